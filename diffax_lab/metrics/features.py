"""Feature spaces for sample metrics, and the cache of real-data reference features.

A feature extractor is any object with
    name: str                                   -- identifies the space *and its weights*
    __call__(images_uint8 [N, H, W, C]) -> float32 [N, F]
so an InceptionV3 port (user-supplied weights) or the CLIP image encoder plugs in beside
``ClassifierFeatures`` (the lab's clean classifier, pooled penultimate layer). Reports name
the extractor, so every number says which feature space it lives in: FD in the classifier's
space is *not* FID (that needs InceptionV3's pool3 features) and is not comparable to it.

``reference_features`` computes the features of a real split once and caches them in
``cache_dir/ref_<key>.npz``; the key hashes the dataset (source, name, split, the images'
bytes), the image count and the extractor name, so a change of any of them computes anew.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from diffax_lab.classifier import load_classifier


def params_digest(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:12]


class ClassifierFeatures:
    """The lab's clean classifier (configs/classifier.py:clean) as a feature space."""

    def __init__(
        self, workdir: str, mesh, batch_size: int = 500, field: str = "config.eval.judge_workdir"
    ):
        self.exp, self.params = load_classifier(workdir, mesh, field=field)
        self.batch_size = batch_size
        self.name = f"classifier-{self.exp.config.data.name}-{params_digest(self.params)}"
        self._features = jax.jit(self.exp.features_fn(self.params))
        self.num_classes = self.exp.config.model.num_classes

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images_u8), self.batch_size):
            x = np.asarray(images_u8[i : i + self.batch_size], np.float32) / 127.5 - 1.0
            out.append(np.asarray(self._features(x)))
        return np.concatenate(out)

    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        return self.exp.predict(self.params, images_u8, self.batch_size)


def reference_key(data_config, split: str, images_u8: np.ndarray, extractor_name: str) -> dict:
    return {
        "source": data_config.source,
        "name": data_config.name,
        "split": split,
        "num_images": int(len(images_u8)),
        "image_shape": list(images_u8.shape[1:]),
        "images_sha256": hashlib.sha256(np.ascontiguousarray(images_u8).tobytes()).hexdigest(),
        "extractor": extractor_name,
    }


def reference_features(extractor, data_config, split: str, images_u8: np.ndarray, cache_dir: str):
    """(features [N, F], cache hit?) of real images, cached under ``cache_dir``."""
    key = reference_key(data_config, split, images_u8, extractor.name)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"ref_{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            if json.loads(str(f["key"])) == key:
                return f["features"], True
    feats = extractor(images_u8)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, features=feats, key=json.dumps(key, sort_keys=True))
    os.replace(tmp, path)  # a crash never leaves a half-written cache entry
    return feats, False
