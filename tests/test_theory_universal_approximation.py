"""Universal approximation study: wider one-hidden-layer nets fit better."""
import json
import os

import pytest

from depthlab.research.theory import universal_approximation as ua


def test_error_falls_with_width(tmp_path):
    config = ua.get_config()
    config.widths = (2, 64)
    config.targets = ("poly", "bump2d")
    config.num_seeds = 2
    config.num_train = 128
    config.num_test = 256
    config.steps = 300
    config.optim.learning_rate = 1e-2
    summary = ua.run(config, str(tmp_path))
    for target in config.targets:
        narrow, wide = summary["nmse_mean"][target]
        assert wide < 0.3 * narrow, (target, narrow, wide)
    assert json.load(open(tmp_path / "results.json"))["tables"]
    assert os.path.exists(tmp_path / "error_vs_width.png")
    assert os.path.exists(tmp_path / "fits_2d.png")


def test_unknown_preset_and_target_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="valid presets"):
        ua.get_config("huge")
    config = ua.get_config()
    config.targets = ("nope",)
    with pytest.raises(ValueError, match="valid"):
        ua.run(config, str(tmp_path))
