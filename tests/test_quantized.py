"""Quantised layers: the b-bit grid, straight-through gradients, float compatibility, and QAT learns."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models.quantized import QuantCNN, QuantConv, QuantDense, quantize, ste_round


def test_quantize_puts_weights_on_a_symmetric_grid_per_channel():
    w = jax.random.normal(jax.random.key(0), (64, 5))
    for bits in (2, 4, 8):
        q = np.asarray(quantize(w, bits, axis=-1))
        levels = 2 ** (bits - 1) - 1
        for c in range(5):
            scale = np.abs(np.asarray(w[:, c])).max() / levels
            np.testing.assert_allclose(q[:, c] / scale, np.round(q[:, c] / scale), atol=1e-4)  # integers
            assert np.abs(q[:, c] / scale).max() <= levels + 1e-4
        err = np.abs(q - np.asarray(w)).max(0) / np.abs(np.asarray(w)).max(0)
        assert np.all(err <= 0.5 / levels + 1e-6)  # rounding error at most half a step
    a = quantize(jnp.linspace(0, 3, 100), 2, signed=False)
    assert len(np.unique(np.asarray(a))) == 4 and float(a.min()) == 0.0
    assert quantize(w, None) is w
    with pytest.raises(ValueError, match="bits=1"):
        quantize(w, 1)


def test_straight_through_gradients_are_the_identity():
    x = jnp.linspace(-2.0, 2.0, 9)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda v: ste_round(v * 1.3).sum())(x)), 1.3, rtol=1e-6)
    g = jax.grad(lambda v: (quantize(v, 4) * jnp.arange(9.0)).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.arange(9.0), rtol=1e-6)


def test_shapes_and_float_compatibility_with_flax_layers():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    conv = QuantConv(6, (3, 3), bits=None)
    params = conv.init(jax.random.key(0), x)
    ref = nn.Conv(6, (3, 3), padding="SAME").apply(params, x)
    out = conv.apply(params, x)
    chex.assert_shape(out, (2, 8, 8, 6))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    dense = QuantDense(4, bits=None)
    p = dense.init(jax.random.key(0), x[:, 0, 0])
    np.testing.assert_allclose(np.asarray(dense.apply(p, x[:, 0, 0])), np.asarray(nn.Dense(4).apply(p, x[:, 0, 0])),
                               atol=1e-5)
    q8 = QuantConv(6, (3, 3), bits=8).apply(params, x)
    assert 0 < float(jnp.abs(q8 - ref).max()) < 0.05 * float(jnp.abs(ref).max())
    model = QuantCNN(channels=(4, 8), dense=(16,), weight_bits=4, act_bits=4)
    variables = model.init(jax.random.key(0), x)
    chex.assert_shape(model.apply(variables, x), (2, 10))
    grads = jax.grad(lambda p: model.apply({"params": p}, x).sum())(variables["params"])
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_int4_quantisation_aware_training_learns_digits():
    from depthlab.research.theory.studies import load_digits

    data = load_digits()
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    model = QuantCNN(channels=(8, 16), dense=(32,), weight_bits=4, act_bits=4)
    params = model.init(jax.random.key(0), x[:2])["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def step(carry, t):
            params, opt = carry
            idx = jax.random.randint(jax.random.key(t), (64,), 0, len(y))
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x[idx]), y[idx]).mean())(params)
            updates, opt = tx.update(g, opt)
            return (optax.apply_updates(params, updates), opt), None

        return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(200))[0][0]

    params = train(params)
    acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, jnp.asarray(data["x_test"])), -1)
                         == jnp.asarray(data["y_test"])))
    assert acc > 0.85, acc
