"""Regularisation study: L1 makes first-layer weights sparse, L2 shrinks them, and both close the loss gap."""
import os

import jax
import numpy as np
import pytest

from depthlab.research.theory import regularization as reg
from depthlab.research.theory.studies import random_shift_images


@pytest.mark.slow   # 35 s loaded: a whole study
def test_l1_sparsifies_and_penalties_shrink_weights(tmp_path):
    config = reg.get_config()
    config.variants = ("none", "l1", "l2")
    config.hidden = (64, 64)
    config.num_seeds = 2
    config.steps = 300
    config.eval_every = 100
    summary = reg.run(config, str(tmp_path))
    rows = {r["variant"]: r for r in summary["rows"]}
    assert rows["none"]["train_acc"] > rows["none"]["test_acc"]  # 100 images: it over-fits
    assert rows["l1"]["near-zero weights"] > 2 * rows["l2"]["near-zero weights"] > 4 * rows["none"]["near-zero weights"]
    assert rows["l2"]["L1 norm / weight"] < rows["none"]["L1 norm / weight"]
    assert rows["l2"]["loss gap"] < rows["none"]["loss gap"]
    assert os.path.exists(tmp_path / "regularization.png")


def test_random_shift_images_moves_pixels_and_keeps_shape():
    images = np.zeros((64, 8, 8, 1), np.float32)
    images[:, 4, 4, 0] = 1.0
    shifted = np.asarray(random_shift_images(jax.random.key(0), images, 1))
    assert shifted.shape == images.shape and np.allclose(shifted.sum((1, 2, 3)), 1.0)
    positions = {tuple(np.argwhere(s[..., 0])[0]) for s in shifted}
    assert positions <= {(4 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} and len(positions) > 3


def test_bad_sizes_fail_clearly(tmp_path):
    config = reg.get_config()
    config.num_train = 5000
    with pytest.raises(ValueError, match="lower them"):
        reg.run(config, str(tmp_path))
