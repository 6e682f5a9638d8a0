"""Tasks: what is trained and how it is judged (diffusion, text2img, classifier, clip, ...).

Each task is one module with one class registered by name (``registry.register``); the
modes run any of them through the interface of ``base.Task``. Task modules never import
each other; what several share lives in ``base`` and ``denoising``.
"""
