"""Writing a file so that a crash never leaves half of it: the floor of the package, beside
``errors`` (it imports nothing of the lab)."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through ``path + ".tmp"`` and a rename, so that a reader
    (or a restart after a crash) sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
