"""The diffusion maths, no networks: schedules, forward process, SDEs, losses, samplers."""

from diffax_lab.diffusion import edm, sde, sde_samplers
from diffax_lab.diffusion.losses import get_loss_fn, get_ve_loss_fn
from diffax_lab.diffusion.samplers import SAMPLERS, register_sampler, sample
from diffax_lab.diffusion.schedules import DiscreteSchedule, get_schedule
from diffax_lab.diffusion.sde import SDES, VESDE, VPSDE, SubVPSDE, get_sde

__all__ = [
    "DiscreteSchedule",
    "SAMPLERS",
    "SDES",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "edm",
    "get_loss_fn",
    "get_schedule",
    "get_sde",
    "get_ve_loss_fn",
    "register_sampler",
    "sample",
    "sde",
    "sde_samplers",
]
