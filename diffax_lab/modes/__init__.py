"""The modes: task-agnostic loops over any registered task (``train``, ``sample``,
``evaluate``), sharing the start-up of ``common``. A mode never asks which task it runs."""
