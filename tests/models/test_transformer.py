"""Stable Diffusion's spatial transformer: parity with diffusers' Transformer2DModel on random
weights, the all-masked identity, and the U-Net's cross-attention option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.models.transformer import SpatialTransformer
from diffax_lab.models.unet import UNet

C, HEADS, CTX_DIM, L = 16, 2, 12, 5


def _init(depth=1):
    block = SpatialTransformer(num_heads=HEADS, depth=depth, num_groups=4)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (2, 4, 4, C))
    ctx = jax.random.normal(k[1], (2, L, CTX_DIM))
    params = jax.jit(block.init)(k[2], x, ctx)["params"]
    # proj_out starts at zero (LDM's zero_module): randomise it so every path shows.
    params["proj_out"]["kernel"] = 0.3 * jax.random.normal(k[2], params["proj_out"]["kernel"].shape)
    return block, params, x, ctx


def test_all_masked_context_leaves_exactly_the_self_attention_path():
    block, params, x, ctx = _init()
    apply = jax.jit(lambda p, c, m: block.apply({"params": p}, x, c, m))
    none = jnp.zeros((2, L), bool)
    out = apply(params, ctx, none)
    # The context is then ignored: another context gives the same output...
    out2 = apply(params, 5.0 * ctx + 1.0, none)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    # ...which is the block whose cross-attention output projection is zero (no attn2 term).
    zeroed = jax.tree.map(lambda p: p, params)
    a2 = zeroed["transformer_blocks_0"]["attn2"]["to_out"]
    a2["kernel"], a2["bias"] = jnp.zeros_like(a2["kernel"]), jnp.zeros_like(a2["bias"])
    ref = apply(zeroed, ctx, jnp.ones((2, L), bool))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    # and with real tokens the context does matter.
    full = apply(params, ctx, jnp.ones((2, L), bool))
    assert float(jnp.max(jnp.abs(full - out))) > 1e-3
    # A masked-out token does not influence the output.
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    a = apply(params, ctx, mask)
    b = apply(params, ctx.at[0, 3:].set(7.0), mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _to_flax(sd, depth):
    def lin(name):
        d = {"kernel": sd[name + ".weight"].T}
        if name + ".bias" in sd:
            d["bias"] = sd[name + ".bias"]
        return d

    def conv1x1(name):
        return {"kernel": sd[name + ".weight"][:, :, 0, 0].T, "bias": sd[name + ".bias"]}

    def ln(name):
        return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}

    p = {
        "norm": {"norm": ln("norm")},
        "proj_in": conv1x1("proj_in"),
        "proj_out": conv1x1("proj_out"),
    }
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        blk = {f"norm{j}": ln(pre + f"norm{j}") for j in (1, 2, 3)}
        for a in ("attn1", "attn2"):
            blk[a] = {n: lin(pre + f"{a}.{n}") for n in ("to_q", "to_k", "to_v")}
            blk[a]["to_out"] = lin(pre + f"{a}.to_out.0")
        blk["ff_proj"] = lin(pre + "ff.net.0.proj")
        blk["ff_out"] = lin(pre + "ff.net.2")
        p[f"transformer_blocks_{i}"] = blk
    return jax.tree.map(jnp.asarray, p)


def test_matches_diffusers_transformer2d_on_random_weights():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    depth = 2
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=C // HEADS,
        in_channels=C,
        num_layers=depth,
        cross_attention_dim=CTX_DIM,
        norm_num_groups=4,
    ).eval()
    with torch.no_grad():  # diffusers does not zero proj_out; make every weight non-trivial
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, C, 4, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, L, CTX_DIM)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    with torch.no_grad():
        want = ref(
            torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(ctx),
            encoder_attention_mask=torch.from_numpy(mask),
        ).sample.numpy()
    block = SpatialTransformer(num_heads=HEADS, depth=depth, num_groups=4)
    got = jax.jit(block.apply)(
        {"params": _to_flax(sd, depth)},
        jnp.asarray(x.transpose(0, 2, 3, 1)),
        jnp.asarray(ctx),
        jnp.asarray(mask, bool),
    )
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-4)


def test_unet_cross_attention_option_uses_the_context():
    net = UNet(
        out_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_groups=4,
        cross_attention_dim=CTX_DIM,
    )
    x = jnp.ones((2, 8, 8, 1))
    t = jnp.array([0.3, 0.7])
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, L, CTX_DIM))
    mask = jnp.ones((2, L), bool)
    params = jax.jit(net.init)(jax.random.PRNGKey(0), x, t, context=ctx, context_mask=mask)
    params = params["params"]
    names = set(params)
    assert "down1_attn0" in names and "mid_attn" in names and "up1_attn0" in names
    assert "attn2" in params["mid_attn"]["transformer_blocks_0"]
    # Non-zero output heads so the context's effect reaches the output.
    params = jax.tree.map(lambda p: p + 0.05, params)
    apply = jax.jit(lambda c: net.apply({"params": params}, x, t, context=c, context_mask=mask))
    a, b = apply(ctx), apply(-ctx)
    assert a.shape == x.shape and float(jnp.max(jnp.abs(a - b))) > 1e-4
    with pytest.raises(ValueError, match="cross_attention_dim"):
        net.apply({"params": params}, x, t)
