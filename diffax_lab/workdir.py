"""The run directory: checks before anything is written, one writer at a time, and the
resolved config beside the checkpoints.

A bad run never damages a good one: the workdir must be a real, writable directory (not ''
or '/'); only one training process writes to it (``WorkdirLock``: the holder's host and
PID, a stale lock of a dead process taken over with a warning); a resumed run must have
the same model, diffusion and data shape as its checkpoints (``check_resume_compatible``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

from diffax_lab.config_lib import DEFAULT_CONFIG, load_config, read_saved, with_defaults
from diffax_lab.errors import WorkdirError
from diffax_lab.files import write_atomic

# Sections (and fields) that define the shape and meaning of the saved state.
STATE_DEFINING = (
    "task",
    "classifier.noise",
    "model",
    "diffusion",
    "data.image_size",
    "data.channels",
    "optim.optimizer",
    "optim.grad_clip",
    "seed",
    "autoencoder",
    "latent.autoencoder",
)
LOCK_NAME = ".lock"


def check_workdir(workdir: str) -> str:
    """The absolute path of a usable --workdir (it need not exist yet)."""
    if not workdir or not workdir.strip():
        raise WorkdirError("--workdir is empty; give the run a directory of its own.")
    path = os.path.abspath(os.path.expanduser(workdir))
    if path == os.path.abspath(os.sep) or path == os.path.expanduser("~"):
        raise WorkdirError(f"--workdir={workdir!r} resolves to {path}; use a directory of its own.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir!r} exists and is not a directory.")
    return path


def make_writable(path: str) -> None:
    """Creates ``path`` and proves it writable, or says why not (one line)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"--workdir={path} is not writable ({e.strerror or e}); choose a directory you "
            "can write to, or fix its permissions."
        ) from e


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved in DIR/checkpoints (orbax renames a step into place only when whole)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def has_checkpoints(workdir: str) -> bool:
    return bool(checkpoint_steps(workdir))


def _lookup(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def _canonical(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as stored


def config_differences(saved: dict, new: dict, fields=STATE_DEFINING) -> list[str]:
    """``field: old -> new`` for each state-defining field that differs."""
    diffs = []
    for field in fields:
        try:
            old_v, new_v = _lookup(saved, field), _lookup(new, field)
        except KeyError:
            continue
        if _canonical(old_v) != _canonical(new_v):
            if isinstance(old_v, dict) and isinstance(new_v, dict):
                diffs += [
                    f"{field}.{k}: {old_v.get(k)!r} -> {new_v.get(k)!r}"
                    for k in sorted(set(old_v) | set(new_v))
                    if _canonical(old_v.get(k)) != _canonical(new_v.get(k))
                ]
            else:
                diffs.append(f"{field}: {old_v!r} -> {new_v!r}")
    return diffs


def check_resume_compatible(workdir: str, config) -> None:
    """Refuses to resume checkpoints whose state-defining fields differ from ``config``.

    A workdir without checkpoints (a run stopped before its first save, or with
    num_steps=0) holds nothing to protect: its config.json is simply replaced.
    """
    if not has_checkpoints(workdir):
        return
    saved = read_saved(workdir)
    if saved is None:
        return  # no config.json: the checkpoints' shapes are checked on restore
    # Fields added to the lab since the run was saved count as their defaults (as
    # load_run_config reads them), so a new field never blocks resuming an older run.
    saved = with_defaults(saved, json.loads(load_config(DEFAULT_CONFIG).to_json()))
    diffs = config_differences(saved, json.loads(config.to_json()))
    if diffs:
        raise WorkdirError(
            f"{workdir} holds checkpoints of a different run ({'; '.join(diffs)}). "
            "Use a new --workdir, or the saved values (see config.json there)."
        )


def write_config(workdir: str, config) -> None:
    write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))


class WorkdirLock:
    """One training process per workdir: an exclusive ``flock`` on DIR/.lock, which names
    its holder (host, PID, start time, command).

    The operating system drops the lock when its process dies however it dies, so a lock
    file left by a dead process is stale: it is taken over with a warning naming the old
    holder. A live holder is named in the refusal.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.fd = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            h = self._holder()
            who = f"PID {h.get('pid', '?')} on host {h.get('host', '?')}"
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is being trained by {who} (since {since}); "
                "one training run per --workdir. Wait for it, stop it (Ctrl-C saves and "
                "exits), or use another --workdir. --mode=sample and --mode=eval may run "
                "beside it."
            ) from None
        old = self._holder()
        if old.get("pid"):
            logging.warning(
                "Took over the stale lock of PID %s on host %s (that process is gone).",
                old.get("pid"),
                old.get("host"),
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
