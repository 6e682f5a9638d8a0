"""The errors a user can cause, each mapped to one exit status by ``main``.

The floor of the package: it imports nothing of the lab, so every layer can raise these.
A message names the field, flag, file or path at fault and says how to fix it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, flag or path (exit 2, before anything loads or compiles)."""


class DataError(ValueError):
    """Data that is missing or unreadable (exit 2)."""


class WorkdirError(ConfigError):
    """The workdir cannot be used as asked: locked by another run, not writable, incompatible
    checkpoints, full disk (exit 2). Nothing already saved there is changed."""
