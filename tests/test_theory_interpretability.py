import pytest
"""Attribution study: integrated gradients is complete, and every method beats random deletion."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.research.theory import interpretability as interp


@pytest.mark.slow   # 37 s loaded; IG's exactness on a quadratic stays fast
def test_ig_completeness_and_deletion_beat_random(tmp_path):
    config = interp.get_config()
    config.steps = 150
    config.num_explain = 12
    config.ig_steps = 64
    config.ig_tolerance = 0.02
    config.smoothgrad_samples = 8
    config.deletion_points = 9
    summary = interp.run(config, str(tmp_path))
    assert summary["test_accuracy"] > 0.8
    assert summary["ig_completeness_holds"], summary["ig_max_relative_error"]
    for method in ("saliency", "smoothgrad", "integrated_gradients"):
        assert summary[f"deletion_auc_{method}"] < summary["deletion_auc_random"], (method, summary)
    assert os.path.exists(tmp_path / "attributions.png") and os.path.exists(tmp_path / "deletion_curves.png")


def test_integrated_gradients_exact_for_a_quadratic_score():
    w = jax.random.normal(jax.random.key(0), (8, 8, 1))
    score = lambda x, c: jnp.sum(w * x ** 2)  # IG of w x^2 from baseline 0 is exactly w x^2 per pixel
    x = jax.random.uniform(jax.random.key(1), (8, 8, 1))
    ig = interp.integrated_gradients(score, x, 0, jnp.zeros_like(x), steps=200)
    np.testing.assert_allclose(ig, w * x ** 2, rtol=1e-3, atol=1e-5)
