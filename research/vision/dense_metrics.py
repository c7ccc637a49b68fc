"""Standard metrics for dense prediction: COCO-style detection mAP, segmentation IoU and Dice.

Detection: `average_precision` follows pycocotools' COCOeval for bounding boxes (area range "all",
at most `max_detections` per image and class) step for step — greedy matching by score at each IoU
threshold, precision made monotone, sampled at 101 recall points — so the numbers agree with
pycocotools (tests/test_dense_metrics.py checks this). mAP@0.5 is VOC-2010+-style AP with COCO's
101-point interpolation; mAP@[.5:.95] averages over IoU thresholds 0.50, 0.55, ..., 0.95.
Classes without any ground truth are left out of the mean (as in COCO).

Segmentation: a confusion matrix accumulated over the whole set, then per-class IoU
TP / (TP + FP + FN), mean IoU, per-class Dice 2 TP / (2 TP + FP + FN) and pixel accuracy.
Classes absent from both prediction and target get NaN and are left out of the means.

Example:
    >>> preds = [{"boxes": b, "scores": s, "classes": c} for b, s, c in ...]   # one dict per image
    >>> truth = [{"boxes": b, "classes": c} for b, c in ...]
    >>> average_precision(preds, truth, num_classes=4)["mAP@0.5"]
    >>> segmentation_scores(confusion_matrix(pred_labels, labels, 5))["mean_iou"]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


# --- detection ----------------------------------------------------------------------------------

def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [N, 4] with b [M, 4] -> [N, M] (NumPy, for host-side evaluation)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match(ious: np.ndarray, threshold: float) -> np.ndarray:
    """COCOeval's greedy matching for one image and class. ious [D, G], dets sorted by score.
    Returns matched [D] bool. Each det takes the unmatched gt of highest IoU >= threshold."""
    num_dt, num_gt = ious.shape
    gt_taken = np.zeros(num_gt, bool)
    matched = np.zeros(num_dt, bool)
    for d in range(num_dt):
        best, m = min(threshold, 1 - 1e-10), -1
        for g in range(num_gt):
            # `<` (not `<=`) like pycocotools: among equal IoUs the later gt wins.
            if gt_taken[g] or ious[d, g] < best:
                continue
            best, m = ious[d, g], g
        if m >= 0:
            gt_taken[m] = True
            matched[d] = True
    return matched


def _interpolated_precision(scores: np.ndarray, matched: np.ndarray, num_gt: int) -> float:
    """Area under the 101-point interpolated precision/recall curve for one class and threshold."""
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(matched[order]).astype(np.float64)
    fp = np.cumsum(~matched[order]).astype(np.float64)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    # Make precision monotone decreasing: the best precision at any recall >= r.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    # Recall levels never reached contribute precision 0.
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(np.mean(sampled))


def average_precision(predictions: Sequence[dict], ground_truths: Sequence[dict], num_classes: int,
                      iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
                      max_detections: int = 100) -> dict:
    """COCO-style AP.

    Args:
      predictions: one dict per image: "boxes" [K, 4] xyxy, "scores" [K], "classes" [K] int.
      ground_truths: one dict per image (same order): "boxes" [M, 4] xyxy, "classes" [M] int.
      num_classes: classes are 0..num_classes-1.
      iou_thresholds: thresholds to average over; must include 0.5 for "mAP@0.5".
      max_detections: highest-scoring detections kept per image and class (COCO: 100).
    Returns:
      {"mAP": mean over thresholds and classes with ground truth (NaN if there are none),
       "mAP@0.5", "mAP@0.75" (when 0.75 is a threshold), "ap_per_class@0.5": [num_classes] (NaN for
       classes without ground truth), "ap": [T, num_classes]}.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"got {len(predictions)} prediction dicts but {len(ground_truths)} ground-truth "
                         "dicts; pass one of each per image, in the same order")
    thresholds = np.asarray(iou_thresholds, np.float64)
    ap = np.full((len(thresholds), num_classes), np.nan)
    for c in range(num_classes):
        scores, matched, num_gt = [], [[] for _ in thresholds], 0
        for pred, truth in zip(predictions, ground_truths):
            gt_boxes = np.asarray(truth["boxes"]).reshape(-1, 4)[np.asarray(truth["classes"]).reshape(-1) == c]
            sel = np.asarray(pred["classes"]).reshape(-1) == c
            dt_scores = np.asarray(pred["scores"], np.float64).reshape(-1)[sel]
            dt_boxes = np.asarray(pred["boxes"]).reshape(-1, 4)[sel]
            order = np.argsort(-dt_scores, kind="mergesort")[:max_detections]
            dt_scores, dt_boxes = dt_scores[order], dt_boxes[order]
            num_gt += len(gt_boxes)
            ious = box_iou_matrix(dt_boxes, gt_boxes)
            scores.append(dt_scores)
            for t, threshold in enumerate(thresholds):
                matched[t].append(_match(ious, threshold))
        if num_gt == 0:
            continue
        all_scores = np.concatenate(scores)
        for t in range(len(thresholds)):
            ap[t, c] = _interpolated_precision(all_scores, np.concatenate(matched[t]), num_gt)
    has_gt = ~np.isnan(ap[0])
    result = {"mAP": float(np.mean(ap[:, has_gt])) if has_gt.any() else float("nan"), "ap": ap}
    for name, value in (("mAP@0.5", 0.5), ("mAP@0.75", 0.75)):
        hit = np.isclose(thresholds, value)
        if hit.any():
            row = ap[np.argmax(hit)]
            result[name] = float(np.mean(row[has_gt])) if has_gt.any() else float("nan")
            if value == 0.5:
                result["ap_per_class@0.5"] = row
    return result


def unpad_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                     valid: np.ndarray | None = None) -> list[dict]:
    """Batched padded detections [B, K, ...] (as from models.detection.postprocess) -> list of dicts."""
    valid = np.asarray(classes) >= 0 if valid is None else np.asarray(valid, bool)
    return [{"boxes": np.asarray(b)[v], "scores": np.asarray(s)[v], "classes": np.asarray(c)[v]}
            for b, s, c, v in zip(boxes, scores, classes, valid)]


def unpad_ground_truth(boxes: np.ndarray, classes: np.ndarray) -> list[dict]:
    """Batched padded ground truth (boxes [B, M, 4], classes [B, M] with -1 padding) -> list of dicts."""
    return [{"boxes": np.asarray(b)[np.asarray(c) >= 0], "classes": np.asarray(c)[np.asarray(c) >= 0]}
            for b, c in zip(boxes, classes)]


# --- segmentation -------------------------------------------------------------------------------

def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] int64 counts; row = true class, column = predicted class.
    pred, target: integer label maps of the same shape (any rank)."""
    pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} pixels but target has {target.size}; pass label maps of one shape")
    if target.size and (target.min() < 0 or target.max() >= num_classes or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got target range [{target.min()}, "
                         f"{target.max()}] and pred range [{pred.min()}, {pred.max()}]")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray, ignore_background: bool = False) -> dict:
    """Per-class IoU and Dice, their means, pixel accuracy, from a confusion matrix.

    Means skip NaN classes (absent from prediction and target); with ignore_background, class 0
    is also left out of the means (then "mean_iou" is the mean over object classes).
    """
    cm = np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    start = 1 if ignore_background else 0
    return {
        "per_class_iou": iou,
        "per_class_dice": dice,
        "mean_iou": float(np.nanmean(iou[start:])) if np.isfinite(iou[start:]).any() else float("nan"),
        "mean_dice": float(np.nanmean(dice[start:])) if np.isfinite(dice[start:]).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1.0)),
    }


def dice_per_image(pred_mask: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
    """Binary Dice 2|P & T| / (|P| + |T|) per image; [N, ...] bool masks -> [N]. Two empty masks
    agree perfectly (Dice 1), the usual convention for images without a lesion."""
    p = np.asarray(pred_mask, bool).reshape(len(pred_mask), -1)
    t = np.asarray(target_mask, bool).reshape(len(target_mask), -1)
    inter = np.sum(p & t, axis=1)
    total = p.sum(axis=1) + t.sum(axis=1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
