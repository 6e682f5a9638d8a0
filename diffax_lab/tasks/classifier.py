"""The classifier task (``config.task = "classifier"``, configs/classifier.py).

The U-Net's encoder half, pooled, trained with cross-entropy on x_t: with
``classifier.noise = "diffusion"`` each image is noised to a uniformly drawn step of the
config's schedule (the noise-conditioned classifier of classifier guidance), with
``"none"`` it sees clean images at t = 0 (the clean classifier that judges samples: its
pooled features are the feature space of the sample metrics, ``feature_extractor``).
Evaluation (evaluator ``accuracy``): test accuracy on clean images and on x_t at
``eval.times``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax_lab.config_lib import check_choice, check_number
from diffax_lab.diffusion import get_schedule, process
from diffax_lab.errors import ConfigError
from diffax_lab.metrics.features import params_digest
from diffax_lab.models import get_model
from diffax_lab.tasks.base import Task, predict_in_batches
from diffax_lab.tasks.denoising import check_diffusion_section, check_unet_section
from diffax_lab.tasks.registry import register

NOISES = ("diffusion", "none")


class ClassifierFeatures:
    """A trained clean classifier as a feature space (pooled penultimate layer)."""

    def __init__(self, task, params, batch_size: int = 500):
        self.task, self.params, self.batch_size = task, params, batch_size
        self.config = task.config
        self.name = f"classifier-{task.config.data.name}-{params_digest(params)}"
        self.num_classes = task.config.model.num_classes
        self._features = jax.jit(task.features_fn(params))

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        return predict_in_batches(self._features, images_u8, self.batch_size)

    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        return self.task.predict(self.params, images_u8, self.batch_size)


@register
class ClassifierTask(Task):
    name = "classifier"
    section = "classifier"
    section_hint = "noise: see configs/classifier.py"
    metrics = ("accuracy",)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_choice(config, "classifier.noise", NOISES)
        check_unet_section(config)
        check_diffusion_section(config)
        check_number(config, "model.num_classes", low=2, integer=True)
        if config.model.cond_dim or config.train.p_uncond:
            raise ConfigError(
                "A classifier takes no condition: set model.cond_dim=0 and train.p_uncond=0."
            )
        for t in tuple(config.eval.get("times", (0.0,))):
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
                raise ConfigError(
                    f"config.eval.times={tuple(config.eval.times)!r} must lie in [0, 1]."
                )

    def build(self):
        c = self.config
        self.schedule = get_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
        self.model = get_model(c)

    def init_params(self, key):
        x = jnp.zeros((1, *self.image_shape))
        return self.model.init(key, x, jnp.zeros((1,)))["params"]

    def noised(self, x0, key):
        """(x_t, t): x0 noised to uniformly drawn schedule steps, or (x0, 0) for "none"."""
        b = x0.shape[0]
        if self.config.classifier.noise == "none":
            return x0, jnp.zeros((b,))
        step_key, noise_key = jax.random.split(key)
        idx = jax.random.randint(step_key, (b,), 0, self.schedule.num_steps)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        x_t = process.q_sample(x0, self.schedule.alphas_cumprod[idx], noise)
        return x_t, self.schedule.times[idx]

    def train_loss(self, params, x0, labels, keys):
        _, noise_key, dropout_key = keys
        x_t, t = self.noised(x0, noise_key)
        logits = self.model.apply(
            {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"accuracy": accuracy}

    # ----- what other tasks and evaluators use -----
    def logits_fn(self, params):
        def fn(x, t):
            return self.model.apply({"params": params}, x, t)

        return fn

    def log_prob_fn(self, params):
        """(x_t, t, y) -> [B] log p(y | x_t): what classifier guidance differentiates."""

        def fn(x, t, y):
            logp = jax.nn.log_softmax(self.model.apply({"params": params}, x, t), -1)
            return jnp.take_along_axis(logp, y[:, None], -1)[:, 0]

        return fn

    def features_fn(self, params):
        """x -> [B, F] penultimate (pooled) features of clean images (t = 0)."""

        def fn(x):
            t = jnp.zeros((x.shape[0],))
            return self.model.apply({"params": params}, x, t, return_features=True)[1]

        return fn

    def feature_extractor(self, params, batch_size: int = 500) -> ClassifierFeatures:
        return ClassifierFeatures(self, params, batch_size)

    def predict(self, params, images_u8: np.ndarray, batch_size: int = 256, t: float = 0.0):
        """Predicted labels of uint8 images [N, H, W, C] (clean, or noised elsewhere)."""
        logits = self.logits_fn(params)
        fn = jax.jit(lambda x: jnp.argmax(logits(x, jnp.full((x.shape[0],), t)), -1))
        return predict_in_batches(fn, images_u8, batch_size)

    def eval_times(self) -> tuple[float, ...]:
        if self.config.classifier.noise == "none":
            return (0.0,)
        return tuple(self.config.eval.get("times", (0.0,)))

    def correct_fn(self):
        """Jitted (params, x_u8, y, t, key) -> number of correct predictions on x_t."""

        @jax.jit
        def correct(params, x_u8, y, t, key):
            x0 = x_u8.astype(jnp.float32) / 127.5 - 1.0
            ab = self.schedule.alpha_bar_at(jnp.full((x0.shape[0],), t))
            x_t = process.q_sample(x0, ab, jax.random.normal(key, x0.shape))
            x_t = jnp.where(t > 0, x_t, x0)  # t = 0: the clean images themselves
            logits = self.model.apply({"params": params}, x_t, jnp.full((x0.shape[0],), t))
            return jnp.sum(jnp.argmax(logits, -1) == y)

        return correct
