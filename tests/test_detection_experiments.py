"""Dense-prediction experiments (detect_shapes, segment_shapes, segment_lesions) run end to end
with their smoke presets and write prediction overlays; bad configs fail clearly."""
import json
import os

import jax
import numpy as np
import pytest

from depthlab.research import run_experiment
from depthlab.research.vision import detect_shapes, segment_lesions, segment_shapes, segmentation


def smoke(name, tmp_path):
    # Non-partitionable threefry: the conv-kernel initialisers compile ~5x faster on CPU (jax 0.10).
    with jax.threefry_partitionable(False):
        return run_experiment(name, preset="smoke", overrides={"train.progress": False},
                              workdir=str(tmp_path / name.replace("/", "_")))


def check_run(result, keys):
    workdir = result["workdir"]
    assert os.path.getsize(os.path.join(workdir, "predictions.png")) > 1000
    for key in keys:
        assert 0.0 <= result["metrics"][f"eval/{key}"] <= 1.0, key
        assert result["summary"][key] == pytest.approx(result["metrics"][f"eval/{key}"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert all(f"eval/{k}" in last for k in keys)


def test_detect_shapes_smoke(tmp_path):
    result = smoke("vision/detect_shapes", tmp_path)
    check_run(result, ["mAP@0.5", "mAP", "mAP@0.75"])
    assert set(result["summary"]) >= {"AP@0.5/circle", "AP@0.5/cross"}


@pytest.mark.slow   # colab/vision_dense.ipynb runs the same smoke experiment in the fast suite
def test_segment_shapes_smoke(tmp_path):
    result = smoke("vision/segment_shapes", tmp_path)
    check_run(result, ["mean_iou", "mean_iou_objects", "pixel_accuracy"])
    assert "iou/triangle" in result["summary"]


@pytest.mark.slow   # so does the notebook
def test_segment_lesions_smoke(tmp_path):
    check_run(smoke("vision/segment_lesions", tmp_path), ["dice", "iou", "dice_per_image"])


def test_lesion_report_and_loss():
    """The lesion report is the Dice of the lesion class (fast check of segment_lesions' own code)."""
    labels = np.zeros((2, 8, 8), np.int32)
    labels[0, 2:6, 2:6] = 1
    pred = np.zeros_like(labels)
    pred[0, 2:6, 2:4] = 1
    report = segment_lesions.lesion_report(pred, labels, segment_lesions.NAMES)
    assert report["dice"] == pytest.approx(2 * 8 / (8 + 16))
    assert report["dice_per_image"] == pytest.approx((2 * 8 / 24 + 1.0) / 2)   # image 2: nothing, rightly
    split = segment_lesions.load_data(segment_lesions.get_config("smoke"))
    assert split["train"]["inputs"].shape[1:] == (64, 64, 1) and set(np.unique(split["train"]["labels"])) == {0, 1}
    # A perfect prediction has zero cross-entropy-plus-Dice loss (up to the logit scale).
    loss_fn = segmentation.segmentation_loss(2, dice_weight=1.0)
    logits = 50.0 * (np.eye(2)[labels] - 0.5)
    loss, metrics = loss_fn(logits, {"labels": labels, "mask": np.array([1.0, 1.0])})
    assert float(loss) < 1e-3 and float(metrics["pixel_accuracy"]) == 1.0


def test_configs_and_errors():
    for module in (detect_shapes, segment_shapes, segment_lesions):
        assert module.get_config().train.steps > module.get_config("smoke").train.steps
        with pytest.raises(ValueError, match="valid presets"):
            module.get_config("huge")
    config = detect_shapes.get_config("smoke")
    with config.unlocked():
        config.model.num_classes = 10
    with pytest.raises(ValueError, match="model.num_classes=10"):
        detect_shapes.make_experiment(config)
