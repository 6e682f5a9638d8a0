"""The classifier task (``config.task = "classifier"``, configs/classifier.py).

``ClassifierExperiment`` is an ``Experiment`` whose model is the U-Net encoder classifier and
whose loss is cross-entropy on x_t: with ``classifier.noise = "diffusion"`` each image is
noised to a uniformly drawn step of the config's schedule (the noise-conditioned classifier
of classifier guidance), with ``"none"`` it sees clean images at t = 0 (the clean classifier
that judges samples). It shares the train loop, state layout, EMA, checkpoints and resume of
the diffusion task.

``load_classifier(workdir, mesh)`` restores a trained one for guidance or evaluation.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax_lab import checkpointing
from diffax_lab.diffusion import process
from diffax_lab.experiment import Experiment
from diffax_lab.models import get_classifier
from diffax_lab.validation import ConfigError
from diffax_lab.workdir import load_run_config

NOISES = ("diffusion", "none")


class ClassifierExperiment(Experiment):
    def build_model(self):
        self.model = get_classifier(self.config.model)

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
        return process.q_sample(x0, self.schedule.alphas_cumprod[idx], noise), self.schedule.times[
            idx
        ]

    def train_loss(self, params, x0, labels, keys):
        _, noise_key, dropout_key = keys
        x_t, t = self.noised(x0, noise_key)
        logits = self.model.apply(
            {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"accuracy": accuracy}

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

    def predict(self, params, images_u8: np.ndarray, batch_size: int = 256, t: float = 0.0):
        """Predicted labels of uint8 images [N, H, W, C] (clean, or noised elsewhere)."""
        fn = jax.jit(self.logits_fn(params))
        preds = []
        for i in range(0, len(images_u8), batch_size):
            x = np.asarray(images_u8[i : i + batch_size], np.float32) / 127.5 - 1.0
            preds.append(np.asarray(jnp.argmax(fn(x, jnp.full((x.shape[0],), t)), -1)))
        return np.concatenate(preds)


def load_classifier(workdir: str, mesh, field: str = "config.sample.classifier_workdir"):
    """(ClassifierExperiment, EMA params) of the latest checkpoint of a classifier run.

    ``field`` names the config field or flag the directory came from, for the errors.
    """
    path = os.path.join(workdir, "config.json")
    if not workdir or not os.path.exists(path):
        raise ConfigError(
            f"{field}={workdir!r} holds no config.json; train a classifier there first: "
            f"python -m diffax_lab.main --config=configs/classifier.py --workdir={workdir or 'DIR'}"
        )
    config = load_run_config(workdir)
    if config.get("task") != "classifier":
        raise ConfigError(
            f"{field}={workdir!r} is a {config.get('task', 'diffusion')!r} run, "
            "not a classifier (configs/classifier.py)."
        )
    exp = ClassifierExperiment(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    state, step = ckpt.restore_latest_good(exp.restore_target)
    ckpt.close()
    if step is None:
        raise ConfigError(f"{field}={workdir!r} has no usable checkpoint; train it first.")
    exp.restored_step = step
    return exp, state["ema_params"]


def check_guidance_classifier(exp: Experiment, classifier_exp: ClassifierExperiment) -> None:
    """The classifier must see what the diffusion model produces: same images, same noise."""
    c, k = exp.config, classifier_exp.config
    where = f"config.sample.classifier_workdir (a classifier for {k.data.name})"
    if (k.data.image_size, k.data.channels) != (c.data.image_size, c.data.channels):
        raise ConfigError(
            f"{where} takes {k.data.image_size}x{k.data.image_size}x{k.data.channels} images, "
            f"the model makes {c.data.image_size}x{c.data.image_size}x{c.data.channels}."
        )
    if (k.diffusion.schedule, k.diffusion.num_timesteps) != (
        c.diffusion.schedule,
        c.diffusion.num_timesteps,
    ):
        raise ConfigError(
            f"{where} was trained on x_t of the {k.diffusion.schedule} schedule with "
            f"T={k.diffusion.num_timesteps}; the model uses {c.diffusion.schedule}, "
            f"T={c.diffusion.num_timesteps}. Train the classifier with the same diffusion section."
        )
    if c.model.num_classes and k.model.num_classes != c.model.num_classes:
        raise ConfigError(
            f"{where} has {k.model.num_classes} classes, the model {c.model.num_classes}."
        )
