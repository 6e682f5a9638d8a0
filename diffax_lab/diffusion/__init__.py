"""The diffusion maths, no networks: schedules, forward process, losses, samplers."""

from diffax_lab.diffusion.losses import get_loss_fn
from diffax_lab.diffusion.samplers import SAMPLERS, register_sampler, sample
from diffax_lab.diffusion.schedules import DiscreteSchedule, get_schedule

__all__ = [
    "DiscreteSchedule",
    "SAMPLERS",
    "get_loss_fn",
    "get_schedule",
    "register_sampler",
    "sample",
]
