"""Semantic segmentation pieces shared by vision/segment_shapes and vision/segment_lesions: the loss
(pixel cross-entropy, optionally + soft Dice), a jitted predictor, IoU/Dice reports, prediction
overlays, the Experiment, and the smoke preset.

Example:
    >>> experiment = segmentation_experiment(config, {"train": ..., "test": ...}, ("background", "lesion"))
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.research.experiment import build_model, predict_all, smoke_preset, supervised_experiment
from depthlab.research.vision import dense_metrics
from depthlab.train import Experiment

# Tiny data, model and run: the tests' and the notebook's setting of both segmentation experiments.
SMOKE_PRESET = smoke_preset(6, log_every=3,
                            data={"num_train": 32, "num_test": 16, "batch_size": 8, "eval_batch_size": 16},
                            model={"features": 4, "depth": 2}, plot={"num_images": 3})


def full_preset(c):
    """The "full" preset of both segmentation experiments: 800 steps, evaluated and checkpointed every 400."""
    c.train.update({"steps": 800, "eval_every": 400, "checkpoint_every": 400})


def segmentation_loss(num_classes: int, dice_weight: float = 0.0):
    """loss_fn(logits [B, H, W, C], batch) -> (pixel cross-entropy [+ dice_weight * soft Dice loss],
    {"pixel_accuracy", "soft_dice"}). Padded eval rows (batch["mask"] == 0) carry no weight.

    The soft Dice loss 1 - mean over object classes of 2 sum(p y) / (sum p + sum y) counts each
    class's region as a whole, so a small structure matters as much as the big background — the
    reason it is standard in medical segmentation, where the lesion is a few percent of the pixels.
    """

    def loss_fn(logits, batch):
        labels = batch["labels"]
        weight = jnp.ones(labels.shape[0]) if "mask" not in batch else batch["mask"].astype(jnp.float32)
        pixel_w = jnp.broadcast_to(weight[:, None, None], labels.shape)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        total_w = jnp.maximum(jnp.sum(pixel_w), 1.0)
        loss = jnp.sum(ce * pixel_w) / total_w
        probs = jnp.exp(log_probs)[..., 1:] * pixel_w[..., None]
        onehot = jax.nn.one_hot(labels, num_classes)[..., 1:] * pixel_w[..., None]
        inter = jnp.sum(probs * onehot, axis=(0, 1, 2))
        soft_dice = jnp.mean((2 * inter + 1.0) / (jnp.sum(probs, axis=(0, 1, 2)) + jnp.sum(onehot, axis=(0, 1, 2)) + 1.0))
        if dice_weight:
            loss = loss + dice_weight * (1.0 - soft_dice)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return loss, {"pixel_accuracy": jnp.sum(correct * pixel_w) / total_w, "soft_dice": soft_dice}

    return loss_fn


def make_predict_fn(model):
    @jax.jit
    def predict(state, images):
        logits = model.apply({"params": state.eval_params(), **state.model_state}, images, train=False)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return predict


def segmentation_report(pred: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> dict:
    """Scalars: mean IoU over all classes (VOC style, background included), over objects only,
    mean Dice over objects, pixel accuracy, and IoU per class."""
    num_classes = len(names)
    cm = dense_metrics.confusion_matrix(pred, labels, num_classes)
    scores = dense_metrics.segmentation_scores(cm)
    objects = dense_metrics.segmentation_scores(cm, ignore_background=True)
    out = {"mean_iou": scores["mean_iou"], "mean_iou_objects": objects["mean_iou"],
           "mean_dice_objects": objects["mean_dice"], "pixel_accuracy": scores["pixel_accuracy"]}
    out.update({f"iou/{name}": float(v) for name, v in zip(names, scores["per_class_iou"])})
    return out


def plot_masks(path: str, images: np.ndarray, labels: np.ndarray, pred: np.ndarray, names, num_images: int) -> str:
    """Three rows: input, ground truth overlaid, prediction overlaid (one colour per class); returns the path."""
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = min(num_images, len(images))
    palette = matplotlib.colormaps["tab10"]
    cmap = ListedColormap([(0, 0, 0, 0)] + [palette(i % 10) for i in range(len(names) - 1)])
    fig = Figure(figsize=(2.2 * n, 6.9))
    axes = fig.subplots(3, n, squeeze=False)
    for i in range(n):
        img = images[i]
        gray = img.mean(axis=-1)
        for row, overlay in enumerate((None, labels[i], pred[i])):
            ax = axes[row, i]
            if overlay is None:
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
            else:   # masks over a grey copy of the input, so class colours do not mix with object colours
                ax.imshow(gray, cmap="gray", alpha=0.6)
                ax.imshow(np.ma.masked_equal(overlay, 0), cmap=cmap, vmin=0, vmax=len(names) - 1, alpha=0.8,
                          interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
    for row, title in enumerate(("input", "ground truth", "prediction")):
        axes[row, 0].set_ylabel(title)
    fig.legend(handles=[Patch(color=palette(i % 10), label=name) for i, name in enumerate(names[1:])],
               loc="lower center", ncol=len(names) - 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    return path


def segmentation_experiment(config, split: dict, names: tuple[str, ...], report=segmentation_report) -> Experiment:
    """An Experiment training config.model (a UNet) on split["train"] {"inputs", "labels"};
    host-side evaluation and finish (overlays) on split["test"]. `names[0]` is background."""
    if config.model.num_classes != len(names):
        raise ValueError(f"model.num_classes={config.model.num_classes} but the data has {len(names)} classes "
                         f"({', '.join(names)}); set --config.model.num_classes={len(names)}")
    train, test = split["train"], split["test"]
    model = build_model(config.model)
    predict = make_predict_fn(model)
    eval_batch_size = int(config.data.eval_batch_size)

    def evaluate(state):
        return report(predict_all(predict, state, test["inputs"], eval_batch_size), test["labels"], names)

    def finish(state, workdir):
        pred = predict_all(predict, state, test["inputs"], eval_batch_size)
        plot_masks(os.path.join(workdir, "predictions.png"), test["inputs"], test["labels"], pred, names,
                   int(config.plot.num_images))
        return report(pred, test["labels"], names)

    return supervised_experiment(config, train, test, model=model,
                                 loss=segmentation_loss(len(names), float(config.loss.dice_weight)),
                                 evaluate=evaluate, finish=finish)
