"""Axis-aligned box utilities: format conversion, area, IoU, GIoU and CIoU.

Boxes are the last axis of size 4. Two formats are used:
  xyxy   = (x_min, y_min, x_max, y_max)      pixels, x to the right, y down
  cxcywh = (center_x, center_y, width, height)
`*_elementwise` functions pair boxes of the same leading shape (a loss between predicted and
target boxes); `pairwise_iou` compares every box of one set with every box of another (NMS, matching).

Example:
    >>> a = jnp.array([[0., 0., 2., 2.]]); b = jnp.array([[1., 1., 3., 3.]])
    >>> pairwise_iou(a, b)             # [[1/7]]
    >>> giou_elementwise(a, b)         # [1/7 - 2/9]
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Guards divisions by an empty area: degenerate boxes give IoU 0, never NaN.
_EPS = 1e-9


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """[..., 4] corners -> [..., 4] center and size."""
    chex.assert_axis_dimension(boxes, -1, 4)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """[..., 4] center and size -> [..., 4] corners."""
    chex.assert_axis_dimension(boxes, -1, 4)
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_xywh(boxes: jax.Array) -> jax.Array:
    """[..., 4] corners -> COCO's (x_min, y_min, width, height)."""
    chex.assert_axis_dimension(boxes, -1, 4)
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """[..., 4] xyxy -> [...] area (0 for inverted boxes)."""
    chex.assert_axis_dimension(boxes, -1, 4)
    w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return w * h


def _intersection_and_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Broadcasting intersection and union areas of xyxy boxes a [..., 4] and b [..., 4]."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _enclosing_area(a: jax.Array, b: jax.Array) -> jax.Array:
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of every box in a [N, 4] with every box in b [M, 4] (xyxy) -> [N, M]."""
    chex.assert_rank([a, b], 2)
    chex.assert_axis_dimension(a, -1, 4)
    chex.assert_axis_dimension(b, -1, 4)
    inter, union = _intersection_and_union(a[:, None, :], b[None, :, :])
    return inter / jnp.maximum(union, _EPS)


def iou_elementwise(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of matching boxes a[..., 4] and b[..., 4] (same shape, xyxy) -> [...]."""
    chex.assert_equal_shape([a, b])
    inter, union = _intersection_and_union(a, b)
    return inter / jnp.maximum(union, _EPS)


def giou_elementwise(a: jax.Array, b: jax.Array) -> jax.Array:
    """Generalised IoU (Rezatofighi et al. 2019) of matching xyxy boxes -> [...] in [-1, 1].

    GIoU = IoU - (enclosing area - union) / enclosing area. Unlike IoU it still has a gradient
    when the boxes do not overlap, which is why detectors regress boxes with 1 - GIoU.
    """
    chex.assert_equal_shape([a, b])
    inter, union = _intersection_and_union(a, b)
    enclosing = _enclosing_area(a, b)
    iou = inter / jnp.maximum(union, _EPS)
    return iou - (enclosing - union) / jnp.maximum(enclosing, _EPS)


def ciou_elementwise(a: jax.Array, b: jax.Array) -> jax.Array:
    """Complete IoU (Zheng et al. 2020) of matching xyxy boxes a (predicted) and b (target) -> [...].

    CIoU = IoU - center_distance^2 / enclosing_diagonal^2 - alpha * v, where v penalises a
    different aspect ratio and alpha = v / (1 - IoU + v) is treated as a constant (no gradient).
    """
    chex.assert_equal_shape([a, b])
    inter, union = _intersection_and_union(a, b)
    iou = inter / jnp.maximum(union, _EPS)
    ca, cb = xyxy_to_cxcywh(a), xyxy_to_cxcywh(b)
    center_dist2 = jnp.sum((ca[..., :2] - cb[..., :2]) ** 2, axis=-1)
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    diag2 = jnp.sum((rb - lt) ** 2, axis=-1)
    wa, ha = jnp.maximum(ca[..., 2], _EPS), jnp.maximum(ca[..., 3], _EPS)
    wb, hb = jnp.maximum(cb[..., 2], _EPS), jnp.maximum(cb[..., 3], _EPS)
    v = (4 / jnp.pi**2) * (jnp.arctan(wb / hb) - jnp.arctan(wa / ha)) ** 2
    alpha = jax.lax.stop_gradient(v / jnp.maximum(1 - iou + v, _EPS))
    return iou - center_dist2 / jnp.maximum(diag2, _EPS) - alpha * v
