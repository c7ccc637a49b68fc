"""Dense metrics: mAP agrees with pycocotools; IoU/Dice agree with direct definitions."""
import contextlib
import io

import numpy as np
import pytest

from depthlab.research.vision import dense_metrics as dm

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def coco_stats(predictions, ground_truths, num_classes):
    """(mAP@[.5:.95], mAP@0.5, mAP@0.75) from pycocotools on the same data."""
    images = [{"id": i + 1} for i in range(len(ground_truths))]
    annotations, results = [], []
    for i, truth in enumerate(ground_truths):
        for box, cls in zip(np.asarray(truth["boxes"]).reshape(-1, 4), truth["classes"]):
            x0, y0, x1, y1 = map(float, box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0})
    for i, pred in enumerate(predictions):
        for box, score, cls in zip(np.asarray(pred["boxes"]).reshape(-1, 4), pred["scores"], pred["classes"]):
            x0, y0, x1, y1 = map(float, box)
            results.append({"image_id": i + 1, "category_id": int(cls) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1], ev.stats[2]


def random_case(seed, num_images=12, num_classes=3, empty_pred_images=(), empty_gt_images=()):
    """Ground truth plus noisy detections: jittered true boxes (various localisation quality),
    duplicates, and false positives, with random scores (some tied)."""
    rng = np.random.default_rng(seed)
    preds, truths = [], []
    for i in range(num_images):
        m = 0 if i in empty_gt_images else int(rng.integers(1, 6))
        xy = rng.uniform(0, 80, (m, 2))
        wh = rng.uniform(5, 30, (m, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        classes = rng.integers(0, num_classes, m)
        truths.append({"boxes": boxes, "classes": classes})
        keep = rng.uniform(size=m) < 0.8
        jitter = rng.normal(0, 1, (m, 4)) * rng.uniform(0.02, 0.3) * np.tile(wh, 2)
        p_boxes = [boxes[keep] + jitter[keep]]
        p_classes = [np.where(rng.uniform(size=m) < 0.9, classes, rng.integers(0, num_classes, m))[keep]]
        dup = rng.uniform(size=m) < 0.3                      # exact duplicates of some detections
        p_boxes.append((boxes + jitter)[dup & keep])
        p_classes.append(p_classes[0][dup[keep]])
        f = int(rng.integers(0, 4))                           # false positives
        fxy = rng.uniform(0, 80, (f, 2))
        p_boxes.append(np.concatenate([fxy, fxy + rng.uniform(5, 30, (f, 2))], axis=1))
        p_classes.append(rng.integers(0, num_classes, f))
        p_boxes, p_classes = np.concatenate(p_boxes), np.concatenate(p_classes)
        p_boxes[:, 2:] = np.maximum(p_boxes[:, 2:], p_boxes[:, :2] + 1)   # well-formed boxes only
        scores = np.round(rng.uniform(0.05, 1, len(p_boxes)), 1)   # rounding makes ties
        if i in empty_pred_images:
            p_boxes, p_classes, scores = np.zeros((0, 4)), np.zeros((0,), int), np.zeros((0,))
        preds.append({"boxes": p_boxes, "scores": scores, "classes": p_classes})
    return preds, truths


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_agrees_with_pycocotools(seed):
    preds, truths = random_case(seed, empty_pred_images=(2, 5), empty_gt_images=(3, 7))
    ours = dm.average_precision(preds, truths, num_classes=3)
    ref = coco_stats(preds, truths, num_classes=3)
    assert 0.05 < ref[1] < 0.99          # a non-trivial case, not all-right or all-wrong
    np.testing.assert_allclose([ours["mAP"], ours["mAP@0.5"], ours["mAP@0.75"]], ref, atol=1e-3)


def test_map_edge_cases_agree_with_pycocotools():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 30]], float)
    truths = [{"boxes": boxes, "classes": np.array([0, 1])},
              {"boxes": np.zeros((0, 4)), "classes": np.zeros((0,), int)},     # no ground truth
              {"boxes": boxes[:1] + 50, "classes": np.array([0])}]             # missed: no predictions
    preds = [{"boxes": np.stack([boxes[0], boxes[0], boxes[1] + 3]),        # a duplicate, a loose box
              "scores": np.array([0.9, 0.9, 0.6]), "classes": np.array([0, 0, 1])},
             {"boxes": boxes[:1] + 5, "scores": np.array([0.95]), "classes": np.array([0])},   # false positive
             {"boxes": np.zeros((0, 4)), "scores": np.zeros((0,)), "classes": np.zeros((0,), int)}]
    ours = dm.average_precision(preds, truths, num_classes=3)   # class 2 has no ground truth at all
    ref = coco_stats(preds, truths, num_classes=3)
    np.testing.assert_allclose([ours["mAP"], ours["mAP@0.5"], ours["mAP@0.75"]], ref, atol=1e-3)
    assert np.isnan(ours["ap_per_class@0.5"][2])


def test_map_perfect_and_empty_predictions():
    _, truths = random_case(5)
    perfect = [{"boxes": t["boxes"], "scores": np.ones(len(t["classes"])), "classes": t["classes"]} for t in truths]
    assert dm.average_precision(perfect, truths, 3)["mAP"] == pytest.approx(1.0)
    # pycocotools cannot load an empty result list; the answer is plainly 0.
    nothing = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "classes": np.zeros(0, int)} for _ in truths]
    assert dm.average_precision(nothing, truths, 3)["mAP"] == 0.0


def test_unpad_round_trip():
    boxes = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    classes = np.array([[0, -1, -1], [1, 2, -1]])
    gts = dm.unpad_ground_truth(boxes, classes)
    assert [len(g["classes"]) for g in gts] == [1, 2]
    np.testing.assert_array_equal(gts[1]["boxes"], boxes[1, :2])


def test_segmentation_scores_match_definitions():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 16, 16))
    pred = np.where(rng.uniform(size=target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    cm = dm.confusion_matrix(pred, target, num_classes=5)   # class 4 appears nowhere
    scores = dm.segmentation_scores(cm)
    for c in range(4):
        p, t = pred == c, target == c
        assert scores["per_class_iou"][c] == pytest.approx((p & t).sum() / (p | t).sum())
        assert scores["per_class_dice"][c] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert np.isnan(scores["per_class_iou"][4])
    assert scores["mean_iou"] == pytest.approx(np.mean(scores["per_class_iou"][:4]))
    assert scores["pixel_accuracy"] == pytest.approx((pred == target).mean())
    fg = dm.segmentation_scores(cm, ignore_background=True)
    assert fg["mean_iou"] == pytest.approx(np.mean(scores["per_class_iou"][1:4]))


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        dm.confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=3)


def test_dice_per_image():
    t = np.zeros((3, 4, 4), bool)
    t[0, :2] = True
    t[1, 0, 0] = True
    p = np.zeros_like(t)
    p[0, :1] = True
    dice = dm.dice_per_image(p, t)
    np.testing.assert_allclose(dice, [2 * 4 / (4 + 8), 0.0, 1.0])
