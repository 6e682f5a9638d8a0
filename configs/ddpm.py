"""DDPM on Fashion-MNIST (padded to 32x32): linear schedule, T = 1000, eps prediction.

Command:
    python -m diffax_lab.main --config=configs/ddpm.py --workdir=workdirs/ddpm
Variants (``--config=configs/ddpm.py:VARIANT``):
    tiny  -- a 0.1M-parameter U-Net, T = 100, 4 steps: the tests' and quick checks' config
             (well under a minute on a 2-core CPU).
    cpu   -- the smallest setting that draws recognisable garments on a 2-core CPU
             (see README: steps, wall time and the grid are recorded there).
The default trains a 6.5M-parameter U-Net for 20k steps at batch 128. No GPU run has been
recorded yet (docs/BENCHMARKS.md lists what was measured and where). Expected samples:
recognisable garments (shirts, trousers, sneakers, bags) on a black background.
Data: `apt-get install dataset-fashion-mnist`, or set data.dir / $DIFFAX_DATA_DIR.
"""

from ml_collections import ConfigDict

from diffax_lab.diffusion.samplers import DEFAULTS


def get_config(arg: str | None = None) -> ConfigDict:
    config = ConfigDict()
    config.task = (
        "diffusion"  # a task of diffax_lab/tasks: diffusion, text2img, latent_diffusion ...
    )
    config.seed = 0  # base PRNG seed; every step derives its key by fold_in(key, step)

    config.data = ConfigDict()
    config.data.source = "idx"  # idx | tfds | folder
    config.data.name = "fashion_mnist"  # dataset name (tfds name for source=tfds)
    config.data.dir = ""  # '' = $DIFFAX_DATA_DIR, else the Debian package's directory
    config.data.image_size = 32  # pixels; 28x28 inputs are zero-padded to 32x32
    config.data.channels = 1
    config.data.random_flip = False  # left-right flips (garments are not symmetric: off)
    config.data.num_examples = 0  # use the first N training images (0 = all)
    config.data.placement = "device"  # device: dataset on device once; host: gather per step
    # Host-sharded input: 0 = every process reads the whole train split (one global order);
    # k > 0 = k contiguous shards, each process reads only its own (k a multiple of the
    # process count), a step takes batch_size / k from each. The order depends on k, not on
    # the process count: keep k when resuming on another number of hosts.
    config.data.num_shards = 0
    # folder source without a test/ sub-folder: this fraction of the images (chosen by a
    # hash of their paths) is the held-out test split; 0 = no test split.
    config.data.test_fraction = 0.0

    config.model = ConfigDict()
    config.model.name = "unet"  # diffax_lab/models registry: unet classifier clip autoencoder_kl
    config.model.base_channels = 64
    config.model.channel_mult = (1, 2, 2)  # per level; 32 -> 16 -> 8
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (8,)  # feature-map sizes with self-attention
    config.model.attention_heads = 4
    config.model.dropout = 0.1
    config.model.num_groups = 32  # GroupNorm groups
    config.model.activation = "silu"  # silu | gelu | relu
    config.model.time_embedding = "sinusoidal"  # sinusoidal | channel
    # The network sees the time index 1000 t - offset: 0 embeds step i as i + 1 (the lab's
    # default since its first checkpoints), 1 embeds it as i (DDPM's and diffusers' networks).
    config.model.time_index_offset = 0.0
    config.model.downsample = "conv"  # conv | avgpool | maxpool | rearrange
    config.model.upsample = "nearest"  # nearest | bilinear | transpose
    config.model.upsample_kernel = 3  # transpose only: PyTorch ConvTranspose2d semantics
    config.model.upsample_padding = 1
    config.model.upsample_output_padding = 1
    config.model.num_classes = 0  # > 0: class-conditional (labels from the data)
    config.model.cond_dim = 0  # > 0: vector-conditional
    # > 0: spatial transformers (self-attention, cross-attention to a token sequence of this
    # width, GEGLU) replace the attention blocks (models/transformer.py; text.conditioning
    # = "tokens" of text2img / latent_diffusion)
    config.model.cross_attention_dim = 0
    config.model.transformer_depth = 1  # transformer blocks per spatial transformer
    config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    # Options of diffusers' UNet2DModel (python -m diffax_lab.convert and
    # init.from_diffusers set them from a folder's config.json); the defaults are the lab's.
    config.model.time_scale = 1000.0  # the network embeds time_scale * t - time_index_offset
    config.model.time_flip_sin_to_cos = False  # cos before sin (diffusers' flip_sin_to_cos)
    config.model.time_freq_shift = 1.0  # frequencies 10000^(-k / (half - shift)) (freq_shift)
    config.model.norm_eps = 1e-6  # every GroupNorm's epsilon (diffusers' norm_eps)
    config.model.downsample_padding = 1  # 1: pad (1, 1); 0: pad (0, 1) as diffusers' 0
    config.model.attention_head_dim = 0  # > 0: width / head_dim heads (not attention_heads)
    config.model.attention_levels = ()  # levels (0 = full size) with attention at any size
    config.model.mid_attention = True  # attention between the two middle ResBlocks
    config.model.center_input = False  # x -> 2 x - 1 first (center_input_sample)
    config.model.outer_activation = ""  # time MLP and output head; '' = model.activation
    # Ablation switches (notebooks/02_unet_ablation.py); UNet2DModel export needs the defaults.
    config.model.norm = "group"  # group: GroupNorm in blocks, attention, head | none
    config.model.residual = True  # False: ResBlocks are two convs without the skip path

    # Start from pretrained weights (tasks/denoising.py): a diffusers UNet2DModel folder
    # (config.json + diffusion_pytorch_model.safetensors, or a pipeline holding unet/). Its
    # config.json sets the model section (a model field set to another value is refused by
    # name) and its scheduler_config.json the diffusion section; '' = random init.
    config.init = ConfigDict()
    config.init.from_diffusers = ""

    config.diffusion = ConfigDict()
    config.diffusion.schedule = "linear"  # linear | cosine | sigmoid
    config.diffusion.num_timesteps = 1000  # T
    config.diffusion.prediction = "eps"  # eps | x0 | v
    config.diffusion.loss_weighting = "uniform"  # uniform (L_simple) | min_snr | elbo
    config.diffusion.min_snr_gamma = 5.0

    config.optim = ConfigDict()
    config.optim.optimizer = "adamw"  # adamw | adam
    config.optim.lr = 2e-4  # peak learning rate
    config.optim.warmup_steps = 500  # linear warm-up from 0
    config.optim.lr_schedule = "constant"  # constant | cosine (decays to 0 at num_steps)
    config.optim.decay_steps = 0  # cosine horizon in steps; 0 = train.num_steps of the first run
    config.optim.weight_decay = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 1.0  # global-norm clip; 0 = off
    config.optim.ema_decay = 0.999  # EMA of the parameters, used for samples
    # The update on one vector ("flat") or per parameter leaf ("tree"); "auto": flat on the
    # CPU with replicated parameters (cuts the train step's compile there; optimizer.py).
    config.optim.update_layout = "auto"

    config.train = ConfigDict()
    config.train.batch_size = 128  # global batch, over all devices
    config.train.num_steps = 20_000  # total; re-running resumes and continues to this
    config.train.num_devices = 0  # 0 = all visible devices
    # Micro-batches per step: the batch_size images pass in grad_accum slices of
    # batch_size / grad_accum (a lax.scan summing gradients); same update, less memory.
    config.train.grad_accum = 1
    # Devices each parameter / optimizer leaf is split over (FSDP); the mesh is
    # (num_devices / fsdp, fsdp), the batch split over all. 1 = replicated (data parallel).
    config.train.fsdp = 1
    config.train.p_uncond = 0.0  # probability of dropping the label (classifier-free guidance)
    config.train.log_every = 100  # steps between metrics.jsonl lines
    config.train.checkpoint_every = 2000
    config.train.sample_every = 5000  # 0 = never during training
    config.train.keep_checkpoints = 3
    config.train.tensorboard = False  # also write TensorBoard events (needs tensorboardX)
    config.train.progress_bar = True
    # Steps whose loss, gradients or updated parameters are not finite are skipped (state
    # unchanged) and counted in metrics.jsonl ("skipped"); this many in a row stop the run.
    config.train.max_consecutive_skips = 10
    config.train.fault_nan_steps = ()  # testing aid: steps whose loss is forced to NaN
    config.train.checkpoint_every_secs = 600  # also save after this much wall time; 0 = off
    # When every checkpoint fails its checksum: False refuses to start (exit 2); True starts
    # again from step 0 (the bad ones stay in DIR/checkpoints_corrupt).
    config.train.restart_if_corrupt = False

    config.sample = ConfigDict()
    config.sample.num = 64  # images in the grid and the .npz
    config.sample.batch_size = 64
    config.sample.seed = 0
    # Defaults shared with the library's samplers.sample (samplers.DEFAULTS):
    config.sample.sampler = DEFAULTS["sampler"]  # ddpm ddim dpm_solver++ euler heun pc ode ...
    config.sample.num_steps = DEFAULTS["num_steps"]  # 0 = all T steps
    config.sample.spacing = DEFAULTS["spacing"]  # uniform | quadratic
    config.sample.variance = DEFAULTS["variance"]  # ddpm only: beta | beta_tilde
    config.sample.eta = DEFAULTS["eta"]  # ddim only
    config.sample.clip_x0 = DEFAULTS["clip_x0"]  # clip predicted x0 to [-c, c]; 0 = off
    # Score-SDE samplers (diffusion/sde_samplers.py): pc = predictor-corrector, ode = the
    # probability-flow ODE with an adaptive diffrax solver (num_steps must be 0 for it).
    config.sample.predictor = "reverse_diffusion"  # pc: reverse_diffusion | ancestral
    config.sample.corrector = "langevin"  # pc: langevin | none
    config.sample.snr = 0.16  # pc: Langevin signal-to-noise ratio (Song et al. 2021)
    config.sample.corrector_steps = 1  # pc: Langevin steps per predictor step
    config.sample.solver = "tsit5"  # ode: tsit5 | dopri5
    config.sample.rtol = 1e-5  # ode: relative tolerance
    config.sample.atol = 1e-5  # ode: absolute tolerance
    config.sample.num_strip = 8  # frames in the forward and reverse strips
    # Class-conditional models (model.num_classes > 0):
    config.sample.labels = ()  # labels to draw; () = cycle through the classes
    # CFG weight w of Ho & Salimans: (1 + w) eps_cond - w eps_uncond. Note: diffusers'
    # guidance_scale s is 1 + w (eps_uncond + s (eps_cond - eps_uncond)); w = 0 is conditional.
    config.sample.guidance_scale = 0.0
    # Classifier guidance (Dhariwal & Nichol 2021): eps - s sqrt(1 - abar) grad log p(y | x_t)
    # with the noise-conditioned classifier trained in classifier_workdir (configs/classifier.py).
    config.sample.classifier_scale = 0.0  # s; 0 = off
    config.sample.classifier_workdir = ""
    # Rows of guidance_sweep.png: CFG weights w for a model trained with p_uncond > 0, else
    # classifier scales s (with sample.classifier_workdir set).
    config.sample.sweep_scales = (0.0, 1.0, 3.0)

    config.eval = ConfigDict()
    # Evaluators (diffax_lab/evaluators) by name: loss, fd, kid, pr, bpd, clip_score, accuracy,
    # zero_shot, reconstruction; () = the task's defaults (loss, + fd/kid/pr with a judge,
    # + bpd when asked).
    config.eval.metrics = ()
    config.eval.num_examples = 2048  # test images for the held-out loss
    config.eval.batch_size = 256
    # Sample metrics (FD, KID, precision/recall; accuracy for labelled samples) in the feature
    # space of the clean classifier trained in judge_workdir (configs/classifier.py:clean);
    # '' = skip them. Samples are drawn with the sample section's sampler and guidance.
    config.eval.judge_workdir = ""
    config.eval.num_samples = 1000  # generated images per evaluation
    config.eval.num_reference = 10_000  # real test images (the reference set, cached)
    config.eval.kid_subset_size = 1000
    config.eval.kid_num_subsets = 100
    config.eval.pr_k = 3  # k of the k-NN manifolds of precision/recall
    config.eval.floor = True  # also: real train images vs the reference (the metrics' floor)
    config.eval.bpd_num_examples = 0  # test images for bits/dim (0 = skip)
    config.eval.bpd_num_terms = 0  # 0 = all T terms of the bound, else stratified n of them
    # ode_bpd (eval.metrics): bits/dim by the probability-flow ODE, uniform dequantization,
    # Hutchinson-Skilling divergence with ode_probes probes (rademacher | gaussian).
    config.eval.ode_num_examples = 256  # test images
    config.eval.ode_probes = 4
    config.eval.ode_probe = "rademacher"
    config.eval.ode_solver = "tsit5"  # tsit5 | dopri5
    config.eval.ode_rtol = 1e-5
    config.eval.ode_atol = 1e-5
    config.eval.ode_eps = 1e-3  # integrate from t = eps (DDPM networks: >= 1 / T)
    config.eval.every_steps = 0  # > 0: sample metrics during training, into metrics.jsonl
    config.eval.checkpoint_step = 0  # --mode=eval on this saved step (0 = the latest)
    # FID / KID in Inception space (evaluators fid_inception, kid_inception): pytorch-fid's
    # Inception-v3 converted once to safetensors (README, "Pretrained weights"), and the
    # reference statistics: a pytorch-fid .npz (mu, sigma), or '' = computed from the
    # eval.fid_reference_split of the data (eval.num_reference images), cached beside the
    # weights in inception_cache/.
    config.eval.inception_weights = ""
    config.eval.fid_reference_stats = ""
    config.eval.fid_reference_split = "train"  # train | test (papers: CIFAR-10 train, 50k)
    config.eval.inception_batch_size = 100

    if arg in (None, ""):
        return config
    if arg == "tiny":
        config.data.num_examples = 512
        config.model.base_channels = 16
        config.model.channel_mult = (1, 2)
        config.model.num_res_blocks = 1
        config.model.attention_resolutions = (16,)
        config.model.attention_heads = 1
        config.model.num_groups = 8
        config.diffusion.num_timesteps = 100
        config.optim.warmup_steps = 2
        config.train.batch_size = 16
        config.train.num_steps = 4
        config.train.log_every = 2
        config.train.checkpoint_every = 2
        config.train.sample_every = 4
        config.train.progress_bar = False
        config.sample.num = 4
        config.sample.batch_size = 4
        config.sample.num_strip = 4
        config.eval.num_examples = 64
        config.eval.batch_size = 32
        return config
    if arg == "cpu":
        # Sized for 2 CPU cores (~1 s a step there): native 28x28, two levels, 0.65M params.
        config.data.image_size = 28
        config.model.base_channels = 32
        config.model.channel_mult = (1, 2)  # 28 -> 14; self-attention in the middle only
        config.model.num_res_blocks = 1
        config.model.attention_resolutions = ()
        config.model.num_groups = 8
        config.model.dropout = 0.0
        config.optim.lr = 1e-3
        config.optim.warmup_steps = 200
        config.optim.ema_decay = 0.995
        config.train.batch_size = 32
        config.train.num_steps = 2000
        config.train.log_every = 100
        config.train.checkpoint_every = 500
        config.train.sample_every = 0
        config.sample.num = 64
        config.sample.sampler = "ddim"
        config.sample.num_steps = 100
        return config
    raise ValueError(f"Unknown variant {arg!r} of configs/ddpm.py; choose '', 'tiny' or 'cpu'.")
