"""Embedded datasets load offline with the documented shapes; a local npz file works end to end."""
import numpy as np
import pytest

from depthlab.research import run_experiment
from depthlab.research.datasets.images import load_dataset


@pytest.mark.parametrize("name,shape,n_train,n_test", [("digits", (8, 8, 1), 1437, 360),
                                                       ("mnist", (28, 28, 1), 4000, 1000),
                                                       ("mnist1d", (40, 1), 4000, 1000)])
def test_embedded_datasets(name, shape, n_train, n_test):
    data = load_dataset(name)
    assert data["train"]["inputs"].shape == (n_train, *shape) and data["test"]["inputs"].shape == (n_test, *shape)
    assert data["train"]["inputs"].dtype == np.float32 and data["train"]["labels"].dtype == np.int32
    assert set(np.unique(data["train"]["labels"])) == set(range(10))
    if name != "mnist1d":
        assert 0.0 <= data["train"]["inputs"].min() and data["train"]["inputs"].max() <= 1.0


def test_mnist1d_matches_the_papers_generator():
    from mnist1d.data import get_dataset_args, make_dataset
    reference = make_dataset(get_dataset_args())
    np.testing.assert_array_equal(load_dataset("mnist1d")["test"]["labels"], reference["y_test"])


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid datasets: digits, mnist"):
        load_dataset("cifar")


def test_local_npz_file_trains(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "blobs.npz"
    y = rng.integers(0, 3, 300)
    x = (rng.normal(size=(300, 8, 8)) * 20 + y[:, None, None] * 60 + 40).clip(0, 255).astype(np.uint8)
    np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    result = run_experiment("vision/digits_cnn", workdir=str(tmp_path / "run"), overrides={
        "data.name": f"npz:{path}", "model.num_classes": 3, "data.eval_batch_size": 60, "data.batch_size": 32,
        "train.steps": 100, "train.eval_every": 100, "train.checkpoint_every": 100, "train.progress": False,
        "optim.warmup_steps": 10})
    assert result["metrics"]["eval/accuracy"] > 0.9


def test_a_missing_field_extra_is_one_line_naming_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def without_mnist1d(name, *args, **kwargs):
        if name.startswith("mnist1d"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mnist1d)
    import importlib
    monkeypatch.setattr(importlib, "import_module", lambda name: without_mnist1d(name, fromlist=["x"]))
    from depthlab.research.datasets import images
    images._mnist1d.cache_clear()
    with pytest.raises(ModuleNotFoundError, match=r"optional package 'mnist1d' is missing.*pip install 'depthlab\[vision\]'"):
        images.load_dataset("mnist1d")
