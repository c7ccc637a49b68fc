"""The train state: one pytree holding everything a step changes.

Example:
    >>> state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(1e-3),
    ...                           rng=jax.random.key(0), model_state={"batch_stats": variables["batch_stats"]})
    >>> state = state.apply_gradients(grads)
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state, mutable model collections, PRNG key, optional EMA.

    `model_state` holds the non-trainable collections a model updates while training (BatchNorm's
    `batch_stats`), as a dict `{collection: tree}`; it is `{}` for models without any.
    `ema_params` is None unless an exponential moving average of the parameters is kept.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    model_state: dict
    rng: jax.Array
    ema_params: PyTree | None = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
    apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array, model_state: dict | None = None, ema_decay: float = 0.0) -> "TrainState":
        """A fresh state at step 0. `ema_decay > 0` also keeps an EMA of the parameters."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=dict(model_state or {}),
            rng=rng,
            ema_params=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
            ema_decay=float(ema_decay),
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(self, grads: PyTree, model_state: dict | None = None) -> "TrainState":
        """One optimizer update: step + 1, new params/opt_state (and EMA, and model_state if given)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, step_size=1.0 - self.ema_decay)
        return self.replace(
            step=self.step + 1,
            params=params,
            opt_state=opt_state,
            model_state=self.model_state if model_state is None else dict(model_state),
            ema_params=ema,
        )

    def eval_params(self) -> PyTree:
        """The parameters to evaluate: the EMA when one is kept, else the live ones."""
        return self.ema_params if self.ema_params is not None else self.params
