"""LeNet-style CNN on scikit-learn's 8x8 digits (embedded): >= 98% held-out accuracy in about a minute on CPU."""
from __future__ import annotations

from depthlab.research.common import base_config, classification_experiment, finalize, random_shift
from depthlab.research.datasets.images import load_dataset
from depthlab.research.report import plot_run


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "cnn", "channels": (32, 64), "dense": (128,), "num_classes": 10, "pool": "max",
               "dropout": 0.2},
        data={"name": "digits", "batch_size": 64, "eval_batch_size": 360, "augment_shift": 1},
        optim={"name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 1e-4},
        train={"steps": 1500, "log_every": 50, "eval_every": 500, "checkpoint_every": 500,
               "best_metric": "eval/accuracy"},
        loss={"label_smoothing": 0.0},
    )
    return finalize(config, preset, PRESETS)


PRESETS = {
    # A few hundred steps: the tests' and the notebook's smoke setting.
    "smoke": lambda c: c.train.update({"steps": 60, "log_every": 20, "eval_every": 60, "checkpoint_every": 60}),
}


def make_experiment(config):
    dataset = load_dataset(config.data.name, seed=config.seed)
    shift = int(config.data.augment_shift)
    return classification_experiment(config, dataset, transform=random_shift(shift) if shift else None,
                                     finish=lambda state, workdir: plot_run(workdir))
