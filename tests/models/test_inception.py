"""The Flax Inception-v3 of FID against pytorch-fid itself (random weights, no download),
its resize against torch's, the converter's file, and FID's statistics helpers."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from diffax_lab.metrics import fid as fid_lib
from diffax_lab.models.inception import (
    FEATURE_DIM,
    InceptionFeatures,
    load_inception,
    resize_bilinear,
    save_converted,
    unit_rgb,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYREF = os.environ.get("DIFFAX_PYREF", os.path.join(REPO, ".pyref"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's features and FID (tests/models/pytorch_fid_reference.py)."""
    d = tmp_path_factory.mktemp("pytorch_fid")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 40, 48, 3), dtype=np.uint8)  # upsampled to 299
    feats_a = rng.standard_normal((300, 64)).astype(np.float32)
    feats_b = (0.8 * rng.standard_normal((300, 64)) + 0.3).astype(np.float32)
    np.savez(d / "in.npz", images=images, feats_a=feats_a, feats_b=feats_b)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYREF, REPO]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.models.pytorch_fid_reference", str(d / "in.npz"), str(d)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise AssertionError(
            "pytorch-fid reference failed. It needs torchvision and pytorch-fid outside "
            f"site-packages: pip install --no-deps --target {PYREF} torchvision==0.28.0 "
            f"pytorch-fid==0.3.0 (or set DIFFAX_PYREF).\n{proc.stderr[-3000:]}"
        )
    ref = np.load(d / "reference.npz")
    # The converter's own code on pytorch-fid's state dict (num_batches_tracked included).
    save_converted(load_file(str(d / "state_dict.safetensors")), str(d / "weights.safetensors"))
    return dict(
        images=images,
        feats_a=feats_a,
        feats_b=feats_b,
        weights=str(d / "weights.safetensors"),
        features=ref["features"],
        features64=ref["features64"],
        fid=float(ref["fid"]),
    )


@pytest.mark.slow  # the pytorch-fid reference runs in a subprocess
def test_flax_inception_matches_pytorch_fid(reference):
    """The same function: resize, normalisation and network, both in float64, agree to
    1e-9 (far inside 1e-4) on the pool3 features of a small image."""
    ref64 = reference["features64"]
    assert ref64.shape == (1, FEATURE_DIM)
    assert float(np.std(ref64)) > 0.05  # the random network carries signal to pool3
    with jax.enable_x64(True):
        extractor = InceptionFeatures(reference["weights"], batch_size=1, dtype=jnp.float64)
        ours64 = extractor(reference["images"])
    np.testing.assert_allclose(ours64, ref64, atol=1e-9, rtol=0)


@pytest.mark.slow  # the pytorch-fid reference runs in a subprocess
def test_float32_features_match_pytorch_fid_to_its_own_rounding(reference):
    """The shipped float32 extractor on small images (resized to 299 as pytorch-fid does)
    is closer to pytorch-fid's float32 features than those are to its float64 ones. (A
    random 94-layer network is ill-conditioned: pytorch-fid's own float32 run is ~1e-3 off
    float64 here, so that, not 1e-4, is what float32 can promise on it.)"""
    extractor = InceptionFeatures(reference["weights"], batch_size=1)
    ours = extractor(reference["images"])
    ref32, ref64 = reference["features"], reference["features64"]
    assert ours.dtype == np.float32 and ours.shape == ref32.shape == (1, FEATURE_DIM)
    assert float(np.std(ref32)) > 0.05
    err_ours = float(np.max(np.abs(ours - ref32)))
    err_torch = float(np.max(np.abs(ref32 - ref64)))
    assert err_ours <= err_torch, (err_ours, err_torch)
    np.testing.assert_allclose(ours, ref32, atol=2e-3, rtol=0)
    assert extractor.name.startswith("inception-fid-") and not extractor.is_pytorch_fid_weights


def test_unit_rgb_reads_images_as_pytorch_fid():
    grey = np.array([[[[0], [255]]]], np.uint8)  # [1, 1, 2, 1]
    np.testing.assert_array_equal(unit_rgb(grey), [[[[0, 0, 0], [1, 1, 1]]]])
    with pytest.raises(ValueError, match="uint8 images"):
        unit_rgb(np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.slow  # the pytorch-fid reference runs in a subprocess
def test_fid_matches_pytorch_fid(reference):
    mu_b, sigma_b = fid_lib.fid_statistics(reference["feats_b"])
    with pytest.warns(fid_lib.SmallSampleWarning, match="300 samples"):
        ours = fid_lib.fid_from_features(reference["feats_a"], mu_b, sigma_b)
    assert ours > 1.0
    assert abs(ours - reference["fid"]) <= 1e-6 * reference["fid"]


@pytest.mark.parametrize(
    "src,dst", [((7, 9), (13, 20)), ((20, 17), (9, 5)), ((32, 32), (299, 299))]
)
def test_resize_matches_torch_bilinear(src, dst):
    x = np.random.default_rng(1).random((2, *src, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear(x, dst))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.slow  # the pytorch-fid reference runs in a subprocess
def test_pickle_and_foreign_weights_are_refused(tmp_path, reference):
    with pytest.raises(ValueError, match=r"pickle.*--convert"):
        load_inception(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    arrays = load_file(reference["weights"])
    bad = dict(arrays)
    bad["Mixed_6b.branch1x1.conv.weight"] = np.zeros((7, 768, 1, 1), np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch1x1\.conv\.weight has shape.*--convert"):
        load_inception(str(tmp_path / "bad.safetensors"))
    del bad["Mixed_6b.branch1x1.conv.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing Mixed_6b\.branch1x1\.conv\.weight.*--convert"):
        load_inception(str(tmp_path / "missing.safetensors"))


def test_converter_keeps_float32_tensors_and_drops_counters(tmp_path):
    state = {
        "a.bn.weight": torch.ones(3, dtype=torch.float64),
        "a.bn.num_batches_tracked": torch.tensor(7),
    }
    save_converted(state, str(tmp_path / "w.safetensors"), source_sha256="6726825d00")
    out = load_file(str(tmp_path / "w.safetensors"))
    assert list(out) == ["a.bn.weight"] and out["a.bn.weight"].dtype == np.float32


def test_reference_statistics_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = fid_lib.fid_statistics(rng.standard_normal((50, 6)))
    fid_lib.save_reference_statistics(str(tmp_path / "ref.npz"), mu, sigma)
    mu2, sigma2 = fid_lib.load_reference_statistics(str(tmp_path / "ref.npz"), dim=6)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(ValueError, match="6-d features, the extractor gives 2048"):
        fid_lib.load_reference_statistics(str(tmp_path / "ref.npz"), dim=FEATURE_DIM)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\].*--save-stats"):
        fid_lib.load_reference_statistics(str(tmp_path / "bad.npz"))


def test_fid_warns_only_below_min_samples():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 4))
    mu, sigma = fid_lib.fid_statistics(rng.standard_normal((40, 4)))
    with pytest.warns(fid_lib.SmallSampleWarning):
        fid_lib.fid_from_features(a, mu, sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid_lib.fid_from_features(a, mu, sigma, min_samples=40)
