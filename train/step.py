"""Builders of the supervised train and eval steps.

`make_train_step(model, loss_fn)` returns a pure `train_step(state, batch) -> (state, metrics)`:
forward pass with dropout keys folded from the step, `value_and_grad` with aux outputs, mutable
collections (BatchNorm statistics) carried in `state.model_state`, one optimizer update. `fit`
applies `jax.jit` with shardings; nothing here is jitted so the same function serves 1 CPU or a pod.

Example:
    >>> def loss_fn(logits, batch):
    ...     loss = softmax_cross_entropy(logits, batch["labels"])
    ...     return loss, {"accuracy": accuracy(logits, batch["labels"])}
    >>> train_step = make_train_step(model, loss_fn)
    >>> state, metrics = jax.jit(train_step)(state, {"inputs": x, "labels": y})
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.train.state import TrainState

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# How a module's __call__ is told train from eval: Flax's two conventions, and look-alikes that would be
# silently ignored (the error names them).
_MODE_ARGUMENTS = ("train", "deterministic")
_LOOK_ALIKES = ("training", "is_training", "eval", "evaluate", "use_running_average", "inference", "test")


def mode_argument(model: nn.Module) -> str | None:
    """The keyword by which `model.__call__` switches between training and evaluation: "train" (True in
    training), "deterministic" (False in training), or None when it takes neither (it then runs the same
    way in both). A look-alike such as `training` is an error naming what the engine expects."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return "train"
    for name in _MODE_ARGUMENTS:
        if name in params:
            return name
    look_alikes = [p for p in params if p in _LOOK_ALIKES]
    if look_alikes:
        raise TypeError(
            f"{type(model).__name__}.__call__ takes {look_alikes[0]!r}; the engine tells a module train from eval "
            f"with `train: bool` (True while training) or `deterministic: bool` (False while training), the two "
            f"Flax conventions. Rename the argument, or wrap the module")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return "train"
    return None


def mode_kwargs(model: nn.Module, train: bool) -> dict:
    """{"train": train}, {"deterministic": not train} or {} for `model.apply`/`model.init` (see mode_argument)."""
    name = mode_argument(model)
    return {} if name is None else {name: train if name == "train" else not train}


def apply_model(model: nn.Module, params, model_state: dict, inputs: Sequence, train: bool,
                rngs: dict | None = None):
    """(outputs, new model_state): `model(*inputs)` in training or evaluation mode. In training, mutable
    collections (BatchNorm statistics) are updated and returned; in evaluation they are read only."""
    import re

    from flax import errors as flax_errors

    variables = {"params": params, **model_state}
    kwargs = mode_kwargs(model, train)
    try:
        if train and model_state:
            outputs, new_model_state = model.apply(variables, *inputs, rngs=rngs or {}, mutable=list(model_state),
                                                   **kwargs)
            return outputs, dict(new_model_state)
        return model.apply(variables, *inputs, rngs=rngs or {}, **kwargs), model_state
    except (flax_errors.ScopeCollectionNotFound, flax_errors.ScopeVariableNotFoundError,
            flax_errors.ModifyScopeVariableError) as e:
        # The module keeps a collection (BatchNorm's batch_stats) the state was built without: one line, not
        # Flax's traceback from inside the traced step.
        found = re.search(r'collection "([^"]+)"', str(e))
        raise ValueError(
            f"{type(model).__name__} uses the collection {found.group(1) if found else '?'!r} but the train state's "
            f"model_state holds {sorted(model_state) or 'none'} ({str(e).split(' (https')[0]}); build the state "
            f"with TrainState.from_model(model, example, tx, rng) or TrainState.create(..., "
            f"variables=model.init(...)), which keep every collection model.init returns") from None


def _forward(model: nn.Module, params, model_state: dict, batch: dict, input_keys: Sequence[str],
             train: bool, rng: jax.Array | None):
    return apply_model(model, params, model_state, [batch[k] for k in input_keys], train,
                       {"dropout": rng} if rng is not None else None)


def make_train_step(model: nn.Module, loss_fn: LossFn, input_keys: Sequence[str] = ("inputs",),
                    grad_norm: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` for `model` and `loss_fn(outputs, batch)`.

    `model` is any Flax module: `train=True` (or `deterministic=False`) is passed only where its `__call__`
    takes it (see `mode_argument`). metrics holds `loss` and whatever `loss_fn` returns beside the loss;
    `grad_norm=True` adds the gradient's global norm (for diagnosing instabilities). It is off by default
    because the step should cost what a hand-written one does: on XLA:CPU that extra pass over the gradients
    costs ~10-15% of a ~1 ms MLP step (benchmarks/README.md), nothing measurable on larger steps.
    """
    input_keys = tuple(input_keys)
    mode_argument(model)   # a look-alike mode argument fails here, before anything is traced

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # A fresh dropout key per step, derived from the state's key: resumable and reproducible.
        rng = jax.random.fold_in(state.rng, state.step)

        def compute_loss(params):
            outputs, new_model_state = _forward(model, params, state.model_state, batch, input_keys, True, rng)
            loss, metrics = loss_fn(outputs, batch)
            return loss, (metrics, new_model_state)

        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, model_state=new_model_state)
        norms = {"grad_norm": _global_norm(grads)} if grad_norm else {}
        return new_state, {"loss": loss, **norms, **metrics}

    return train_step


def make_eval_step(model: nn.Module, loss_fn: LossFn, input_keys: Sequence[str] = ("inputs",)
                   ) -> Callable[[TrainState, dict], dict]:
    """`eval_step(state, batch) -> metrics` (per-batch means), using EMA parameters when kept."""
    input_keys = tuple(input_keys)

    def eval_step(state: TrainState, batch: dict) -> dict:
        outputs, _ = _forward(model, state.eval_params(), state.model_state, batch, input_keys, False, None)
        loss, metrics = loss_fn(outputs, batch)
        return {"loss": loss, **metrics}

    return eval_step


# ----------------------------------------------------------------------------------------------
# The PRNG implementation a step draws its random numbers with (train.prng_impl)
# ----------------------------------------------------------------------------------------------
# Why this exists (benchmarks/dropout_compile.py, /work/notes/F_findings.md): with JAX's default
# partitionable threefry, random bits are an elementwise hash (~165 integer ops) of an iota counter, so
# XLA fuses that hash into every consumer of a dropout mask (the forward masking, the backward masking,
# residual adds and norms) and compiles each copy; for TPU this tripled the compile time of a small GPT
# step and made char_gpt's nanogpt preset take over 25 minutes. "threefry_materialized" computes the very
# same bits once (an optimization barrier stops the duplication): identical masks, losses and checkpoints.
# "rbg"/"unsafe_rbg" use XLA's RngBitGenerator (what MaxText and T5X use on TPU): other masks, cheaper to
# compile, but under SPMD each chip generates the bits of the global batch unless libtpu runs with
# --xla_tpu_spmd_rng_bit_generator_unsafe=true in LIBTPU_INIT_ARGS (a process-wide setting: the CLI's to
# make, never the library's).
PRNG_IMPLS = ("auto", "threefry", "threefry_materialized", "rbg", "unsafe_rbg")


def _materialized_random_bits(keys, bit_width, shape):
    return jax.lax.optimization_barrier(jax.extend.random.threefry_prng_impl.random_bits(keys, bit_width, shape))


_THREEFRY = jax.extend.random.threefry_prng_impl
THREEFRY_MATERIALIZED = jax.extend.random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split, fold_in=_THREEFRY.fold_in,
    random_bits=_materialized_random_bits, name="threefry_materialized", tag="fry_m")


def resolve_prng_impl(name: str, platform: str) -> str:
    """The implementation `name` (one of PRNG_IMPLS) means for devices of `platform` ("cpu", "tpu", "gpu"):
    "auto" is "threefry_materialized" on TPU (same numbers, faster compile) and "threefry" elsewhere."""
    if name not in PRNG_IMPLS:
        raise ValueError(f"train.prng_impl={name!r} is not one of {PRNG_IMPLS}; use 'threefry' for JAX's default")
    if name == "auto":
        return "threefry_materialized" if platform == "tpu" else "threefry"
    return name


def _is_typed_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def convert_key(key: jax.Array, impl: str) -> jax.Array:
    """A scalar typed key of implementation `impl` derived from `key` (typed, or raw uint32 threefry data).
    threefry and threefry_materialized share the key data, so their random streams are the same."""
    if not _is_typed_key(key):
        key = jax.random.wrap_key_data(key)
    target = {"threefry": _THREEFRY, "threefry_materialized": THREEFRY_MATERIALIZED}.get(impl, impl)
    data = jax.random.key_data(key)
    width = jax.random.key_data(jax.random.key(0, impl=target)).shape[-1]
    if impl in ("threefry", "threefry_materialized") and data.shape[-1:] == (width,):
        return jax.random.wrap_key_data(data, impl=target)      # same key data: the same random stream
    if key.shape != ():
        raise ValueError(f"train.prng_impl={impl!r} needs a scalar state key, got key shape {key.shape}; "
                         f"use 'threefry_materialized'")
    return jax.random.wrap_key_data(jax.random.bits(key, (width,), jnp.uint32), impl=target)


def with_prng_impl(train_step: Callable, impl: str) -> Callable:
    """`train_step` drawing its random numbers (dropout masks, noise) with PRNG implementation `impl`.

    The step sees `state.rng` converted to `impl`; the state it returns keeps the stored key (threefry, so
    checkpoints do not change) when the step left its key alone, or a threefry key derived from the new one
    when the step advanced it; a state without an `rng` passes through. "threefry" returns `train_step`
    itself, and so does "auto", which needs the devices' platform: resolve it first (`resolve_prng_impl`).

        >>> step = with_prng_impl(make_train_step(model, loss_fn), resolve_prng_impl("auto", "tpu"))
    """
    impl = resolve_prng_impl(impl, "cpu")
    if impl == "threefry":
        return train_step

    def step(state, batch):
        rng = getattr(state, "rng", None)
        if rng is None or not hasattr(state, "replace"):
            return train_step(state, batch)
        converted = convert_key(rng, impl)
        new_state, metrics = train_step(state.replace(rng=converted), batch)
        new_rng = getattr(new_state, "rng", None)
        if new_rng is converted:        # the usual case: the step folded the step number into it
            new_state = new_state.replace(rng=rng)
        elif new_rng is not None:
            back = convert_key(new_rng, "threefry")
            new_state = new_state.replace(rng=back if _is_typed_key(rng) else jax.random.key_data(back))
        return new_state, metrics

    return step
