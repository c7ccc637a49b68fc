"""Backprop study: hand-written per-layer VJPs equal jax.grad, train identically, and cost ~2x a forward."""
import os

import jax
import pytest

from depthlab.research.theory import backprop as bp


@pytest.mark.parametrize("act", bp.ACTIVATIONS)
def test_hand_gradients_equal_jax_grad_on_random_nets(act):
    for seed, sizes in enumerate([(10, 7, 5), (12, 9, 8, 6, 4)]):
        assert bp.gradient_error(act, sizes, jax.random.key(seed), batch=16) < 1e-5


def test_hand_training_curve_equals_autodiff_and_backward_is_cheap(tmp_path):
    summary = bp.run(bp.get_config("smoke"), str(tmp_path))
    assert summary["max_grad_error"] < 1e-5
    assert summary["max_curve_difference"] < 1e-4  # the same SGD trajectory, to float32 rounding
    row = summary["rows"][0]
    assert row["test acc (hand)"] == pytest.approx(row["test acc (autodiff)"], abs=1e-6)
    for ratio in summary["backward_over_forward_autodiff"] + summary["backward_over_forward_hand"]:
        assert 1.0 < ratio < 3.0  # one matmul forward, at most two backward per layer
    assert os.path.exists(tmp_path / "backprop.png") and os.path.exists(tmp_path / "results.json")


def test_unknown_activation_is_named(tmp_path):
    config = bp.get_config("smoke")
    config.activations = ("swish",)
    with pytest.raises(ValueError, match="swish"):
        bp.run(config, str(tmp_path))
