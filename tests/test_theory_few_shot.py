"""Few-shot study: after one step on 10 points of a new sine, the MAML init beats a random init;
prototypical networks classify unseen digit classes far above chance."""
import os

import jax
import jax.numpy as jnp
import pytest

from depthlab.research.theory import few_shot as fs


@pytest.mark.slow   # 57 s loaded; the episode and class tests stay fast
def test_maml_beats_scratch_after_one_step_and_protonet_beats_chance(tmp_path):
    config = fs.get_config()
    config.maml.meta_steps = 500
    config.maml.meta_batch = 10
    config.maml.eval_tasks = 50
    config.maml.eval_steps = (0, 1)
    config.proto.episodes = 100
    config.proto.eval_episodes = 50
    config.proto.eval_settings = ((2, 1),)
    summary = fs.run(config, str(tmp_path))
    maml = {r["init"]: r for r in summary["maml_rows"]}
    assert summary["maml_mse_1_step"] < 0.5 * summary["scratch_mse_1_step"], summary
    # the init is built for adaptation: one step on the task's 10 points lowers its error
    assert maml["maml"]["MSE after 1 steps"] < maml["maml"]["MSE after 0 steps"]
    assert summary["protonet_2-way_1-shot"] > 0.7
    assert os.path.exists(tmp_path / "few_shot.png")


def test_episode_classes_are_drawn_from_the_given_classes():
    images = jnp.arange(10)[:, None, None, None, None] * jnp.ones((10, 6, 8, 8, 1))  # pixel value = class
    support, query = fs.sample_episode(jax.random.key(0), images, jnp.asarray([5, 7, 9]), 2, 2, 3)
    assert support.shape == (2, 2, 8, 8, 1) and query.shape == (2, 3, 8, 8, 1)
    classes = set(float(v) for v in support[:, :, 0, 0, 0].ravel()) | set(float(v) for v in query[:, :, 0, 0, 0].ravel())
    assert classes <= {5.0, 7.0, 9.0} and len(classes) == 2


def test_overlapping_classes_are_rejected(tmp_path):
    config = fs.get_config()
    config.proto.test_classes = (4, 5, 6, 7, 8)
    with pytest.raises(ValueError, match="overlap"):
        fs.run(config, str(tmp_path))
