"""The PyTorch peer of the speed benchmarks builds the same network as the lab."""

import pytest
import torch  # noqa: F401  (installed by .ci/setup for this test)
from diffusers import UNet2DModel

from benchmarks.diffusers_peer import unet_kwargs
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import load_config


@pytest.mark.parametrize(
    "name,arg",
    [
        ("cifar10_ddpm.py", None),
        ("ddpm.py", None),
        ("ddpm.py", "cpu"),
        ("ddpm.py", "tiny"),
        ("cfg.py", "cpu"),
    ],
)
def test_diffusers_unet_has_our_parameter_count(name, arg):
    """Block for block the same U-Net: every parameter tensor is matched in count (the
    CIFAR-10 preset is 35,746,307 in both, the google/ddpm-cifar10-32 network)."""
    config = load_config(name, arg)
    peer = UNet2DModel(**unet_kwargs(config.model, config.data.image_size, config.data.channels))
    ours = registry.build(config, make_mesh(1)).count_params()
    assert sum(p.numel() for p in peer.parameters()) == ours


def test_peer_refuses_what_it_cannot_model():
    config = load_config("ddpm.py", "tiny")
    config.model.upsample = "transpose"
    with pytest.raises(ValueError, match=r"model.upsample='nearest'"):
        unet_kwargs(config.model, 32, 1)
