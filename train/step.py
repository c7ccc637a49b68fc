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
