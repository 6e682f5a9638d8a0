"""The benchmark's analytic FLOP counter, checked against counts known independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.flops import count_flops
from diffax_lab.models import ddpm_cifar10_unet
from diffax_lab.models.layers import AttentionBlock


def test_conv_and_matmul_counts():
    x = jnp.zeros((2, 8, 8, 3))
    k = jnp.zeros((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert count_flops(conv, x, k) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    a, b = jnp.zeros((4, 6, 7)), jnp.zeros((4, 7, 9))
    assert count_flops(jnp.matmul, a, b) == 2 * 4 * 6 * 9 * 7
    # Inside a scan the body counts once per iteration.
    scanned = lambda a, b: jax.lax.scan(lambda c, _: (c, jnp.matmul(a, b)), 0.0, None, length=5)[1]
    assert count_flops(scanned, a, b) == 5 * 2 * 4 * 6 * 9 * 7


def test_attention_block_counts_qk_and_av():
    b, hw, c = 2, 4, 16
    block = AttentionBlock(num_heads=2, num_groups=4)
    x = jnp.zeros((b, hw, hw, c))
    params = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x))
    n = hw * hw
    expected = 2 * b * n * c * 3 * c + 2 * b * n * c * c  # qkv and output projections
    expected += 2 * (2 * b * n * n * c)  # q k^T and a v over both heads
    assert count_flops(block.apply, params, x) == expected


def test_ddpm_cifar10_unet_is_12_4_gflop_per_image():
    model = ddpm_cifar10_unet()
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t))
    assert count_flops(model.apply, params, x, t) / 1e9 == pytest.approx(12.4, rel=0.01)


def test_guidance_benchmark_run_specs():
    from benchmarks.guidance_accuracy import parse_run

    assert parse_run("ddim:50:w=1") == {"sampler": "ddim", "num_steps": 50, "w": 1.0, "s": 0.0}
    assert parse_run("ddpm:0:s=3") == {"sampler": "ddpm", "num_steps": 0, "w": 0.0, "s": 3.0}
    with pytest.raises(ValueError, match=r"options are w=W and s=S"):
        parse_run("ddim:10:x=1")
    with pytest.raises(ValueError, match=r"must be SAMPLER:STEPS"):
        parse_run("ddim")


def test_benchmark_modules_import_together_without_flag_clashes():
    """Every benchmark defines its flags only when run as a script, so tests and notebooks
    can import any set of them (two of them both define --out)."""
    import importlib

    import orbax.checkpoint  # noqa: F401
    from absl import app, flags  # noqa: F401  (absl.app and orbax define flags on import)

    before = set(flags.FLAGS)
    for name in (
        "conv_cap",
        "cpu_layers",
        "cpu_levers",
        "cpu_profile",
        "diffusers_peer",
        "guidance_accuracy",
        "kernel_grad",
        "plot_eval",
        "sampler_errors",
        "throughput",
    ):
        importlib.import_module(f"benchmarks.{name}")
    assert set(flags.FLAGS) == before


def test_notebook_streams_render_as_a_terminal_shows_them():
    """A progress bar redrawn with carriage returns keeps only its last state; other lines
    and other streams stay as they are."""
    from benchmarks.terminal_streams import merge_streams

    bar = [{"output_type": "stream", "name": "stderr", "text": f"\rtrain: {i}/3"} for i in range(4)]
    outputs = [
        {"output_type": "stream", "name": "stdout", "text": "a\nb\n"},
        *bar,
        {"output_type": "stream", "name": "stderr", "text": "\ndone\n"},
        {"output_type": "display_data", "data": {}},
        {"output_type": "stream", "name": "stderr", "text": "x\ry\n"},
    ]
    merged = merge_streams(outputs)
    assert [o.get("text") for o in merged] == ["a\nb\n", "train: 3/3\ndone\n", None, "y\n"]


def test_conv_cap_finds_every_convolution_and_runs_them_as_lax_does(monkeypatch):
    """benchmarks/conv_cap.py reads one convolution per 4-D kernel of the U-Net (less the 1x1
    ones that layers.Conv's "lab" runs as dots), and its one-after-the-other program
    computes what lax computes on the same inputs, each convolution plus its bias."""
    from benchmarks.conv_cap import _lax_conv, network_convs, ours_program
    from diffax_lab.models import layers
    from diffax_lab.models.unet import UNet

    model = UNet(out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_groups=4)  # fmt: skip
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
    params = model.init(jax.random.PRNGKey(0), x, t)["params"]
    kernels = sorted(k.shape for k in jax.tree.leaves(params) if k.ndim == 4)
    backend = jax.default_backend()
    monkeypatch.setitem(layers.CONV_IMPL_BY_BACKEND, backend, "lab")
    pointwise_as_dots = network_convs(model, params, x, t)
    assert sorted(s["rhs"] for s in pointwise_as_dots) == [k for k in kernels if k[:2] != (1, 1)]
    monkeypatch.setitem(layers.CONV_IMPL_BY_BACKEND, backend, "xla")
    specs = network_convs(model, params, x, t)
    assert sorted(s["rhs"] for s in specs) == kernels
    assert any(k[:2] == (1, 1) for k in kernels)
    fn, args = ours_program(specs[:3], train=True)
    for spec, (inp, k, bias, g), (y, dx, dk) in zip(specs[:3], args, fn(args), strict=True):
        y_ref, vjp = jax.vjp(lambda x, k, s=spec, b=bias: _lax_conv(s)(x, k) + b, inp, k)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip((dx, dk), vjp(g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_cap_pieces_compute_what_pytorch_computes_on_the_same_numbers():
    """--pieces times ours and PyTorch's forward, input and kernel gradients of one
    convolution on the same inputs: their results agree (so the timings compare like
    with like), the 3x3 and the strided, asymmetrically padded downsampling conv."""
    import torch  # installed for the tests by .ci/setup

    from benchmarks.conv_cap import network_convs, piece_programs
    from diffax_lab.models.unet import UNet

    model = UNet(out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), num_groups=4, downsample_padding=0)  # fmt: skip
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
    params = model.init(jax.random.PRNGKey(0), x, t)["params"]
    specs = network_convs(model, params, x, t)
    strided = [s for s in specs if s["window_strides"] != (1, 1)]
    assert strided and strided[0]["padding"] == ((0, 1), (0, 1))
    for spec in (specs[1], strided[0]):
        p = piece_programs(torch, spec)
        lhs, rhs, out = spec["dimension_numbers"]
        (pt, pb), (pl, pr) = spec["padding"]
        back = lambda a, dims: np.asarray(a).transpose(np.argsort(dims))  # noqa: E731
        np.testing.assert_allclose(back(p["torch_fwd"](), out), p["ours_fwd"](), atol=1e-4)
        np.testing.assert_allclose(back(p["torch_dw"](), rhs), p["ours_dw"](), atol=1e-3)
        dx = back(p["torch_dx"](), lhs)  # of the padded input: crop the padding
        dx = dx[:, pt : dx.shape[1] - pb, pl : dx.shape[2] - pr]
        np.testing.assert_allclose(dx, p["ours_dx"](), atol=1e-4)


def test_kernel_grad_formulations_equal_xlas_kernel_gradient_and_pytorchs():
    """benchmarks/kernel_grad.py: every formulation of a 3x3 kernel gradient computes XLA's
    (programs() refuses one that does not, and does refuse a wrong one), PyTorch's
    conv2d_weight agrees on the same numbers, and only 3x3 stride-1 'same' convolutions
    of a U-Net are taken (not the strided downsampling one)."""
    import torch  # installed for the tests by .ci/setup

    from benchmarks import kernel_grad
    from benchmarks.conv_cap import network_convs
    from diffax_lab.models.unet import UNet

    model = UNet(out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), num_groups=4, downsample_padding=0)  # fmt: skip
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
    params = model.init(jax.random.PRNGKey(0), x, t)["params"]
    specs = network_convs(model, params, x, t)
    taken = [s for s in specs if kernel_grad.eligible(s)]
    assert taken and len(taken) < len(specs)
    assert all(s["window_strides"] == (1, 1) and s["rhs"][:2] == (3, 3) for s in taken)
    assert not kernel_grad.eligible(next(s for s in specs if s["window_strides"] != (1, 1)))
    spec = next(s for s in taken if s["rhs"][2] > 1 and s["rhs"][3] > 1)
    names = list(kernel_grad.NAMES)
    progs = kernel_grad.programs(spec, names, torch)  # each checked against xla's
    assert set(progs) == {*names, "torch"}
    ours = np.asarray(progs["xla"]())
    theirs = progs["torch"]().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())
    floor = np.asarray(progs["gemm_floor"]())  # the same dot, its operand prebuilt
    np.testing.assert_allclose(floor.reshape(ours.shape), ours, atol=1e-4 * np.abs(ours).max())
    with pytest.MonkeyPatch.context() as m:
        m.setitem(
            kernel_grad.FORMULATIONS, "im2col", lambda x, dy: kernel_grad.dw_xla(x, dy) * 1.01
        )
        with pytest.raises(ValueError, match="im2col differs"):
            kernel_grad.programs(spec, ["im2col"])


def test_cpu_levers_builds_each_variant_on_its_own_config_and_restores_the_tables(monkeypatch):
    """cpu_levers.build: a diagnostic variant's overrides reach the built step on a copy of
    the config (the next variant gets the config unchanged), a fusion set holds only while
    its step is built, and every lever table is back to what it was afterwards."""
    import benchmarks.cpu_profile
    from benchmarks import cpu_levers
    from diffax_lab import compilation, config_lib
    from diffax_lab.models import layers

    seen = []

    def ours(config, forward_batch):
        conv = layers.CONV_IMPL_BY_BACKEND[jax.default_backend()]
        fusions = compilation.cpu_compiler_options("cpu", training=True)
        fusions = next(iter(fusions.values()), "") if fusions else ""
        seen.append((config.model.activation, config.model.norm, conv, "REDUCE" in fusions))

    monkeypatch.setattr(benchmarks.cpu_profile, "Ours", ours)
    monkeypatch.delenv(compilation.FUSIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")  # read per call; the backend already has its flags
    before = (dict(layers.CONV_IMPL_BY_BACKEND), compilation.CPU_YNN_FUSIONS)
    config = config_lib.load_config("configs/ddpm.py:tiny")
    for name in ("relu_activation", "no_norm", "conv_xla", "no_reduce_fusion", "all"):
        cpu_levers.build(config, 4, **cpu_levers.VARIANTS[name])
    reduce = "REDUCE" in before[1]
    assert reduce  # the lab's set; the variant takes it out
    assert seen == [
        ("relu", "group", "lab", reduce),
        ("silu", "none", "lab", reduce),
        ("silu", "group", "xla", reduce),
        ("silu", "group", "lab", False),
        ("silu", "group", "lab", reduce),
    ]
    assert (config.model.activation, config.model.norm) == ("silu", "group")
    assert (dict(layers.CONV_IMPL_BY_BACKEND), compilation.CPU_YNN_FUSIONS) == before
