"""The one place that talks to orbax, and the integrity check orbax does not do.

Saves are asynchronous; orbax writes each step into a temporary directory and renames it
only when complete, so a save killed halfway never becomes a step. orbax does not checksum
array data, though: a flipped bit in a float restores silently. So every save first writes
``DIR/checkpoint_digests/<step>.json`` (SHA-256 of every leaf, atomically) and every
restore recomputes and compares. ``restore_latest_good`` walks back from the newest step:
a checkpoint that fails to restore (truncated file, missing metadata) or to verify is moved
aside to ``DIR/checkpoints_corrupt/`` (never deleted) with a loud warning, and the previous
one is tried. Checkpoints saved before digests existed, or whose digest file is empty or
unreadable, restore unverified with a warning.

A checkpoint of another shape (a changed model, a missing config.json) is not corrupt: its
saved metadata is compared with the restore target first and the difference is refused
(``IncompatibleCheckpointError``), leaving every checkpoint where it is. When checkpoints
exist but none restores, ``AllCorruptError`` says so rather than starting afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffax_lab.errors import WorkdirError
from diffax_lab.files import write_atomic


class CorruptCheckpointError(RuntimeError):
    pass


class IncompatibleCheckpointError(WorkdirError):
    """The checkpoint holds a state of another shape than the run asks for."""


class AllCorruptError(WorkdirError):
    """Every checkpoint of the workdir failed to restore or verify (all moved aside)."""


def _host_copy(x) -> np.ndarray:
    """A leaf on the host; replicated arrays need only their local copy (multi-host too)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def state_digest(state) -> dict[str, str]:
    """SHA-256 of each leaf's dtype, shape and bytes, keyed by its path in the tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = np.ascontiguousarray(_host_copy(leaf))
        h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.digest_dir = os.path.join(self.workdir, "checkpoint_digests")
        self.max_to_keep = max_to_keep
        self._saved_steps: set[int] = set()  # steps this process wrote (their digests)
        self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _digest_path(self, step: int) -> str:
        return os.path.join(self.digest_dir, f"{step}.json")

    def save(self, step: int, state) -> None:
        """Writes the digest (atomically, process 0), then starts the asynchronous save."""
        digest = state_digest(state)
        if jax.process_index() == 0:
            os.makedirs(self.digest_dir, exist_ok=True)
            write_atomic(self._digest_path(step), json.dumps(digest))
        self._saved_steps.add(step)
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self._drop_stale_digests()

    def _drop_stale_digests(self) -> None:
        """Digests of steps this process saved that orbax has since deleted (max_to_keep).
        A digest this process did not write is never deleted."""
        if jax.process_index() != 0:
            return
        keep = set(self.manager.all_steps())
        newest = max(keep, default=-1)
        for step in sorted(self._saved_steps):
            if step not in keep and step < newest:  # never the one being written
                path = self._digest_path(step)
                if os.path.exists(path):
                    os.remove(path)
                self._saved_steps.discard(step)

    def check_compatible(self, step: int, abstract_state) -> None:
        """IncompatibleCheckpointError if the saved parameters' shapes or dtypes differ from
        the target's. Unreadable metadata is left to ``restore`` (corruption)."""
        try:
            saved = self.manager.item_metadata(step)
            saved = getattr(saved, "tree", saved)["params"]
        except Exception:  # noqa: BLE001 (unreadable metadata: restore decides)
            return

        def shapes(tree):
            return {
                jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype).name)
                for p, x in jax.tree_util.tree_leaves_with_path(tree)
            }

        old, new = shapes(saved), shapes(abstract_state["params"])
        if old == new:
            return
        diffs = [f"{k}: missing in the checkpoint" for k in sorted(set(new) - set(old))]
        diffs += [f"{k}: not in this model" for k in sorted(set(old) - set(new))]
        diffs += [
            f"{k}: saved {old[k][0]} {old[k][1]}, model {new[k][0]} {new[k][1]}"
            for k in sorted(set(old) & set(new))
            if old[k] != new[k]
        ]
        raise IncompatibleCheckpointError(
            f"checkpoint {step} in {self.directory} holds parameters of another shape than "
            f"this config's model ({len(diffs)} differ, e.g. {'; '.join(diffs[:3])}). It is "
            "left as it is. Use the run's own config (its config.json, or the overrides it was "
            "trained with), or a new --workdir."
        )

    def restore(self, step: int, abstract_state, verify: bool = True):
        """Restores and verifies one step; raises CorruptCheckpointError if it fails."""
        try:
            state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many kinds for damaged files
            raise CorruptCheckpointError(
                f"checkpoint {step} does not restore: {type(e).__name__}: {e}"
            ) from e
        if verify:
            path = self._digest_path(step)
            expected = None
            try:
                with open(path) as f:
                    expected = json.load(f)
            except (OSError, ValueError) as e:  # missing, empty or unreadable
                logging.warning(
                    "Checkpoint %d has no readable digest (%s: %s): restored unverified.",
                    step,
                    path,
                    type(e).__name__,
                )
            if isinstance(expected, dict):
                actual = state_digest(state)
                bad = sorted(k for k in expected if actual.get(k) != expected[k])
                if bad or set(actual) != set(expected):
                    raise CorruptCheckpointError(
                        f"checkpoint {step} does not match its digest in {bad[:3] or 'the tree'}"
                    )
        return state

    def restore_latest_good(self, abstract_state):
        """(state, step) of the newest checkpoint that restores and verifies, or
        (None, None) if there is none. Bad ones are moved to DIR/checkpoints_corrupt/;
        AllCorruptError if there were checkpoints and every one was bad;
        IncompatibleCheckpointError (nothing moved) for a state of another shape."""
        steps = self.all_steps()
        if steps:
            self.check_compatible(steps[-1], abstract_state)
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state), step
            except CorruptCheckpointError as e:
                aside = self._move_aside(step)
                logging.error(
                    "!!! %s. Moved it to %s; falling back to the previous checkpoint.", e, aside
                )
                print(f"WARNING: {e}; moved to {aside}; falling back.", flush=True)
        if steps:
            raise AllCorruptError(
                f"Every checkpoint in {self.directory} ({steps}) failed to restore or verify; "
                f"all were moved to {os.path.join(self.workdir, 'checkpoints_corrupt')}. "
                "Nothing was trained. To start this run from step 0, rerun with "
                "--config.train.restart_if_corrupt=True."
            )
        return None, None

    def _move_aside(self, step: int) -> str:
        dest_root = os.path.join(self.workdir, "checkpoints_corrupt")
        dest = os.path.join(dest_root, str(step))
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(dest_root, f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
            if os.path.exists(self._digest_path(step)):
                shutil.move(self._digest_path(step), dest + ".digest.json")
        self.manager.close()
        self._open()  # orbax caches the step list
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs that carry the shardings the restored arrays should have."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def restore_latest(workdir: str, restore_target, step: int = 0, keep: int = 3):
    """(state, step) of the newest good checkpoint of ``workdir``, or of ``step`` when > 0.

    FileNotFoundError (which ``main`` reports in one line) when there is none.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # never create one here
        raise FileNotFoundError(
            f"{workdir} holds no checkpoints; train first with --mode=train and the same --workdir."
        )
    ckpt = Checkpointer(workdir, keep)
    try:
        if step:
            if step not in ckpt.all_steps():
                raise FileNotFoundError(
                    f"No checkpoint at step {step} in {ckpt.directory}; it has {ckpt.all_steps()}."
                )
            ckpt.check_compatible(step, restore_target)
            return ckpt.restore(step, restore_target), step
        state, step = ckpt.restore_latest_good(restore_target)
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(
            f"No usable checkpoint in {ckpt.directory}; train first with --mode=train and the "
            "same --workdir."
        )
    return state, step
