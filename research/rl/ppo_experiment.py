"""What every PPO experiment shares: the config layout, the engine Experiment, evaluation from a checkpoint.

One `fit` step is one PPO iteration (a rollout plus its epochs of minibatch updates); the train step
collects its own data, so the Experiment has train_batches=None. An experiment module (rl/ppo_cartpole.py)
is `get_config` over `ppo_config`, its PRESETS, and `make_experiment = ppo_experiment`.

Example:
    >>> config = ppo_config(env="CartPole-v1", total_timesteps=500_000, num_envs=4, num_steps=128)
    >>> result = fit(ppo_experiment(config), config, workdir)
"""
from __future__ import annotations

import os

import jax
import ml_collections

from depthlab.research.experiment import base_config
from depthlab.research.rl.environments import make_env
from depthlab.research.rl.ppo_training import describe, make_evaluate, make_ppo
from depthlab.train import Experiment


def ppo_config(env: str, total_timesteps: int, num_envs: int, num_steps: int) -> ml_collections.ConfigDict:
    """PPO defaults (PureJaxRL / CleanRL) on the standard config (no data section: the agent collects its own);
    train.steps = total_timesteps // (num_envs * num_steps)."""
    steps = max(1, total_timesteps // (num_envs * num_steps))
    return base_config(
        model={"name": "actor_critic", "hidden": (64, 64), "activation": "tanh", "shared_torso": False,
               "log_std_init": 0.0},
        optim={"name": "adam", "learning_rate": 2.5e-4, "eps": 1e-5,
               "schedule": "linear",     # annealed to 0 over the run's minibatch steps
               "clip_norm": 0.5},
        train={"steps": steps, "log_every": max(1, steps // 50), "eval_every": max(1, steps // 4),
               "checkpoint_every": max(1, steps // 4), "keep": 2},
        env={"name": env, "kwargs": {}},
        ppo={
            "num_envs": num_envs,
            "num_steps": num_steps,          # rollout length per env per iteration
            "update_epochs": 4,
            "num_minibatches": 4,
            "gamma": 0.99,
            "gae_lambda": 0.95,
            "clip_eps": 0.2,
            "clip_value": True,              # PPO2's clipped value loss
            "vf_coef": 0.5,
            "ent_coef": 0.01,
            "normalize_obs": False,
            "normalize_reward": False,
            "normalize_advantages": True,
            "eval_envs": 32,                 # greedy episodes per evaluation
            "num_seeds": 4,                  # agents trained at once by the notebook / benchmark (vmap)
        })


def ppo_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """The engine's view of PPO: init -> PPOState, train_step = one PPO iteration, greedy evaluation."""
    env = make_env(config.env.name, **config.env.kwargs.to_dict())
    init, update = make_ppo(config, env)
    evaluate_fn = jax.jit(make_evaluate(config, env))
    print(describe(config))

    def evaluate(state) -> dict:
        # A fixed evaluation key per step: the same checkpoint always scores the same.
        out = evaluate_fn(state, jax.random.fold_in(jax.random.key(config.seed + 10_000), state.step))
        return {"return": float(out["return"]), "return_std": float(out["return_std"]),
                "episode_length": float(out["length"])}

    return Experiment(init=init, train_step=lambda state, batch: update(state), train_batches=None,
                      evaluate=evaluate)


def evaluate_ppo_checkpoint(state, config: ml_collections.ConfigDict, workdir: str, episodes: int = 100) -> dict:
    """`depthlab eval`: greedy and sampled returns of the restored agent over `episodes` fresh episodes."""
    env = make_env(config.env.name, **config.env.kwargs.to_dict())
    key = jax.random.key(config.seed + 20_000)
    out = {"env_steps_trained": int(jax.device_get(state.step)) * config.ppo.num_envs * config.ppo.num_steps}
    for mode, greedy in (("greedy", True), ("sampled", False)):
        result = jax.jit(make_evaluate(config, env, num_envs=episodes, greedy=greedy))(state, key)
        out[f"{mode}_return"] = float(result["return"])
        out[f"{mode}_return_std"] = float(result["return_std"])
        out[f"{mode}_episode_length"] = float(result["length"])
    print(f"{config.env.name} from {os.path.abspath(workdir)}: greedy return {out['greedy_return']:.1f} "
          f"+- {out['greedy_return_std']:.1f}, sampled {out['sampled_return']:.1f} over {episodes} episodes")
    return out
