"""Shape, gradient and learning tests for models/rl.py (ActorCritic, PolicyValueNet)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models import get_model
from depthlab.models.rl import ActorCritic, PolicyValueNet


def _all_grads_nonzero(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("shared", [False, True])
def test_actor_critic_discrete_shapes_and_grads(shared):
    net = ActorCritic(action_dim=3, discrete=True, hidden=(16, 16), shared_torso=shared)
    params = net.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    assert ("torso" in params) == shared and ("actor_torso" in params) != shared
    obs = jax.random.normal(jax.random.key(1), (7, 5))
    logits, value = net.apply({"params": params}, obs)
    chex.assert_shape(logits, (7, 3))
    chex.assert_shape(value, (7,))
    # Orthogonal init with gain 0.01 on the policy output: an almost uniform initial policy.
    assert np.abs(np.asarray(logits)).max() < 0.1

    def loss(p):
        logits, value = net.apply({"params": p}, obs)
        return jax.nn.log_softmax(logits)[:, 0].sum() + (value**2).sum()

    _all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_actor_critic_gaussian_shapes_and_grads():
    net = get_model("actor_critic", action_dim=2, discrete=False, hidden=(8,), log_std_init=-0.5)
    params = net.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    obs = jax.random.normal(jax.random.key(1), (4, 3))
    (mean, log_std), value = net.apply({"params": params}, obs)
    chex.assert_shape([mean, log_std], (4, 2))
    chex.assert_shape(value, (4,))
    np.testing.assert_allclose(log_std, -0.5)

    def loss(p):
        (mean, log_std), value = net.apply({"params": p}, obs)
        return (mean**2).sum() + log_std.sum() ** 2 + value.sum() ** 2

    _all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_orthogonal_init():
    net = ActorCritic(action_dim=2, hidden=(32,), activation="relu")
    params = net.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    kernel = np.asarray(params["actor_torso"]["Dense_0"]["kernel"])
    # A square orthogonal matrix scaled by sqrt(2): K^T K = 2 I.
    np.testing.assert_allclose(kernel.T @ kernel, 2 * np.eye(32), atol=1e-4)
    with pytest.raises(ValueError, match="valid activations"):
        ActorCritic(action_dim=2, activation="nope").init(jax.random.key(0), jnp.zeros((1, 3)))


@pytest.mark.usefixtures("default_threefry")
def test_policy_value_net_shapes_grads_and_learns():
    net = get_model("alphazero", num_actions=9, channels=8, num_blocks=1, value_hidden=8)
    boards = jax.random.bernoulli(jax.random.key(0), 0.3, (16, 3, 3, 2)).astype(jnp.float32)
    variables = jax.jit(net.init)(jax.random.key(1), boards[:1])
    # Targets: a fixed random policy and a value that depends on the board.
    target_policy = jax.nn.softmax(jax.random.normal(jax.random.key(2), (16, 9)))
    target_value = jnp.tanh(boards[..., 0].sum((1, 2)) - boards[..., 1].sum((1, 2)))

    def loss(params, batch_stats):
        (logits, value), updates = net.apply({"params": params, "batch_stats": batch_stats}, boards, train=True,
                                             mutable=["batch_stats"])
        chex.assert_shape(logits, (16, 9))
        chex.assert_shape(value, (16,))
        loss = optax.softmax_cross_entropy(logits, target_policy).mean() + ((value - target_value) ** 2).mean()
        return loss, (updates, value)

    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss_value, (updates, value)), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats)
        updates_p, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates_p), updates["batch_stats"], opt_state, loss_value, grads, value

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    params, batch_stats, opt_state, first, grads, value = step(params, batch_stats, opt_state)
    _all_grads_nonzero(grads)
    assert np.all(np.abs(value) < 1)
    for _ in range(40):
        params, batch_stats, opt_state, loss_value, _, _ = step(params, batch_stats, opt_state)
    assert loss_value < 0.6 * first, (first, loss_value)
