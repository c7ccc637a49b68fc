"""LIF cell and spiking MLP: shapes, the surrogate gradient's formula, BPTT gradients, and it learns."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from depthlab.models.spiking import LIFCell, SpikingMLP, spike, surrogate_gradient


def test_spike_is_a_step_forward_and_a_fast_sigmoid_backward():
    x = jnp.linspace(-2.0, 2.0, 41)
    np.testing.assert_array_equal(np.asarray(spike(x, 10.0)), np.asarray(x > 0, np.float32))
    grad = jax.vmap(jax.grad(lambda v: spike(v, 10.0)))(x)
    np.testing.assert_allclose(np.asarray(grad), 1.0 / (1.0 + 10.0 * np.abs(np.asarray(x))) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(surrogate_gradient(x, 10.0)), rtol=1e-6)
    # the chain rule passes the cotangent through: d(3 spike(2x))/dx = 6 / (1 + slope |2x|)^2
    g = jax.grad(lambda v: 3.0 * spike(2.0 * v, 10.0))(0.1)
    np.testing.assert_allclose(float(g), 6.0 / (1.0 + 10.0 * 0.2) ** 2, rtol=1e-6)


def test_lif_cell_integrates_fires_and_resets():
    cell = LIFCell(1, beta=0.5, threshold=1.0)
    params = {"params": {"input": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}}}
    v, out = jnp.zeros((1, 1)), []
    for _ in range(4):  # constant input 0.8: v = 0.8, 1.2 -> spike, reset to 0.2, 0.9, 1.25 -> spike
        v, s = cell.apply(params, v, jnp.full((1, 1), 0.8))
        out.append(float(s[0, 0]))
    assert out == [0.0, 1.0, 0.0, 1.0]
    np.testing.assert_allclose(float(v[0, 0]), 0.25, rtol=1e-6)


def test_lif_cell_in_nn_rnn_shapes_and_carry():
    rnn = nn.RNN(LIFCell(16), return_carry=True)
    x = jnp.ones((3, 7, 5))
    variables = rnn.init(jax.random.key(0), x)
    carry, spikes = rnn.apply(variables, x)
    chex.assert_shape(spikes, (3, 7, 16))
    chex.assert_shape(carry, (3, 16))
    assert set(np.unique(np.asarray(spikes))) <= {0.0, 1.0}


def test_spiking_mlp_shapes_and_finite_bptt_gradients():
    model = SpikingMLP(hidden=(32, 16), num_classes=10)
    x = (jax.random.uniform(jax.random.key(0), (4, 12, 20)) < 0.3).astype(jnp.float32)
    variables = model.init(jax.random.key(1), x)
    logits, aux = model.apply(variables, x)
    chex.assert_shape(logits, (4, 10))
    chex.assert_shape(aux["spikes"][0], (4, 12, 32))
    chex.assert_shape(aux["spikes"][1], (4, 12, 16))
    grads = jax.grad(lambda p: model.apply({"params": p}, x)[0].sum())(variables["params"])
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    assert all(np.isfinite(n) and n > 0 for n in jax.tree.leaves(norms)), norms  # surrogate reaches every layer


def test_spiking_mlp_learns_a_two_class_rate_task():
    # class 0 fires mostly on the first half of 20 inputs, class 1 on the second half
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    rates = np.where((np.arange(20)[None, :] < 10) == (labels[:, None] == 0), 0.5, 0.05)
    x = jnp.asarray(rng.random((256, 10, 20)) < rates[:, None, :], jnp.float32)
    y = jnp.asarray(labels)
    model = SpikingMLP(hidden=(16,), num_classes=2)
    params = model.init(jax.random.key(0), x[:2])["params"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x)[0], y).mean())(params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(60):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, x)[0], -1) == y))
    assert losses[-1] < 0.5 * losses[0] and acc > 0.9, (losses[0], losses[-1], acc)
