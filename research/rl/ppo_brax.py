"""PPO on brax physics (inverted pendulum on CPU; ant and halfcheetah presets for accelerators).

The environments go through the same adapter as gymnax (research/rl/environments.py: our own time limit,
auto-reset and truncation bootstrap), so this is our PPO, not brax's trainer. brax is part of the
optional extra: pip install 'depthlab[rl]'.

Presets: None / "inverted_pendulum" (CPU, 500k steps, return 1000 = balanced for the whole episode),
"halfcheetah" and "ant" (50M steps with 2048 envs: run them on a GPU/TPU).

Example:
    depthlab run rl/ppo_brax --workdir runs/pendulum_brax
    depthlab run rl/ppo_brax --preset ant --workdir runs/ant        # accelerator
"""
from __future__ import annotations

import ml_collections

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.rl import ppo_common

def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Brax-style PPO: many envs, short rollouts, normalised observations and rewards."""
    config = ppo_common.base_config(env="brax/inverted_pendulum", total_timesteps=500_000, num_envs=64,
                                    num_steps=32)
    config.env.kwargs = ml_collections.ConfigDict({"episode_length": 1000})
    p = config.ppo
    p.update_epochs, p.num_minibatches = 4, 8
    p.gamma, p.gae_lambda = 0.99, 0.95
    p.ent_coef = 0.0
    p.normalize_obs = p.normalize_reward = True
    p.eval_envs = 16
    config.optim.learning_rate = 3e-4
    return with_preset(config, preset, PRESETS)


def _locomotion(task: str):
    """Brax's published PPO settings for halfcheetah and ant, with our per-iteration layout: 2048 envs x 16
    steps = 32k transitions per iteration, 32 minibatches, 4 epochs."""
    def apply(config: ml_collections.ConfigDict) -> None:
        config.env.name = f"brax/{task}"
        p = config.ppo
        p.num_envs, p.num_steps, p.num_minibatches, p.update_epochs = 2048, 16, 32, 4
        p.gamma = 0.95 if task == "halfcheetah" else 0.97
        p.ent_coef = 1e-3 if task == "halfcheetah" else 1e-2
        config.model.hidden = (256, 256)
        config.model.activation = "silu"
        config.train.steps = 50_000_000 // (p.num_envs * p.num_steps)
        config.train.log_every, config.train.eval_every = 20, 200
        config.train.checkpoint_every = 200
    return apply


PRESETS = {
    "inverted_pendulum": lambda config: None,   # the default, by its name
    "halfcheetah": _locomotion("halfcheetah"),
    "ant": _locomotion("ant"),
    "smoke": smoke_preset(2, log_every=1, eval_every=2, checkpoint_every=2,
                          ppo={"num_envs": 8, "num_steps": 8, "eval_envs": 2}, env={"kwargs": {"episode_length": 50}}),
}

def make_experiment(config: ml_collections.ConfigDict):
    """fit drives one PPO iteration per step (see research/rl/ppo_common.py)."""
    return ppo_common.make_experiment(config)


def evaluate_checkpoint(state, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`depthlab eval rl/ppo_brax`: greedy and sampled returns over 100 episodes."""
    return ppo_common.evaluate_checkpoint(state, config, workdir)
