"""U-Net: shapes, gradients, BatchNorm state, and it learns to segment generated shapes."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models.unet import UNet
from depthlab.research.datasets.scenes import make_scenes


def init(model, x, seed=0):
    """Jitted init. Non-partitionable threefry compiles rank-4 conv-kernel initialisers about 5x
    faster on CPU (jax 0.10); the values differ, which tests do not care about."""
    with jax.threefry_partitionable(False):
        return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))


def test_shapes_and_depth_check():
    model = UNet(num_classes=5, features=4, depth=2)
    x = jnp.zeros((2, 16, 24, 3))
    variables = init(model, x)
    assert set(variables) == {"params", "batch_stats"}
    logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    chex.assert_shape(logits, (2, 16, 24, 5))
    assert "batch_stats" in updates
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*depth"):
        model.apply(variables, jnp.zeros((1, 18, 24, 3)))
    # Without BatchNorm there is no mutable state.
    plain = UNet(num_classes=2, features=4, depth=1, batch_norm=False)
    assert set(init(plain, x)) == {"params"}


def test_gradients_finite_and_nonzero():
    model = UNet(num_classes=3, features=4, depth=2)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, (2, 16, 16)))
    variables = init(model, x)

    @jax.jit
    def grad_fn(params):
        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                    train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return jax.grad(loss)(params)

    for path, g in jax.tree_util.tree_leaves_with_path(grad_fn(variables["params"])):
        assert np.all(np.isfinite(g)), path
        assert np.any(np.asarray(g) != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_unet_learns_to_segment_shapes():
    data = make_scenes(16, image_size=16, max_objects=2, min_size=5, max_size=8, clutter=0, seed=0)
    x, y = jnp.asarray(data["images"]), jnp.asarray(data["semantic"])
    model = UNet(num_classes=5, features=8, depth=2)
    variables = init(model, x)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (upd["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))
        (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses, accs = [], []
    for _ in range(60):
        params, batch_stats, opt_state, loss, acc = step(params, batch_stats, opt_state)
        losses.append(float(loss)); accs.append(float(acc))
    background = float(jnp.mean(y == 0))
    assert losses[-1] < 0.3 * losses[0]
    assert accs[-1] > background + 0.5 * (1 - background)   # beyond "everything is background"
