"""``psnr``, ``ssim``: how close an upsampler's outputs are to the real high-resolution
images they were made from (full-reference quality, ``metrics/image_quality.py``).

The task's ``eval_samples`` upsamples the low-resolution versions of the first
``eval.num_samples`` test images (a diffusion upsampler with the sample section's sampler,
guidance and ``sample.aug_level``); the hook ``paired_reference(n)`` gives the real
high-resolution test images in the same order. PSNR and SSIM are on uint8 pixels
(data range 255), averaged over images. The judge's FD and accuracy of the same samples
come from ``sample_quality`` (``fd``), which shares the drawn samples.
"""

from __future__ import annotations

import numpy as np

from diffax_lab.errors import ConfigError
from diffax_lab.evaluators import Context, EvaluatorBase
from diffax_lab.metrics.image_quality import psnr, ssim


class Evaluator(EvaluatorBase):
    def prepare(self):
        if not hasattr(self.task, "paired_reference"):
            raise ConfigError(
                f"config.eval.metrics asks for {list(self.metrics)}, but a {self.task.name!r} "
                "task makes no images paired with real ones (an upsampler does: "
                "configs/superres.py, configs/upsampler.py)."
            )

    def run(self, ctx: Context) -> dict:
        fake_u8, _, info = ctx.samples
        real_u8 = self.task.paired_reference(len(fake_u8))
        report = {**info, "paired_num": int(len(fake_u8))}
        if "psnr" in self.metrics:
            p = psnr(fake_u8, real_u8)
            report["psnr"] = float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else 99.0
        if "ssim" in self.metrics:
            report["ssim"] = float(np.mean(ssim(fake_u8, real_u8)))
        return report
