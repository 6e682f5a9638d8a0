"""The benchmark's analytic FLOP counter, checked against counts known independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.flops import count_flops
from diffax_lab.models import ddpm_cifar10_unet
from diffax_lab.models.layers import AttentionBlock
from tests.helpers import conv_matches_nn_conv


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
        kinds = tuple(k in fusions for k in ("REDUCE", "INDIVIDUAL_CONVOLUTION", "ELTWISE"))
        seen.append((config.model.activation, config.model.norm, conv, *kinds))

    monkeypatch.setattr(benchmarks.cpu_profile, "Ours", ours)
    monkeypatch.delenv(compilation.FUSIONS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")  # read per call; the backend already has its flags
    before = (dict(layers.CONV_IMPL_BY_BACKEND), compilation.CPU_YNN_FUSIONS)
    config = config_lib.load_config("configs/ddpm.py:tiny")
    names = ("relu_activation", "no_norm", "conv_xla", "no_reduce_fusion", "ynn_convolutions")
    for name in (*names, "ynn_eltwise", "conv_onednn_dw", "all"):
        cpu_levers.build(config, 4, **cpu_levers.VARIANTS[name])
    # The lab's train-step set has REDUCE, and neither INDIVIDUAL_CONVOLUTION nor ELTWISE;
    # one variant takes REDUCE out, the two others each add one of the latter.
    assert [k in before[1] for k in ("REDUCE", "INDIVIDUAL_CONVOLUTION", "ELTWISE")] == [
        True,
        False,
        False,
    ]
    lab = ("silu", "group", "lab", True, False, False)
    assert seen == [
        ("relu", "group", "lab", True, False, False),
        ("silu", "none", "lab", True, False, False),
        ("silu", "group", "xla", True, False, False),
        ("silu", "group", "lab", False, False, False),
        ("silu", "group", "lab", True, True, False),
        ("silu", "group", "lab", True, False, True),
        ("silu", "group", "onednn_dw", True, False, False),  # registered by build
        lab,
    ]
    assert "onednn_dw" in layers.CONV_IMPLS
    assert (config.model.activation, config.model.norm) == ("silu", "group")
    assert (dict(layers.CONV_IMPL_BY_BACKEND), compilation.CPU_YNN_FUSIONS) == before


def test_cpu_profile_peer_full_step_does_the_lab_steps_work():
    """The PyTorch peer's full train step (the default) does the lab's step's work: each
    step a fresh batch of its uint8 images scaled to [-1, 1] and noised in closed form at
    fresh timesteps, and an EMA update after AdamW; the network step reuses one fixed batch
    and has no EMA; an unknown step is refused, naming the choices."""
    import torch  # torch and diffusers are installed for the tests by .ci/setup

    from benchmarks.common_flags import PEER_STEPS
    from benchmarks.cpu_profile import Peer
    from diffax_lab import config_lib

    config = config_lib.load_config("configs/ddpm.py:tiny")
    config.train.batch_size = 3
    full, net = Peer(config, 2, "full"), Peer(config, 2, "network")
    work = full.work
    torch.manual_seed(7)
    x, t, eps = work.batch()
    torch.manual_seed(7)  # the same draws, by hand
    idx = torch.randint(0, work.images.shape[0], (3,))
    x0 = work.images[idx].float() / 127.5 - 1.0
    noise = torch.randn_like(x0)
    t_ = torch.randint(0, config.diffusion.num_timesteps, (3,))
    ab = work.scheduler.alphas_cumprod[t_].reshape(3, 1, 1, 1)
    assert torch.equal(t, t_) and torch.equal(eps, noise)
    torch.testing.assert_close(x, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    assert float(x0.min()) >= -1.0 and float(x0.max()) <= 1.0
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(work.batch()[2], eps)  # fresh noise each step
    assert all(a is b for a, b in zip(net.work.batch(), net.work.batch(), strict=True))

    shadow = [s.clone() for s in work.ema.shadow_params]
    for _ in range(2):
        full.train()
        net.train()
    assert work.ema.optimization_step == 2 and net.work.ema.optimization_step == 0
    moved = [not torch.equal(a, b) for a, b in zip(shadow, work.ema.shadow_params, strict=True)]
    assert any(moved)  # the EMA followed AdamW's update
    with pytest.raises(ValueError, match=r"choose one of \('full', 'network'\)"):
        Peer(config, 2, "bogus")
    assert PEER_STEPS == ("full", "network")


def test_convolution_placement_reads_where_xla_runs_each_convolution():
    """cpu_profile.convolution_placement: in a compiled program, a convolution and its two
    gradients are found, the kernel gradient told apart by its image-wide window; a
    convolution inside a computation that a YNNPACK fusion calls counts as YNNPACK's."""
    from benchmarks.cpu_profile import convolution_placement
    from diffax_lab import compilation

    x, k = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))

    def conv(x, k):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)

    def fwd_and_grads(x, k):
        y, vjp = jax.vjp(conv, x, k)
        return (y, *vjp(y))

    lowered = jax.jit(fwd_and_grads).lower(x, k)
    text = compilation.compile_with_options(lowered, training=True).as_text()
    found = convolution_placement(text)
    assert sum(found[w]["kernel_gradient"] for w in found) == 1
    assert sum(found[w]["other"] for w in found) == 2
    hlo = "\n".join(
        [
            "%fused_computation.1 (p0: f32[2,8,8,32], p1: f32[3,3,32,32]) -> f32[2,8,8,32] {",
            "  ROOT %c.1 = f32[2,8,8,32]{3,2,1,0} convolution(%p0, %p1), "
            "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
            "}",
            "ENTRY %main.2 (a: f32[2,8,8,32]) -> f32[32,3,3,32] {",
            "  %c.2 = f32[32,3,3,32]{3,2,1,0} convolution(%t0, %t1), "
            "window={size=8x8 pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
            "  %ynn_fusion = f32[2,8,8,32]{3,2,1,0} fusion(%a, %k), kind=kCustom, "
            'calls=%fused_computation.1, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
            "}",
        ]
    )
    assert convolution_placement(hlo) == {
        "xla": {"kernel_gradient": 1, "other": 0},
        "ynnpack": {"kernel_gradient": 0, "other": 1},
    }


def test_list_flags_refuse_unknown_choices_by_name():
    """common_flags.check_choices, the one check behind --variants, --formulations and
    --modes: known values pass; unknown ones are refused, named, with the choices."""
    from absl import app

    from benchmarks.common_flags import check_choices

    check_choices("modes", ["fp32", "bf16"], ("fp32", "bf16", "bf16_compile"))
    with pytest.raises(app.UsageError, match=r"--modes: unknown \['fp8'\]; choose from \['fp32'"):
        check_choices("modes", ["fp32", "fp8"], ("fp32", "bf16"))


@pytest.mark.parametrize("impl", ["onednn_dw", "onednn_all"])
@pytest.mark.parametrize(
    "kwargs, custom_call",
    [
        (dict(features=5, kernel_size=(3, 3)), True),
        (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), True),
        # asymmetric padding: oneDNN's call takes symmetric padding, so XLA's runs
        (dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((0, 1), (0, 1))), False),
        (dict(features=3, kernel_size=(1, 1)), False),  # 1x1: one dot, as "lab"
    ],
)
def test_onednn_ffi_convolutions_compute_nn_convs_values_and_gradients(impl, kwargs, custom_call):
    """benchmarks/onednn_ffi.py: oneDNN's convolution pieces, as custom calls inside the
    compiled program, give nn.Conv's outputs and gradients (input and kernel), and run
    where they are meant to (the program names the custom call, or does not)."""
    from benchmarks import onednn_ffi

    onednn_ffi.register_conv_impls()
    text = conv_matches_nn_conv(kwargs, impl)
    assert ("diffax_onednn_dw" in text) == custom_call
    assert ("diffax_onednn_fwd" in text) == (custom_call and impl == "onednn_all")


def test_onednn_ffi_handler_failure_raises_instead_of_leaving_the_output_unwritten():
    """A Python exception in an FFI handler reaches the caller as XLA's error, with its
    message; the program does not return an output buffer nobody wrote."""
    from benchmarks import onednn_ffi

    def fails(ins, outs):
        raise RuntimeError("oneDNN was not reached")

    onednn_ffi._register("diffax_test_failing_target", fails)
    call = jax.ffi.ffi_call("diffax_test_failing_target", jax.ShapeDtypeStruct((3,), np.float32))
    with pytest.raises(Exception, match="oneDNN was not reached"):
        jax.block_until_ready(jax.jit(call)(jnp.ones((3,), jnp.float32)))


@pytest.fixture
def persistent_cache_off():
    """JAX's persistent compilation cache off for one test (benchmarks/xla_onednn.py's
    programs cannot be serialized), back as it was afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()  # JAX decides once per process whether to use the cache, until reset
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    cc.reset_cache()


@pytest.mark.parametrize("impl", ["xla_onednn", "xla_onednn_all"])
@pytest.mark.parametrize(
    "kwargs, pieces",
    [
        # forward, input and kernel gradients (8 output features: oneDNN's kernel gradient)
        (dict(features=8, kernel_size=(3, 3)), "fxw"),
        # stride 2: the input gradient stays XLA's
        (dict(features=8, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), "fw"),
        # asymmetric padding, read as it is; 5 output features: XLA's kernel gradient
        (dict(features=5, kernel_size=(3, 3), padding=((0, 2), (1, 0))), "fx"),
        (dict(features=3, kernel_size=(1, 1)), ""),  # 1x1: one dot, as "lab"
        # negative padding (cropping): XLA's whole
        (dict(features=8, kernel_size=(3, 3), padding=((-1, 1), (1, 1))), ""),
    ],
)
def test_xla_onednn_convolutions_compute_nn_convs_values_and_gradients(
    impl, kwargs, pieces, persistent_cache_off
):
    """benchmarks/xla_onednn.py: XLA:CPU's oneDNN convolution thunk, as the forward,
    input-gradient and kernel-gradient convolutions built there, gives nn.Conv's outputs
    and gradients; the program calls it once for each piece it applies to."""
    from benchmarks import xla_onednn

    xla_onednn.register_conv_impls()
    text = conv_matches_nn_conv(kwargs, impl)
    expected = len(pieces if impl == "xla_onednn_all" else pieces.replace("w", ""))
    # the forward runs twice: in the output and in the gradient's forward pass
    expected += "f" in pieces
    assert text.count(xla_onednn.TARGET) == expected


def test_xla_onednn_refuses_to_trace_with_the_persistent_cache_on(tmp_path):
    """XLA cannot serialize a program with the oneDNN thunk, so with JAX's persistent cache
    on, the convolution says so when traced, before anything compiles or is written."""
    from benchmarks import xla_onednn

    impl = xla_onednn.conv_impl("f")
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", before[1] or str(tmp_path))
    try:
        assert xla_onednn.persistent_cache_on()
        with pytest.raises(RuntimeError, match=r"persistent_cache_off\(\)"):
            jax.jit(lambda x, k: impl(x, k, (1, 1), ((1, 1), (1, 1)), None)).lower(x, k)
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])


def test_xla_onednn_says_so_when_this_jaxlib_does_not_run_its_convolution(
    monkeypatch, persistent_cache_off
):
    """Where the subprocess probe failed (another XLA's config conventions, or no oneDNN),
    tracing stops with what the probe printed instead of aborting in oneDNN."""
    from benchmarks import xla_onednn

    monkeypatch.setitem(xla_onednn._probe, "result", (False, "XLA is not built with oneDNN."))
    impl = xla_onednn.conv_impl("fx")
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(RuntimeError, match="does not run the oneDNN convolution.*not built"):
        jax.jit(lambda x, k: impl(x, k, (1, 1), ((1, 1), (1, 1)), None)).lower(x, k)


def test_xla_onednn_persistent_cache_off_stops_writes_in_a_process_that_used_the_cache(tmp_path):
    """JAX decides once per process whether to use the persistent cache; turning it off
    must undo that decision, or a later program with the oneDNN thunk would be written."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    from benchmarks import xla_onednn

    before = (
        jax.config.jax_enable_compilation_cache,
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    try:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        cc.reset_cache()
        jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)).block_until_ready()
        written = sorted(tmp_path.iterdir())
        assert written  # the cache was in use
        xla_onednn.persistent_cache_off()
        assert not xla_onednn.persistent_cache_on()
        jax.jit(lambda x: x * 3 - 1)(jnp.arange(3.0)).block_until_ready()
        assert sorted(tmp_path.iterdir()) == written
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[2])
        cc.reset_cache()
