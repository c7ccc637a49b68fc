"""train.prng_impl: the PRNG implementation a train step draws dropout masks with (train/step.py)."""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.train import TrainState
from depthlab.train.step import (PRNG_IMPLS, convert_key, make_train_step, resolve_prng_impl,
                                 with_prng_impl)


@flax.struct.dataclass
class KeyState:
    step: jax.Array
    rng: jax.Array


def mask_step(state, batch):
    """Returns the dropout-like mask it draws, as make_train_step does: the step folded into state.rng."""
    mask = jax.random.bernoulli(jax.random.fold_in(state.rng, state.step), 0.5, (256,))
    return state.replace(step=state.step + 1), {"mask": mask}


def advancing_step(state, batch):
    """A step that keeps a new key in the state (RL and GAN steps do this)."""
    rng, key = jax.random.split(state.rng)
    return state.replace(step=state.step + 1, rng=rng), {"x": jax.random.uniform(key)}


class DropoutMLP(nn.Module):
    """Dense -> dropout -> Dense, with dropout on the input too: two masks, as a transformer block has."""
    dropout: float

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(5)(nn.Dropout(self.dropout, deterministic=not train)(x))


def model_setup(dropout):
    model = DropoutMLP(dropout)
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
    params = model.init(jax.random.key(1), inputs)["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2), rng=jax.random.key(2))

    def loss_fn(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), {}

    return make_train_step(model, loss_fn), state, {"inputs": inputs, "labels": jnp.arange(16) % 5}


def run(step, state, batch, n=2):
    step = jax.jit(step)
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_threefry_is_the_step_itself_and_auto_resolves_per_platform():
    assert with_prng_impl(mask_step, "threefry") is mask_step
    assert with_prng_impl(mask_step, "auto") is mask_step          # "auto" outside a mesh: CPU rules
    assert resolve_prng_impl("auto", "tpu") == "threefry_materialized"
    assert resolve_prng_impl("auto", "cpu") == "threefry"
    assert resolve_prng_impl("auto", "gpu") == "threefry"
    assert set(PRNG_IMPLS) >= {"threefry", "threefry_materialized", "rbg", "unsafe_rbg"}


def test_unknown_impl_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"train.prng_impl='philox'.*threefry"):
        with_prng_impl(mask_step, "philox")


@pytest.fixture(scope="module")
def dropout_model():
    """A dropout model's step, its state and batch, and the state and losses of two plain (threefry) steps."""
    step, state, batch = model_setup(dropout=0.3)
    return step, state, batch, *run(step, state, batch)


def test_threefry_materialized_keeps_losses_and_params_identical(dropout_model):
    step, state, batch, plain, plain_losses = dropout_model
    same, same_losses = run(with_prng_impl(step, "threefry_materialized"), state, batch)
    assert same_losses == plain_losses
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(same.params)))
    # the stored key is untouched: checkpoints are the same
    assert np.array_equal(jax.random.key_data(same.rng), jax.random.key_data(state.rng))
    assert same.rng.dtype == state.rng.dtype


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_rbg_gives_finite_losses_and_other_masks_per_step(impl):
    state = KeyState(step=jnp.zeros((), jnp.int32), rng=jax.random.key(0))
    step = jax.jit(with_prng_impl(mask_step, impl))
    s1, m1 = step(state, None)
    s2, m2 = step(s1, None)
    _, reference = jax.jit(mask_step)(state, None)
    m1, m2, reference = np.asarray(m1["mask"]), np.asarray(m2["mask"]), np.asarray(reference["mask"])
    assert 0.3 < m1.mean() < 0.7 and 0.3 < m2.mean() < 0.7          # a keep probability of 0.5
    assert not np.array_equal(m1, m2)                                # a fresh mask every step
    assert not np.array_equal(m1, reference)                         # and not threefry's
    assert s2.rng.dtype == state.rng.dtype                           # the state keeps its threefry key
    assert np.array_equal(jax.random.key_data(s2.rng), jax.random.key_data(state.rng))


def test_rbg_dropout_model_trains_with_finite_losses_of_its_own(dropout_model):
    step, state, batch, _, threefry_losses = dropout_model
    _, losses = run(with_prng_impl(step, "rbg"), state, batch)
    assert np.all(np.isfinite(losses)) and losses != threefry_losses


def test_without_dropout_every_impl_gives_the_same_losses():
    step, state, batch = model_setup(dropout=0.0)
    _, reference = run(step, state, batch, n=2)
    assert run(with_prng_impl(step, "rbg"), state, batch, n=2)[1] == reference


def test_a_step_that_advances_its_key_keeps_advancing_a_threefry_key():
    state = KeyState(step=jnp.zeros((), jnp.int32), rng=jax.random.key(0))
    step = jax.jit(with_prng_impl(advancing_step, "rbg"))
    s1, m1 = step(state, None)
    s2, m2 = step(s1, None)
    assert s2.rng.dtype == state.rng.dtype
    assert not np.array_equal(jax.random.key_data(s1.rng), jax.random.key_data(state.rng))
    assert float(m1["x"]) != float(m2["x"])


def test_raw_uint32_state_keys_stay_raw():
    state = KeyState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    s1, _ = jax.jit(with_prng_impl(advancing_step, "rbg"))(state, None)
    assert s1.rng.dtype == jnp.uint32 and s1.rng.shape == (2,)
    s2, _ = jax.jit(with_prng_impl(mask_step, "threefry_materialized"))(state, None)
    assert np.array_equal(s2.rng, state.rng)


def test_convert_key_shares_threefry_data_and_rejects_batched_keys_for_rbg():
    key = jax.random.key(5)
    same = convert_key(key, "threefry_materialized")
    assert np.array_equal(jax.random.key_data(same), jax.random.key_data(key))
    assert np.array_equal(jax.random.uniform(same, (4,)), jax.random.uniform(key, (4,)))
    with pytest.raises(ValueError, match="scalar state key"):
        convert_key(jax.random.split(key, 3), "rbg")
