"""Box utilities: conversions, IoU/GIoU/CIoU values against hand computations and NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.models import boxes as B
from depthlab.research.vision.dense_metrics import box_iou_matrix


def random_boxes(rng, n):
    xy = rng.uniform(0, 50, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 20, (n, 2))], axis=1).astype(np.float32)


def test_format_round_trips():
    b = random_boxes(np.random.default_rng(0), 7)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(b)), b, atol=1e-5)
    np.testing.assert_allclose(B.xyxy_to_cxcywh(jnp.array([[0., 2., 4., 8.]])), [[2., 5., 4., 6.]])
    np.testing.assert_allclose(B.xyxy_to_xywh(jnp.array([[1., 2., 4., 8.]])), [[1., 2., 3., 6.]])


def test_iou_and_giou_hand_values():
    a = jnp.array([[0., 0., 2., 2.]])
    b = jnp.array([[1., 1., 3., 3.]])
    np.testing.assert_allclose(B.pairwise_iou(a, b), [[1 / 7]], rtol=1e-6)
    # enclosing box 3x3 = 9, union 7: GIoU = 1/7 - 2/9
    np.testing.assert_allclose(B.giou_elementwise(a, b), [1 / 7 - 2 / 9], rtol=1e-6)
    far = jnp.array([[10., 0., 12., 2.]])
    np.testing.assert_allclose(B.iou_elementwise(a, far), [0.0])
    assert float(B.giou_elementwise(a, far)[0]) == pytest.approx(-(24 - 8) / 24)   # enclosing 12x2
    np.testing.assert_allclose(B.giou_elementwise(a, a), [1.0])
    np.testing.assert_allclose(B.ciou_elementwise(a, a), [1.0], atol=1e-6)


def test_pairwise_iou_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 9), random_boxes(rng, 5)
    np.testing.assert_allclose(B.pairwise_iou(a, b), box_iou_matrix(a, b), atol=1e-6)
    np.testing.assert_allclose(np.diag(np.asarray(B.pairwise_iou(a, a))), 1.0, atol=1e-6)


def test_ciou_penalises_center_distance_and_aspect():
    target = jnp.array([0., 0., 4., 4.])
    shifted = jnp.array([1., 0., 5., 4.])
    stretched = jnp.array([0., 1., 4., 3.])   # same center, different aspect
    iou = B.iou_elementwise
    assert B.ciou_elementwise(shifted, target) < iou(shifted, target)
    assert B.ciou_elementwise(stretched, target) < iou(stretched, target)


def test_giou_gradient_pulls_disjoint_boxes_together():
    target = jnp.array([10., 10., 14., 14.])
    pred = jnp.array([0., 0., 4., 4.])
    shift = lambda t: pred + t * jnp.ones(4)   # translate the box towards the target
    slope = jax.grad(lambda t: 1 - B.giou_elementwise(shift(t), target))(0.0)
    assert np.isfinite(slope) and slope < 0       # moving right/down lowers the loss
    slope_iou = jax.grad(lambda t: 1 - B.iou_elementwise(shift(t), target))(0.0)
    assert slope_iou == 0.0     # plain IoU has no signal for disjoint boxes: why GIoU exists


def test_degenerate_boxes_are_finite():
    z = jnp.zeros((3, 4))
    for fn in (B.iou_elementwise, B.giou_elementwise, B.ciou_elementwise):
        assert np.all(np.isfinite(fn(z, z)))
        assert np.all(np.isfinite(jax.grad(lambda p: fn(p, z).sum())(z + 1e-3)))
