"""Feature spaces for sample metrics, and the cache of real-data reference features.

A feature extractor is any object with
    name: str                                   -- identifies the space *and its weights*
    __call__(images_uint8 [N, H, W, C]) -> float32 [N, F]
so an InceptionV3 port (user-supplied weights), the CLIP image encoder or the lab's clean
classifier (its task's ``feature_extractor``, pooled penultimate layer) plug in alike: the
extractor is handed in, never loaded here. Reports name
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


def params_digest(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:12]


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


def reference_features(
    extractor, data_config, split: str, images_u8: np.ndarray, cache_dir: str, prefix="ref"
):
    """(features [N, F], cache hit?) of real images, cached in ``cache_dir/<prefix>_*.npz``."""
    key = reference_key(data_config, split, images_u8, extractor.name)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{prefix}_{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            if json.loads(str(f["key"])) == key:
                return f["features"], True
    feats = extractor(images_u8)
    if jax.process_index() == 0:  # process 0 writes for all
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, features=feats, key=json.dumps(key, sort_keys=True))
        os.replace(tmp, path)  # a crash never leaves a half-written cache entry
    return feats, False
