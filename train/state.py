"""The train state: one pytree holding everything a step changes.

Example:
    >>> state = TrainState.from_model(model, x[:1], optax.adam(1e-3), jax.random.key(0))   # BatchNorm or not
    >>> state = TrainState.create(apply_fn=model.apply, variables=model.init(key, x[:1]), tx=tx, rng=key)
    >>> state = state.apply_gradients(grads)

Every collection `model.init` returns besides "params" (BatchNorm's "batch_stats", ...) goes to
`model_state`, except "intermediates": `sow`'s per-call outputs, which a step does not carry over.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any

# sow()'s collection: outputs recorded per call (appended to a tuple), not state a step carries over.
TRANSIENT_COLLECTIONS = ("intermediates",)


def split_variables(variables: Mapping) -> tuple[PyTree, dict]:
    """(params, model_state) from what `model.init` returns: "params", and every other collection except
    the transient "intermediates"."""
    if "params" not in variables:
        raise ValueError(f"variables have no 'params' collection (collections: {', '.join(variables) or 'none'}); "
                         "pass what model.init(...) returns")
    model_state = {k: v for k, v in variables.items() if k != "params" and k not in TRANSIENT_COLLECTIONS}
    return variables["params"], model_state


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
    def create(cls, *, apply_fn: Callable, tx: optax.GradientTransformation, rng: jax.Array,
               params: PyTree = None, model_state: dict | None = None, variables: Mapping | None = None,
               ema_decay: float = 0.0) -> "TrainState":
        """A fresh state at step 0. `ema_decay > 0` also keeps an EMA of the parameters.

        Give either `variables` (what `model.init` returns: "params" become the parameters, every other
        collection but "intermediates" the model_state) or `params` (and `model_state` if the model has
        mutable collections).
        """
        if variables is not None:
            if params is not None or model_state is not None:
                raise TypeError("TrainState.create takes variables= or params=/model_state=, not both; pass "
                                "variables=model.init(...) alone")
            params, model_state = split_variables(variables)
        if params is None:
            raise TypeError("TrainState.create needs params= (or variables=model.init(...))")
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

    @classmethod
    def from_model(cls, model, example: Any, tx: optax.GradientTransformation, rng: jax.Array, *,
                   ema_decay: float = 0.0) -> "TrainState":
        """A fresh state for the Flax module `model`, initialised on `example` (one input batch, e.g. `x[:1]`).

        `model.init` runs in evaluation mode (`train=False` / `deterministic=True` where `__call__` takes one)
        and every collection it returns is kept (see the module docstring). `rng` is split into the
        parameters' key, an init-time dropout key and the state's key. Build `tx` once, outside the `init`
        function of an experiment: the state's static fields must be the same objects at every call.
        """
        from depthlab.train.step import mode_kwargs   # step.py imports this module

        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, jnp.asarray(example),
                               **mode_kwargs(model, train=False))
        return cls.create(apply_fn=model.apply, variables=variables, tx=tx, rng=state_rng, ema_decay=ema_decay)

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
