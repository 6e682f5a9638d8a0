"""The diffusion task on pixels (``config.task = "diffusion"``; configs/ddpm.py, cfg.py,
cifar10_ddpm.py): unconditional, or class-conditional with classifier-free guidance
(``model.num_classes > 0``, labels dropped to a learned null label at rate
``train.p_uncond``), and classifier guidance from a trained classifier run at sampling time.
Everything it does is ``DenoisingTask``'s on the pixels themselves.
"""

from __future__ import annotations

from diffax_lab.errors import ConfigError
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register


@register
class DiffusionTask(DenoisingTask):
    name = "diffusion"
    metrics = (*DenoisingTask.metrics, "ode_bpd")  # ode_bpd: as the VP-SDE (linear schedule)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.model.cond_dim:
            raise ConfigError(
                "config.model.cond_dim > 0 conditions on CLIP embeddings: that is the "
                "text2img task (config.task='text2img', configs/text2img.py)."
            )
