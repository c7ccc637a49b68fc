"""Optax optimizer chains built from a config.

    clip (global norm) -> L1 / L2 penalty gradients -> optimizer (sgd, adam, ...) with a schedule
    -> decoupled weight decay (masked: no decay on biases and norm scales) -> frozen parameters
    (`freeze`, by name pattern: their updates are zero) -> gradient accumulation

Example:
    >>> config = default_optim_config(); config.name = "adamw"; config.learning_rate = 3e-4
    >>> config.schedule = "warmup_cosine"; config.warmup_steps = 100; config.decay_steps = 2000
    >>> tx = make_optimizer(config)
    >>> config.freeze = "*,!Dense_0"     # fine-tuning: train only the head (see `frozen_mask`)

Conventions that differ from PyTorch (docs/pytorch.md):
    RMSProp's epsilon: Optax's default adds `eps` inside the square root, `g / sqrt(v + eps)`;
    `torch.optim.RMSprop` adds it outside, `g / (sqrt(v) + eps)`. `rmsprop_eps_in_sqrt=False` gives
    PyTorch's rule (the difference matters while `v` is small, i.e. in the first steps and for
    rarely-active weights). Both start from `v = 0` and use no bias correction.
    RMSProp's momentum: `momentum=None` (the default) means no momentum for rmsprop, PyTorch's default;
    a number is applied as PyTorch does, `buf = momentum * buf + g / (sqrt(v) + eps)`.
    Keys an optimizer does not read (`b1` for sgd, `momentum` for adam, ...) must keep their default:
    setting one is an error naming the optimizers that use it (`OPTIMIZER_KEYS`), not a silent no-op.
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from depthlab.train import schema

OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "lamb", "lion", "adafactor")
SCHEDULES = ("constant", "warmup_cosine", "cosine", "step", "linear", "warmup_linear")

# Keys only some optimizers read -> those optimizers. Every other key (learning rate, schedule,
# weight_decay, l1, l2, clip_norm, accumulate_steps, ema_decay) applies to all of them.
OPTIMIZER_KEYS = {
    "momentum": ("momentum", "nesterov", "rmsprop"),
    "b1": ("adam", "adamw", "lamb", "lion"),
    "b2": ("adam", "adamw", "lamb", "lion"),
    "eps": ("rmsprop", "adagrad", "adam", "adamw", "lamb"),
    "rmsprop_decay": ("rmsprop",),
    "rmsprop_eps_in_sqrt": ("rmsprop",),
    "rmsprop_centered": ("rmsprop",),
}
SGD_MOMENTUM = 0.9  # what momentum/nesterov use when `momentum` is None

# Scalars that may be held in the optimizer's state as arrays (`optim.inject`, optax.inject_hyperparams), so that
# runs differing only in them are one program with different state values (a together sweep's members). Each is
# a number the chain only computes with; a key whose zero or None changes the chain's structure (weight_decay,
# l1, l2, clip_norm: 0 leaves the part out; momentum: None) keeps that structure from the config.
INJECTABLE = ("learning_rate", "end_learning_rate", "weight_decay", "l1", "l2", "clip_norm", "momentum", "b1", "b2",
              "eps", "rmsprop_decay")


def default_optim_config() -> ml_collections.ConfigDict:
    """Every key make_optimizer reads, with the defaults a small experiment wants."""
    return ml_collections.ConfigDict({
        "name": "adam",
        "learning_rate": 1e-3,
        "schedule": "constant",
        "warmup_steps": 0,
        "decay_steps": 0,          # 0: the run's train.steps (filled in by the experiment)
        "end_learning_rate": 0.0,  # final value of linear/cosine decays
        "step_boundaries": (),     # "step" schedule: steps at which the rate is multiplied by step_factor
        "step_factor": 0.1,
        "momentum": None,          # None: 0.9 for momentum/nesterov, none for rmsprop (PyTorch's default 0)
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "rmsprop_decay": 0.9,      # PyTorch's `alpha` (torch default 0.99)
        "rmsprop_eps_in_sqrt": True,  # True: g / sqrt(v + eps) (Optax); False: g / (sqrt(v) + eps) (PyTorch)
        "rmsprop_centered": False,    # divide by the running std instead of the RMS (PyTorch's centered=True)
        "weight_decay": 0.0,       # decoupled (AdamW-style), skips biases and norm scales
        "l2": 0.0,                 # coupled L2 penalty: adds l2 * w to the gradient (skips biases/norms)
        "l1": 0.0,                 # L1 penalty: adds l1 * sign(w) to the gradient (skips biases/norms)
        "clip_norm": 0.0,          # global-norm clipping; 0 disables
        "accumulate_steps": 1,     # gradient accumulation over k micro-batches (optax.MultiSteps)
        "ema_decay": 0.0,          # EMA of parameters kept in the TrainState; 0 disables
        "freeze": "",              # params not trained, comma-separated globs over paths ("stem_*,BasicBlock_*";
                                   # "*,!Dense_0": all but the head); "" trains every parameter (frozen_mask)
        "freeze_steps": 0,         # 0: frozen for the whole run; k > 0: frozen for the first k updates only
    })


# The type and domain of every key of default_optim_config (train/schema.py checks them, for every optimizer
# section of an experiment's config, before a run directory is written).
OPTIM_DOMAINS = {
    "name": schema.choice(*OPTIMIZERS),
    "learning_rate": schema.positive(),
    "schedule": schema.choice(*SCHEDULES),
    "warmup_steps": schema.integer(0),
    "decay_steps": schema.integer(0, note="0: the run's length"),
    "end_learning_rate": schema.number(0.0),
    "step_boundaries": schema.sizes(1, "steps of the step schedule", empty_ok=True),
    "step_factor": schema.positive(),
    "momentum": schema.number(0.0, 1.0, optional=True),
    "b1": schema.number(0.0, 1.0),
    "b2": schema.number(0.0, 1.0),
    "eps": schema.positive(),
    "rmsprop_decay": schema.number(0.0, 1.0),
    "rmsprop_eps_in_sqrt": schema.boolean(),
    "rmsprop_centered": schema.boolean(),
    "weight_decay": schema.number(0.0),
    "l2": schema.number(0.0),
    "l1": schema.number(0.0),
    "clip_norm": schema.number(0.0, note="0 disables"),
    "accumulate_steps": schema.integer(1),
    "ema_decay": schema.number(0.0, 1.0, note="0 disables"),
    "freeze": schema.text(),
    "freeze_steps": schema.integer(0),
}


def _choices_error(kind: str, value: Any, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")


def with_run_length(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """A copy of an optim config whose `decay_steps`, when 0 ("the run's length"), is `steps` (the number of
    optimizer updates of the run). The one place that resolves it: supervised runs pass train.steps, PPO its
    minibatch updates, the theory studies their own step counts."""
    config = ml_collections.ConfigDict(config.to_dict())
    if int(config.decay_steps) <= 0:
        config.decay_steps = int(steps)
    return config


def make_schedule(config: ml_collections.ConfigDict, values: dict | None = None) -> optax.Schedule:
    """The learning-rate schedule named by `config.schedule`. `values` may give `learning_rate` and
    `end_learning_rate` as arrays (injected hyperparameters, see `make_optimizer`); the rest is static."""
    values = values or {}
    lr = values.get("learning_rate", float(config.learning_rate))
    warmup = int(config.warmup_steps)
    decay_steps = max(int(config.decay_steps), warmup + 1)
    end = values.get("end_learning_rate", float(config.end_learning_rate))
    name = config.schedule
    if name == "constant":
        if warmup > 0:
            return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
        return optax.constant_schedule(lr)
    if name in ("warmup_cosine", "cosine"):
        if isinstance(lr, (int, float)):
            return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, decay_steps, end)
        # an injected (array) peak: optax's own composition, without its Python test of `peak == 0` (the
        # learning rate's domain is > 0)
        return optax.join_schedules([optax.linear_schedule(0.0 if warmup else lr, lr, warmup),
                                     optax.cosine_decay_schedule(lr, decay_steps - warmup, end / lr)], [warmup])
    if name in ("linear", "warmup_linear"):
        decay = optax.linear_schedule(lr, end, decay_steps - warmup)
        if warmup == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    if name == "step":
        boundaries = {int(b): float(config.step_factor) for b in config.step_boundaries}
        return optax.piecewise_constant_schedule(lr, boundaries)
    raise _choices_error("schedule", name, SCHEDULES)


def decay_mask(params: Any) -> Any:
    """True for weights that get decay/penalties: kernels and embeddings, not biases or norm scales.

    A parameter is decayed when its leaf name is not `bias`/`scale` and it has at least 2 dimensions.
    """

    def keep(path, leaf) -> bool:
        # The last dict key is the parameter's name (boxed leaves add a `.value` attribute after it).
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = names[-1] if names else ""
        return name not in ("bias", "scale") and getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(keep, params)


def add_l1_penalty(l1: float, mask: Callable | Any = decay_mask) -> optax.GradientTransformation:
    """Adds `l1 * sign(w)` to the gradient: the (sub)gradient of `l1 * |w|_1`."""

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("add_l1_penalty needs params: call tx.update(grads, opt_state, params)")
        updates = jax.tree.map(lambda g, p: g + l1 * jnp.sign(p), updates, params)
        return updates, state

    return optax.masked(optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn), mask)


def check_domains(config: ml_collections.ConfigDict) -> None:
    """One line naming an optim value outside its domain (`OPTIM_DOMAINS`: a negative learning rate, b1 >= 1,
    an unknown optimizer name, ...)."""
    schema.check(config, [(f"optim.{key}", domain) for key, domain in OPTIM_DOMAINS.items()], prefix="optim",
                 defaults=default_optim_config())


def check_unused_keys(config: ml_collections.ConfigDict) -> None:
    """Fails when a key the chosen optimizer does not read is set away from its default.

    Example: `name="sgd", b1=0.5` raises "optim.b1=0.5 has no effect on optimizer 'sgd'; it is read by
    adam, adamw, lamb, lion ...". Keys missing from `config` count as default.
    """
    defaults = default_optim_config()
    for key, users in OPTIMIZER_KEYS.items():
        if config.name in users or key not in config:
            continue
        value, default = config[key], defaults[key]
        if value != default:
            raise ValueError(f"optim.{key}={value!r} has no effect on optimizer {config.name!r}; it is read by "
                             f"{', '.join(users)}. Set optim.{key} back to {default!r} or choose one of those "
                             f"optimizers")


def _base_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule,
                    value: Callable[[str], Any]) -> optax.GradientTransformation:
    name = config.name
    momentum = value("momentum") if config.get("momentum") is not None else None
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=SGD_MOMENTUM if momentum is None else momentum)
    if name == "nesterov":
        return optax.sgd(lr, momentum=SGD_MOMENTUM if momentum is None else momentum, nesterov=True)
    if name == "rmsprop":
        # momentum None or 0: none (optax treats 0 as "no trace" too, but None skips the state).
        return optax.rmsprop(lr, decay=value("rmsprop_decay"), eps=value("eps"),
                             eps_in_sqrt=bool(config.get("rmsprop_eps_in_sqrt", True)),
                             centered=bool(config.get("rmsprop_centered", False)),
                             momentum=momentum if config.get("momentum") else None)
    if name == "adagrad":
        return optax.adagrad(lr, eps=value("eps"))
    if name in ("adam", "adamw"):
        # adamw == adam + decoupled weight decay, which is added below for every optimizer.
        return optax.adam(lr, b1=value("b1"), b2=value("b2"), eps=value("eps"))
    if name == "lamb":
        return optax.lamb(lr, b1=value("b1"), b2=value("b2"), eps=value("eps"), weight_decay=value("weight_decay"),
                          mask=decay_mask)
    if name == "lion":
        return optax.lion(lr, b1=value("b1"), b2=value("b2"))
    if name == "adafactor":
        return optax.adafactor(lr)
    raise _choices_error("optimizer", name, OPTIMIZERS)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The Optax chain described by an optim config (see `default_optim_config`).

    Weight decay is decoupled (scaled by the learning rate, applied after the optimizer, as in AdamW)
    and masked by `decay_mask`. `l1`/`l2` are penalties added to the gradient before the optimizer.
    `accumulate_steps = k > 1` wraps the chain in `optax.MultiSteps`: parameters change every k-th
    call with the mean of the k micro-batch gradients. A key the optimizer does not read, set to a
    non-default value, is an error (`check_unused_keys`).

    RMSProp follows Optax by default (eps inside the square root); `rmsprop_eps_in_sqrt=False`,
    `rmsprop_decay=0.99` and `momentum=None` reproduce `torch.optim.RMSprop(lr=..., eps=...)` (see the
    module docstring).

    An optional key `inject` ("learning_rate,weight_decay": names from `INJECTABLE`; absent or "" by default)
    holds those scalars in the optimizer's state as arrays (`optax.inject_hyperparams`; the chain's own state is
    its `inner_state`, see `without_injected`): the same arithmetic, but runs that differ only in them are one
    program, which is how `depthlab sweep --together` trains learning rates together.
    """
    check_domains(config)   # the name and schedule among them (OPTIM_DOMAINS)
    check_unused_keys(config)
    k = int(config.accumulate_steps)
    if k < 1:
        raise ValueError(f"optim.accumulate_steps must be >= 1, got {k}")
    freeze, freeze_steps = str(config.get("freeze", "") or ""), int(config.get("freeze_steps", 0) or 0)
    if freeze_steps and not freeze:
        raise ValueError(f"optim.freeze_steps={freeze_steps} has no effect without optim.freeze; name the "
                         "parameters to freeze (e.g. --config.optim.freeze='*,!Dense_0') or set freeze_steps to 0")
    if freeze:
        _patterns(freeze)   # syntax errors now, not at init
    inject = injected_keys(config)
    if not inject:
        return _chain(config, {})

    def factory(**values):
        return _chain(config, values)
    # inject_hyperparams finds the hyperparameters among the factory's named parameters
    factory.__signature__ = inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in inject])
    return optax.inject_hyperparams(factory)(**{key: float(config[key]) for key in inject})


def injected_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The scalars `config.inject` names, checked: each in `INJECTABLE`, a number in this config, and for the
    keys whose 0 or None leaves a part out of the chain, set (so the chain's structure is the config's)."""
    text = str(config.get("inject", "") or "")
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    for key in keys:
        if key not in INJECTABLE:
            raise ValueError(f"optim.inject={text!r}: {key!r} cannot be held in the optimizer state; injectable "
                             f"scalars are {', '.join(INJECTABLE)}")
        if not config.get(key):
            raise ValueError(f"optim.inject names {key!r}, but optim.{key}={config.get(key)!r} leaves that part "
                             f"out of the chain; set optim.{key} to a number or drop it from optim.inject")
    return keys


def _chain(config: ml_collections.ConfigDict, values: dict) -> optax.GradientTransformation:
    """make_optimizer's chain; `values` (name -> array) replaces the config's number for injected scalars."""
    value = lambda key: values.get(key, config[key])  # noqa: E731
    lr = make_schedule(config, values)
    parts = []
    if config.clip_norm and config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(value("clip_norm")))
    if config.l1:
        parts.append(add_l1_penalty(value("l1")))
    if config.l2:
        parts.append(optax.add_decayed_weights(value("l2"), mask=decay_mask))
    parts.append(_base_optimizer(config, lr, value))
    if config.weight_decay and config.name != "lamb":
        # Decoupled: update -= lr(t) * wd * w, after the optimizer's own scaling.
        parts.append(_decoupled_weight_decay(value("weight_decay"), lr))
    tx = optax.chain(*parts)
    freeze = str(config.get("freeze", "") or "")
    if freeze:
        tx = freeze_params(tx, freeze, int(config.get("freeze_steps", 0) or 0))
    k = int(config.accumulate_steps)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    return tx


def without_injected(tree: Any) -> Any:
    """`tree` (a TrainState, an optimizer state) with every injected-hyperparameter state replaced by the chain's
    own state inside it: what the same config without `optim.inject` has (its checkpoint layout)."""
    injected = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    return jax.tree.map(lambda x: x.inner_state if isinstance(x, injected) else x, tree,
                        is_leaf=lambda x: isinstance(x, injected))


# ----------------------------------------------------------------------------------------------
# Freezing parameters by name (fine-tuning)
# ----------------------------------------------------------------------------------------------
def param_paths(params: Any) -> Any:
    """The tree of "/"-joined paths of `params`' leaves, e.g. "BasicBlock_0/Conv_0/kernel" (Flax boxes skipped)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)), params)


def _patterns(patterns: str) -> tuple[list[str], list[str]]:
    items = [p.strip() for p in patterns.split(",")]
    if any(not p or p == "!" for p in items):
        raise ValueError(f"optim.freeze={patterns!r} has an empty pattern; give comma-separated globs over "
                         "parameter paths, e.g. 'stem_*,BasicBlock_*' or '*,!Dense_0'")
    return [p for p in items if not p.startswith("!")], [p[1:] for p in items if p.startswith("!")]


def _matches(pattern: str, path: str) -> bool:
    # A pattern names a parameter or any module above it: "BasicBlock_0" freezes the whole block.
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def frozen_mask(params: Any, patterns: str) -> Any:
    """True for the parameters `patterns` freezes: comma-separated globs (fnmatch) over "/"-joined parameter
    paths (`param_paths`); a pattern matches a path or any module above it, and one starting with "!" unfreezes
    what it matches. "stem_*,BasicBlock_*" freezes the stem and the blocks; "*,!Dense_0" everything but the
    head. A pattern that matches no parameter is an error listing some paths.
    """
    freeze, keep = _patterns(patterns)
    paths = jax.tree.leaves(param_paths(params))
    for pattern in freeze + keep:
        if not any(_matches(pattern, p) for p in paths):
            raise ValueError(f"optim.freeze pattern {pattern!r} matches no parameter; paths look like "
                             f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}")
    return jax.tree.map(lambda p: any(_matches(f, p) for f in freeze) and not any(_matches(k, p) for k in keep),
                        param_paths(params))


class FrozenForState(NamedTuple):
    count: jax.Array                 # updates seen so far
    inner: optax.OptState            # the optimizer's state, untouched while frozen


def _frozen_for(steps: int, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Zero updates for the first `steps` calls, then `tx`; `tx` (its moments and schedule) starts at that step."""

    def init_fn(params):
        return FrozenForState(jnp.zeros([], jnp.int32), tx.init(params))

    def update_fn(updates, state, params=None):
        def frozen():
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        new_updates, inner = jax.lax.cond(state.count < steps, frozen, lambda: tx.update(updates, state.inner, params))
        return new_updates, FrozenForState(optax.safe_increment(state.count), inner)

    return optax.GradientTransformation(init_fn, update_fn)


def freeze_params(tx: optax.GradientTransformation, patterns: str, steps: int = 0) -> optax.GradientTransformation:
    """`tx` for the parameters `patterns` leaves trainable; zero updates for the frozen ones (`frozen_mask`), so
    they stay bit-identical. `steps = k > 0` freezes them for the first k updates only, after which they follow
    `tx` from a fresh state (its schedule counts from there). The frozen ones get no weight decay either.
    """
    _patterns(patterns)      # syntax errors now, not at init
    frozen = optax.set_to_zero() if steps == 0 else _frozen_for(steps, tx)
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained", frozen_mask(params, patterns))  # noqa: E731
    return optax.multi_transform({"trained": tx, "frozen": frozen}, labels)


def _decoupled_weight_decay(weight_decay: float, lr: optax.Schedule) -> optax.GradientTransformation:
    """update -= lr(count) * weight_decay * w on masked leaves (the AdamW rule)."""

    def init_fn(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("weight decay needs params: call tx.update(grads, opt_state, params)")
        rate = lr(state.count) * weight_decay
        mask = decay_mask(params)
        updates = jax.tree.map(lambda u, p, m: u - rate * p if m else u, updates, params, mask)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
