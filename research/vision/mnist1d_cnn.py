"""1-D CNN on MNIST-1D (generated offline): beats the paper's 94% CNN baseline in a few minutes on CPU."""
from __future__ import annotations

from depthlab.research.experiment import base_config, image_classification, smoke_preset, with_preset


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "cnn", "channels": (32, 64, 128), "kernel_size": 5, "dense": (256,), "num_classes": 10,
               "pool": "max", "batch_norm": True, "dropout": 0.2},
        data={"name": "mnist1d", "batch_size": 100, "eval_batch_size": 500},
        optim={"name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 200,
               "weight_decay": 1e-3},
        train={"steps": 3000, "log_every": 100, "eval_every": 1000, "checkpoint_every": 1000,
               "best_metric": "eval/accuracy"},
        loss={"label_smoothing": 0.0},
    )
    return with_preset(config, preset, PRESETS)


PRESETS = {
    "smoke": smoke_preset(60),  # the tests' and notebooks' CPU setting
}


def make_experiment(config):
    return image_classification(config)
