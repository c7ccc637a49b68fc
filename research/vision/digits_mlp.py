"""MLP on scikit-learn's 8x8 digits (embedded); the activation is a config choice (relu, sigmoid, tanh, gelu, ...)."""
from __future__ import annotations

from depthlab.research.experiment import base_config, image_classification, smoke_preset, with_preset


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "mlp", "features": (256, 256, 10), "activation": "relu", "dropout": 0.1,
               "batch_norm": False, "residual": False, "output": "logits"},
        data={"name": "digits", "batch_size": 64, "eval_batch_size": 360},
        optim={"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 1e-4},
        train={"steps": 1500, "log_every": 50, "eval_every": 500, "checkpoint_every": 500,
               "best_metric": "eval/accuracy"},
        loss={"label_smoothing": 0.0},
    )
    return with_preset(config, preset, PRESETS)


PRESETS = {
    "smoke": smoke_preset(60),  # the tests' and notebooks' CPU setting
}


def make_experiment(config):
    return image_classification(config)
