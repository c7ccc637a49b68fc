"""Vanishing-gradient study: sigmoid's gradient dies towards the input; ReLU + residual keeps it level."""
import math
import os

import pytest

from depthlab.research.theory import vanishing_gradients as vg


def small_config():
    config = vg.get_config()
    config.depth = 6
    config.width = 32
    config.num_seeds = 2
    config.steps = 3
    return config


def test_sigmoid_vanishes_relu_residual_does_not(tmp_path):
    config = small_config()
    config.settings = ("sigmoid/lecun/plain", "relu/lecun/residual")
    config.exploding_setting = ""
    summary = vg.run(config, str(tmp_path))
    sigmoid, residual = summary["sigmoid/lecun/plain"], summary["relu/lecun/residual"]
    # sigmoid: the first layer's gradient is orders of magnitude below the last layers'
    assert sigmoid["first/last_hidden"] < 1e-2 and sigmoid["first/output"] < 1e-2, sigmoid
    # ReLU + residual: first and last layers within one order of magnitude, and so is every layer
    assert 0.1 < residual["first/last_hidden"] < 10 and 0.1 < residual["first/output"] < 10, residual
    assert residual["max/min"] < 10, residual
    for name in ("results.json", "gradient_heatmaps.png", "gradient_profile_init.png"):
        assert os.path.exists(tmp_path / name)


@pytest.mark.slow
def test_clipping_tames_exploding_gradients(tmp_path):
    config = small_config()
    config.depth = 12
    config.steps = 100
    config.settings = ()
    summary = vg.run(config, str(tmp_path))
    no_clip, clip = summary["relu/large/plain (no clip)"], summary["relu/large/plain (clip 1)"]
    assert clip["first_layer"] > 100  # the gradients at init really explode
    no_clip_loss, clip_loss = float(no_clip["final_train_loss"]), float(clip["final_train_loss"])
    assert not math.isfinite(no_clip_loss) or no_clip_loss > 10  # diverged without clipping
    assert math.isfinite(clip_loss) and (not math.isfinite(no_clip_loss) or clip_loss < no_clip_loss)


def test_bad_setting_names_the_format():
    with pytest.raises(ValueError, match="activation/init/arch"):
        vg.parse_setting("relu/unknown")


def test_a_finished_study_is_recognised_not_recomputed(tmp_path, capsys):
    from depthlab.research import run_experiment
    overrides = {"depth": 4, "width": 16, "num_seeds": 1, "steps": 2, "settings": ("sigmoid/lecun/plain",),
                 "exploding_setting": ""}
    first = run_experiment("theory/vanishing_gradients", preset="smoke", overrides=overrides, workdir=str(tmp_path))
    stamp = os.path.getmtime(tmp_path / "results.json")
    again = run_experiment("theory/vanishing_gradients", preset="smoke", overrides=overrides, workdir=str(tmp_path))
    assert "already holds this study's results" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "results.json") == stamp and again["summary"] == first["summary"]
