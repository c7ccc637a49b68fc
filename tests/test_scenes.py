"""Generated scenes and lesions: exact, consistent labels; determinism; speed; optional TFDS."""
import time

import numpy as np
import pytest

from depthlab.research.datasets import scenes


def check_consistent(data, num_classes):
    n, m = data["classes"].shape
    assert data["images"].dtype == np.float32 and 0 <= data["images"].min() and data["images"].max() <= 1
    for i in range(n):
        k = int(data["num_objects"][i])
        assert np.all(data["classes"][i, :k] >= 0) and np.all(data["classes"][i, k:] == -1)
        assert np.all(data["classes"][i] < num_classes)
        assert set(np.unique(data["instance"][i])) <= set(range(k + 1))
        for j in range(k):
            mask = data["instance"][i] == j + 1
            rows, cols = np.nonzero(mask)
            # The box is exactly the tight box of the object's pixels ...
            np.testing.assert_array_equal(data["boxes"][i, j], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            # ... and the semantic mask says the object's class on exactly those pixels.
            assert np.all(data["semantic"][i][mask] == data["classes"][i, j] + 1)
        assert np.array_equal(data["semantic"][i] > 0, data["instance"][i] > 0)


def test_scenes_labels_are_exact():
    data = scenes.make_scenes(60, seed=0)
    assert data["images"].shape == (60, 64, 64, 3) and data["boxes"].shape == (60, 4, 4)
    check_consistent(data, len(scenes.SHAPE_CLASSES))
    assert set(np.unique(data["classes"])) == {-1, 0, 1, 2, 3}


def test_digit_scenes_and_lesions_are_exact():
    digits = scenes.make_scenes(30, kind="digits", min_size=12, max_size=20, seed=1)
    check_consistent(digits, 10)
    lesions = scenes.make_lesions(40, seed=2)
    assert lesions["images"].shape == (40, 64, 64, 1)
    check_consistent(lesions, 1)
    assert 0 in lesions["num_objects"] and lesions["num_objects"].max() > 1   # healthy and multi-lesion images
    # Lesions are faint: their mean brightness is within ~2 texture-stds of the surroundings.
    inside = lesions["images"][..., 0][lesions["semantic"] == 1].mean()
    outside = lesions["images"][..., 0][lesions["semantic"] == 0].mean()
    assert 0 < inside - outside < 0.2


def test_seeded_and_fast():
    start = time.perf_counter()
    a = scenes.make_scenes(200, seed=7)
    assert time.perf_counter() - start < 10      # about 0.2 s on a laptop; generous for shared CI
    b = scenes.make_scenes(200, seed=7)
    c = scenes.make_scenes(200, seed=8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], c["images"])


def test_shape_masks():
    for name in scenes.SHAPE_CLASSES:
        mask = scenes.shape_mask(name, 12)
        assert mask.shape == (12, 12) and mask.any()
        np.testing.assert_array_equal(mask, mask[:, ::-1])    # all four shapes are left-right symmetric
    assert scenes.shape_mask("square", 5).all()
    with pytest.raises(ValueError, match="valid shapes"):
        scenes.shape_mask("hexagon", 5)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown kind"):
        scenes.make_scenes(1, kind="letters")
    with pytest.raises(ValueError, match="min_size"):
        scenes.make_scenes(1, min_size=30, max_size=20)


def test_tfds_loader_names_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name == "tensorflow_datasets":
            raise ImportError("no tfds")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tfds)
    with pytest.raises(ImportError, match=r"pip install depthlab\[data\]"):
        scenes.load_tfds_detection("voc/2007")
