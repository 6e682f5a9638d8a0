"""Builds everything a run needs from a config: model, schedule, loss, optimizer, state, step.

The train state is one pytree ``{params, ema_params, opt_state, step, rng}``. Its abstract
form (``jax.eval_shape``) gives the shardings, the ``out_shardings`` of the jitted init and
the restore target of a checkpoint, so all three always agree.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax_lab import checkpointing, sharding
from diffax_lab.data import pipeline
from diffax_lab.diffusion import get_loss_fn, get_schedule, guidance, samplers
from diffax_lab.models import get_model


def make_lr_schedule(optim_config, num_steps: int):
    c = optim_config
    warmup = optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1))
    if c.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, max(num_steps - c.warmup_steps, 1))
    else:
        after = optax.constant_schedule(c.lr)
    return optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(optim_config, num_steps: int):
    c = optim_config
    lr = make_lr_schedule(c, num_steps)
    if c.optimizer == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:
        opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    return optax.chain(*parts, opt), lr


def tree_all_finite(tree):
    """One boolean: every element of every floating leaf is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@dataclasses.dataclass
class Experiment:
    config: object
    mesh: jax.sharding.Mesh

    def __post_init__(self):
        c = self.config
        self.schedule = get_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
        self.build_model()
        self.classifier = None  # (ClassifierExperiment, params) once attach_classifier ran
        # The lr schedule's horizon is fixed by the run's first num_steps only for cosine.
        self.tx, self.lr_fn = make_optimizer(c.optim, c.train.num_steps)
        self.image_shape = (c.data.image_size, c.data.image_size, c.data.channels)
        self.repl = sharding.replicated(self.mesh)
        self.batch_sharding = sharding.batch_sharded(self.mesh)
        self.abstract_state = jax.eval_shape(self.init_state)
        self.state_shardings = jax.tree.map(lambda _: self.repl, self.abstract_state)

    def build_model(self):
        c = self.config
        self.model = get_model(c.model, out_channels=c.data.channels)
        self.loss_fn = get_loss_fn(
            self.schedule,
            c.diffusion.prediction,
            c.diffusion.loss_weighting,
            c.diffusion.min_snr_gamma,
        )

    # ----- parameters and state -----
    def _dummy_inputs(self, batch: int = 1):
        c = self.config.model
        x = jnp.zeros((batch, *self.image_shape))
        t = jnp.zeros((batch,))
        y = jnp.zeros((batch,), jnp.int32) if c.num_classes else None
        cond = jnp.zeros((batch, c.cond_dim)) if c.cond_dim else None
        return x, t, y, cond

    def init_state(self):
        key = jax.random.PRNGKey(self.config.seed)
        params = self.init_params(jax.random.fold_in(key, 0))
        return {
            "params": params,
            "ema_params": jax.tree.map(jnp.copy, params),
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(key, 1),
        }

    def init_params(self, key):
        x, t, y, cond = self._dummy_inputs()
        return self.model.init(key, x, t, y=y, cond=cond)["params"]

    def create_state(self):
        return jax.jit(self.init_state, out_shardings=self.state_shardings)()

    @property
    def restore_target(self):
        """The abstract state with its shardings: what a checkpoint restores into."""
        return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def count_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))

    # ----- the network as the samplers and losses see it -----
    def model_fn(self, params, y=None, cond=None, cond_mask=None, *, train=False, rngs=None):
        def fn(x_t, t):
            return self.model.apply(
                {"params": params},
                x_t,
                t,
                y=y,
                cond=cond,
                cond_mask=cond_mask,
                train=train,
                rngs=rngs,
            )

        return fn

    # ----- training -----
    def train_loss(self, params, x0, labels, keys):
        """(loss, aux) of one batch; ``keys`` = (label-drop, noise, dropout) keys."""
        c = self.config
        drop_key, loss_key, dropout_key = keys
        y = cond = cond_mask = None
        if c.model.num_classes:
            y = labels
            if c.train.p_uncond > 0:  # classifier-free guidance: drop to the null label
                drop = jax.random.bernoulli(drop_key, c.train.p_uncond, y.shape)
                y = jnp.where(drop, c.model.num_classes, y)
        elif c.model.cond_dim:  # labels are condition vectors (CLIP embeddings)
            cond = labels
            cond_mask = ~jax.random.bernoulli(drop_key, c.train.p_uncond, labels.shape[:1])
        fn = self.model_fn(params, y, cond, cond_mask, train=True, rngs={"dropout": dropout_key})
        return self.loss_fn(fn, x0, loss_key)

    def make_train_step(self, num_examples: int, gather_in_step: bool):
        """(state, images, labels) -> (state, metrics), jitted with the state donated.

        With ``gather_in_step`` the images are the whole uint8 dataset on the device and the
        step picks its batch; otherwise they are the batch itself (gathered on the host
        with the same ``batch_indices``).
        """
        c = self.config
        B = c.train.batch_size
        decay = c.optim.ema_decay
        faults = tuple(c.train.get("fault_nan_steps", ()))

        def train_step(state, images, labels):
            step = state["step"]
            key = jax.random.fold_in(state["rng"], step)
            # Batches are ordered by self.data_key (seed only); this key drives the noise.
            flip_key, *loss_keys = jax.random.split(key, 4)
            if gather_in_step:
                idx = pipeline.batch_indices(self.data_key, step, num_examples, B)
                images, labels = images[idx], labels[idx]
            x0 = pipeline.to_model_range(images)
            if c.data.random_flip:
                x0 = pipeline.random_flip(flip_key, x0)
            x0 = jax.lax.with_sharding_constraint(x0, self.batch_sharding)

            def loss_of(params):
                loss, aux = self.train_loss(params, x0, labels, loss_keys)
                if faults:  # fault injection (train.fault_nan_steps): NaN loss and grads
                    loss = loss * jnp.where(jnp.isin(step, jnp.asarray(faults)), jnp.nan, 1.0)
                return loss, aux

            (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
            grad_norm = optax.tree_utils.tree_norm(grads)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ema = jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params
            )
            # Non-finite guard: a step whose loss, gradients or new parameters are not finite
            # leaves parameters, EMA and optimizer state as they were (the batch is skipped).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(params)

            def keep(new, old):
                return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": self.lr_fn(step),
                "skipped": (~finite).astype(jnp.float32),
                **aux,
            }
            new_state = {
                "params": keep(params, state["params"]),
                "ema_params": keep(ema, state["ema_params"]),
                "opt_state": keep(opt_state, state["opt_state"]),
                "step": step + 1,
                "rng": state["rng"],
            }
            return new_state, metrics

        data_in = self.repl if gather_in_step else self.batch_sharding
        return jax.jit(
            train_step,
            in_shardings=(self.state_shardings, data_in, data_in),
            out_shardings=(self.state_shardings, self.repl),
            donate_argnums=(0,),
        )

    @property
    def data_key(self):
        """The key that orders the data: batches depend on (seed, step) only."""
        return jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 2)

    # ----- sampling -----
    def attach_classifier(self, classifier_exp, classifier_params) -> None:
        """Enables classifier guidance (sample.classifier_scale) with a trained classifier."""
        self.classifier = (classifier_exp, classifier_params)

    @property
    def num_labels(self) -> int:
        """Classes a sample can be asked for: the model's, else the guiding classifier's."""
        if self.config.model.num_classes:
            return self.config.model.num_classes
        return self.classifier[0].config.model.num_classes if self.classifier else 0

    def guided_model_fn(
        self, params, y, guidance_scale, classifier_params=None, classifier_scale=0.0
    ):
        """The network as the sampler sees it: plain, conditional, CFG with weight w, and
        classifier guidance with scale s on top when ``classifier_params`` are given.

        CFG runs whenever the model was trained with label dropout (train.p_uncond > 0);
        w = 0 is then plain conditional sampling (the unconditional half is multiplied by 0).
        """
        c = self.config
        if c.model.cond_dim:  # y holds condition vectors (CLIP text embeddings)

            def apply_cond(x, t, cond, cond_mask):
                return self.model.apply({"params": params}, x, t, cond=cond, cond_mask=cond_mask)

            on = jnp.ones(y.shape[:1], bool)
            fn = guidance.classifier_free(
                apply_cond,
                {"cond": y, "cond_mask": on},
                {"cond": y, "cond_mask": ~on},
                guidance_scale,
            )
        elif not c.model.num_classes:
            fn = self.model_fn(params)
        elif c.train.p_uncond == 0:
            fn = self.model_fn(params, y)
        else:

            def apply_fn(x, t, y):
                return self.model.apply({"params": params}, x, t, y=y)

            null = jnp.full_like(y, c.model.num_classes)
            fn = guidance.classifier_free(apply_fn, {"y": y}, {"y": null}, guidance_scale)
        if classifier_params is None:
            return fn
        log_prob_fn = self.classifier[0].log_prob_fn(classifier_params)
        return guidance.classifier_guided(
            fn, log_prob_fn, y, self.schedule, classifier_scale, c.diffusion.prediction
        )

    @functools.cached_property
    def sample_batch(self):
        """The jitted sampler for one batch of sample.batch_size:
        (params, key, y, guidance_scale, x_T, classifier_params, classifier_scale,
        num_trajectory=static) -> SampleOutput."""
        s = self.config.sample

        def run(
            params, key, y, guidance_scale, x_T, classifier_params, classifier_scale, num_trajectory
        ):
            return samplers.sample(
                self.guided_model_fn(
                    params, y, guidance_scale, classifier_params, classifier_scale
                ),
                self.schedule,
                (s.batch_size, *self.image_shape),
                key,
                sampler=s.sampler,
                num_steps=s.num_steps or None,
                spacing=s.spacing,
                prediction=self.config.diffusion.prediction,
                clip_x0=s.clip_x0 or None,
                num_trajectory=num_trajectory,
                x_T=x_T,
                **self.sampler_kwargs(),
            )

        return jax.jit(run, static_argnames=("num_trajectory",))

    def sampler_kwargs(self):
        s = self.config.sample
        return {"ddpm": {"variance": s.variance}, "ddim": {"eta": s.eta}}.get(s.sampler, {})

    def sample_labels(self, labels, batch: int):
        """The int32 labels of batch ``batch`` (None for unlabelled sampling)."""
        if self.config.model.cond_dim:  # condition vectors, cycled like labels
            bs = self.config.sample.batch_size
            ids = np.arange(batch * bs, (batch + 1) * bs)
            return jnp.asarray(np.asarray(labels)[ids % len(labels)], jnp.float32)
        if not self.num_labels:
            return None
        bs = self.config.sample.batch_size
        ids = np.arange(batch * bs, (batch + 1) * bs)
        return jnp.asarray(np.asarray(labels)[ids % len(labels)], jnp.int32)

    def generate(
        self,
        params,
        num: int,
        key,
        labels=None,
        num_trajectory: int = 0,
        guidance_scale: float | None = None,
        same_noise: bool = False,
        classifier_scale: float | None = None,
    ):
        """``num`` images as float [-1, 1] (numpy), in batches of sample.batch_size.

        ``labels`` (class-conditional models, or classifier guidance) default to
        config.sample.labels, else cycle through the classes. ``guidance_scale`` (CFG w)
        and ``classifier_scale`` (s, needs ``attach_classifier``) default to the config's.
        ``same_noise`` starts every batch from the same x_T (for sweeps). Returns
        (images, trajectory, trajectory_times); the trajectory is of the first batch only.
        """
        c = self.config
        bs = c.sample.batch_size
        w = c.sample.guidance_scale if guidance_scale is None else guidance_scale
        s = c.sample.classifier_scale if classifier_scale is None else classifier_scale
        classifier_params = None
        if s > 0:
            if self.classifier is None:
                raise ValueError("classifier_scale > 0 needs attach_classifier() first.")
            classifier_params = self.classifier[1]
        if labels is None and self.num_labels:
            labels = tuple(c.sample.labels) or tuple(range(self.num_labels))
        x_T = None
        if same_noise:
            x_T = jax.random.normal(jax.random.fold_in(key, 2**31 - 1), (bs, *self.image_shape))
        outs, traj, times = [], None, None
        for b in range(-(-num // bs)):
            batch_key = key if same_noise else jax.random.fold_in(key, b)
            out = self.sample_batch(
                params,
                batch_key,
                self.sample_labels(labels, b),
                jnp.float32(w),
                x_T,
                classifier_params,
                jnp.float32(s),
                num_trajectory=num_trajectory if b == 0 else 0,
            )
            outs.append(jax.device_get(out.samples))
            if b == 0 and num_trajectory:
                traj, times = jax.device_get(out.trajectory), out.trajectory_times
        return np.concatenate(outs)[:num], traj, times
