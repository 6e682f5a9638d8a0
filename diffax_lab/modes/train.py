"""``--mode=train``: the training loop of any task: state, step, logging, samples, periodic
evaluation, checkpoint cadence, and stopping without losing work.

``run(config, workdir)`` trains to ``config.train.num_steps`` total, resuming from the
newest good checkpoint in ``workdir``. A resumed run is bit-identical to an uninterrupted
one on the same devices: batches, noise and dropout all come from ``fold_in(key, step)``.

Stopping: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop; it saves the next
finished step and returns ("saved step N; rerun the same command to resume"). A second
Ctrl-C exits at once; only complete checkpoints are ever trusted on restart. At most
``MAX_IN_FLIGHT`` steps are queued on the device, so a signal is honoured within about two
step times plus the save, and the progress bar counts finished steps. One training process
per workdir (``workdir.WorkdirLock``).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import sys
import threading
import time
import warnings

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from diffax_lab import checkpointing, compilation, evaluators
from diffax_lab import workdir as workdir_lib
from diffax_lab.data import pipeline
from diffax_lab.distributed import is_main_process
from diffax_lab.errors import DataError, WorkdirError
from diffax_lab.files import write_atomic
from diffax_lab.modes.common import build_evaluators, prepare
from diffax_lab.optimizer import tree_all_finite

MAX_IN_FLIGHT = 2  # steps dispatched but not finished: bounds how late a stop can come
wall_clock = time.monotonic  # the clock of train.checkpoint_every_secs


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
            write_atomic(self.path, "".join(keep))
        if tensorboard:
            from tensorboardX import SummaryWriter  # checked in modes.common

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


class StopSignals:
    """SIGINT and SIGTERM -> "stop at the next finished step and save"; a second SIGINT
    exits at once (status 130) without waiting for anything.

    One process: handlers that set a flag the loop reads after each step. Several
    processes (after jax.distributed.initialize): orbax's ``reached_preemption``, which
    JAX's coordination service answers with the same step on every process (its own
    SIGTERM notifier), so all save the same step together; Ctrl-C keeps its default there.
    """

    def __init__(self, ckpt: checkpointing.Checkpointer):
        self.ckpt = ckpt
        self.signum = None
        self.previous = {}
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            print("\nSecond Ctrl-C: exiting now, without saving.", file=sys.stderr, flush=True)
            os._exit(130)  # orbax never trusts a half-written step
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after the step in progress and saving it "
            "(Ctrl-C again to exit at once without saving).",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self.ckpt.manager.reached_preemption(step))
        return self.signum is not None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) is ENOSPC."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def state_megabytes(abstract_state) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) / 2**20


def compiled_memory(compiled) -> dict[str, float]:
    """Per-device MiB of a compiled program (XLA's buffer assignment): its arguments (the
    state and batch), temporaries (activations, gradients, gathered weights) and peak."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without the analysis
        return {}
    mib = {
        "arguments": stats.argument_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes,
        "peak": getattr(stats, "peak_memory_in_bytes", 0),
    }
    return {k: v / 2**20 for k, v in mib.items()}


def memory_line(compiled) -> str:
    return ", ".join(f"{k} {v:.2f} MiB" for k, v in compiled_memory(compiled).items()) or "n/a"


def restore_or_init(task, ckpt, config):
    """(state, resumed step or None), honouring train.restart_if_corrupt."""
    try:
        state, latest = ckpt.restore_latest_good(task.restore_target)
    except checkpointing.AllCorruptError as e:
        if not config.train.get("restart_if_corrupt", False):
            raise
        logging.warning("%s Starting from step 0 (train.restart_if_corrupt=True).", e)
        state, latest = None, None
    if latest is not None:
        logging.info("Resuming from the checkpoint at step %d in %s.", latest, ckpt.directory)
        return state, latest
    return task.create_state(), None


def run(config, workdir: str):
    """Trains; returns the final train state (on the devices)."""
    workdir, mesh, task = prepare(config, workdir, "train")
    lock = None
    if is_main_process():
        workdir_lib.make_writable(workdir)
        lock = workdir_lib.WorkdirLock(workdir).acquire()
    try:
        return _train(config, workdir, mesh, task)
    except Exception as e:
        if disk_full(e):
            steps = workdir_lib.checkpoint_steps(workdir)  # no orbax: the disk is full
            raise WorkdirError(
                f"No space left on the device holding {workdir} (a checkpoint of this run "
                f"needs about {state_megabytes(task.abstract_state):.0f} MB). The earlier "
                f"checkpoints (steps {steps}) are intact. Free some space or move the "
                "workdir, then rerun the same command to resume."
            ) from None
        raise
    finally:
        if lock:
            lock.release()


def _train(config, workdir, mesh, task):
    task.load_resources(workdir, "train")  # frozen models, checked before compiling
    imgs, labels = task.train_data(workdir)
    if is_main_process():
        workdir_lib.write_config(workdir, config)
    logging.info(
        "%s task, %s with %.2fM parameters; %d training images; %d device(s).",
        task.name,
        type(task.model).__name__,
        task.count_params() / 1e6,
        imgs.shape[0],
        mesh.devices.size,
    )
    every_eval = config.eval.get("every_steps", 0)
    periodic = []
    if every_eval:  # periodic sample metrics: load the judge before anything compiles
        metrics = [m for m in task.selected_metrics() if evaluators.get(m).during_training]
        periodic = build_evaluators(task, workdir, mesh, metrics)

    ckpt = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
    # From here on Ctrl-C and SIGTERM ask for a save at the next finished step.
    stop = StopSignals(ckpt)
    all_finite = jax.jit(tree_all_finite)  # one program, not one op per leaf
    writer = progress = None
    try:
        state, _ = restore_or_init(task, ckpt, config)
        start = int(jax.device_get(state["step"]))
        total = config.train.num_steps
        if start >= total:
            logging.info(
                "Already at step %d >= train.num_steps=%d: nothing to train.", start, total
            )
            return state

        gather_in_step = config.data.placement == "device"
        n = imgs.shape[0]
        if gather_in_step:
            data_args = (jax.device_put(imgs, task.repl), jax.device_put(labels, task.repl))
        else:
            host_indices = jax.jit(pipeline.sharded_batch_indices, static_argnums=(2, 3))
            shard_sizes = task.shard_sizes or (n,)
        train_step = task.make_train_step(n, gather_in_step)

        def batch_for(step):
            if gather_in_step:
                return data_args
            # Each process gathers only the rows its own devices hold (its slice of the
            # batch), from the examples it holds (all, or its shards: data.num_shards).
            idx = np.asarray(
                host_indices(task.data_key, step, shard_sizes, config.train.batch_size)
            )
            local = idx - task.local_offset

            def rows(i):
                r = local[i[0]]
                if r.size and (r.min() < 0 or r.max() >= n):
                    raise DataError(
                        f"Process {jax.process_index()} holds train examples "
                        f"[{task.local_offset}, {task.local_offset + n}) but its devices hold "
                        f"batch rows {i[0]} of other shards: the device mesh does not keep "
                        "each process's devices together; set data.num_shards=0."
                    )
                return r

            return tuple(
                jax.make_array_from_callback(
                    (len(idx), *a.shape[1:]), task.batch_sharding, lambda i, a=a: a[rows(i)]
                )
                for a in (imgs, labels)
            )

        logging.info("CPU runtime: %s.", compilation.configure_cpu_runtime())
        logging.info("Compiling the train step (batch %d)...", config.train.batch_size)
        t0 = time.perf_counter()
        train_step = compilation.compile_lowered(
            train_step.lower(state, *batch_for(start)), task.mesh.devices.flat, training=True
        )
        logging.info(
            "Compiled in %.1f s; per device %s.", time.perf_counter() - t0, memory_line(train_step)
        )

        writer = MetricsWriter(workdir, start, config.train.tensorboard)
        sample_key = jax.random.PRNGKey(config.sample.seed)
        pending: list = []  # per-step metrics still on the device
        in_flight: collections.deque = collections.deque()  # (step, metrics) not yet finished
        skips = {"consecutive": 0, "total": 0}
        clock = {"time": None, "step": start}
        every_secs = config.train.get("checkpoint_every_secs", 0) if jax.process_count() == 1 else 0
        last_save = wall_clock()
        estimate = {"logged": False, "t0": None, "s0": None}

        def flush(step):
            """Fetches pending metrics once, checks them, writes and returns their mean."""
            nonlocal pending
            if not pending:
                return None
            fetched = jax.device_get(pending)
            pending = []
            first = step - len(fetched) + 1
            for i, m in enumerate(fetched):
                if m["skipped"]:
                    skips["consecutive"] += 1
                    skips["total"] += 1
                    logging.warning("Step %d: non-finite loss or gradients; skipped.", first + i)
                else:
                    skips["consecutive"] = 0
                if skips["consecutive"] >= config.train.max_consecutive_skips:
                    raise NonFiniteError(
                        f"{skips['consecutive']} consecutive non-finite steps up to step {first + i} "
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
            mean["skipped_total"] = float(skips["total"])
            now = time.perf_counter()
            if clock["time"] is not None and step > clock["step"]:
                mean["images_per_sec"] = (
                    (step - clock["step"]) * config.train.batch_size / (now - clock["time"])
                )
            clock["time"], clock["step"] = now, step
            writer.write(step, mean)
            return mean

        def save(step):
            nonlocal last_save
            flush(step)  # never save a state whose losses were not checked
            if not bool(all_finite(state)):  # the guard makes this unreachable; be sure
                raise NonFiniteError(f"Non-finite parameters at step {step}; not saved.")
            ckpt.save(step, state)
            last_save = wall_clock()

        progress = tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            disable=not config.train.progress_bar or jax.process_index() != 0,
        )
        finished = start

        def finish_up_to(limit):
            """Waits for queued steps until at most ``limit`` remain; advances the bar."""
            nonlocal finished
            while len(in_flight) > limit:
                s, m = in_flight.popleft()
                jax.block_until_ready(m)
                progress.update(s - finished)
                finished = s
                log_estimate(s)

        def log_estimate(s):
            """Once: the measured step time and what the rest of the run will take."""
            if estimate["logged"]:
                return
            now = time.perf_counter()
            if estimate["t0"] is None:
                estimate["t0"], estimate["s0"] = now, s
                return
            done = s - estimate["s0"]
            if done >= 5 or (done >= 1 and now - estimate["t0"] > 30):
                per = (now - estimate["t0"]) / done
                left = (total - s) * per
                logging.info(
                    "%.2f s/step: the remaining %d steps take about %s (train.num_steps=%d).",
                    per,
                    total - s,
                    time.strftime("%H:%M:%S", time.gmtime(left))
                    if left < 86400
                    else f"{left / 86400:.1f} days",
                    total,
                )
                estimate["logged"] = True

        for step in range(start, total):
            state, metrics = train_step(state, *batch_for(step))
            pending.append(metrics)
            done = step + 1
            in_flight.append((done, metrics))
            finish_up_to(MAX_IN_FLIGHT)
            if stop.requested(done) and done != total:
                finish_up_to(0)
                save(done)
                ckpt.wait()  # the asynchronous save is complete before returning
                progress.close()
                print(
                    f"Saved step {done} in {ckpt.directory}; rerun the same command to resume.",
                    file=sys.stderr,
                    flush=True,
                )
                logging.warning("Stopped by a signal: saved step %d.", done)
                return state
            if done == start + 1:  # start the throughput clock after the first step
                jax.block_until_ready(metrics)
                clock["time"], clock["step"] = time.perf_counter(), done
            if every(done, config.train.log_every) or done == total:
                mean = flush(done)
                if mean:
                    progress.set_postfix(
                        loss=f"{mean.get('loss', float('nan')):.4f}",
                        img_s=f"{mean.get('images_per_sec', 0):.0f}",
                    )
            timed = every_secs and wall_clock() - last_save > every_secs
            if every(done, config.train.checkpoint_every) or done == total or timed:
                save(done)
            if every(done, config.train.sample_every) or (
                done == total and config.train.sample_every
            ):
                task.write_samples(state["ema_params"], workdir, done, sample_key)
                clock["time"], clock["step"] = time.perf_counter(), done  # not training time
            if every(done, every_eval):
                ctx = evaluators.Context(
                    task, state["ema_params"], sample_key, jax.random.fold_in(sample_key, done)
                )
                report = {}
                for ev in periodic:
                    report.update(ev.run(ctx))
                numeric = {
                    f"eval_{k}": v
                    for k, v in report.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
                writer.write(done, numeric)
                logging.info("Step %d sample metrics: %s", done, numeric)
                clock["time"], clock["step"] = time.perf_counter(), done
        finish_up_to(0)
    finally:  # a failing run still completes its pending saves (the last good step)
        stop.restore()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    if is_main_process():
        task.export(state["ema_params"], workdir)
    logging.info("Trained to step %d; checkpoints in %s.", total, ckpt.directory)
    return state
