"""YOLO-style detector finds circles, squares, triangles and crosses in cluttered generated scenes: COCO mAP@0.5 on held-out scenes.

Data: `research/datasets/scenes.make_scenes` — 64x64 noisy, textured canvases with 1-4 non-overlapping
shapes (10-20 px) plus distractor lines and specks; exact boxes. The model is `models.detection.Detector`
(a 4-stage conv net, stride-4 grid head predicting objectness, class and a box per cell) trained
with 1 - GIoU box loss, focal objectness and class cross-entropy. Evaluation decodes boxes, runs
class-aware NMS under jit, and scores COCO mAP@0.5 and mAP@[.5:.95] (pycocotools-compatible,
research/vision/dense_metrics.py). `finish` draws predicted boxes with labels and scores over test
images into predictions.png.

    depthlab run vision/detect_shapes --workdir runs/detect
    depthlab run vision/detect_shapes --preset digits --workdir runs/detect_digits   # real digits as objects
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.models.detection import detection_loss, postprocess
from depthlab.research.experiment import (base_config, build_model, predict_all, smoke_preset,
                                         supervised_experiment, with_preset)
from depthlab.research.datasets.scenes import DIGIT_CLASSES, SHAPE_CLASSES, make_scenes
from depthlab.research.vision import dense_metrics


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "detector", "num_classes": 4, "stem_width": 16, "widths": (32, 64), "head_width": 64,
               "size_prior": 4.0},
        data={"kind": "shapes", "image_size": 64, "min_objects": 1, "max_objects": 4, "min_size": 10,
              "max_size": 20, "num_train": 4000, "num_test": 500, "batch_size": 32, "eval_batch_size": 100},
        loss={"box_loss": "giou", "box_weight": 5.0, "obj_weight": 1.0, "cls_weight": 1.0, "focal_gamma": 2.0},
        detect={"score_threshold": 0.05, "iou_threshold": 0.5, "pre_nms_top_k": 100, "max_detections": 50},
        optim={"name": "adamw", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 1e-4, "clip_norm": 10.0},
        train={"steps": 600, "log_every": 50, "eval_every": 200, "checkpoint_every": 200,
               "best_metric": "eval/mAP@0.5"},
        plot={"num_images": 12},
    )
    return with_preset(config, preset, PRESETS)


def _digits(c):
    # Handwritten digits are harder than shapes (10 classes, thin strokes): bigger objects, longer run.
    c.model.num_classes = 10
    c.data.update({"kind": "digits", "min_size": 14, "max_size": 22, "num_train": 8000})
    c.train.steps = 4000


PRESETS = {
    "smoke": smoke_preset(10, log_every=5,
                          data={"num_train": 64, "num_test": 32, "batch_size": 16, "eval_batch_size": 32},
                          model={"stem_width": 8, "widths": (8, 16), "head_width": 16}, plot={"num_images": 4}),
    "digits": _digits,
}


def class_names(config) -> tuple[str, ...]:
    return SHAPE_CLASSES if config.data.kind == "shapes" else DIGIT_CLASSES


def load_data(config) -> dict[str, dict[str, np.ndarray]]:
    """{"train": ..., "test": ...} scene arrays; the test scenes use a different seed (held out)."""
    d = config.data
    make = functools.partial(make_scenes, image_size=d.image_size, min_objects=d.min_objects,
                             max_objects=d.max_objects, min_size=d.min_size, max_size=d.max_size, kind=d.kind)
    keys = ("images", "boxes", "classes")
    rename = {"images": "inputs"}
    split = {}
    for name, n, seed in (("train", d.num_train, 2 * config.seed), ("test", d.num_test, 2 * config.seed + 1)):
        arrays = make(n, seed=seed)
        split[name] = {rename.get(k, k): arrays[k] for k in keys}
    return split


def make_loss_fn(config, stride: int):
    c = config.loss

    def loss_fn(raw, batch):
        classes = batch["classes"]
        if "mask" in batch:   # padded eval rows hold no objects
            classes = jnp.where(batch["mask"][:, None] > 0, classes, -1)
        loss, metrics = detection_loss(raw, batch["boxes"], classes, stride, size_prior=config.model.size_prior,
                                       box_loss=c.box_loss, box_weight=c.box_weight, obj_weight=c.obj_weight,
                                       cls_weight=c.cls_weight, focal_gamma=c.focal_gamma)
        metrics.pop("loss")
        return loss, metrics

    return loss_fn


def make_predict_fn(model, config):
    """jitted (state, images) -> padded detections (boxes, scores, classes, valid) [B, K, ...]."""
    c = config.detect

    @jax.jit
    def predict(state, images):
        raw = model.apply({"params": state.eval_params(), **state.model_state}, images, train=False)
        return postprocess(raw, model.stride, size_prior=config.model.size_prior,
                           score_threshold=c.score_threshold, iou_threshold=c.iou_threshold,
                           pre_nms_top_k=c.pre_nms_top_k, max_detections=c.max_detections)

    return predict


def detection_scores(dets: dict, test: dict, num_classes: int) -> dict:
    """COCO average precision of padded detections (from the predictor) against the test scenes' boxes."""
    preds = dense_metrics.unpad_detections(dets["boxes"], dets["scores"], dets["classes"], dets["valid"])
    truth = dense_metrics.unpad_ground_truth(test["boxes"], test["classes"])
    return dense_metrics.average_precision(preds, truth, num_classes)


def plot_detections(path: str, images, dets: dict, test: dict, names, num_images: int) -> str:
    """Predicted boxes (solid, labelled "class score") and ground truth (dashed white) over inputs;
    returns the path."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = min(num_images, len(images))
    cols = min(n, 6)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.colormaps["tab10"]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", extent=(0, img.shape[1], img.shape[0], 0))
        for box, cls in zip(test["boxes"][i], test["classes"][i]):
            if cls >= 0:
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="white",
                                           ls="--", lw=0.8))
        for box, score, cls, ok in zip(dets["boxes"][i], dets["scores"][i], dets["classes"][i], dets["valid"][i]):
            if not ok or score < 0.3:
                continue
            col = colors(int(cls) % 10)
            ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec=col, lw=1.5))
            ax.text(box[0], box[1] - 1, f"{names[int(cls)]} {score:.2f}", color="black", fontsize=6,
                    bbox={"facecolor": col, "alpha": 0.8, "pad": 1, "lw": 0})
    fig.suptitle("predictions (solid, score >= 0.3) and ground truth (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def make_experiment(config):
    if config.model.num_classes != len(class_names(config)):
        raise ValueError(f"model.num_classes={config.model.num_classes} but data.kind={config.data.kind!r} has "
                         f"{len(class_names(config))} classes; set --config.model.num_classes={len(class_names(config))}")
    split = load_data(config)
    train, test = split["train"], split["test"]
    model = build_model(config.model)
    predict = make_predict_fn(model, config)
    eval_batch_size = int(config.data.eval_batch_size)

    def evaluate(state):
        dets = predict_all(predict, state, test["inputs"], eval_batch_size)
        ap = detection_scores(dets, test, config.model.num_classes)
        return {"mAP@0.5": ap["mAP@0.5"], "mAP": ap["mAP"], "mAP@0.75": ap["mAP@0.75"]}

    def finish(state, workdir):
        dets = predict_all(predict, state, test["inputs"], eval_batch_size)
        ap = detection_scores(dets, test, config.model.num_classes)
        plot_detections(os.path.join(workdir, "predictions.png"), test["inputs"], dets, test,
                        class_names(config), int(config.plot.num_images))
        per_class = {f"AP@0.5/{name}": float(v) for name, v in zip(class_names(config), ap["ap_per_class@0.5"])}
        return {"mAP@0.5": ap["mAP@0.5"], "mAP": ap["mAP"], "mAP@0.75": ap["mAP@0.75"], **per_class}

    return supervised_experiment(config, train, test, model=model, loss=make_loss_fn(config, model.stride),
                                 evaluate=evaluate, finish=finish)
