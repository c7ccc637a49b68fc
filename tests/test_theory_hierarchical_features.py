"""Hierarchical features: probes on every layer, filters and preferred inputs drawn, HOG baseline."""
import os

import jax
import numpy as np
import pytest

from depthlab.research.theory import hierarchical_features as hf


def test_hog_features_respond_to_orientation():
    vertical = np.zeros((1, 8, 8), np.float32)
    vertical[:, :, 3:5] = 1.0
    horizontal = vertical.transpose(0, 2, 1).copy()
    f = hf.hog_features(np.concatenate([vertical, horizontal]))
    assert f.shape[0] == 2 and np.all(np.isfinite(f))
    assert np.abs(f[0] - f[1]).sum() > 0.5  # different orientations, different descriptors


@pytest.mark.slow   # 35 s loaded: a whole study
def test_smoke_run_probes_every_layer_and_draws(tmp_path):
    summary = hf.run(hf.get_config("smoke"), str(tmp_path))
    probes = summary["probe_acc_by_layer"]
    assert list(probes) == list(hf.LAYERS)
    assert all(0.5 < v <= 1.0 for v in probes.values()), probes
    # training, not the architecture, makes the deep layers linearly separable
    assert probes["logits"] > summary["probe_acc_random_by_layer"]["logits"] + 0.1
    for name in ("filters.png", "preferred_inputs.png", "probes.png"):
        assert os.path.exists(tmp_path / name)


def test_bad_train_size_fails_clearly(tmp_path):
    config = hf.get_config("smoke")
    config.train_sizes = (5000,)
    with pytest.raises(ValueError, match="lower it"):
        hf.run(config, str(tmp_path))
