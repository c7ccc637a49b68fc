"""The PPO agent through the engine: fit, Orbax checkpoint, resume (bit-identical), evaluate_checkpoint."""
import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("gymnax")

from depthlab.research.rl import ppo_cartpole  # noqa: E402
from depthlab.train import fit, read_metrics  # noqa: E402


def _config():
    config = ppo_cartpole.get_config()
    config.unlock()
    config.train.update({"steps": 4, "checkpoint_every": 2, "eval_every": 2, "log_every": 1, "keep": 3,
                         "progress": False, "tensorboard": False, "async_checkpoint": False})
    config.ppo.update({"num_envs": 2, "num_steps": 16, "num_minibatches": 2, "update_epochs": 1, "eval_envs": 2})
    config.model.hidden = (8,)
    config.env.kwargs = {"max_steps_in_episode": 50}
    return config


def test_fit_checkpoint_resume_and_evaluate(tmp_path):
    config = _config()
    workdir = str(tmp_path / "run")
    first = fit(ppo_cartpole.make_experiment(config), config, workdir)
    assert int(first.state.step) == 4
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "eval/return" in r] == [2, 4]
    assert {"loss", "episode_return", "entropy", "perf/steps_per_sec"} <= set(records[-1])

    # Forget the last checkpoint: the rerun resumes from step 2 (agent, optimizer, env states, keys)
    # and must reproduce steps 3 and 4 exactly.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    second = fit(ppo_cartpole.make_experiment(config), config, workdir)
    assert int(second.state.step) == 4
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(second.state)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    out = ppo_cartpole.evaluate_checkpoint(second.state, config, workdir)
    assert out["env_steps_trained"] == 4 * 2 * 16
    assert 1 <= out["greedy_return"] <= 50 and 1 <= out["sampled_return"] <= 50
