"""One functional environment interface over gymnax and brax, for PPO.

    env = make_env("gymnax/CartPole-v1")            # or "brax/inverted_pendulum", or "CartPole-v1"
    obs, state = env.reset(key)                                  # obs [obs_dim]
    step = env.step(key, state, action)                          # a Transition (below)

`step` auto-resets finished episodes and reports *terminated* (a true end: no bootstrapping) and
*truncated* (a time limit: bootstrap from the value of `final_obs`) separately, which is what PPO
needs for correct returns. Everything is a pure, jittable function of single (unbatched) inputs;
callers `jax.vmap` over environments.

gymnax and brax are the optional `rl` extra; they are imported lazily so that the rest of depthlab
works without them.

Example:
    >>> env = make_env("CartPole-v1")
    >>> obs, state = env.reset(jax.random.key(0))
    >>> t = env.step(jax.random.key(1), state, jnp.int32(0))
    >>> t.obs.shape, t.reward, t.terminated, t.truncated
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from depthlab.research.datasets import require


class Transition(NamedTuple):
    """What one env.step returns (single environment; vmapped callers get a leading [num_envs])."""

    obs: jax.Array          # observation to act on next (the first of a new episode after a reset)
    state: Any              # environment state to pass to the next step
    reward: jax.Array       # [] float32
    terminated: jax.Array   # [] bool: the episode really ended (value of what follows is 0)
    truncated: jax.Array    # [] bool: cut by the time limit (bootstrap from final_obs)
    final_obs: jax.Array    # observation reached by this step, before any auto-reset


@dataclasses.dataclass(frozen=True)
class JaxEnv:
    """A pure environment. For discrete envs `num_actions` > 0; for continuous ones `action_dim` > 0
    with bounds `action_low`/`action_high` (floats; actions are clipped to them)."""

    name: str
    obs_shape: tuple[int, ...]
    reset: Callable[[jax.Array], tuple[jax.Array, Any]]
    step: Callable[[jax.Array, Any, jax.Array], Transition]
    num_actions: int = 0
    action_dim: int = 0
    action_low: float = -1.0
    action_high: float = 1.0
    max_episode_steps: int = 0

    @property
    def discrete(self) -> bool:
        return self.num_actions > 0


def make_env(name: str, **kwargs: Any) -> JaxEnv:
    """Builds an environment by name: "gymnax/<id>", "brax/<name>", or a bare gymnax id.

    kwargs are environment parameters: for gymnax any field of the env's EnvParams (e.g.
    max_steps_in_episode=200); for brax `episode_length` (default 1000) and constructor arguments.
    """
    if name.startswith("brax/"):
        return _make_brax(name[len("brax/"):], **kwargs)
    return _make_gymnax(name[len("gymnax/"):] if name.startswith("gymnax/") else name, **kwargs)


def _make_gymnax(env_id: str, **kwargs: Any) -> JaxEnv:
    gymnax = require("gymnax", "rl", f"the gymnax environment {env_id!r}")
    if env_id not in gymnax.registered_envs:
        raise ValueError(f"unknown gymnax environment {env_id!r}; valid: {', '.join(gymnax.registered_envs)} "
                         "(brax environments are named 'brax/<name>')")
    env, params = gymnax.make(env_id)
    if kwargs:
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(params)}
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)} for {env_id}; valid: "
                             f"{[f.name for f in dataclasses.fields(params)]}")
        params = params.replace(**kwargs)
    space = env.action_space(params)
    discrete = hasattr(space, "n")
    max_steps = int(getattr(params, "max_steps_in_episode", 0))

    def reset(key):
        obs, state = env.reset(key, params)
        return _flat(obs), state

    def step(key, state, action):
        out = env.step(key, state, action, params)
        if len(out) == 6:   # gymnax >= 1.0: (obs, state, reward, terminated, truncated, info)
            obs, new_state, reward, terminated, truncated, info = out
            final_obs = info["final_observation"]
        else:               # gymnax < 1.0: (obs, state, reward, done, info); time limit folded in done
            obs, new_state, reward, done, info = out
            truncated = done & (state.time + 1 >= max_steps)
            terminated = done & ~truncated
            final_obs = obs  # the pre-reset observation is lost in the old API: bootstrap from the reset one
        return Transition(_flat(obs), new_state, jnp.asarray(reward, jnp.float32), jnp.asarray(terminated, bool),
                          jnp.asarray(truncated, bool) & ~jnp.asarray(terminated, bool), _flat(final_obs))

    obs_shape = (int(jnp.prod(jnp.array(env.observation_space(params).shape))),)
    if discrete:
        return JaxEnv(env_id, obs_shape, reset, step, num_actions=int(space.n), max_episode_steps=max_steps)
    low, high = float(jnp.min(jnp.asarray(space.low))), float(jnp.max(jnp.asarray(space.high)))
    return JaxEnv(env_id, obs_shape, reset, step, action_dim=int(space.shape[0]) if space.shape else 1,
                  action_low=low, action_high=high, max_episode_steps=max_steps)


def _flat(obs: jax.Array) -> jax.Array:
    # MinAtar observations are [10, 10, channels] booleans; an MLP policy wants a float vector.
    return jnp.asarray(obs, jnp.float32).reshape(-1)


class BraxState(NamedTuple):
    """Brax state plus the step counter that implements the episode time limit."""

    env_state: Any
    time: jax.Array


def _make_brax(env_name: str, episode_length: int = 1000, **kwargs: Any) -> JaxEnv:
    envs = require("brax.envs", "rl", f"the brax environment {env_name!r}")
    try:
        env = envs.get_environment(env_name, **kwargs)
    except KeyError as error:
        raise ValueError(f"unknown brax environment {env_name!r}; valid: {', '.join(sorted(envs._envs))}") from error

    def reset(key):
        s = env.reset(key)
        return s.obs, BraxState(s, jnp.zeros((), jnp.int32))

    def step(key, state, action):
        # Our own time limit and auto-reset (instead of brax's wrappers) so that the final observation
        # of a truncated episode is kept for bootstrapping and every new episode gets a fresh key.
        s = env.step(state.env_state, action)
        time = state.time + 1
        terminated = jnp.asarray(s.done) > 0.5
        truncated = (time >= episode_length) & ~terminated
        done = terminated | truncated
        reset_obs, reset_state = reset(key)
        next_state = jax.tree.map(lambda r, c: jnp.where(done, r, c), reset_state, BraxState(s, time))
        return Transition(jnp.where(done, reset_obs, s.obs), next_state, jnp.asarray(s.reward, jnp.float32),
                          terminated, truncated, s.obs)

    return JaxEnv(f"brax/{env_name}", (int(env.observation_size),), reset, step, action_dim=int(env.action_size),
                  action_low=-1.0, action_high=1.0, max_episode_steps=episode_length)
