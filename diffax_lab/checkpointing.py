"""The one place that talks to orbax, and the integrity check orbax does not do.

Saves are asynchronous; orbax writes each step into a temporary directory and renames it
only when complete, so a save killed halfway never becomes a step. orbax does not checksum
array data, though: a flipped bit in a float restores silently. So every save first writes
``DIR/checkpoint_digests/<step>.json`` (SHA-256 of every leaf, atomically) and every
restore recomputes and compares. ``restore_latest_good`` walks back from the newest step:
a checkpoint that fails to restore (truncated file, missing metadata) or to verify is moved
aside to ``DIR/checkpoints_corrupt/`` (never deleted) with a loud warning, and the previous
one is tried. Checkpoints saved before digests existed restore with a warning.
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


class CorruptCheckpointError(RuntimeError):
    pass


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
        self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, enable_async_checkpointing=True, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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
            tmp = self._digest_path(step) + ".tmp"
            with open(tmp, "w") as f:
                json.dump(digest, f)
            os.replace(tmp, self._digest_path(step))
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self._drop_stale_digests()

    def _drop_stale_digests(self) -> None:
        """Digests of steps orbax has since deleted (max_to_keep); only inside the workdir."""
        if jax.process_index() != 0 or not os.path.isdir(self.digest_dir):
            return
        keep = set(self.manager.all_steps())
        for name in os.listdir(self.digest_dir):
            stem = name.split(".")[0]
            if name.endswith(".json") and stem.isdigit() and int(stem) not in keep:
                if int(stem) < max(keep, default=-1):  # never the one being written
                    os.remove(os.path.join(self.digest_dir, name))

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
            if not os.path.exists(path):
                logging.warning(
                    "Checkpoint %d has no digest (%s): restored unverified.", step, path
                )
            else:
                with open(path) as f:
                    expected = json.load(f)
                actual = state_digest(state)
                bad = sorted(k for k in expected if actual.get(k) != expected[k])
                if bad or set(actual) != set(expected):
                    raise CorruptCheckpointError(
                        f"checkpoint {step} does not match its digest in {bad[:3] or 'the tree'}"
                    )
        return state

    def restore_latest_good(self, abstract_state):
        """(state, step) of the newest checkpoint that restores and verifies, or
        (None, None) if there is none. Bad ones are moved to DIR/checkpoints_corrupt/."""
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state), step
            except CorruptCheckpointError as e:
                aside = self._move_aside(step)
                logging.error(
                    "!!! %s. Moved it to %s; falling back to the previous checkpoint.", e, aside
                )
                print(f"WARNING: {e}; moved to {aside}; falling back.", flush=True)
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
