"""MLP on MNIST-1D (generated offline): matches the paper's 68% MLP baseline, showing what convolution adds."""
from __future__ import annotations

from depthlab.research.experiment import base_config, image_classification, smoke_preset, with_preset


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "mlp", "features": (512, 512, 10), "activation": "relu", "dropout": 0.3,
               "batch_norm": False, "residual": False, "output": "logits"},
        data={"name": "mnist1d", "batch_size": 100, "eval_batch_size": 500},
        optim={"name": "adamw", "learning_rate": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 200,
               "weight_decay": 1e-2},
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
