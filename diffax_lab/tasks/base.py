"""The interface every task implements, and what all tasks share: optimizer, train state,
the jitted train step with EMA and the non-finite guard, data loading.

A task says what is trained and how it is judged; the modes (``diffax_lab/modes``) run any
task without asking which one it is. A task implements:

- ``check_config(config)`` (classmethod): its own sections, raising ConfigError;
- ``build()``: its networks, schedules and losses (nothing compiles);
- ``init_params(key)`` and ``train_loss(params, x0, labels, keys)``;
- optionally ``load_resources(workdir, mode)`` (frozen models, a guiding classifier: loaded
  and checked before anything compiles), ``train_data(workdir)`` (what a step conditions
  on), ``write_samples`` / ``sample`` (``can_sample = True``), ``eval_samples`` and
  ``default_metrics`` (the evaluators it supports), ``export`` (after training).

The train state is one pytree ``{params, ema_params, opt_state, step, rng}``. Its abstract
form (``jax.eval_shape``) gives the shardings, the ``out_shardings`` of the jitted init and
the restore target of a checkpoint, so all three always agree.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax_lab import checkpointing, optimizer, sharding
from diffax_lab.config_lib import check_choice, check_number
from diffax_lab.data import SOURCES, load_split, pipeline, split_size
from diffax_lab.errors import ConfigError


def check_common(config) -> None:
    """The sections every task reads: seed, data, optim, train, the eval batch."""
    check_number(config, "seed", low=0, integer=True)
    check_choice(config, "data.source", SOURCES)
    check_number(config, "data.image_size", low=1, integer=True)
    check_choice(config, "data.channels", (1, 3))
    check_number(config, "data.num_examples", low=0, integer=True)
    check_choice(config, "data.placement", ("device", "host"))
    if "num_shards" in config.data:
        check_number(config, "data.num_shards", low=0, integer=True)
        k = config.data.num_shards
        if k and config.train.batch_size % k:
            raise ConfigError(
                f"config.train.batch_size={config.train.batch_size} must be divisible by "
                f"config.data.num_shards={k} (each step takes batch_size / num_shards "
                "examples from every shard); change one of them."
            )
    if "test_fraction" in config.data:
        check_number(config, "data.test_fraction", low=0.0, high=1.0, high_open=True)

    check_choice(config, "optim.optimizer", ("adam", "adamw"))
    check_number(config, "optim.lr", low=0.0, low_open=True)
    check_number(config, "optim.warmup_steps", low=0, integer=True)
    check_choice(config, "optim.lr_schedule", ("constant", "cosine"))
    if "decay_steps" in config.optim:
        check_number(config, "optim.decay_steps", low=0, integer=True)
    check_number(config, "optim.weight_decay", low=0.0)
    check_number(config, "optim.b1", low=0.0, high=1.0, high_open=True)
    check_number(config, "optim.b2", low=0.0, high=1.0, high_open=True)
    check_number(config, "optim.eps", low=0.0, low_open=True)
    check_number(config, "optim.grad_clip", low=0.0)
    check_number(config, "optim.ema_decay", low=0.0, high=1.0, high_open=True)
    if "update_layout" in config.optim:
        optimizer.check_layout(config)

    check_number(config, "train.batch_size", low=1, integer=True)
    check_number(config, "train.num_steps", low=0, integer=True)
    check_number(config, "train.num_devices", low=0, integer=True)
    if "grad_accum" in config.train:
        check_number(config, "train.grad_accum", low=1, integer=True)
    if "fsdp" in config.train:
        check_number(config, "train.fsdp", low=1, integer=True)
    for f in ("log_every", "checkpoint_every", "keep_checkpoints"):
        check_number(config, "train." + f, low=1, integer=True)
    check_number(config, "train.sample_every", low=0, integer=True)
    check_number(config, "train.max_consecutive_skips", low=1, integer=True)
    if "checkpoint_every_secs" in config.train:
        check_number(config, "train.checkpoint_every_secs", low=0, integer=True)
    faults = tuple(config.train.fault_nan_steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in faults):
        raise ConfigError(
            f"config.train.fault_nan_steps={faults!r} must be step numbers (integers >= 0)."
        )
    check_number(config, "eval.num_examples", low=1, integer=True)
    check_number(config, "eval.batch_size", low=1, integer=True)
    if "checkpoint_step" in config.eval:
        check_number(config, "eval.checkpoint_step", low=0, integer=True)


class Task:
    """The base of every task: the train state and step, given a model and a loss."""

    name: ClassVar[str] = ""
    can_sample: ClassVar[bool] = False  # --mode=sample draws something
    # Evaluators (diffax_lab/evaluators) this task supports; default_metrics() picks the
    # ones that run when config.eval.metrics is empty.
    metrics: ClassVar[tuple[str, ...]] = ()
    # The config section of this task's own fields (e.g. "superres"), checked to exist
    # before anything else, with a hint of what it holds; "" for none.
    section: ClassVar[str] = ""
    section_hint: ClassVar[str] = ""

    def __init__(self, config, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        c = config
        self.image_shape = (c.data.image_size, c.data.image_size, c.data.channels)
        # Host-sharded input (data.num_shards): the sizes of all shards and where this
        # process's examples start, set by load_train_split; None: one global order.
        self.shard_sizes: tuple[int, ...] | None = None
        self.local_offset = 0
        self.repl = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharded(mesh)
        self.build()
        self.tx, self.lr_fn = optimizer.make_optimizer(c.optim, c.train.num_steps)
        self.abstract_state = jax.eval_shape(self.init_state)
        # Replicated, or split over the fsdp axis (train.fsdp > 1): sharding.py decides.
        self.state_shardings = sharding.state_shardings(self.abstract_state, mesh)
        # The update per leaf or on one vector (diffax_lab/optimizer.py).
        self.update_layout = optimizer.resolve_layout(
            c,
            self.abstract_state["params"],
            all(s.is_fully_replicated for s in jax.tree.leaves(self.state_shardings["params"])),
        )

    # ----- hooks a task implements -----
    @classmethod
    def check_config(cls, config) -> None:
        """Raises ConfigError naming the first bad field of the sections this task reads."""
        if cls.section and cls.section not in config:
            raise ConfigError(
                f"config.task={cls.name!r} needs a config.{cls.section} section "
                f"({cls.section_hint})."
            )
        check_common(config)
        metrics = tuple(config.eval.get("metrics", ()))
        unknown = [m for m in metrics if m not in cls.metrics]
        if unknown:
            raise ConfigError(
                f"config.eval.metrics={metrics!r}: task {cls.name!r} supports "
                f"{list(cls.metrics)}, not {unknown}."
            )
        if config.train.sample_every and not cls.can_sample:
            raise ConfigError(
                f"A {cls.name} run draws nothing during training: set config.train.sample_every=0."
            )

    def build(self) -> None:
        """Sets self.model (and whatever else the task computes with)."""
        raise NotImplementedError

    def init_params(self, key):
        raise NotImplementedError

    def train_loss(self, params, x0, labels, keys):
        """(loss, aux dict) of one batch; x0 in [-1, 1]; ``keys`` = three PRNG keys."""
        raise NotImplementedError

    def load_resources(self, workdir: str, mode: str) -> None:
        """Loads and checks what the task needs beside its own state, before compiling."""

    def train_data(self, workdir: str):
        """(uint8 images [N, H, W, C], per-example conditions [N, ...]) the steps draw from."""
        return self.load_train_split()

    def model_input(self, images, labels, key):
        """A step's batch as the loss takes it: uint8 images -> [-1, 1] (flipped left-right
        at random with data.random_flip), labels as they are. A task whose data is not
        pixels (cached latents) returns its own."""
        x0 = pipeline.to_model_range(images)
        if self.config.data.random_flip:
            x0 = pipeline.random_flip(key, x0)
        return x0, labels

    def write_samples(self, params, workdir: str, step: int, key) -> str | None:
        """Periodic samples during training (train.sample_every); None: nothing to draw."""
        return None

    def sample(self, params, workdir: str, step: int, key) -> dict:
        """``--mode=sample``: writes images to DIR/samples, returns their paths."""
        raise ConfigError(f"A {self.name} run has nothing to sample; use --mode=eval.")

    def eval_conditions(self, labels, workdir: str):
        """What conditions each test example's loss: its label, unless a task says else."""
        return labels

    def eval_loss(self, params, x_u8, cond, key):
        """(loss, aux) of a test batch (evaluator ``loss``): the training loss by default."""
        x0 = pipeline.to_model_range(x_u8)
        return self.train_loss(params, x0, cond, tuple(jax.random.split(key, 3)))

    def default_metrics(self) -> tuple[str, ...]:
        return self.metrics

    def selected_metrics(self) -> tuple[str, ...]:
        return tuple(self.config.eval.get("metrics", ())) or self.default_metrics()

    def export(self, params, workdir: str) -> None:
        """After training: write the EMA weights in another format (e.g. Hugging Face)."""

    def sample_tag(self) -> str:
        """Names an evaluation's sampling setting (one report file each); '' when none."""
        return ""

    # ----- data -----
    def load_train_split(self):
        """The train split (with data.num_shards: only this process's shards), checked
        against the batch size (before compiling)."""
        c = self.config
        k = c.data.get("num_shards", 0)
        if k:
            imgs, labels = self._load_own_shards(k)
        else:
            imgs, labels = load_split(c.data, "train")
            self.shard_sizes, self.local_offset = (imgs.shape[0],), 0
        if c.train.batch_size > sum(self.shard_sizes):
            raise ConfigError(
                f"config.train.batch_size={c.train.batch_size} exceeds the "
                f"{sum(self.shard_sizes)} "
                "training images; lower it or use more data (data.num_examples)."
            )
        k = c.model.get("num_classes", 0)
        if k and labels.max() >= k:
            raise ConfigError(
                f"config.model.num_classes={k} but the data has label {int(labels.max())}; "
                f"set it to at least {int(labels.max()) + 1}."
            )
        return imgs, labels

    def _load_own_shards(self, num_shards: int):
        """Reads the contiguous shards this process's devices feed: process p of P holds
        shards [p k / P, (p + 1) k / P) of ``pipeline.shard_ranges``."""
        c = self.config
        n = split_size(c.data, "train")
        ranges = pipeline.shard_ranges(n, num_shards)
        per_shard = c.train.batch_size // num_shards
        if per_shard > min(b - a for a, b in ranges):
            raise ConfigError(
                f"config.data.num_shards={num_shards} cuts the {n} training images into "
                f"shards of {min(b - a for a, b in ranges)}, fewer than the "
                f"batch_size / num_shards = {per_shard} a step takes from each; use fewer "
                "shards or a smaller batch."
            )
        procs, p = jax.process_count(), jax.process_index()
        own = ranges[p * num_shards // procs : (p + 1) * num_shards // procs]
        start, stop = own[0][0], own[-1][1]
        logging.info(
            "Process %d of %d reads train examples [%d, %d) of %d (shards %d-%d of %d).",
            p,
            procs,
            start,
            stop,
            n,
            p * num_shards // procs,
            (p + 1) * num_shards // procs - 1,
            num_shards,
        )
        self.shard_sizes = tuple(b - a for a, b in ranges)
        self.local_offset = start
        return load_split(c.data, "train", (start, stop))

    def test_batches(self):
        """The test split, cut to eval.num_examples in whole batches of eval.batch_size."""
        e = self.config.eval
        imgs, labels = load_split(self.config.data, "test")
        n = min(e.num_examples, imgs.shape[0])
        bs = min(e.batch_size, n)
        n = n // bs * bs  # whole batches: one compiled shape
        return imgs[:n], labels[:n], bs

    @property
    def data_key(self):
        """The key that orders the data: batches depend on (seed, step) only."""
        return jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 2)

    # ----- parameters and state -----
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

    def create_state(self):
        return jax.jit(self.init_state, out_shardings=self.state_shardings)()

    @property
    def restore_target(self):
        """The abstract state with its shardings: what a checkpoint restores into."""
        return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def count_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))

    # ----- training -----
    def make_train_step(self, num_examples: int, gather_in_step: bool):
        """(state, images, labels) -> (state, metrics), jitted with the state donated.

        With ``gather_in_step`` the images are the whole uint8 dataset on the device and the
        step picks its batch; otherwise they are the batch itself (gathered on the host
        with the same ``batch_indices``).

        With ``train.grad_accum = A > 1`` the batch of B is split into A micro-batches of
        B / A (example j goes to micro-batch j % A: each device keeps its own rows, no data
        moves) and a ``lax.scan`` sums their gradients inside the step: one micro-batch is
        live at a time, and the program (and its compile memory) does not grow with A.
        The update, the non-finite guard and the EMA then see the mean gradient, as with
        one batch of B. Micro-batch m draws its noise from ``fold_in(key, m)``.
        """
        c = self.config
        B = c.train.batch_size
        accum = c.train.get("grad_accum", 1)
        decay = c.optim.ema_decay
        faults = tuple(c.train.get("fault_nan_steps", ()))
        micro_sharding = sharding.microbatch_sharded(self.mesh)
        update = optimizer.UPDATES[self.update_layout]

        def train_step(state, images, labels):
            step = state["step"]
            key = jax.random.fold_in(state["rng"], step)
            # Batches are ordered by self.data_key (seed only); this key drives the noise.
            flip_key, *loss_keys = jax.random.split(key, 4)
            if gather_in_step:  # the device holds every shard (one process)
                sizes = self.shard_sizes or (num_examples,)
                idx = pipeline.sharded_batch_indices(self.data_key, step, sizes, B)
                images, labels = images[idx], labels[idx]
            x0, labels = self.model_input(images, labels, flip_key)
            x0 = jax.lax.with_sharding_constraint(x0, self.batch_sharding)

            def loss_of(params, x0, labels, keys):
                loss, aux = self.train_loss(params, x0, labels, keys)
                if faults:  # fault injection (train.fault_nan_steps): NaN loss and grads
                    loss = loss * jnp.where(jnp.isin(step, jnp.asarray(faults)), jnp.nan, 1.0)
                return loss, aux

            grad_fn = jax.value_and_grad(loss_of, has_aux=True)
            if accum == 1:
                (loss, aux), grads = grad_fn(state["params"], x0, labels, loss_keys)
            else:
                (loss, aux), grads = accumulate(
                    grad_fn, state["params"], x0, labels, loss_keys, accum, micro_sharding
                )
            # Optimizer, EMA and the non-finite guard: a step whose loss, gradients or new
            # parameters are not finite leaves all three as they were (the batch is skipped).
            params, opt_state, ema, grad_norm, finite = update(
                self.tx,
                decay,
                state["params"],
                grads,
                state["opt_state"],
                state["ema_params"],
                loss,
            )

            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": self.lr_fn(step),
                "skipped": (~finite).astype(jnp.float32),
                **aux,
            }
            new_state = {
                "params": params,
                "ema_params": ema,
                "opt_state": opt_state,
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


def split_microbatches(x, num: int):
    """[B, ...] -> [num, B / num, ...]; micro-batch m holds examples m, m + num, ..."""
    if x is None:
        return None
    b = x.shape[0] // num
    return jnp.swapaxes(x.reshape(b, num, *x.shape[1:]), 0, 1)


def accumulate(grad_fn, params, x0, labels, keys, num: int, micro_sharding):
    """((mean loss, mean aux), mean gradient) of ``grad_fn`` over ``num`` micro-batches,
    summed in a ``lax.scan`` (one micro-batch live at a time). Aux entries are averaged
    ignoring NaN (a statistic empty in one micro-batch), as the loop averages steps."""

    def split(t):  # [B, ...] -> [num, B / num, ...], each micro-batch over all devices
        return jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(split_microbatches(a, num), micro_sharding),
            t,
        )

    xs = (split(x0), split(labels), jnp.arange(num))

    def body(grad_sum, inputs):
        x, y, m = inputs
        micro_keys = [jax.random.fold_in(k, m) for k in keys]
        (loss, aux), grads = grad_fn(params, x, y, micro_keys)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (losses, auxes) = jax.lax.scan(body, zeros, xs)
    grads = jax.tree.map(lambda g: g / num, grad_sum)
    aux = jax.tree.map(lambda a: jnp.nanmean(a, axis=0), auxes)
    return (jnp.mean(losses), aux), grads


def predict_in_batches(fn, images_u8: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` (jitted, on float images in [-1, 1]) over uint8 images, batch by batch."""
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = np.asarray(images_u8[i : i + batch_size], np.float32) / 127.5 - 1.0
        out.append(np.asarray(fn(x)))
    return np.concatenate(out)
