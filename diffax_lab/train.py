"""The training loop: state, step, logging, samples and checkpoint cadence.

``train(config, workdir)`` trains to ``config.train.num_steps`` total, resuming from the
latest checkpoint in ``workdir`` if there is one. A resumed run is bit-identical to an
uninterrupted one on the same devices: batches, noise and dropout all come from
``fold_in(key, step)``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from diffax_lab import checkpointing, data, images, sharding
from diffax_lab import workdir as workdir_lib
from diffax_lab.data import pipeline
from diffax_lab.distributed import is_main_process
from diffax_lab.experiment import Experiment, tree_all_finite
from diffax_lab.validation import ConfigError, validate_config


class NonFiniteError(FloatingPointError):
    """Training stopped: too many consecutive non-finite steps."""


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class MetricsWriter:
    """metrics.jsonl (one JSON object per log interval), and TensorBoard when asked."""

    def __init__(self, workdir: str, start_step: int, tensorboard: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = is_main_process()  # process 0 writes for all
        self.tb = None
        if not self.enabled:
            return
        # Lines past the checkpoint we resume from belong to a lost future: drop them.
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [
                    ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step
                ]
            with open(self.path, "w") as f:
                f.writelines(keep)
        if tensorboard:
            from tensorboardX import SummaryWriter  # checked in check_optional_deps

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def check_optional_deps(config) -> None:
    if config.train.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "config.train.tensorboard=True needs tensorboardX: `pip install -e .[tensorboard]`."
            ) from e


def load_train_data(config):
    """Loads the train split and checks it against the batch size (before compiling)."""
    imgs, labels = data.load_split(config.data, "train")
    n = imgs.shape[0]
    if config.train.batch_size > n:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} exceeds the {n} training "
            "images; lower it or use more data (data.num_examples)."
        )
    if config.model.num_classes and labels.max() >= config.model.num_classes:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes} but the data has label "
            f"{int(labels.max())}; set it to at least {int(labels.max()) + 1}."
        )
    return imgs, labels


def prepare(config, workdir: str, mode: str):
    """Every check that can fail, before any data is placed or anything compiles."""
    validate_config(config)
    check_optional_deps(config)
    workdir = workdir_lib.check_workdir(workdir)
    mesh = sharding.make_mesh(config.train.num_devices or None)
    if mode == "train":
        sharding.check_batch_divides(config.train.batch_size, mesh)
        if config.train.batch_size % jax.process_count():
            raise ConfigError(
                f"config.train.batch_size={config.train.batch_size} must be divisible by the "
                f"{jax.process_count()} processes (each feeds batch_size / processes images)."
            )
    if config.model.cond_dim and "text" not in config:
        raise ConfigError(
            "config.model.cond_dim > 0 conditions on CLIP embeddings: it needs a config.text "
            "section with clip_dir (see configs/text2img.py)."
        )
    if config.get("task") in ("classifier", "clip") and mode == "sample":
        raise ConfigError(
            f"A {config.task} run has nothing to sample; use --mode=eval for its test accuracy."
        )
    workdir_lib.check_resume_compatible(workdir, config)
    return workdir, mesh


def make_experiment(config, mesh) -> Experiment:
    """The task's experiment: diffusion (Experiment) or classifier (ClassifierExperiment)."""
    task = config.get("task", "diffusion")
    if task == "classifier":
        from diffax_lab.classifier import ClassifierExperiment

        return ClassifierExperiment(config, mesh)
    if task == "clip":
        from diffax_lab.clip_task import ClipExperiment

        return ClipExperiment(config, mesh)
    return Experiment(config, mesh)


def train(config, workdir: str) -> dict:
    """Trains; returns the final train state (on the devices)."""
    workdir, mesh = prepare(config, workdir, "train")
    exp = make_experiment(config, mesh)
    imgs, labels = load_train_data(config)
    if config.model.cond_dim:  # text-to-image: condition on CLIP image embeddings
        from diffax_lab.text2img import cached_image_embeddings, load_encoder

        encoder = load_encoder(config)
        os.makedirs(workdir, exist_ok=True)
        labels = cached_image_embeddings(encoder, imgs, "train", workdir)
    os.makedirs(workdir, exist_ok=True)
    if is_main_process():
        workdir_lib.write_config(workdir, config)
    logging.info(
        "%s with %.2fM parameters; %d training images; %d device(s).",
        type(exp.model).__name__,
        exp.count_params() / 1e6,
        imgs.shape[0],
        mesh.devices.size,
    )

    judge = None
    every_eval = config.eval.get("every_steps", 0) if config.get("task") != "classifier" else 0
    if every_eval:  # periodic sample metrics: load the judge before anything compiles
        from diffax_lab import evaluate

        judge = evaluate.load_judge(config, mesh)

    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    state, latest = ckpt.restore_latest_good(exp.restore_target)
    if latest is not None:
        logging.info("Resuming from the checkpoint at step %d in %s.", latest, ckpt.directory)
    else:
        state = exp.create_state()
    start = int(jax.device_get(state["step"]))
    total = config.train.num_steps
    if start >= total:
        logging.info("Already at step %d >= train.num_steps=%d: nothing to train.", start, total)
        ckpt.close()
        return state

    gather_in_step = config.data.placement == "device"
    n = imgs.shape[0]
    if gather_in_step:
        data_args = (jax.device_put(imgs, exp.repl), jax.device_put(labels, exp.repl))
    else:
        host_indices = jax.jit(pipeline.batch_indices, static_argnums=(2, 3))
    train_step = exp.make_train_step(n, gather_in_step)

    def batch_for(step):
        if gather_in_step:
            return data_args
        # Each process gathers only the rows its own devices hold (its slice of the batch).
        idx = np.asarray(host_indices(exp.data_key, step, n, config.train.batch_size))
        return tuple(
            jax.make_array_from_callback(
                (len(idx), *a.shape[1:]), exp.batch_sharding, lambda i, a=a: a[idx[i[0]]]
            )
            for a in (imgs, labels)
        )

    logging.info("Compiling the train step (batch %d)...", config.train.batch_size)
    t0 = time.perf_counter()
    train_step = train_step.lower(state, *batch_for(start)).compile()
    logging.info("Compiled in %.1f s.", time.perf_counter() - t0)

    writer = MetricsWriter(workdir, start, config.train.tensorboard)
    sample_key = jax.random.PRNGKey(config.sample.seed)
    pending: list = []  # per-step metrics still on the device
    consecutive_skips = total_skips = 0
    last_time, last_step = None, start

    def flush(step):
        """Fetches pending metrics once, checks them, writes and returns their mean."""
        nonlocal pending, last_time, last_step
        if not pending:
            return
        nonlocal consecutive_skips, total_skips
        fetched = jax.device_get(pending)
        pending = []
        first = step - len(fetched) + 1
        for i, m in enumerate(fetched):
            if m["skipped"]:
                consecutive_skips += 1
                total_skips += 1
                logging.warning("Step %d: non-finite loss or gradients; skipped.", first + i)
            else:
                consecutive_skips = 0
            if consecutive_skips >= config.train.max_consecutive_skips:
                raise NonFiniteError(
                    f"{consecutive_skips} consecutive non-finite steps up to step {first + i} "
                    f"(train.max_consecutive_skips={config.train.max_consecutive_skips}); "
                    f"the last checkpoint (step {ckpt.latest_step()}) holds finite parameters. "
                    "Lower optim.lr or raise optim.warmup_steps, then re-run to resume."
                )
        # Means over the steps that trained (a window of skipped steps logs only counts);
        # NaN entries (mse_q* of an empty quartile) are left out of the line.
        good = [m for m in fetched if not m["skipped"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = {
                k: float(np.nanmean([m[k] for m in good]))
                for k in fetched[0]
                if good and k != "skipped"
            }
        mean = {k: v for k, v in mean.items() if np.isfinite(v)}
        mean["skipped"] = float(sum(m["skipped"] for m in fetched))
        mean["skipped_total"] = float(total_skips)
        now = time.perf_counter()
        if last_time is not None and step > last_step:
            mean["images_per_sec"] = (
                (step - last_step) * config.train.batch_size / (now - last_time)
            )
        last_time, last_step = now, step
        writer.write(step, mean)
        return mean

    progress = tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc="train",
        disable=not config.train.progress_bar or jax.process_index() != 0,
    )
    preempt = PreemptionWatch(ckpt)
    try:
        for step in progress:
            state, metrics = train_step(state, *batch_for(step))
            pending.append(metrics)
            done = step + 1
            if preempt.requested(done) and done != total:
                flush(done)
                if not bool(tree_all_finite(state)):
                    raise NonFiniteError(f"Non-finite parameters at step {done}; not saved.")
                ckpt.save(done, state)
                ckpt.wait()  # the asynchronous save is complete before the process exits
                logging.warning(
                    "Preempted (SIGTERM): saved step %d in %s; re-run the same command to resume.",
                    done,
                    ckpt.directory,
                )
                return state
            if done == start + 1:  # start the throughput clock after the first step
                jax.block_until_ready(metrics)
                last_time, last_step = time.perf_counter(), done
            if every(done, config.train.log_every) or done == total:
                mean = flush(done)
                if mean:
                    progress.set_postfix(
                        loss=f"{mean.get('loss', float('nan')):.4f}",
                        img_s=f"{mean.get('images_per_sec', 0):.0f}",
                    )
            if every(done, config.train.checkpoint_every) or done == total:
                flush(done)  # never save a state whose losses were not checked
                if not bool(tree_all_finite(state)):  # the guard makes this unreachable; be sure
                    raise NonFiniteError(f"Non-finite parameters at step {done}; not saved.")
                ckpt.save(done, state)
            if every(done, config.train.sample_every) or (
                done == total and config.train.sample_every
            ):
                write_samples(exp, state["ema_params"], workdir, done, sample_key)
                last_time, last_step = time.perf_counter(), done  # sampling is not training time
            if every(done, every_eval):
                report = evaluate.sample_metrics(
                    exp, state["ema_params"], judge, workdir, jax.random.fold_in(sample_key, done)
                )
                numeric = {
                    f"eval_{k}": v
                    for k, v in report.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
                writer.write(done, numeric)
                logging.info("Step %d sample metrics (%s): %s", done, judge.name, numeric)
                last_time, last_step = time.perf_counter(), done
    finally:  # a failing run still completes its pending saves (the last good step)
        ckpt.close()
        writer.close()
        preempt.restore()
    if config.get("task") == "clip" and is_main_process():
        path = exp.export(state["ema_params"], os.path.join(workdir, "hf_clip"))
        logging.info("Wrote the CLIP (EMA weights, Hugging Face layout) to %s.", path)
    logging.info("Trained to step %d; checkpoints in %s.", total, ckpt.directory)
    return state


class PreemptionWatch:
    """SIGTERM -> save at the current step and exit 0.

    One process: a SIGTERM handler sets a flag the loop reads after each step (orbax's own
    check needs jax.distributed). Several processes (after jax.distributed.initialize):
    orbax's ``reached_preemption``, which JAX's coordination service answers with the same
    step on every process (its own SIGTERM notifier), so all save the same step together.
    """

    def __init__(self, ckpt: checkpointing.Checkpointer):
        self.ckpt = ckpt
        self.flag = False
        self.previous = None
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self.ckpt.manager.reached_preemption(step))
        return self.flag

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def write_samples(exp: Experiment, params, workdir: str, step: int, key) -> str:
    num = exp.config.sample.num
    samples, _, _ = exp.generate(params, num, key)
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    if is_main_process():
        images.save_grid(path, np.asarray(pipeline.to_uint8(samples)))
    logging.info("Wrote %d samples (EMA) to %s.", num, path)
    return path
