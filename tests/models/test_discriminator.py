"""The Flax patch-GAN discriminator and LDM's autoencoder step against PyTorch transcriptions of
taming-transformers' ``NLayerDiscriminator`` and ``LPIPSWithDiscriminator`` (perceptual weight
0), with diffusers' ``AutoencoderKL`` as the autoencoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from torch import nn

from diffax_lab.diffusion import latent
from diffax_lab.models.autoencoder_kl_io import flax_params_from_diffusers
from diffax_lab.models.discriminator import NLayerDiscriminator
from diffax_lab.models.vae import LAST_LAYER, AutoencoderKL, AutoencoderKLConfig


class TamingNLayerDiscriminator(nn.Module):
    """taming/modules/discriminator/model.py, NLayerDiscriminator with BatchNorm (verbatim
    structure; ActNorm and weights_init left out)."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        norm_layer, use_bias, kw, padw = nn.BatchNorm2d, False, 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, 2, padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kw, 1, padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
        ]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kw, 1, padw)]
        self.main = nn.Sequential(*sequence)

    def forward(self, x):
        return self.main(x)


def nhwc(t):
    return np.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()


def torch_from_flax(disc: TamingNLayerDiscriminator, variables, n_layers):
    """Copies the Flax variables into the taming module (main.<i> indices by position)."""
    p, stats = variables["params"], variables.get("batch_stats", {})
    convs = {0: 0, **{n: 3 * n - 1 for n in range(1, n_layers + 1)}, n_layers + 1: 3 * n_layers + 2}
    with torch.no_grad():
        for i, idx in convs.items():
            layer = disc.main[idx]
            layer.weight.copy_(
                torch.from_numpy(np.transpose(np.array(p[f"conv_{i}"]["kernel"]), (3, 2, 0, 1)))
            )
            if layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(np.array(p[f"conv_{i}"]["bias"])))
        for n in range(1, n_layers + 1):
            bn = disc.main[3 * n]
            bn.weight.copy_(torch.from_numpy(np.array(p[f"norm_{n}"]["scale"])))
            bn.bias.copy_(torch.from_numpy(np.array(p[f"norm_{n}"]["bias"])))
            if stats:
                bn.running_mean.copy_(torch.from_numpy(np.array(stats[f"norm_{n}"]["mean"])))
                bn.running_var.copy_(torch.from_numpy(np.array(stats[f"norm_{n}"]["var"])))


def test_default_discriminator_is_tamings_70px_patch_gan():
    disc = NLayerDiscriminator()
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: disc.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: disc.apply(v, x), variables, x)
    assert out.shape == (1, 30, 30, 1)
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    theirs = sum(p.numel() for p in TamingNLayerDiscriminator().parameters())
    assert ours == theirs == 2_765_633


@pytest.fixture(scope="module")
def discriminators():
    n_layers = 2
    disc = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = disc.init(jax.random.key(1), x)
    peer = TamingNLayerDiscriminator(3, 8, n_layers)
    torch_from_flax(peer, variables, n_layers)
    return disc, variables, peer, n_layers


def test_discriminator_equals_taming_in_train_and_eval_mode(discriminators):
    disc, variables, peer, n_layers = discriminators
    x = np.asarray(jax.random.normal(jax.random.key(2), (4, 16, 16, 3)))
    peer.train()
    with torch.no_grad():
        ref = peer(nchw(x))
    out, updates = disc.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, nhwc(ref), atol=1e-4)
    # Running means move as PyTorch's (momentum 0.1); running variances differ by Bessel's
    # n / (n - 1) (PyTorch stores the unbiased one), so eval mode is compared on equal stats.
    for n in range(1, n_layers + 1):
        np.testing.assert_allclose(
            updates["batch_stats"][f"norm_{n}"]["mean"],
            peer.main[3 * n].running_mean.numpy(),
            atol=1e-5,
        )
    variables = {**variables, **updates}
    torch_from_flax(peer, variables, n_layers)
    peer.eval()
    with torch.no_grad():
        ref = peer(nchw(x))
    np.testing.assert_allclose(disc.apply(variables, jnp.asarray(x)), nhwc(ref), atol=1e-4)


def test_ldm_autoencoder_step_equals_taming(discriminators, tmp_path):
    """LPIPSWithDiscriminator.forward (perceptual_weight=0, logvar=0, posterior mode) for both
    optimizers, against latent.py composed as its docstring says."""
    disc, disc_vars, peer, _ = discriminators
    kl_weight, disc_factor, disc_weight = 1e-2, 1.0, 0.5

    torch.manual_seed(0)
    vae_t = TorchAutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=2,
    )
    params = flax_params_from_diffusers({k: v.numpy() for k, v in vae_t.state_dict().items()})
    vae = AutoencoderKL(
        AutoencoderKLConfig(
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2
        )
    )
    x = np.asarray(jax.random.uniform(jax.random.key(3), (4, 16, 16, 3), minval=-1, maxval=1))

    # --- PyTorch: taming's generator (optimizer_idx 0) and discriminator (1) losses.
    peer.train()
    torch_from_flax(peer, disc_vars, 2)
    xt = nchw(x)
    posterior = vae_t.encode(xt).latent_dist
    rec_t = vae_t.decode(posterior.mode()).sample
    nll_t = torch.abs(xt - rec_t)  # logvar = 0: rec / exp(0) + 0
    nll_t = torch.sum(nll_t) / nll_t.shape[0]
    kl_t = torch.sum(posterior.kl()) / xt.shape[0]
    g_loss_t = -torch.mean(peer(rec_t))
    last = vae_t.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll_t, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss_t, last, retain_graph=True)[0]
    d_weight_t = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4)
    d_weight_t = d_weight_t.detach() * disc_weight
    loss_t = nll_t + kl_weight * kl_t + d_weight_t * disc_factor * g_loss_t
    grad_t = torch.autograd.grad(loss_t, vae_t.encoder.conv_in.weight)[0]
    with torch.no_grad():
        d_loss_t = disc_factor * (
            0.5 * torch.mean(torch.relu(1.0 - peer(xt)))
            + 0.5 * torch.mean(torch.relu(1.0 + peer(rec_t)))
        )

    # --- JAX: the same step from latent.py.
    def discriminate(images):
        logits, _ = disc.apply(disc_vars, images, train=True, mutable=["batch_stats"])
        return logits

    def pick(tree):
        for k in LAST_LAYER:
            tree = tree[k]
        return tree

    def generator_loss(params):
        rec, mean, logvar = vae.apply({"params": params}, jnp.asarray(x))

        def nll_of(p):
            r, m, lv = vae.apply({"params": p}, jnp.asarray(x))
            return latent.autoencoder_loss(x, r, m, lv, kl_weight=0.0)[1]["nll"]

        def adversarial_of(p):
            r, _, _ = vae.apply({"params": p}, jnp.asarray(x))
            return latent.generator_adversarial_loss(discriminate(r))

        weight = latent.adaptive_adversarial_weight(
            pick(jax.grad(nll_of)(params)),
            pick(jax.grad(adversarial_of)(params)),
            disc_weight=disc_weight,
        )
        factor = latent.discriminator_factor(10, disc_start=5, factor=disc_factor)
        loss, aux = latent.autoencoder_loss(
            x,
            rec,
            mean,
            logvar,
            kl_weight=kl_weight,
            logits_fake=discriminate(rec),
            adversarial_weight=weight * factor,
        )
        return loss, (aux, weight, rec)

    (loss, (aux, weight, rec)), grads = jax.jit(jax.value_and_grad(generator_loss, has_aux=True))(
        params
    )
    d_loss = latent.discriminator_loss(discriminate(jnp.asarray(x)), discriminate(rec))

    np.testing.assert_allclose(weight, d_weight_t.item(), rtol=1e-3)
    np.testing.assert_allclose(aux["nll"], nll_t.item(), rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], kl_t.item(), rtol=1e-4)
    np.testing.assert_allclose(aux["adversarial"], g_loss_t.item(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(
        grads["encoder"]["conv_in"]["kernel"],
        np.transpose(grad_t.numpy(), (2, 3, 1, 0)),
        rtol=1e-3,
        atol=1e-3 * float(np.abs(grad_t.numpy()).max()),
    )
    np.testing.assert_allclose(d_loss * disc_factor, d_loss_t.item(), rtol=1e-5)
    assert aux["adversarial"] != 0.0 and weight > 0.0
