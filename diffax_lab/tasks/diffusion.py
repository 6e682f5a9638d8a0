"""The diffusion task on pixels (``config.task = "diffusion"``; configs/ddpm.py, cfg.py,
cifar10_ddpm.py): unconditional, or class-conditional with classifier-free guidance
(``model.num_classes > 0``, labels dropped to a learned null label at rate
``train.p_uncond``), and classifier guidance from a trained classifier run at sampling time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffax_lab.errors import ConfigError
from diffax_lab.tasks.denoising import DenoisingTask
from diffax_lab.tasks.registry import register


@register
class DiffusionTask(DenoisingTask):
    name = "diffusion"

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.model.cond_dim:
            raise ConfigError(
                "config.model.cond_dim > 0 conditions on CLIP embeddings: that is the "
                "text2img task (config.task='text2img', configs/text2img.py)."
            )
        k = config.model.num_classes
        if config.train.p_uncond > 0 and not k:
            raise ConfigError(
                "config.train.p_uncond > 0 drops the condition, but the model is "
                "unconditional; set model.num_classes or p_uncond=0."
            )
        guided = config.sample.classifier_scale > 0
        labels = tuple(config.sample.labels)
        if labels and not (k or guided):
            raise ConfigError(
                "config.sample.labels is set but the model is unconditional "
                "(model.num_classes=0) and no classifier guides it (sample.classifier_scale=0)."
            )
        if k and any(not isinstance(y, int) or not 0 <= y < k for y in labels):
            raise ConfigError(f"config.sample.labels={labels!r} must be integers in [0, {k}).")
        if any(not isinstance(y, int) or y < 0 for y in labels):
            raise ConfigError(f"config.sample.labels={labels!r} must be integers >= 0.")
        if config.sample.guidance_scale > 0 and not (k and config.train.p_uncond > 0):
            raise ConfigError(
                "config.sample.guidance_scale > 0 needs a conditional model trained with "
                "condition dropout (model.num_classes > 0 and train.p_uncond > 0)."
            )

    @property
    def uses_condition(self) -> bool:
        return bool(self.config.model.num_classes)

    def condition_kwargs(self, cond, train=False, key=None):
        k = self.config.model.num_classes
        if not k:
            return {}  # labels reach only a guiding classifier
        p = self.config.train.p_uncond
        if train and p > 0:  # classifier-free guidance: drop to the null label
            cond = jnp.where(jax.random.bernoulli(key, p, cond.shape), k, cond)
        return {"y": cond}

    def uncond_kwargs(self, cond):
        k = self.config.model.num_classes
        if not k or self.config.train.p_uncond == 0:
            return None
        return {"y": jnp.full_like(cond, k)}

    def sample_conditions(self, num, labels=None):
        if not self.num_labels:
            return None
        labels = labels if labels is not None else tuple(self.config.sample.labels)
        labels = tuple(np.asarray(labels).tolist()) or tuple(range(self.num_labels))
        return np.asarray(labels, np.int32)
