"""U-Net segments circles, squares, triangles and crosses (plus background) in cluttered generated scenes: mean IoU on held-out scenes.

Data: `research/datasets/scenes.make_scenes` semantic masks (0 = background, 1 + shape class) on
64x64 noisy, textured canvases with distractor lines. Model: `models.unet.UNet` (BatchNorm,
depth 3, 16 base channels), per-pixel cross-entropy (optionally plus soft Dice). Evaluation
accumulates a confusion matrix over the test set: per-class IoU, mean IoU (all classes, VOC
style, and objects only), Dice. `finish` writes overlays of ground truth and prediction on the
inputs to predictions.png. The segmentation pieces it shares with vision/segment_lesions live in
vision/segmentation.py.

    depthlab run vision/segment_shapes --workdir runs/seg
"""
from __future__ import annotations

import numpy as np

from depthlab.research.experiment import base_config, with_preset
from depthlab.research.datasets.scenes import SHAPE_CLASSES, make_scenes
from depthlab.research.vision.segmentation import SMOKE_PRESET, full_preset, segmentation_experiment


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "unet", "num_classes": 1 + len(SHAPE_CLASSES), "features": 16, "depth": 3,
               "batch_norm": True},
        data={"image_size": 64, "min_objects": 1, "max_objects": 4, "min_size": 10, "max_size": 20,
              "num_train": 2000, "num_test": 300, "batch_size": 16, "eval_batch_size": 100},
        loss={"dice_weight": 0.0},
        optim={"name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 1e-4},
        # 600 steps: under 5 minutes on 2 CPU cores (800 took 331 s of CPU); `--preset full` is the 800-step run.
        train={"steps": 600, "log_every": 50, "eval_every": 300, "checkpoint_every": 300,
               "best_metric": "eval/mean_iou"},
        plot={"num_images": 8},
    )
    return with_preset(config, preset, PRESETS)


PRESETS = {
    "smoke": SMOKE_PRESET,
    "full": full_preset,
}


def load_data(config) -> dict[str, dict[str, np.ndarray]]:
    d = config.data
    split = {}
    for name, n, seed in (("train", d.num_train, 2 * config.seed), ("test", d.num_test, 2 * config.seed + 1)):
        arrays = make_scenes(n, image_size=d.image_size, min_objects=d.min_objects, max_objects=d.max_objects,
                             min_size=d.min_size, max_size=d.max_size, seed=seed)
        split[name] = {"inputs": arrays["images"], "labels": arrays["semantic"]}
    return split


def make_experiment(config):
    return segmentation_experiment(config, load_data(config), ("background",) + SHAPE_CLASSES)
