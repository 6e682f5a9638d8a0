"""pytorch-fid's own numbers for tests/models/test_inception.py, run in a subprocess:

    python -m tests.models.pytorch_fid_reference IN.npz OUT_DIR

IN.npz holds ``images`` (uint8 [N, H, W, 3], small: pytorch-fid resizes them) and two
feature sets ``feats_a``, ``feats_b``. The script builds pytorch-fid's ``InceptionV3``
(output block 3, its resize and normalisation) exactly as
``pytorch_fid.inception.fid_inception_v3`` does, torchvision's ``inception_v3(weights=None,
aux_logits=False, init_weights=False, num_classes=1008)`` with ``Mixed_5b``..``Mixed_7c``
replaced by ``FIDInceptionA/C/E_1/E_2``, but with random weights instead of the download.
Batch-norm affine parameters are drawn at random and their statistics set from one forward
pass of the test images, so every layer carries O(1) activations (as FID's real network
does) and a wrong block shows.
It writes the network's ``state_dict()`` as it is to OUT_DIR/state_dict.safetensors (the
test converts it with the converter's own code) and OUT_DIR/reference.npz with the pool3
features of ``images`` in float32 (as pytorch-fid runs) and in float64 (the same weights,
``.double()``, the same images divided by 255 in float64), and pytorch-fid's
``calculate_frechet_distance`` of the two feature sets.

A subprocess, because PyPI's torchvision wheels are CUDA builds: beside the CPU torch of
the test setup their C operators do not load, and importing torchvision fails while
registering fake kernels for detection ops (``torchvision::nms`` ...). Inception needs none
of them, so those two registration modules are stubbed here, in this process only; and
torchvision lives outside site-packages (``$DIFFAX_PYREF``, default ``<repo>/.pyref``),
because there it would break every ``import transformers``/``diffusers`` in the suite.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np


def import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:  # "operator torchvision::nms does not exist": C ops did not load
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        return importlib.import_module("torchvision")


def build_reference(torch, calibration_images, seed: int = 0):
    tv = import_torchvision()
    import pytorch_fid.inception as pfi  # noqa: PLC0415

    torch.manual_seed(seed)
    net = tv.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    pfi.fid_inception_v3 = lambda: net  # no download: InceptionV3 wraps this network
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0  # running statistics := the calibration batch's
        model.train()
        model(calibration_images)
    model.eval()
    return model, net


def main(argv):
    in_path, out_dir = argv
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    torch.set_num_threads(2)
    data = np.load(in_path)
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255.0
    model, net = build_reference(torch, x)  # imports torchvision first (import_torchvision)
    from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: PLC0415

    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(out_dir, "state_dict.safetensors"))  # torch's own names
    x64 = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
        feats = model(x)[0].squeeze(-1).squeeze(-1).numpy()
        feats64 = model.double()(x64)[0].squeeze(-1).squeeze(-1).numpy()
    stats = []
    for f in (data["feats_a"].astype(np.float64), data["feats_b"].astype(np.float64)):
        stats += [np.mean(f, axis=0), np.cov(f, rowvar=False)]
    fid = calculate_frechet_distance(*stats)
    np.savez(
        os.path.join(out_dir, "reference.npz"),
        features=feats,
        features64=feats64,
        fid=fid,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
