"""VAE models: shapes, gradients, the ELBO and IWAE bound against direct computation, learning, determinism."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models import get_model
from depthlab.models.vae import ConvVAE, MLPVAE, reparameterize
from depthlab.research.generative import losses
from depthlab.research.datasets.images import load_dataset
from depthlab.research.generative.vae_training import (create_vae_state, iwae_log_likelihood,
                                                       make_vae_eval_step, make_vae_train_step)


def _tiny(cls, likelihood="bernoulli", shape=(8, 8, 1), latent=3):
    kwargs = dict(hidden=(16,)) if cls is MLPVAE else dict(channels=(4, 8), dense=16)
    return cls(image_shape=shape, latent_dim=latent, likelihood=likelihood, **kwargs)


@pytest.mark.parametrize("cls,likelihood", [(MLPVAE, "bernoulli"), (MLPVAE, "gaussian"), (ConvVAE, "bernoulli")])
def test_shapes(cls, likelihood):
    model = _tiny(cls, likelihood, shape=(8, 4, 2))
    key = jax.random.key(0)
    variables = jax.jit(model.init)(key, jnp.zeros((1, 8, 4, 2)), key)
    out = jax.jit(model.apply)(variables, jnp.ones((5, 8, 4, 2)), jax.random.key(1))
    chex.assert_shape(out.logits, (5, 8, 4, 2))
    chex.assert_shape([out.mean, out.logvar, out.z], (5, 3))
    if likelihood == "gaussian":
        chex.assert_shape(out.log_scale, (5, 8, 4, 2))
    else:
        assert out.log_scale is None
    chex.assert_shape(model.apply(variables, jnp.zeros((7, 3)), method=model.decode), (7, 8, 4, 2))


def test_registry_and_bad_arguments():
    assert isinstance(get_model("conv_vae", image_shape=(28, 28, 1)), ConvVAE)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="divisible by 4"):
        _tiny(ConvVAE, shape=(10, 10, 1)).init(key, jnp.zeros((1, 10, 10, 1)), key)
    with pytest.raises(ValueError, match="likelihood"):
        MLPVAE(image_shape=(8, 8, 1), likelihood="poisson").init(key, jnp.zeros((1, 8, 8, 1)), key)
    with pytest.raises(AssertionError):  # wrong image shape is caught at the boundary
        _tiny(MLPVAE).init(key, jnp.zeros((1, 9, 8, 1)), key)


def test_reparameterize_uses_the_key():
    mean, logvar = jnp.array([[1.0, -2.0]]), jnp.array([[0.0, math.log(4.0)]])
    key = jax.random.key(3)
    eps = jax.random.normal(key, (1, 2))
    np.testing.assert_allclose(reparameterize(key, mean, logvar), mean + jnp.array([[1.0, 2.0]]) * eps, rtol=1e-6)
    assert not np.allclose(reparameterize(jax.random.key(4), mean, logvar), reparameterize(key, mean, logvar))


@pytest.mark.parametrize("cls,likelihood", [(MLPVAE, "gaussian"), (ConvVAE, "bernoulli")])
def test_gradients_finite_and_nonzero(cls, likelihood):
    model = _tiny(cls, likelihood)
    key = jax.random.key(0)
    params = model.init(key, jnp.zeros((1, 8, 8, 1)), key)["params"]
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))

    def loss(p):
        return jnp.mean(losses.negative_elbo(model.apply({"params": p}, x, jax.random.key(2)), x, likelihood)[0])

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def _tiny_one_latent_model():
    """2x2 binary images, one latent: p(x) can be integrated on a grid."""
    model = MLPVAE(image_shape=(2, 2, 1), latent_dim=1, hidden=(8,), activation="tanh")
    params = model.init(jax.random.key(5), jnp.zeros((1, 2, 2, 1)), jax.random.key(6))["params"]
    x = jnp.array([[1.0, 0.0], [1.0, 1.0]]).reshape(1, 2, 2, 1)
    return model, params, x


def test_elbo_matches_direct_computation():
    model, params, x = _tiny_one_latent_model()
    out = model.apply({"params": params}, x, jax.random.key(7))
    nelbo, recon, kl = losses.negative_elbo(out, x, "bernoulli")
    # Direct: Bernoulli log-probabilities pixel by pixel, KL by numerical integration over z.
    p = 1 / (1 + np.exp(-np.asarray(out.logits, np.float64)))
    xs = np.asarray(x, np.float64)
    direct_recon = -np.sum(xs * np.log(p) + (1 - xs) * np.log(1 - p))
    mu, var = float(out.mean[0, 0]), float(np.exp(out.logvar[0, 0]))
    z = np.linspace(mu - 12 * math.sqrt(var), mu + 12 * math.sqrt(var), 200_001)
    log_q = -0.5 * ((z - mu) ** 2 / var + math.log(2 * math.pi * var))
    log_p = -0.5 * (z**2 + math.log(2 * math.pi))
    direct_kl = np.trapezoid(np.exp(log_q) * (log_q - log_p), z)
    np.testing.assert_allclose(float(recon[0]), direct_recon, rtol=1e-5)
    np.testing.assert_allclose(float(kl[0]), direct_kl, rtol=1e-4)
    np.testing.assert_allclose(float(nelbo[0]), direct_recon + direct_kl, rtol=1e-5)


def test_iwae_bound_approaches_log_marginal_likelihood():
    model, params, x = _tiny_one_latent_model()
    # log p(x) = log integral p(x|z) p(z) dz on a dense grid over z.
    z = np.linspace(-10, 10, 20_001, dtype=np.float32)[:, None]
    logits = model.apply({"params": params}, jnp.asarray(z), method=model.decode)
    log_px_z = np.asarray(losses.log_likelihood(logits, None, jnp.broadcast_to(x, logits.shape), "bernoulli"))
    log_joint = log_px_z.astype(np.float64) - 0.5 * (z[:, 0] ** 2 + math.log(2 * math.pi))
    log_px = np.log(np.trapezoid(np.exp(log_joint), z[:, 0]))

    iwae_1 = iwae_log_likelihood(model, params, np.asarray(x), jax.random.key(0), num_samples=1)
    elbo = -np.mean([float(losses.negative_elbo(model.apply({"params": params}, x, jax.random.key(i)), x,
                                                "bernoulli")[0][0]) for i in range(200)])
    iwae_k = iwae_log_likelihood(model, params, np.repeat(np.asarray(x), 4, 0), jax.random.key(1),
                                 num_samples=2000)
    assert elbo < log_px                                   # the ELBO is a lower bound ...
    assert abs(float(iwae_k.mean()) - log_px) < 0.02       # ... and IWAE with many samples closes the gap
    assert np.isfinite(iwae_1).all()


def test_factorized_baselines():
    train = np.array([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 2, 1)
    test = np.array([[1.0, 1.0]]).reshape(1, 1, 2, 1)
    # Pixel probabilities (clipped) 0.999 and 0.5: -log p = -log 0.999 - log 0.5.
    np.testing.assert_allclose(losses.factorized_bernoulli_nll(train, test), -math.log(0.999) + math.log(2), rtol=1e-5)
    g_train = np.array([0.0, 2.0]).reshape(2, 1, 1, 1)
    # N(1, 1) at x = 1: 0.5 log(2 pi).
    np.testing.assert_allclose(losses.factorized_gaussian_nll(g_train, np.ones((1, 1, 1, 1))), 0.5 * math.log(2 * math.pi),
                               rtol=1e-5)


def test_vae_learns_on_digits_and_beats_factorized_baseline():
    data = load_dataset("digits")
    x = (data["train"]["inputs"] > 0.5).astype(np.float32)
    model = MLPVAE(image_shape=(8, 8, 1), latent_dim=8, hidden=(128,))
    state = create_vae_state(jax.random.key(0), model, optax.adam(3e-3))
    step = jax.jit(chex.assert_max_traces(make_vae_train_step(model), n=1))
    eval_step = jax.jit(make_vae_eval_step(model))
    test = (data["test"]["inputs"] > 0.5).astype(np.float32)
    first = float(eval_step(state, {"inputs": test})["nelbo"])
    rng = np.random.default_rng(0)
    for _ in range(300):
        state, metrics = step(state, {"inputs": x[rng.integers(0, len(x), 64)]})
    last = float(eval_step(state, {"inputs": test})["nelbo"])
    baseline = losses.factorized_bernoulli_nll(x, test)
    assert np.isfinite(float(metrics["loss"]))
    assert last < 0.5 * first, (first, last)
    assert last < baseline - 3.0, (last, baseline)   # the latent code explains real structure


@pytest.mark.usefixtures("default_threefry")
def test_eval_step_masks_padding():
    model = _tiny(MLPVAE)
    state = create_vae_state(jax.random.key(0), model, optax.adam(1e-3))
    eval_step = make_vae_eval_step(model)
    x = jax.random.bernoulli(jax.random.key(1), 0.3, (3, 8, 8, 1)).astype(jnp.float32)
    padded = jnp.concatenate([x, jnp.ones((2, 8, 8, 1))])
    full = eval_step(state, {"inputs": x})
    masked = eval_step(state, {"inputs": padded, "mask": jnp.array([1.0, 1, 1, 0, 0])})
    np.testing.assert_allclose(full["nelbo"], masked["nelbo"], rtol=1e-5)


def test_training_is_deterministic():
    model = _tiny(MLPVAE)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)))
    step = jax.jit(make_vae_train_step(model, dynamic_binarize=True))

    def run(seed):
        state = create_vae_state(jax.random.key(seed), model, optax.adam(1e-3))
        for _ in range(3):
            state, metrics = step(state, {"inputs": x})
        return state.params, float(metrics["loss"])

    (p1, l1), (p2, l2), (p3, _) = run(0), run(0), run(1)
    chex.assert_trees_all_equal(p1, p2)
    assert l1 == l2
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(p3)[0])
