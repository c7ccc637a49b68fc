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
from depthlab.research.rl.ppo_experiment import evaluate_ppo_checkpoint, ppo_config, ppo_experiment


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Brax-style PPO: many envs, short rollouts, normalised observations and rewards."""
    config = ppo_config(env="brax/inverted_pendulum", total_timesteps=500_000, num_envs=64,
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


def _locomotion(config: ml_collections.ConfigDict, task: str) -> None:
    """Brax's published PPO settings for halfcheetah and ant, with our per-iteration layout: 2048 envs x 16
    steps = 32k transitions per iteration, 32 minibatches, 4 epochs."""
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


def _halfcheetah(config: ml_collections.ConfigDict) -> None:
    _locomotion(config, "halfcheetah")


def _ant(config: ml_collections.ConfigDict) -> None:
    _locomotion(config, "ant")


def _inverted_pendulum(config: ml_collections.ConfigDict) -> None:
    """The default, by its name."""


PRESETS = {
    "inverted_pendulum": _inverted_pendulum,
    "halfcheetah": _halfcheetah,
    "ant": _ant,
    "smoke": smoke_preset(2, log_every=1, eval_every=2, checkpoint_every=2,
                          ppo={"num_envs": 8, "num_steps": 8, "eval_envs": 2}, env={"kwargs": {"episode_length": 50}}),
}


# fit drives one PPO iteration per step; `depthlab eval` reports greedy and sampled returns over 100 episodes.
make_experiment = ppo_experiment
evaluate_checkpoint = evaluate_ppo_checkpoint
