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
Training is one AdamW step of the eps-prediction MSE on random data of the config's shape
(as benchmarks/throughput.py times ours); forward is the network at ``--forward_batch``.
Prints one JSON object per mode.
"""

from __future__ import annotations

import json
import platform
import time

from absl import app, flags

from benchmarks.common_flags import define_measurement_flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags; called only when it runs as a script, so that
    importing it (tests, notebooks, other benchmarks) defines no global flags."""
    define_measurement_flags()
    flags.DEFINE_list("modes", ["fp32", "bf16", "bf16_compile"], "fp32 | bf16 | bf16_compile")
    flags.DEFINE_integer("train_batch", 0, "Training batch (0 = config.train.batch_size).")
    flags.DEFINE_integer("threads", 0, "torch.set_num_threads on the CPU (0 = torch's default).")
    flags.DEFINE_string("out", "", "Also append the JSON lines here.")


MODES = ("fp32", "bf16", "bf16_compile")


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
) -> dict:
    """Times one mode; returns its JSON record (train_batch 0 = config.train.batch_size)."""
    size, ch = config.data.image_size, config.data.channels
    T = config.diffusion.num_timesteps
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

    def batch(n):
        x = torch.randn(n, ch, size, size, device=dev).to(memory_format=torch.channels_last)
        t = torch.randint(0, T, (n,), device=dev)
        y = torch.randint(0, num_classes, (n,), device=dev) if num_classes else None
        return x, t, y

    x, t, y = batch(B)
    eps = torch.randn_like(x)

    def train_step():
        with autocast:
            out = net(x, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    fx, ft, fy = batch(FB)

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
    bad = set(FLAGS.modes) - set(MODES)
    if bad:
        raise app.UsageError(f"--modes {sorted(bad)} unknown; choose from {MODES}.")
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
        )
        line = json.dumps(result)
        print(line, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
