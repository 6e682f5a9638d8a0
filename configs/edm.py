"""EDM (Karras et al. 2022) on Fashion-MNIST: the U-Net of configs/ddpm.py trained as the
preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), ln sigma ~
N(-1.2, 1.2^2), loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; sampled with
EDM's sampler (``edm``: Heun on the rho = 7 grid from sigma 80 to 0.002, 18 steps = 35
network evaluations; sample.S_churn > 0 for the stochastic Algorithm 2). The task is
diffax_lab/tasks/edm.py; every sampler of the registry works (ddim, dpm_solver++, pc, ode...).

Commands:
    python -m diffax_lab.main --config=configs/edm.py --workdir=workdirs/edm
    python -m diffax_lab.main --config=configs/edm.py --workdir=workdirs/edm --mode=sample \
        --config.sample.S_churn=40 --config.sample.S_tmin=0.05 --config.sample.S_tmax=50 \
        --config.sample.S_noise=1.003         # stochastic sampler (EDM's ImageNet settings)
    python -m diffax_lab.main --config=configs/edm.py --workdir=workdirs/edm --mode=eval \
        --config.eval.metrics='("loss","bpd","ode_bpd")' --config.eval.bpd_num_examples=256
Variants, comma-separated (``:cpu,ve``):
    tiny -- the tests' size (configs/ddpm.py:tiny's U-Net, T = 100, 4 train steps, 4 sample
            steps); seconds on a 2-core CPU.
    cpu  -- configs/ddpm.py:cpu's 0.65M-parameter U-Net at 28x28, batch 32, lr 1e-3.
    ve   -- VE-SDE training instead (Song et al. 2021, NCSN++-style): a sigma-conditioned
            score network (score = F / sigma), sigma one of 1000 geometric levels from 0.01
            to 50, denoising score matching with lambda(sigma) = sigma^2; sampled with
            predictor-corrector (reverse diffusion + Langevin, snr 0.16) or sample.sampler=ode.
Device, time and result: measured on a 2-core CPU, shared with other jobs: ``:cpu`` for 300
steps (the size of the DDPM model it is compared with) in docs/BENCHMARKS.md, "Continuous
time" (FD and judge accuracy per sampler, ODE bits/dim). No GPU run and no full-size run has
been recorded; expected of the full-size default: recognisable garments at 35 evaluations.
Data: `apt-get install dataset-fashion-mnist`, or set data.dir / $DIFFAX_DATA_DIR.
"""

from diffax_lab.config_lib import base, parse_variants

VARIANTS = ("tiny", "cpu", "ve")


def get_config(arg: str | None = None):
    variants = parse_variants(arg, VARIANTS, "configs/edm.py")
    size = "tiny" if "tiny" in variants else "cpu" if "cpu" in variants else None
    config = base("ddpm", size)
    config.task = "edm"

    d = config.diffusion
    d.prediction = "x0"  # what the samplers see: D(x; sigma) (the network is F)
    d.preconditioning = "edm"  # edm (Karras et al. 2022) | ve (score = F / sigma, NCSN++)
    d.sigma_min = 0.002  # the sigma range of the sampling grid (and of VE training)
    d.sigma_max = 80.0
    d.sigma_data = 0.5  # edm: c_skip, c_out, c_in and the loss weight
    d.p_mean = -1.2  # edm: ln sigma ~ N(p_mean, p_std^2) in training
    d.p_std = 1.2
    d.num_scales = 0  # ve: geometric training levels (0 = continuous sigma(t), t ~ U)
    # diffusion.num_timesteps (T) is the number of steps of the sigma grid the samplers
    # use (geometric in sigma); diffusion.schedule and loss_weighting are not used.

    s = config.sample
    s.sampler = "edm"  # Algorithm 2 (Algorithm 1 at S_churn = 0): 2 num_steps - 1 evaluations
    s.num_steps = 4 if size == "tiny" else 18
    s.S_churn = 0.0  # > 0: the stochastic sampler
    s.S_tmin = 0.0
    s.S_tmax = 1e9  # no upper limit on the churn window
    s.S_noise = 1.0

    if "ve" in variants:
        d.preconditioning = "ve"
        d.sigma_min = 0.01
        d.sigma_max = 50.0
        d.num_scales = 1000
        s.sampler = "pc"  # reverse diffusion + one Langevin step at snr 0.16
        s.predictor = "reverse_diffusion"
        s.corrector = "langevin"
        s.num_steps = 4 if size == "tiny" else 100 if size == "cpu" else 0
    return config
