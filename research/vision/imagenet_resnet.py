"""ResNet-50 on ImageNet-shaped images (224x224x3, 1000 classes): the scaling table's ResNet, on synthetic data.

The images are synthetic (uint8, the ResNet casts them to its compute dtype): each class has its own
mean colour plus noise, so the loss falls, and batch s is a pure function of (seed, s). The model is
torchvision's ResNet-50 layout (`depth=50`, bottleneck blocks, the 7x7 stem) with bf16 compute in the
`resnet50` preset; the default is a small ResNet at 64x64 that trains on a laptop CPU. For real ImageNet
point `vision/mnist_resnet`'s streaming sources at your files; this module exists to compile and time the
ImageNet shapes.

Example:
    depthlab run vision/imagenet_resnet --preset smoke --workdir runs/r50
    depthlab compile vision/imagenet_resnet --preset resnet50 --topology v5e:2x4
"""
from __future__ import annotations

import numpy as np

from depthlab.research.experiment import base_config, smoke_preset, supervised_experiment, with_preset


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "resnet", "depth": 18, "num_filters": 16, "num_classes": 10, "cifar_stem": False,
               "dtype": "float32", "remat": "none"},
        data={"image_size": 64, "batch_size": 16, "eval_batch_size": 16, "eval_batches": 2},
        optim={"name": "momentum", "learning_rate": 0.1, "momentum": 0.9, "schedule": "warmup_cosine",
               "warmup_steps": 20, "weight_decay": 1e-4},
        train={"steps": 200, "log_every": 20, "eval_every": 100, "checkpoint_every": 100,
               "best_metric": "eval/accuracy"},
        loss={"label_smoothing": 0.0})
    return with_preset(config, preset, PRESETS)


def _resnet50(c) -> None:
    """ResNet-50 at 224x224, 1000 classes, bf16 compute, batch 256 (set it per slice), SGD momentum 0.9
    with label smoothing 0.1 (Goyal et al. 2017's recipe, lr 0.1 per 256 images)."""
    c.model.update({"depth": 50, "num_filters": 64, "num_classes": 1000, "dtype": "bfloat16"})
    c.data.update({"image_size": 224, "batch_size": 256, "eval_batch_size": 256, "eval_batches": 1})
    c.optim.update({"learning_rate": 0.1, "warmup_steps": 5 * 5000})
    c.loss.label_smoothing = 0.1
    c.train.update({"steps": 90 * 5000, "log_every": 100, "eval_every": 5000, "checkpoint_every": 5000})


PRESETS = {
    "smoke": smoke_preset(20, model={"depth": 18, "num_filters": 8, "num_classes": 4},
                          data={"image_size": 32, "batch_size": 8, "eval_batch_size": 8}),
    "resnet50": _resnet50,
}


def synthetic_images(num_classes: int, image_size: int, batch_size: int, seed: int, start_step: int = 0):
    """Infinite {'inputs' uint8 [batch, size, size, 3], 'labels' int32 [batch]}: class k's images are its own
    colour plus uniform noise; batch s depends only on (seed, s)."""
    colours = np.random.default_rng(seed).integers(40, 216, size=(num_classes, 3))
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        labels = rng.integers(0, num_classes, size=batch_size)
        noise = rng.integers(-40, 40, size=(batch_size, image_size, image_size, 1), dtype=np.int16)
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        yield {"inputs": images, "labels": labels.astype(np.int32)}
        step += 1


def make_experiment(config):
    d, classes, seed = config.data, int(config.model.num_classes), int(config.seed)
    train = lambda start: synthetic_images(classes, int(d.image_size), int(d.batch_size), seed, start)  # noqa: E731

    def test():
        batches = synthetic_images(classes, int(d.image_size), int(d.eval_batch_size), seed + 1_000_003)
        return [next(batches) for _ in range(int(d.eval_batches))]
    example = np.zeros((1, int(d.image_size), int(d.image_size), 3), np.uint8)
    return supervised_experiment(config, train, test, example=example)
