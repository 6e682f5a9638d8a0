"""The PyTorch peer: the same U-Net built with diffusers' ``UNet2DModel``, timed the same way.

    python -m benchmarks.diffusers_peer --config=configs/cifar10_ddpm.py \
        [--modes=fp32,bf16,bf16_compile] [--train_batch=128] [--forward_batch=256] \
        [--iters=10] [--out=FILE]

Needs ``pip install -e .[peer]`` (torch, diffusers); nothing of it is imported by the lab.
The network comes from the config's ``model`` section, mapped onto ``UNet2DModel`` as the
google/ddpm-cifar10-32 checkpoint does (DownBlock2D / AttnDownBlock2D per level, attention
where the feature map's size is in ``attention_resolutions``, a ResNet-attention-ResNet
middle, sinusoidal time embedding). Its parameter count is printed beside ours, so a
mismatch shows. Modes:
    fp32          eager float32 (TF32 matmuls and convolutions allowed on GPUs, PyTorch's
                  usual fast setting);
    bf16          eager under ``torch.autocast(dtype=bfloat16)``;
    bf16_compile  the same under ``torch.compile`` (compile time reported apart).
Training is one step of the eps-prediction MSE that does the lab's train step's work
(``TrainWork``: a batch drawn from uint8 images, noise, timesteps, ``add_noise``, forward,
backward, gradient clipping, AdamW, EMA); ``--peer_step=network`` keeps only forward,
backward, clipping and AdamW on a fixed batch, as in docs/BENCHMARKS.md's earlier
figures. Forward is the network at ``--forward_batch``. Prints one JSON object per mode.
"""

from __future__ import annotations

import json
import platform
import time

from absl import app, flags

from benchmarks.common_flags import (
    PEER_STEPS,
    check_choices,
    define_measurement_flags,
    define_peer_step_flag,
)

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    define_measurement_flags()
    flags.DEFINE_list("modes", ["fp32", "bf16", "bf16_compile"], "fp32 | bf16 | bf16_compile")
    flags.DEFINE_integer("train_batch", 0, "Training batch (0 = config.train.batch_size).")
    flags.DEFINE_integer("threads", 0, "torch.set_num_threads on the CPU (0 = torch's default).")
    define_peer_step_flag()
    flags.DEFINE_string("out", "", "Also append the JSON lines here.")


MODES = ("fp32", "bf16", "bf16_compile")


class TrainWork:
    """The peer's train step around the network, as the lab's step does it.

    ``step="full"``: each step draws B of ``max(B, 1024)`` uint8 images and scales them to
    [-1, 1], draws Gaussian noise and uniform timesteps, noises the batch with
    ``DDPMScheduler.add_noise``, and after AdamW updates diffusers' ``EMAModel`` (foreach,
    decay ``optim.ema_decay``): the work diffusers' unconditional training example does
    each step with ``--use_ema``, and what the lab's jitted step has always included.
    ``step="network"`` (the peer of docs/BENCHMARKS.md's earlier figures) reuses one
    fixed noisy batch and has no EMA, so its rate is an upper bound on the full step's.
    The noise schedule's values do not change the cost, so the scheduler keeps
    diffusers' default betas.
    """

    def __init__(self, torch, model, config, batch_size: int, dev, step: str = "full"):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        if step not in PEER_STEPS:
            raise ValueError(f"Peer step={step!r}: choose one of {PEER_STEPS}.")
        self.torch, self.full, self.B, self.dev = torch, step == "full", batch_size, dev
        c = config
        self.T = c.diffusion.num_timesteps
        self.shape = (c.data.channels, c.data.image_size, c.data.image_size)
        n = max(batch_size, 1024)
        self.images = torch.randint(0, 256, (n, *self.shape), dtype=torch.uint8, device=dev)
        self.scheduler = DDPMScheduler(num_train_timesteps=self.T)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(dev)
        self.ema = EMAModel(model.parameters(), decay=c.optim.ema_decay, foreach=True)
        self.model = model
        self.x, self.t = self.noise_batch(batch_size)
        self.eps = torch.randn_like(self.x)

    def noise_batch(self, n):
        """(Gaussian images [n, C, H, W] in channels-last memory, uniform timesteps)."""
        torch = self.torch
        x = torch.randn(n, *self.shape, device=self.dev)
        return x.to(memory_format=torch.channels_last), torch.randint(
            0, self.T, (n,), device=self.dev
        )

    def batch(self):
        """(noisy images, timesteps, noise): drawn afresh (``full``) or the fixed batch."""
        if not self.full:
            return self.x, self.t, self.eps
        torch = self.torch
        idx = torch.randint(0, self.images.shape[0], (self.B,), device=self.dev)
        x0 = self.images[idx].float().div_(127.5).sub_(1.0)
        x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.T, (self.B,), device=self.dev)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def after_update(self):
        """The EMA step (``full``); nothing for ``network``."""
        if self.full:
            self.ema.step(self.model.parameters())


def unet_kwargs(model_config, image_size: int, channels: int) -> dict:
    """UNet2DModel arguments for the lab's U-Net config (documented above)."""
    c = model_config
    if c.time_embedding != "sinusoidal" or c.downsample != "conv" or c.upsample != "nearest":
        raise ValueError(
            "The diffusers peer models the DDPM U-Net only: model.time_embedding='sinusoidal', "
            "model.downsample='conv', model.upsample='nearest'."
        )
    if c.cond_dim:
        raise ValueError("The diffusers peer has no vector condition: set model.cond_dim=0.")
    widths = [c.base_channels * m for m in c.channel_mult]
    sizes = [image_size // 2**i for i in range(len(widths))]
    attn = [s in tuple(c.attention_resolutions) for s in sizes]
    return dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        layers_per_block=c.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=widths[-1] // c.attention_heads,
        norm_num_groups=c.num_groups,
        dropout=c.dropout,
        act_fn=c.activation,
        time_embedding_type="positional",
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        num_class_embeds=(c.num_classes + 1) if c.num_classes else None,
    )


def run_mode(
    mode,
    torch,
    UNet2DModel,
    dev,
    kwargs,
    config,
    *,
    train_batch: int,
    forward_batch: int,
    iters: int,
    step: str = "full",
) -> dict:
    """Times one mode; returns its JSON record (train_batch 0 = config.train.batch_size)."""
    B = train_batch or config.train.batch_size
    FB = forward_batch
    num_classes = config.model.num_classes

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = UNet2DModel(**kwargs).to(dev).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    net = model
    compile_s = None
    if mode == "bf16_compile":
        net = torch.compile(model)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode != "fp32")

    work = TrainWork(torch, model, config, B, dev, step)

    def labels(n):  # drawn once: the lab's step gathers them with the images, at no cost
        return torch.randint(0, num_classes, (n,), device=dev) if num_classes else None

    y = labels(B)

    def train_step():
        x, t, eps = work.batch()
        with autocast:
            out = net(x, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        work.after_update()
        return loss

    (fx, ft), fy = work.noise_batch(FB), labels(FB)

    @torch.no_grad()
    def forward():
        with autocast:
            return net(fx, ft, class_labels=fy).sample

    def timed(fn):
        t0 = time.perf_counter()
        fn()  # warm-up (and, under torch.compile, compilation)
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters, first

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    train_s, train_first = timed(train_step)
    model.eval()
    fwd_s, fwd_first = timed(forward)
    if mode == "bf16_compile":
        compile_s = {"train_first_call_s": train_first, "forward_first_call_s": fwd_first}
    result = {
        "peer": "diffusers.UNet2DModel",
        "mode": mode,
        "device": torch.cuda.get_device_name()
        if dev.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": n_params,
        "peer_step": step,
        "train_batch": B,
        "train_images_per_s": B / train_s,
        "forward_batch": FB,
        "forward_images_per_s": FB / fwd_s,
        "compile": compile_s,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
        ),
    }
    return result


def setup_torch(torch):
    """The device, with PyTorch's usual fast settings (TF32, cuDNN autotuning) on GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv):
    del argv
    import torch
    from diffusers import UNet2DModel

    config = FLAGS.config
    check_choices("modes", FLAGS.modes, MODES)
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    dev = setup_torch(torch)
    kwargs = unet_kwargs(config.model, config.data.image_size, config.data.channels)
    for mode in FLAGS.modes:
        result = run_mode(
            mode,
            torch,
            UNet2DModel,
            dev,
            kwargs,
            config,
            train_batch=FLAGS.train_batch,
            forward_batch=FLAGS.forward_batch,
            iters=FLAGS.iters,
            step=FLAGS.peer_step,
        )
        line = json.dumps(result)
        print(line, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
