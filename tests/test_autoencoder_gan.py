"""The autoencoder task's patch-GAN (autoencoder.discriminator=True): one loss, each network
gets only its own gradient, LDM's adaptive weight, the start step, and the plain loss without
KL and discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax_lab.diffusion import latent
from diffax_lab.models.vae import LAST_LAYER
from diffax_lab.sharding import make_mesh
from diffax_lab.tasks import registry
from tests.helpers import load_config


def make_task(**fields):
    config = load_config("vae.py", "tiny")
    for k, v in fields.items():
        config.autoencoder[k] = v
    registry.get("autoencoder").check_config(config)
    return registry.build(config, make_mesh(1))


def batch():
    x0 = jax.random.uniform(jax.random.key(3), (4, 32, 32, 1), minval=-1.0, maxval=1.0)
    return x0, list(jax.random.split(jax.random.key(4), 3))


def last(tree):
    for k in LAST_LAYER:
        tree = tree[k]
    return tree


def test_without_kl_and_discriminator_the_loss_is_the_summed_l1_error():
    task = make_task(kl_weight=0.0, discriminator=False)
    params = task.init_params(jax.random.key(0))
    assert set(params) == {"autoencoder"}
    x0, keys = batch()
    loss, aux = jax.jit(task.train_loss)(params, x0, None, keys)
    x_rec, _, _ = task.model.apply({"params": params["autoencoder"]}, x0, key=keys[1])
    plain = jnp.mean(jnp.sum(jnp.abs(x0 - x_rec), axis=(1, 2, 3)))
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-5)
    assert "adaptive_weight" not in aux


@pytest.mark.slow  # gradients of two networks through the GAN loss: 12 s of compiles
def test_each_network_gets_only_its_own_gradient_and_the_adaptive_weight():
    task = make_task(discriminator=True, disc_start=2, disc_weight=0.5, kl_weight=1e-3)
    a = task.config.autoencoder
    params = task.init_params(jax.random.key(0))
    assert set(params) == {"autoencoder", "disc", "disc_clock"}
    x0, keys = batch()

    def loss(p):
        return task.train_loss(p, x0, None, keys)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    # Before disc_start: no adversarial term, no discriminator loss.
    (l0, aux0), _ = value_and_grad(params)
    assert float(aux0["adaptive_weight"]) > 0.0
    assert float(aux0["disc_factor"]) == 0.0 and float(aux0["loss_d"]) == 0.0
    np.testing.assert_allclose(float(l0), float(aux0["nll"] + a.kl_weight * aux0["kl"]), rtol=1e-5)

    # Switched on; a discriminator with larger weights so that lambda is below its clip 1e4.
    disc_params = jax.tree.map(lambda p: 5.0 * p, params["disc"])
    params = {**params, "disc": disc_params, "disc_clock": jnp.float32(a.disc_start)}
    (total, aux), grads = value_and_grad(params)
    assert float(aux["disc_factor"]) == 1.0 and float(grads["disc_clock"]) == 0.0

    def forward(ae):
        return task.model.apply({"params": ae}, x0, key=keys[1])

    def disc(d, x):
        return task.disc.apply({"params": d}, x)

    x_rec = forward(params["autoencoder"])[0]

    # The adaptive weight by its definition: gradients with respect to the decoder's last
    # kernel of the nll and of the generator's adversarial loss, through the whole network.
    def nll(ae):
        return jnp.mean(jnp.sum(jnp.abs(x0 - forward(ae)[0]), axis=(1, 2, 3)))

    def adv(ae):
        return -jnp.mean(disc(params["disc"], forward(ae)[0]))

    g_nll = last(jax.jit(jax.grad(nll))(params["autoencoder"]))
    g_adv = last(jax.jit(jax.grad(adv))(params["autoencoder"]))
    ratio = float(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_adv) + 1e-4))
    assert ratio < 1e4  # LDM clips lambda to [0, 1e4]; here it is not clipped
    want = a.disc_weight * ratio
    np.testing.assert_allclose(float(aux["adaptive_weight"]), float(want), rtol=1e-4)

    # The autoencoder's gradient is L_G's alone (the discriminator's parameters fixed)...
    def loss_g(ae):
        x_rec, mean, logvar = forward(ae)
        return latent.autoencoder_loss(
            x0,
            x_rec,
            mean,
            logvar,
            kl_weight=a.kl_weight,
            logits_fake=disc(params["disc"], x_rec),
            adversarial_weight=aux["adaptive_weight"],
        )[0]

    g_ae = jax.jit(jax.grad(loss_g))(params["autoencoder"])
    for got, ref in zip(jax.tree.leaves(grads["autoencoder"]), jax.tree.leaves(g_ae), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)

    # ...and the discriminator's is L_D's alone (the reconstructions fixed).
    def loss_d(d):
        return latent.discriminator_loss(disc(d, x0), disc(d, x_rec), "hinge")

    g_d = jax.jit(jax.grad(loss_d))(params["disc"])
    for got, ref in zip(jax.tree.leaves(grads["disc"]), jax.tree.leaves(g_d), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(total), float(aux["loss_g"] + aux["loss_d"]), rtol=1e-6)

    # The step clock: the optimizer moves disc_clock by exactly +1 whatever its gradient.
    updates, _ = task.tx.update(grads, task.tx.init(params), params)
    assert float(updates["disc_clock"]) == 1.0
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_bad_discriminator_fields_are_refused():
    config = load_config("vae.py", "tiny")
    config.autoencoder.discriminator = True
    config.autoencoder.disc_loss = "wasserstein"
    with pytest.raises(Exception, match="disc_loss"):
        registry.get("autoencoder").check_config(config)
