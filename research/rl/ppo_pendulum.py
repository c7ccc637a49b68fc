"""PPO with a Gaussian policy on gymnax Pendulum-v1 (swing-up; best returns are about -150).

Presets: None (Pendulum-v1), "mountain_car" (MountainCarContinuous-v0).

Example:
    depthlab run rl/ppo_pendulum --workdir runs/pendulum
"""
from __future__ import annotations

import ml_collections

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.rl.ppo_experiment import evaluate_ppo_checkpoint, ppo_config, ppo_experiment


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Continuous-control settings: normalised observations and rewards, gamma 0.95, 10 epochs."""
    config = ppo_config(env="Pendulum-v1", total_timesteps=1_000_000, num_envs=16, num_steps=128)
    p = config.ppo
    p.gamma, p.gae_lambda = 0.95, 0.95
    p.update_epochs, p.num_minibatches = 10, 16
    p.ent_coef = 0.0
    p.normalize_obs = p.normalize_reward = True
    config.model.log_std_init = -0.5
    config.optim.learning_rate = 1e-3
    return with_preset(config, preset, PRESETS)


def _mountain_car(config: ml_collections.ConfigDict) -> None:
    config.env.name = "MountainCarContinuous-v0"
    config.ppo.gamma, config.ppo.ent_coef = 0.99, 0.01
    config.model.log_std_init = 0.0


PRESETS = {
    "mountain_car": _mountain_car,
    "smoke": smoke_preset(4, log_every=1, eval_every=2, checkpoint_every=2, ppo={"num_steps": 32, "eval_envs": 4}),
}


# fit drives one PPO iteration per step; `depthlab eval` reports greedy and sampled returns over 100 episodes.
make_experiment = ppo_experiment
evaluate_checkpoint = evaluate_ppo_checkpoint
