"""GAN models and the two-optimizer step: shapes, gradients, both networks updated, R1, SN, determinism, learning."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models import get_model
from depthlab.models.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from depthlab.research.generative.data import ring_quality, ring_samples
from depthlab.research.generative.gan_training import create_gan_state, generate, make_gan_train_step
from depthlab.research.generative.losses import r1_penalty
from depthlab.train import losses


@pytest.mark.parametrize("shape,channels", [((28, 28, 1), (16, 8))])
def test_dcgan_shapes(shape, channels):
    gen = DCGANGenerator(image_shape=shape, channels=channels)
    disc = DCGANDiscriminator(channels=(4, 8))
    key = jax.random.key(0)
    g_vars = jax.jit(gen.init)(key, jnp.zeros((2, 10)))
    images = jax.jit(gen.apply)(g_vars, jax.random.normal(key, (3, 10)))
    chex.assert_shape(images, (3, *shape))
    assert float(jnp.abs(images).max()) <= 1.0  # tanh output
    logits = jax.jit(disc.apply)(jax.jit(disc.init)(key, images), images)
    chex.assert_shape(logits, (3,))


def test_mlp_pair_shapes_and_registry():
    key = jax.random.key(0)
    gen, disc = get_model("mlp_generator", hidden=(8,)), get_model("mlp_discriminator", hidden=(8,))
    points = gen.apply(gen.init(key, jnp.zeros((1, 4))), jnp.ones((5, 4)))
    chex.assert_shape(points, (5, 2))
    chex.assert_shape(disc.apply(disc.init(key, points), points), (5,))
    with pytest.raises(ValueError, match="divisible by 4"):
        DCGANGenerator(image_shape=(10, 10, 1), channels=(8, 4)).init(key, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="output activation"):
        DCGANGenerator(image_shape=(8, 8, 1), output="relu6").init(key, jnp.zeros((1, 4)))


@pytest.mark.slow  # fast coverage: test_dcgan_step_moves_every_parameter (zero gradients would not move Adam)
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_gradients_finite_and_nonzero(spectral_norm):
    key = jax.random.key(0)
    gen = DCGANGenerator(image_shape=(8, 8, 1), channels=(8, 4))
    disc = DCGANDiscriminator(channels=(4, 8), spectral_norm=spectral_norm)
    g_vars = jax.jit(gen.init)(key, jnp.zeros((2, 6)))
    d_vars = jax.jit(disc.init)(key, jnp.zeros((2, 8, 8, 1)))
    z = jax.random.normal(jax.random.key(1), (4, 6))

    def g_loss(g_params):
        fake, _ = gen.apply({**g_vars, "params": g_params}, z, train=True, mutable=["batch_stats"])
        return losses.gan_generator_loss(disc.apply(d_vars, fake))

    def d_loss(d_params):
        fake = gen.apply(g_vars, z)
        return losses.gan_discriminator_loss(disc.apply({**d_vars, "params": d_params}, -fake), disc.apply({**d_vars, "params": d_params}, fake))

    for grads in (jax.jit(jax.grad(g_loss))(g_vars["params"]), jax.jit(jax.grad(d_loss))(d_vars["params"])):
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert np.all(np.isfinite(g)), path
            assert np.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_spectral_norm_bounds_the_layer():
    disc = MLPDiscriminator(hidden=(32,), spectral_norm=True)
    x = jax.random.normal(jax.random.key(0), (64, 2))
    variables = disc.init(jax.random.key(1), x)
    variables = {**variables, "params": jax.tree.map(lambda w: 10.0 * w, variables["params"])}
    for _ in range(20):  # power iteration converges over repeated training calls
        _, updates = disc.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    sigma = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/sigma"]
    true_sigma = jnp.linalg.norm(variables["params"]["Dense_0"]["kernel"], ord=2)
    np.testing.assert_allclose(sigma, true_sigma, rtol=1e-3)


def test_r1_penalty_of_a_linear_discriminator():
    w = jnp.array([3.0, -4.0])
    real = jax.random.normal(jax.random.key(0), (7, 2))
    np.testing.assert_allclose(r1_penalty(lambda x: x @ w + 1.0, real), 25.0, rtol=1e-6)


def _ring_setup(r1_gamma=0.0, spectral_norm=False, width=32, ema_decay=0.0):
    gen = MLPGenerator(hidden=(width, width))
    disc = MLPDiscriminator(hidden=(width, width), spectral_norm=spectral_norm)
    real = ring_samples(np.random.default_rng(0), 64)
    tx = lambda: optax.adam(1e-3, b1=0.5)
    state = create_gan_state(jax.random.key(0), gen, disc, 4, real, tx(), tx(), ema_decay=ema_decay)
    step = make_gan_train_step(gen, disc, latent_dim=4, r1_gamma=r1_gamma)
    return gen, disc, state, step, real


@pytest.mark.parametrize("r1_gamma,spectral_norm", [(1.0, False), (0.0, True)])
def test_one_step_updates_both_networks(r1_gamma, spectral_norm):
    _, _, state, step, real = _ring_setup(r1_gamma, spectral_norm, ema_decay=0.9)
    new, metrics = jax.jit(step)(state, {"inputs": real})
    assert int(new.step) == 1 and int(new.generator.step) == 1 and int(new.discriminator.step) == 1
    for old_params, new_params in [(state.generator.params, new.generator.params),
                                   (state.discriminator.params, new.discriminator.params)]:
        for a, b in zip(jax.tree.leaves(old_params), jax.tree.leaves(new_params)):
            assert not np.allclose(a, b), "every parameter array should move in one step"
    assert not np.allclose(jax.tree.leaves(new.generator.ema_params)[0], jax.tree.leaves(state.generator.params)[0])
    for name in ("d_loss", "g_loss", "r1", "d_real", "d_fake"):
        assert np.isfinite(float(metrics[name])), name
    assert (float(metrics["r1"]) > 0) == (r1_gamma > 0)
    if spectral_norm:
        u_old = jax.tree.leaves(state.discriminator.model_state)
        u_new = jax.tree.leaves(new.discriminator.model_state)
        assert any(not np.allclose(a, b) for a, b in zip(u_old, u_new)), "power iteration stats should update"


def test_generator_update_uses_the_updated_discriminator():
    """The generator's gradient equals the one computed by hand against D after its own update."""
    gen, disc, state, step, real = _ring_setup()
    new, _ = jax.jit(step)(state, {"inputs": real})
    _, g_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    z = jax.random.normal(g_key, (64, 4))

    def g_loss(p):
        fake = gen.apply({"params": p}, z)
        return losses.gan_generator_loss(disc.apply({"params": new.discriminator.params}, fake))

    expected = state.generator.apply_gradients(jax.grad(g_loss)(state.generator.params))
    chex.assert_trees_all_close(expected.params, new.generator.params, rtol=1e-5, atol=1e-6)


def test_dcgan_step_moves_every_parameter_and_updates_batchnorm_stats():
    gen = DCGANGenerator(image_shape=(16, 8, 3), channels=(8, 4, 4))  # non-square, 3 channels, 3 blocks
    disc = DCGANDiscriminator(channels=(4, 8))
    real = jax.random.uniform(jax.random.key(1), (6, 16, 8, 3)) * 2 - 1
    state = create_gan_state(jax.random.key(0), gen, disc, 5, real, optax.adam(1e-3), optax.adam(1e-3))
    new, metrics = jax.jit(make_gan_train_step(gen, disc, 5))(state, {"inputs": real})
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for old_params, new_params in [(state.generator.params, new.generator.params),
                                   (state.discriminator.params, new.discriminator.params)]:
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(old_params), jax.tree.leaves(new_params)):
            assert not np.allclose(a, b), f"{jax.tree_util.keystr(path)} did not move: zero or non-finite gradient"
    old_stats, new_stats = jax.tree.leaves(state.generator.model_state), jax.tree.leaves(new.generator.model_state)
    assert any(not np.allclose(a, b) for a, b in zip(old_stats, new_stats))
    chex.assert_shape(generate(gen, new, jax.random.key(2), 3, 5), (3, 16, 8, 3))


def test_gan_training_is_deterministic():
    _, _, state, step, real = _ring_setup(r1_gamma=0.5)
    step = jax.jit(chex.assert_max_traces(step, n=1))

    def run(state):
        for i in range(3):
            state, metrics = step(state, {"inputs": real + 0.01 * i})
        return state, float(metrics["loss"])

    (s1, l1), (s2, l2) = run(state), run(state)
    chex.assert_trees_all_equal(s1.generator.params, s2.generator.params)
    chex.assert_trees_all_equal(s1.discriminator.opt_state, s2.discriminator.opt_state)
    assert l1 == l2


def test_ring_gan_learns_to_put_samples_on_the_ring():
    gen, _, state, step, _ = _ring_setup(r1_gamma=0.1, width=64)
    step = jax.jit(step)
    rng = np.random.default_rng(1)

    def mean_radius_error(state):
        samples = np.asarray(generate(gen, state, jax.random.key(9), 2000, 4))
        return float(np.mean(np.abs(np.linalg.norm(samples, axis=-1) - 2.0)))

    before = mean_radius_error(state)
    for _ in range(600):
        state, _ = step(state, {"inputs": ring_samples(rng, 64)})
    after = mean_radius_error(state)
    assert after < 0.7 * before, (before, after)
    assert ring_quality(np.asarray(generate(gen, state, jax.random.key(9), 2000, 4)), std=0.2)["modes_covered"] >= 2


def test_ring_quality_counts_modes():
    rng = np.random.default_rng(0)
    perfect = ring_samples(rng, 4000)
    assert ring_quality(perfect) == {"modes_covered": 8, "high_quality": pytest.approx(1 - np.exp(-4.5), abs=0.01)}  # P(|2-D normal| < 3)
    one_mode = np.tile([[2.0, 0.0]], (1000, 1)) + 0.01 * rng.standard_normal((1000, 2))
    assert ring_quality(one_mode)["modes_covered"] == 1
    noise = rng.standard_normal((1000, 2)) * 5
    assert ring_quality(noise)["high_quality"] < 0.05
