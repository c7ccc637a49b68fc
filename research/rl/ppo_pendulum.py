"""PPO with a Gaussian policy on gymnax Pendulum-v1 (swing-up; best returns are about -150).

Presets: None (Pendulum-v1), "mountain_car" (MountainCarContinuous-v0).

Example:
    depthlab run rl/ppo_pendulum --workdir runs/pendulum
"""
from __future__ import annotations

import ml_collections

from depthlab.research.rl import _ppo_experiment

PRESETS = ("mountain_car",)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Continuous-control settings: normalised observations and rewards, gamma 0.95, 10 epochs."""
    config = _ppo_experiment.base_config(env="Pendulum-v1", total_timesteps=1_000_000, num_envs=16, num_steps=128)
    p = config.ppo
    p.gamma, p.gae_lambda = 0.95, 0.95
    p.update_epochs, p.num_minibatches = 10, 16
    p.ent_coef = 0.0
    p.normalize_obs = p.normalize_reward = True
    config.model.log_std_init = -0.5
    config.optim.learning_rate = 1e-3
    if preset == "mountain_car":
        config.env.name = "MountainCarContinuous-v0"
        p.gamma, p.ent_coef = 0.99, 0.01
        config.model.log_std_init = 0.0
    elif preset is not None:
        raise ValueError(f"unknown preset {preset!r} for rl/ppo_pendulum; valid presets: None, {', '.join(PRESETS)}")
    config.lock()
    return config


def make_experiment(config: ml_collections.ConfigDict):
    """fit drives one PPO iteration per step (see research/rl/_ppo_experiment.py)."""
    return _ppo_experiment.make_experiment(config)


def evaluate_checkpoint(state, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`depthlab eval rl/ppo_pendulum`: greedy and sampled returns over 100 episodes."""
    return _ppo_experiment.evaluate_checkpoint(state, config, workdir)
