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

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.train.state import TrainState

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _forward(model: nn.Module, params, model_state: dict, batch: dict, input_keys: Sequence[str],
             train: bool, rng: jax.Array | None):
    variables = {"params": params, **model_state}
    inputs = [batch[k] for k in input_keys]
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
        outputs, new_model_state = model.apply(variables, *inputs, train=True, rngs=rngs,
                                               mutable=list(model_state.keys()))
        return outputs, dict(new_model_state)
    return model.apply(variables, *inputs, train=train, rngs=rngs), model_state


def make_train_step(model: nn.Module, loss_fn: LossFn, input_keys: Sequence[str] = ("inputs",)
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` for `model` and `loss_fn(outputs, batch)`.

    metrics holds `loss`, `grad_norm` and whatever `loss_fn` returns beside the loss.
    """
    input_keys = tuple(input_keys)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # A fresh dropout key per step, derived from the state's key: resumable and reproducible.
        rng = jax.random.fold_in(state.rng, state.step)

        def compute_loss(params):
            outputs, new_model_state = _forward(model, params, state.model_state, batch, input_keys, True, rng)
            loss, metrics = loss_fn(outputs, batch)
            return loss, (metrics, new_model_state)

        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, model_state=new_model_state)
        return new_state, {"loss": loss, "grad_norm": _global_norm(grads), **metrics}

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
