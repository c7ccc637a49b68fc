"""A single-stage, anchor-free, YOLO-style object detector, its loss, box decoding and NMS.

    image [B, H, W, C]
    -> conv backbone (a stem, then `len(widths)` stages that each halve the resolution)
    -> head (two 3x3 convs, then a 1x1 conv) on a grid of stride s = 2**len(widths)
    -> raw map [B, H/s, W/s, 5 + num_classes]: (tx, ty, tw, th, objectness, class logits...)

Each grid cell predicts at most one object: the one whose box center falls in the cell (YOLOv1's
assignment; objects in the scenes data never share a cell, see `build_targets`). A cell at column
j, row i decodes its box as
    center = (j + 2 sigmoid(tx) - 0.5, i + 2 sigmoid(ty) - 0.5) * s   (YOLOv5: may leave the cell a little)
    size   = size_prior * s * exp(tw, th)
so every box is a smooth function of the outputs, and the box loss is 1 - GIoU (or 1 - CIoU) of the
decoded box with its target. Objectness is a sigmoid focal loss over all cells (almost all cells
are background); the class is a softmax cross-entropy on the positive cells.
At test time `postprocess` scores each cell by objectness * class probability, keeps the
`pre_nms_top_k` best and runs greedy class-aware NMS with static shapes, so all of it jits.

Example:
    >>> model = Detector(num_classes=4, widths=(32, 64))
    >>> variables = model.init(key, images, train=False)           # images [B, 64, 64, 3]
    >>> raw = model.apply(variables, images, train=False)           # [B, 16, 16, 9]
    >>> loss, metrics = detection_loss(raw, gt_boxes, gt_classes, stride=4)
    >>> dets = postprocess(raw, stride=4)                           # boxes/scores/classes/valid
"""
from __future__ import annotations

import functools
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models import boxes as box_ops
from depthlab.models.registry import register_model

# Widest log-size step from the prior; keeps exp() finite early in training.
_MAX_LOG_SIZE = 4.0


class ConvBN(nn.Module):
    """3x3 (or k x k) conv -> BatchNorm -> SiLU."""

    features: int
    strides: int = 1
    kernel_size: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k = self.kernel_size
        x = nn.Conv(self.features, (k, k), (self.strides, self.strides), use_bias=False, dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        return nn.silu(x)


@register_model("detector")
class Detector(nn.Module):
    """YOLO-style detector head on a small conv backbone.

    Attributes:
      num_classes: object classes (background is not a class: objectness handles it).
      stem_width: channels of the full-resolution stem conv.
      widths: channels of each downsampling stage; the output stride is 2**len(widths).
      head_width: channels of the two head convs.
      size_prior: box size, in grid cells, that a zero tw/th output decodes to.
      prior_prob: initial objectness probability (RetinaNet's bias init: the loss starts small).
    """

    num_classes: int
    stem_width: int = 16
    widths: Sequence[int] = (32, 64)
    head_width: int = 64
    size_prior: float = 4.0
    prior_prob: float = 0.01
    dtype: jnp.dtype = jnp.float32

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, C] with H, W divisible by the stride -> raw [B, H/s, W/s, 5 + num_classes]."""
        chex.assert_rank(x, 4)
        s = self.stride
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by the detector stride {s}; "
                             f"pad or resize the images, or change widths={tuple(self.widths)}")
        x = x.astype(self.dtype)
        x = ConvBN(self.stem_width, dtype=self.dtype)(x, train)
        for width in self.widths:
            x = ConvBN(width, strides=2, dtype=self.dtype)(x, train)
            x = ConvBN(width, dtype=self.dtype)(x, train)
        for _ in range(2):
            x = ConvBN(self.head_width, dtype=self.dtype)(x, train)
        bias_obj = -jnp.log((1 - self.prior_prob) / self.prior_prob)
        box = nn.Conv(4, (1, 1), dtype=self.dtype, name="box")(x)
        obj = nn.Conv(1, (1, 1), dtype=self.dtype, name="objectness",
                      bias_init=nn.initializers.constant(bias_obj))(x)
        cls = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classes")(x)
        return jnp.concatenate([box, obj, cls], axis=-1).astype(jnp.float32)


def decode_boxes(raw: jax.Array, stride: int, size_prior: float = 4.0) -> jax.Array:
    """raw [B, Gh, Gw, 5 + C] -> xyxy boxes in pixels [B, Gh, Gw, 4] (see the module docstring)."""
    chex.assert_rank(raw, 4)
    gh, gw = raw.shape[1:3]
    rows, cols = jnp.meshgrid(jnp.arange(gh, dtype=jnp.float32), jnp.arange(gw, dtype=jnp.float32), indexing="ij")
    cx = (cols + 2 * jax.nn.sigmoid(raw[..., 0]) - 0.5) * stride
    cy = (rows + 2 * jax.nn.sigmoid(raw[..., 1]) - 0.5) * stride
    log_wh = jnp.clip(raw[..., 2:4], -_MAX_LOG_SIZE, _MAX_LOG_SIZE)
    wh = size_prior * stride * jnp.exp(log_wh)
    return box_ops.cxcywh_to_xyxy(jnp.concatenate([cx[..., None], cy[..., None], wh], axis=-1))


def build_targets(gt_boxes: jax.Array, gt_classes: jax.Array, grid_shape: tuple[int, int],
                  stride: int) -> dict[str, jax.Array]:
    """Assigns each ground-truth object to the grid cell holding its box center.

    Args:
      gt_boxes: [B, M, 4] xyxy boxes in pixels, padded to M objects per image.
      gt_classes: [B, M] int class ids; -1 marks padding.
      grid_shape: (Gh, Gw) of the raw map.
    Returns:
      dict with "positive" [B, Gh, Gw] bool, "boxes" [B, Gh, Gw, 4], "classes" [B, Gh, Gw] int.
      If two objects share a cell the later one wins (the scenes data places objects so that
      their centers are at least 2 cells apart).
    """
    chex.assert_rank([gt_boxes, gt_classes], [3, 2])
    gh, gw = grid_shape
    b, m = gt_classes.shape
    valid = gt_classes >= 0
    centers = box_ops.xyxy_to_cxcywh(gt_boxes)[..., :2]
    col = jnp.clip(jnp.floor(centers[..., 0] / stride).astype(jnp.int32), 0, gw - 1)
    row = jnp.clip(jnp.floor(centers[..., 1] / stride).astype(jnp.int32), 0, gh - 1)
    # Padding objects scatter into a dummy cell past the end, which is then cut off.
    flat = jnp.where(valid, row * gw + col, gh * gw)
    batch = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
    positive = jnp.zeros((b, gh * gw + 1), bool).at[batch, flat].set(valid)
    boxes = jnp.zeros((b, gh * gw + 1, 4), jnp.float32).at[batch, flat].set(gt_boxes.astype(jnp.float32))
    classes = jnp.zeros((b, gh * gw + 1), jnp.int32).at[batch, flat].set(jnp.maximum(gt_classes, 0))
    return {
        "positive": positive[:, :-1].reshape(b, gh, gw),
        "boxes": boxes[:, :-1].reshape(b, gh, gw, 4),
        "classes": classes[:, :-1].reshape(b, gh, gw),
    }


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0) -> jax.Array:
    """Elementwise focal loss (Lin et al. 2017): BCE scaled by (1 - p_t)^gamma, so the many easy
    background cells stop dominating. logits, targets: same shape, targets in [0, 1]."""
    chex.assert_equal_shape([logits, targets])
    p = jax.nn.sigmoid(logits)
    bce = jax.nn.softplus(logits) - targets * logits
    p_t = p * targets + (1 - p) * (1 - targets)
    return bce * (1 - p_t) ** gamma


def detection_loss(raw: jax.Array, gt_boxes: jax.Array, gt_classes: jax.Array, stride: int,
                   size_prior: float = 4.0, box_loss: str = "giou", box_weight: float = 5.0,
                   obj_weight: float = 1.0, cls_weight: float = 1.0,
                   focal_gamma: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """YOLO-style loss. raw [B, Gh, Gw, 5 + C]; gt_boxes [B, M, 4] xyxy; gt_classes [B, M] (-1 = pad).

    Returns (scalar loss, metrics dict): box loss (1 - GIoU or 1 - CIoU) and class cross-entropy
    averaged over positive cells; objectness sigmoid focal loss summed over cells and divided by
    the number of positives (RetinaNet's normalisation, so images with many objects count more).
    """
    chex.assert_rank(raw, 4)
    if box_loss not in ("giou", "ciou", "iou"):
        raise ValueError(f"unknown box_loss {box_loss!r}; valid: giou, ciou, iou")
    targets = build_targets(gt_boxes, gt_classes, raw.shape[1:3], stride)
    pos = targets["positive"].astype(jnp.float32)
    num_pos = jnp.maximum(jnp.sum(pos), 1.0)

    pred_boxes = decode_boxes(raw, stride, size_prior)
    overlap_fn = {"giou": box_ops.giou_elementwise, "ciou": box_ops.ciou_elementwise,
                  "iou": box_ops.iou_elementwise}[box_loss]
    overlap = overlap_fn(pred_boxes, targets["boxes"])
    loss_box = jnp.sum((1.0 - overlap) * pos) / num_pos

    loss_obj = jnp.sum(sigmoid_focal_loss(raw[..., 4], pos, gamma=focal_gamma)) / num_pos
    log_probs = jax.nn.log_softmax(raw[..., 5:], axis=-1)
    ce = -jnp.take_along_axis(log_probs, targets["classes"][..., None], axis=-1)[..., 0]
    loss_cls = jnp.sum(ce * pos) / num_pos

    loss = box_weight * loss_box + obj_weight * loss_obj + cls_weight * loss_cls
    iou = jnp.sum(box_ops.iou_elementwise(pred_boxes, targets["boxes"]) * pos) / num_pos
    return loss, {"loss": loss, "box_loss": loss_box, "obj_loss": loss_obj, "cls_loss": loss_cls,
                  "positive_iou": iou}


def non_max_suppression(boxes: jax.Array, scores: jax.Array, classes: jax.Array | None = None,
                        iou_threshold: float = 0.5, score_threshold: float = 0.0,
                        max_outputs: int = 100) -> dict[str, jax.Array]:
    """Greedy NMS with static shapes (jit- and vmap-friendly).

    Visits boxes from the highest score down; a box is kept unless an already kept box (of the
    same class, when `classes` is given) overlaps it with IoU > iou_threshold. Boxes with
    score <= score_threshold are never kept.

    Args:
      boxes: [N, 4] xyxy; scores: [N]; classes: [N] int or None (class-agnostic).
    Returns:
      dict of "boxes" [K, 4], "scores" [K], "classes" [K], "valid" [K] bool, "indices" [K] (into
      the input), K = max_outputs, kept boxes first in descending score order; invalid rows are
      zeros with class -1 and index -1.
    Example:
      >>> out = non_max_suppression(boxes, scores, classes, iou_threshold=0.5, max_outputs=10)
    """
    chex.assert_rank([boxes, scores], [2, 1])
    n = scores.shape[0]
    if classes is None:
        classes = jnp.zeros((n,), jnp.int32)
    order = jnp.argsort(-scores, stable=True)
    sorted_boxes, sorted_scores, sorted_classes = boxes[order], scores[order], classes[order]
    iou = box_ops.pairwise_iou(sorted_boxes, sorted_boxes)
    overlaps = (iou > iou_threshold) & (sorted_classes[:, None] == sorted_classes[None, :])
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
    suppresses = overlaps & later     # suppresses[i, j]: i (higher score) would suppress j

    def visit(i, keep):
        return keep & ~(suppresses[i] & keep[i])

    keep = jax.lax.fori_loop(0, n, visit, sorted_scores > score_threshold)
    # Stable sort puts kept boxes first and preserves their score order.
    rank = jnp.argsort(~keep, stable=True)
    k = max_outputs
    if k > n:   # fewer candidates than outputs: pad the ranking with "nothing" rows
        rank = jnp.concatenate([rank, jnp.full((k - n,), n, rank.dtype)])
    rank = rank[:k]
    keep_pad = jnp.concatenate([keep, jnp.zeros((1,), bool)])
    valid = keep_pad[rank]
    safe = jnp.minimum(rank, n - 1)
    return {
        "boxes": jnp.where(valid[:, None], sorted_boxes[safe], 0.0),
        "scores": jnp.where(valid, sorted_scores[safe], 0.0),
        "classes": jnp.where(valid, sorted_classes[safe], -1),
        "valid": valid,
        "indices": jnp.where(valid, order[safe], -1),
    }


def postprocess(raw: jax.Array, stride: int, size_prior: float = 4.0, score_threshold: float = 0.05,
                iou_threshold: float = 0.5, pre_nms_top_k: int = 100,
                max_detections: int = 50) -> dict[str, jax.Array]:
    """raw [B, Gh, Gw, 5 + C] -> per-image detections, each [B, max_detections, ...] (see NMS).

    Score = sigmoid(objectness) * max softmax class probability; the class is the argmax.
    """
    chex.assert_rank(raw, 4)
    b = raw.shape[0]
    boxes = decode_boxes(raw, stride, size_prior).reshape(b, -1, 4)
    obj = jax.nn.sigmoid(raw[..., 4]).reshape(b, -1)
    probs = jax.nn.softmax(raw[..., 5:], axis=-1).reshape(b, obj.shape[1], -1)
    scores = obj * jnp.max(probs, axis=-1)
    classes = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    top_k = min(pre_nms_top_k, scores.shape[1])
    top_scores, top_idx = jax.lax.top_k(scores, top_k)
    top_boxes = jnp.take_along_axis(boxes, top_idx[..., None], axis=1)
    top_classes = jnp.take_along_axis(classes, top_idx, axis=1)
    nms = functools.partial(non_max_suppression, iou_threshold=iou_threshold,
                            score_threshold=score_threshold, max_outputs=max_detections)
    out = jax.vmap(nms)(top_boxes, top_scores, top_classes)
    del out["indices"]
    return out
