"""A classifier of Fashion-MNIST on noisy or clean images (the U-Net's encoder half, pooled).

Commands:
    # noise-conditioned, for classifier guidance (x_t at every step of the linear schedule):
    python -m diffax_lab.main --config=configs/classifier.py --workdir=workdirs/classifier
    # clean (t = 0), the judge of samples and the feature space of evaluation:
    python -m diffax_lab.main --config=configs/classifier.py:clean --workdir=workdirs/clean
    python -m diffax_lab.main --config=configs/classifier.py:clean --workdir=workdirs/clean \
        --mode=eval   # test accuracy -> workdirs/clean/eval/step_N.json
    # then guide a diffusion model of the same image size and schedule with it:
    python -m diffax_lab.main --config=configs/ddpm.py --workdir=workdirs/ddpm --mode=sample \
        --config.sample.classifier_scale=3 --config.sample.classifier_workdir=workdirs/classifier
Variants, comma-separated (``:cpu,clean``):
    clean -- t fixed at 0 (no noise);
    cpu   -- 28x28 to match configs/ddpm.py:cpu and configs/cfg.py:cpu, sized for 2 CPU cores;
    tiny  -- the tests' size.
The data, diffusion (schedule, T) and image-size fields mean what they mean in
configs/ddpm.py: a guiding classifier must share them with the model it guides (checked).
model.num_classes is here the number of outputs. Measured accuracies: docs/BENCHMARKS.md.
"""

from ml_collections import ConfigDict

from diffax_lab.config_lib import base, parse_variants

VARIANTS = ("clean", "cpu", "tiny")


def get_config(arg: str | None = None):
    variants = parse_variants(arg, VARIANTS, "configs/classifier.py")
    size = "tiny" if "tiny" in variants else "cpu" if "cpu" in variants else None
    config = base("ddpm", size)  # data, diffusion and image size of the matching model
    config.task = "classifier"
    config.classifier = ConfigDict()
    config.classifier.noise = "none" if "clean" in variants else "diffusion"  # diffusion | none

    m = config.model
    m.name = "classifier"
    m.num_classes = 10  # outputs
    m.cond_dim = 0
    m.base_channels = 32
    m.channel_mult = (1, 2, 2)  # 32 -> 16 -> 8 (28 -> 14 -> 7)
    m.num_res_blocks = 2
    m.attention_resolutions = ()
    m.num_groups = 8
    m.dropout = 0.1

    o = config.optim
    o.lr = 1e-3
    o.warmup_steps = 200
    o.lr_schedule = "cosine"
    o.weight_decay = 0.05
    o.ema_decay = 0.999

    t = config.train
    t.batch_size = 128
    t.num_steps = 10_000
    t.checkpoint_every = 2000
    t.sample_every = 0  # a classifier has nothing to draw
    config.sample.classifier_scale = 0.0
    config.eval.num_examples = 10_000  # the whole test set
    config.eval.batch_size = 500
    config.eval.times = (0.0, 0.25, 0.5, 0.75)  # accuracy on x_t at these t (noisy classifier)

    if size == "cpu":
        m.num_res_blocks = 1
        t.batch_size = 64
        t.num_steps = 1200
        t.checkpoint_every = 1000
    elif size == "tiny":
        m.base_channels = 16
        m.channel_mult = (1, 2)
        m.num_res_blocks = 1
        o.warmup_steps = 2
        t.batch_size = 16
        t.num_steps = 4
        config.eval.num_examples = 32
        config.eval.batch_size = 16
    return config
