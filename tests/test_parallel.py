"""On 4 fake CPU devices, data-parallel and FSDP steps equal the 1-device step (BatchNorm included)."""
import chex
import jax
import numpy as np
import pytest

from depthlab.models import CNN
from depthlab.research.experiment import classification_loss, init_state
from depthlab.train import data, default_optim_config, make_optimizer, make_train_step, parallel

STEPS = 3


def _run(mesh, strategy):
    model = CNN(channels=(8, 16), dense=(32,), num_classes=4, batch_norm=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, 32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 4, size=(STEPS, 32)).astype(np.int32)
    config = default_optim_config()
    config.learning_rate = 1e-2
    tx = make_optimizer(config)
    init = lambda key: init_state(model, x[0], tx, key)
    shardings = parallel.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, strategy, fsdp_min_size=64)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    batch_sh = parallel.batch_sharding(mesh)
    step = jax.jit(make_train_step(model, classification_loss()), in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, data.to_global({"inputs": x[i], "labels": y[i]}, batch_sh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), jax.device_get(state.model_state), state


@pytest.fixture(scope="module")
def reference():
    assert len(jax.devices()) == 4, "tests/conftest.py should give 4 fake CPU devices"
    return _run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]), "replicated")


@pytest.mark.parametrize("axes,strategy", [({"data": 4}, "replicated"), ({"fsdp": 4}, "fsdp"),
                                           ({"data": 2, "fsdp": 2}, "fsdp")])
def test_sharded_step_equals_single_device(reference, axes, strategy):
    ref_losses, ref_params, ref_stats, _ = reference
    losses, params, stats, state = _run(parallel.make_mesh(axes), strategy)
    # Same maths, different reduction order across devices: equal to float32 rounding.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(stats, ref_stats, rtol=1e-4, atol=1e-5)   # BatchNorm statistics
    if strategy == "fsdp":
        spec = state.params["Dense_0"]["kernel"].sharding.spec
        assert "fsdp" in tuple(spec), f"FSDP should shard the large dense kernel, got {spec}"
        shard = state.params["Dense_0"]["kernel"].addressable_shards[0].data
        assert shard.size * axes["fsdp"] == state.params["Dense_0"]["kernel"].size


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 6 devices but 4 are available"):
        parallel.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        parallel.make_mesh({"model": 2})
    assert parallel.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 2, "fsdp": 1, "tensor": 2}


def test_fsdp_leaves_no_large_named_parameter_replicated():
    """A leaf whose logical names miss the fsdp axis (`embed` of 6 over 4 devices, `mlp` on a size-1 tensor
    axis) goes on fsdp along its largest divisible dimension under strategy=fsdp; small leaves stay whole."""
    import flax.linen as nn
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4})
    box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32), names)
    state = {"wide": box((6, 1024), ("embed", "mlp")), "named": box((8, 1024), ("embed", "mlp")),
             "small": box((6, 100), ("embed", "mlp")), "plain": jax.ShapeDtypeStruct((6, 1024), np.float32)}
    fsdp = parallel.state_shardings(state, mesh, strategy="fsdp", fsdp_min_size=1024)
    assert fsdp["wide"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp["named"].spec == jax.sharding.PartitionSpec("fsdp", None)    # the rule's own choice stands
    assert fsdp["small"].is_fully_replicated and fsdp["plain"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    replicated = parallel.state_shardings(state, mesh, strategy="replicated")
    assert replicated["wide"].is_fully_replicated and replicated["plain"].is_fully_replicated


def test_activation_constraints_bind_only_under_with_activation_sharding():
    """A transformer block's `with_logical_constraint(x, ("batch", "length", "embed"))` is a no-op unless the
    rules and mesh are bound (then the activations stay batch-sharded under FSDP instead of being
    all-reduced); bound, the block computes the same values, and its DenseGeneral kernels still apply."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from depthlab.models.transformer import Block
    from depthlab.train.parallel import make_mesh, with_activation_sharding

    mesh = make_mesh({"data": 1, "fsdp": 4})
    block = Block(num_heads=2, mlp_dim=32)
    x = jnp.ones((4, 8, 16))
    params = block.init(jax.random.key(0), x)
    apply = lambda p, x: block.apply(p, x)
    shard = (NamedSharding(mesh, P()), NamedSharding(mesh, P()))
    plain = jax.jit(apply, in_shardings=shard).lower(params, x).as_text()
    bound = jax.jit(with_activation_sharding(apply, mesh), in_shardings=shard)
    text = bound.lower(params, x).as_text()
    assert "sharding_constraint" not in plain
    assert 'sharding_constraint' in text and '{"data", "fsdp"}' in text
    np.testing.assert_allclose(bound(params, x), jax.jit(apply)(params, x), rtol=1e-6, atol=1e-6)
