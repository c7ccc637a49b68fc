"""PPO on gymnax CartPole-v1 (500k env steps, one jitted train; vmap runs many seeds at once).

Presets: None (CartPole-v1, 500k steps), "acrobot" (Acrobot-v1), "minatar_breakout" (MinAtar Breakout,
accelerator-sized).

Example:
    depthlab run rl/ppo_cartpole --workdir runs/cartpole
    depthlab eval rl/ppo_cartpole --workdir runs/cartpole
"""
from __future__ import annotations

import ml_collections

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.rl.ppo_experiment import evaluate_ppo_checkpoint, ppo_config, ppo_experiment


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """PureJaxRL's CartPole settings: 4 envs x 128 steps, 4 epochs x 4 minibatches, tanh 64x64."""
    config = ppo_config(env="CartPole-v1", total_timesteps=500_000, num_envs=4, num_steps=128)
    return with_preset(config, preset, PRESETS)


def _acrobot(config: ml_collections.ConfigDict) -> None:
    config.env.name = "Acrobot-v1"


def _minatar_breakout(config: ml_collections.ConfigDict) -> None:
    config.env.name = "Breakout-MinAtar"
    p = config.ppo
    p.num_envs, p.num_steps, p.update_epochs, p.num_minibatches = 64, 128, 4, 8
    config.model.hidden = (256, 256)
    config.model.activation = "relu"
    config.optim.learning_rate = 5e-4
    config.train.steps = 10_000_000 // (p.num_envs * p.num_steps)


PRESETS = {
    "acrobot": _acrobot,
    "minatar_breakout": _minatar_breakout,
    "smoke": smoke_preset(4, log_every=1, eval_every=2, checkpoint_every=2, ppo={"num_steps": 32, "eval_envs": 4}),
}


# fit drives one PPO iteration per step; `depthlab eval` reports greedy and sampled returns over 100 episodes.
make_experiment = ppo_experiment
evaluate_checkpoint = evaluate_ppo_checkpoint
