"""YOLO-style detector: shapes, gradients, target assignment, loss, NMS against NumPy, learning."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models import detection as D
from depthlab.research.datasets.scenes import make_scenes
from depthlab.research.vision.dense_metrics import box_iou_matrix


def init(model, x, seed=0):
    """Jitted init. Non-partitionable threefry compiles rank-4 conv-kernel initialisers about 5x
    faster on CPU (jax 0.10); the values differ, which tests do not care about."""
    with jax.threefry_partitionable(False):
        return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))


def tiny_detector(num_classes=4):
    return D.Detector(num_classes=num_classes, stem_width=8, widths=(8, 16), head_width=16)


def test_shapes_and_batch_stats():
    model = tiny_detector()
    x = jnp.zeros((2, 32, 48, 3))
    variables = init(model, x)
    assert set(variables) == {"params", "batch_stats"}
    raw, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    chex.assert_shape(raw, (2, 8, 12, 5 + 4))
    assert model.stride == 4
    chex.assert_shape(D.decode_boxes(raw, 4), (2, 8, 12, 4))
    with pytest.raises(ValueError, match="not divisible by the detector stride"):
        model.apply(variables, jnp.zeros((1, 30, 32, 3)))


def test_build_targets_assigns_center_cells():
    boxes = jnp.array([[[0., 0., 8., 8.], [10., 2., 20., 14.], [0., 0., 0., 0.]]])
    classes = jnp.array([[2, 0, -1]])
    t = D.build_targets(boxes, classes, (4, 4), stride=8)
    expected = np.zeros((1, 4, 4), bool)
    expected[0, 0, 0] = True      # center (4, 4)
    expected[0, 1, 1] = True      # center (15, 8) -> row 1, col 1
    np.testing.assert_array_equal(t["positive"], expected)
    assert int(t["classes"][0, 0, 0]) == 2 and int(t["classes"][0, 1, 1]) == 0
    np.testing.assert_allclose(t["boxes"][0, 1, 1], [10., 2., 20., 14.])


def test_scenes_objects_never_share_a_cell():
    data = make_scenes(200, seed=3)
    t = jax.jit(D.build_targets, static_argnums=(2, 3))(data["boxes"], data["classes"], (16, 16), 4)
    np.testing.assert_array_equal(np.asarray(t["positive"]).sum(axis=(1, 2)), data["num_objects"])


def test_gradients_finite_and_nonzero():
    model = tiny_detector()
    data = make_scenes(4, image_size=32, max_objects=2, min_size=8, max_size=12, seed=0)
    variables = init(model, data["images"])

    def loss_fn(params):
        raw, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             data["images"], train=True, mutable=["batch_stats"])
        return D.detection_loss(raw, data["boxes"], data["classes"], stride=4, box_loss="ciou")[0]

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(np.asarray(g) != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_loss_is_small_for_the_right_answer():
    """Logits that encode the targets exactly give near-zero box and class loss."""
    boxes = jnp.array([[[4., 4., 20., 20.]]])
    classes = jnp.array([[1]])
    raw = np.zeros((1, 4, 4, 5 + 2), np.float32)
    raw[..., 4] = -10.0
    # center (12, 12) in cell (1, 1) at stride 8: 2 sigmoid(t) - 0.5 = 0.5 -> t = 0; size 16 = 4 * 8 * exp(tw)
    raw[0, 1, 1, :4] = [0.0, 0.0, np.log(0.5), np.log(0.5)]
    raw[0, 1, 1, 4] = 10.0
    raw[0, 1, 1, 5:] = [-10.0, 10.0]
    loss_fn = jax.jit(lambda r: D.detection_loss(r, boxes, classes, stride=8))
    loss, metrics = loss_fn(jnp.asarray(raw))
    assert float(metrics["positive_iou"]) == pytest.approx(1.0, abs=1e-5)
    assert float(loss) < 1e-3
    raw[0, 1, 1, 5:] = [10.0, -10.0]      # wrong class: the loss notices
    assert float(loss_fn(jnp.asarray(raw))[0]) > 10


def nms_numpy(boxes, scores, classes, iou_threshold, score_threshold, max_outputs):
    """Textbook greedy NMS, one box at a time."""
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= score_threshold:
            continue
        if any(classes[j] == classes[i] and box_iou_matrix(boxes[i:i + 1], boxes[j:j + 1])[0, 0] > iou_threshold
               for j in keep):
            continue
        keep.append(i)
    return keep[:max_outputs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(10, 50, (5, 2))                 # clusters of overlapping boxes
    c = centers[rng.integers(0, 5, 60)] + rng.normal(0, 3, (60, 2))
    wh = rng.uniform(6, 14, (60, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 60).astype(np.float32)
    classes = rng.integers(0, 2, 60).astype(np.int32)
    nms = jax.jit(D.non_max_suppression, static_argnames=("iou_threshold", "score_threshold", "max_outputs"))
    for iou_t, score_t, k in [(0.5, 0.1, 30), (0.3, 0.0, 8), (0.7, 0.5, 100)]:
        out = nms(boxes, scores, classes, iou_threshold=iou_t, score_threshold=score_t, max_outputs=k)
        ref = nms_numpy(boxes, scores, classes, iou_t, score_t, k)
        n = len(ref)
        assert 0 < n < 60
        np.testing.assert_array_equal(np.asarray(out["indices"])[:n], ref)
        assert not np.any(np.asarray(out["valid"])[n:]) and np.all(np.asarray(out["valid"])[:n])
        np.testing.assert_allclose(np.asarray(out["boxes"])[:n], boxes[ref])
        chex.assert_shape(out["boxes"], (k, 4))
    agnostic = nms(boxes, scores, None, iou_threshold=0.5, score_threshold=0.0, max_outputs=60)
    ref = nms_numpy(boxes, scores, np.zeros(60), 0.5, 0.0, 60)
    np.testing.assert_array_equal(np.asarray(agnostic["indices"])[:len(ref)], ref)


def test_postprocess_jits_once_and_has_static_shapes():
    model = tiny_detector(num_classes=3)
    x = jnp.asarray(make_scenes(3, image_size=32, seed=0)["images"])
    variables = init(model, x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def detect(variables, images):
        return D.postprocess(model.apply(variables, images), stride=4, max_detections=7, pre_nms_top_k=20)

    for _ in range(2):
        out = detect(variables, x)
    chex.assert_shape([out["boxes"], out["scores"], out["classes"], out["valid"]],
                      [(3, 7, 4), (3, 7), (3, 7), (3, 7)])
    scores = np.asarray(out["scores"])
    assert np.all(np.diff(scores, axis=1) <= 0)             # best first
    assert np.all(np.asarray(out["classes"])[~np.asarray(out["valid"])] == -1)


def test_detector_learns():
    """A few Adam steps on a fixed batch of scenes: the loss falls and boxes start to fit."""
    model = tiny_detector()
    data = make_scenes(16, image_size=32, max_objects=2, min_size=8, max_size=12, seed=1)
    variables = init(model, jnp.asarray(data["images"]))
    tx = optax.adam(3e-3)

    def loss_fn(params, batch_stats):
        raw, updates = model.apply({"params": params, "batch_stats": batch_stats}, data["images"],
                                   train=True, mutable=["batch_stats"])
        loss, metrics = D.detection_loss(raw, data["boxes"], data["classes"], stride=4)
        return loss, (metrics, updates["batch_stats"])

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, metrics

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    history = []
    for _ in range(40):
        params, batch_stats, opt_state, metrics = step(params, batch_stats, opt_state)
        history.append(metrics)
    assert float(history[-1]["loss"]) < 0.5 * float(history[0]["loss"])
    assert float(history[-1]["positive_iou"]) > float(history[0]["positive_iou"]) + 0.2


def _parallel_run(mesh, steps=2):
    """Two detector train steps (engine step builder, BatchNorm, GIoU loss) on `mesh`."""
    from depthlab.research.experiment import init_state
    from depthlab.train import data, default_optim_config, make_optimizer, make_train_step, parallel

    model = tiny_detector()
    scenes = make_scenes(16 * steps, image_size=32, max_objects=2, min_size=8, max_size=12, seed=4)
    config = default_optim_config()
    config.learning_rate = 1e-2
    tx = make_optimizer(config)
    with jax.threefry_partitionable(False):   # fast conv-kernel init compile (see `init` above)
        init = lambda key: init_state(model, scenes["images"], tx, key)
        shardings = parallel.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    loss_fn = lambda raw, batch: D.detection_loss(raw, batch["boxes"], batch["classes"], stride=4)
    batch_sh = parallel.batch_sharding(mesh)
    step = jax.jit(make_train_step(model, loss_fn), in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    losses = []
    for i in range(steps):
        rows = slice(16 * i, 16 * (i + 1))
        batch = {"inputs": scenes["images"][rows], "boxes": scenes["boxes"][rows], "classes": scenes["classes"][rows]}
        state, metrics = step(state, data.to_global(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), jax.device_get(state.model_state)


def test_data_parallel_step_on_4_devices_equals_1_device():
    from depthlab.train import parallel

    assert len(jax.devices()) == 4, "tests/conftest.py should give 4 fake CPU devices"
    ref = _parallel_run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    par = _parallel_run(parallel.make_mesh({"data": 4}))
    np.testing.assert_allclose(par[0], ref[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(par[1], ref[1], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(par[2], ref[2], rtol=1e-4, atol=1e-5)   # BatchNorm statistics
