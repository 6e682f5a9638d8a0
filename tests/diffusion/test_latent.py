"""The latent-space maths against closed forms and torch.distributions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffax_lab.diffusion import latent


def gaussian(shape=(3, 4, 4, 2), seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=shape).astype(np.float32)
    logvar = rng.uniform(-3.0, 1.5, size=shape).astype(np.float32)
    return mean, logvar


def test_kl_is_the_closed_form_of_torch_distributions():
    mean, logvar = gaussian()
    q = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(0.0, 1.0)
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).numpy()
    got = latent.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Known points: N(0, 1) costs nothing; a unit shift of the mean costs 1/2 nat a dimension.
    zeros = jnp.zeros((2, 5))
    np.testing.assert_allclose(latent.kl_to_standard_normal(zeros, zeros), [0.0, 0.0])
    np.testing.assert_allclose(latent.kl_to_standard_normal(zeros + 1, zeros), [2.5, 2.5])


def test_reparameterised_sample_has_the_posterior_mean_and_variance():
    mean, logvar = gaussian(shape=(2, 3, 3, 2))
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    z = jax.vmap(lambda k: latent.sample_posterior(k, mean, logvar))(keys)  # [n, ...]
    var = np.exp(logvar)
    # Monte Carlo: standard errors sqrt(var / n) for the mean, var sqrt(2 / n) for the variance.
    assert np.all(np.abs(z.mean(0) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0) - var) < 5 * var * np.sqrt(2 / n))


def test_plain_autoencoder_loss_without_kl_and_discriminator():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    x_rec = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
    mean, logvar = gaussian()
    for kind, err in (("l1", np.abs(x - x_rec)), ("l2", np.square(x - x_rec))):
        plain = err.reshape(3, -1).sum(1).mean()
        loss, aux = latent.autoencoder_loss(
            x, x_rec, mean, logvar, kl_weight=0.0, reconstruction=kind
        )
        np.testing.assert_allclose(loss, plain, rtol=1e-5)
        # The discriminator off (weight 0) adds nothing, whatever it says.
        off, _ = latent.autoencoder_loss(
            x,
            x_rec,
            mean,
            logvar,
            kl_weight=0.0,
            reconstruction=kind,
            logits_fake=jnp.full((3, 2, 2, 1), 7.0),
            adversarial_weight=0.0,
        )
        np.testing.assert_allclose(off, plain, rtol=1e-5)
        assert aux["reconstruction"] == pytest.approx(plain, rel=1e-5)
    # With beta and LDM's learned output log-variance s: sum |.| / e^s + s per pixel, + beta KL.
    beta, s = 1e-3, 0.3
    loss, aux = latent.autoencoder_loss(x, x_rec, mean, logvar, kl_weight=beta, output_logvar=s)
    kl = latent.kl_to_standard_normal(mean, logvar).mean()
    nll = (np.abs(x - x_rec) / math.exp(s) + s).reshape(3, -1).sum(1).mean()
    np.testing.assert_allclose(loss, nll + beta * kl, rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], kl, rtol=1e-6)
    with pytest.raises(ValueError, match="reconstruction loss must be one of"):
        latent.reconstruction_loss(x, x_rec, "lpips")


def test_adversarial_term_and_its_weight():
    x = jnp.zeros((2, 4, 4, 1))
    logits = jnp.asarray([[1.0, -3.0], [2.0, 0.0]]).reshape(2, 2, 1, 1)
    zeros = jnp.zeros((2, 1, 1, 1))
    loss, aux = latent.autoencoder_loss(
        x, x, zeros, zeros, kl_weight=1.0, logits_fake=logits, adversarial_weight=0.5
    )
    assert aux["adversarial"] == pytest.approx(0.0)  # -mean(1, -3, 2, 0)
    loss, aux = latent.autoencoder_loss(
        x, x, zeros, zeros, kl_weight=1.0, logits_fake=logits + 1, adversarial_weight=0.5
    )
    assert loss == pytest.approx(-0.5) and aux["adversarial"] == pytest.approx(-1.0)
    # The weight is a constant to the optimiser.
    g = jax.grad(
        lambda w: latent.autoencoder_loss(
            x, x, zeros, zeros, kl_weight=1.0, logits_fake=logits, adversarial_weight=w
        )[0]
    )(2.0)
    assert g == 0.0


def test_adaptive_weight_is_the_clipped_gradient_norm_ratio():
    a = jnp.asarray([[3.0, 4.0]])  # ||a|| = 5
    b = jnp.asarray([[0.0, 2.0]])  # ||b|| = 2
    w = latent.adaptive_adversarial_weight(a, b, disc_weight=0.5)
    assert w == pytest.approx(0.5 * 5.0 / (2.0 + 1e-4))
    assert latent.adaptive_adversarial_weight(a, 0 * b) == pytest.approx(1e4)  # clipped
    assert jax.grad(lambda s: latent.adaptive_adversarial_weight(s * a, b))(1.0) == 0.0


def test_discriminator_losses_and_start():
    real = jnp.asarray([2.0, 0.5, -1.0])
    fake = jnp.asarray([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 2)
    assert latent.discriminator_loss(real, fake) == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    softplus = torch.nn.functional.softplus
    r, f = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    want = 0.5 * (softplus(-r).mean() + softplus(f).mean()).item()
    assert latent.discriminator_loss(real, fake, "vanilla") == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="hinge"):
        latent.discriminator_loss(real, fake, "wgan")
    assert latent.discriminator_factor(4, disc_start=5, factor=0.7) == 0.0
    assert latent.discriminator_factor(5, disc_start=5, factor=0.7) == pytest.approx(0.7)


def test_latent_scale_factor_of_known_statistics():
    # LDM's estimate is 1 / std over all entries, PyTorch's unbiased std.
    z = jax.random.normal(jax.random.key(0), (64, 8, 8, 4)) * 2.5 + 0.7
    scale = latent.latent_scale_factor(z)
    assert scale == pytest.approx(1 / 2.5, rel=0.01)
    assert scale == pytest.approx(1 / torch.from_numpy(np.array(z)).flatten().std().item())
    scaled = latent.scale_latents(z, scale, shift_factor=0.7)
    assert float(jnp.std(scaled, ddof=1)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(latent.unscale_latents(scaled, scale, 0.7), z, atol=1e-5)


def test_psnr_and_rate():
    x = jnp.zeros((2, 4, 4, 3))
    x_rec = x.at[0].set(0.1).at[1].set(-0.01)  # MSE 1e-2 and 1e-4
    np.testing.assert_allclose(
        latent.psnr(x, x_rec), [10 * np.log10(4 / 1e-2), 10 * np.log10(4 / 1e-4)], rtol=1e-5
    )
    np.testing.assert_allclose(latent.psnr(x, x_rec, data_range=1.0)[0], 20.0, rtol=1e-5)
    # One latent dimension with a unit mean shift: 1/2 nat, over 48 data dimensions.
    mean = jnp.zeros((2, 1, 1, 1)).at[0].set(1.0)
    rate = latent.rate_bits_per_dim(mean, jnp.zeros_like(mean), num_data_dims=48)
    np.testing.assert_allclose(rate, [0.5 / (48 * np.log(2)), 0.0], atol=1e-8)
