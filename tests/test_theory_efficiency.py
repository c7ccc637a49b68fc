import pytest
"""Efficiency study: model_cost reads the compiled program's FLOPs; wider CNNs cost more and score higher."""
import os

import flax.linen as nn
import jax.numpy as jnp

from depthlab.models import CNN
from depthlab.research.theory import efficiency as eff


def test_model_cost_counts_a_dense_layer():
    cost = eff.model_cost(_Dense(), jnp.ones((4, 8)))
    assert cost["params"] == 8 * 16 + 16 and cost["batch"] == 4
    assert 2 * 8 * 16 <= cost["flops_per_example"] <= 2 * 8 * 16 + 2 * 16  # multiply-adds (+ bias)


def test_model_cost_grows_with_width():
    x = jnp.ones((2, 8, 8, 1))
    small, large = eff.model_cost(CNN(channels=(4, 8)), x), eff.model_cost(CNN(channels=(16, 32)), x)
    assert large["params"] > small["params"] and large["flops_per_example"] > 4 * small["flops_per_example"]


@pytest.mark.slow   # 34 s loaded; the cost counters stay fast
def test_run_accuracy_rises_with_flops(tmp_path):
    config = eff.get_config()
    config.models = (("mlp", {"features": (32, 10)}, (8, 8, 1)),)
    config.widths = (1, 16)
    config.num_seeds = 1
    config.steps = 150
    config.repeats = 2
    summary = eff.run(config, str(tmp_path))
    narrow, wide = summary["width_sweep"]
    assert wide["kFLOPs/example"] > narrow["kFLOPs/example"]
    assert wide["test_acc (mean)"] > narrow["test_acc (mean)"] + 0.05
    assert summary["models"][0]["examples/s (CPU)"] > 0
    assert os.path.exists(tmp_path / "accuracy_vs_flops.png")


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(16)(x)
