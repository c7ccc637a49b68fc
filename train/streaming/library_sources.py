"""Sources read through another library's datasets: `HFSource` (Hugging Face `datasets` over local files) and
`TFDSSource` (a prepared TensorFlow Datasets split); and `open_source`, which builds any source from its spec.

Example:
    >>> source = open_source("hf:imagefolder:photos/train")     # an HFSource; label = the class folder's index
    >>> source.classes, len(source)
"""
from __future__ import annotations

import os
from typing import Sequence

from depthlab.train.optional import require
from depthlab.train.streaming.records import DataSourceError, first_line
from depthlab.train.streaming.sources import (ArrayRecordSource, ParquetSource, Source, check_nonempty,
                                              expand_paths)

_HF_BUILDERS = ("parquet", "json", "csv", "text", "arrow", "imagefolder")


class HFSource:
    """A Hugging Face `datasets` dataset loaded from local files (never the hub): `HFSource("parquet",
    "data/train-*.parquet")`, `HFSource("json", "data/train.jsonl")`, `HFSource("imagefolder", "photos/train")`
    (one sub-folder per class: `label` is the class index). `datasets` converts the files once into its Arrow
    cache (`HF_DATASETS_CACHE`, default ~/.cache/huggingface/datasets) and reads rows from it by random access.
    Image columns are read undecoded ({"bytes", "path"}), so the decoding runs in Grain's workers
    (`ImageExample`), as for the other sources."""

    def __init__(self, builder: str, path: str, split: str = "train"):
        if builder not in _HF_BUILDERS:
            raise DataSourceError(f"hf:{builder}:{path}: `datasets` builder {builder!r} is not one that reads local "
                                  f"files; use one of {', '.join(_HF_BUILDERS)}")
        self.spec = f"hf:{builder}:{path}"
        if builder == "imagefolder":
            if not os.path.isdir(path):
                raise DataSourceError(f"no such image folder {path!r}; check data.source ({self.spec})")
            kwargs = {"data_dir": path}
        else:
            kwargs = {"data_files": expand_paths(path)}
        datasets = require("datasets", "hf", "streaming input")
        try:
            dataset = datasets.load_dataset(builder, split=split, **kwargs)
        except Exception as e:  # noqa: BLE001 - `datasets` raises many types (some bare) on unreadable files
            raise DataSourceError(f"`datasets` cannot load {self.spec} ({type(e).__name__}: {first_line(e)}); "
                                  f"check that the files are {builder} files with one example per row") from None
        for name, feature in dataset.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
        check_nonempty(self.spec, len(dataset))
        self.dataset = dataset
        label = dataset.features.get("label")
        self.classes = list(label.names) if isinstance(label, datasets.ClassLabel) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, key: int) -> str:
        return f"example {int(key)} of {self.spec}"

    def read(self, keys: Sequence[int]) -> list[dict]:
        columns = self.dataset[[int(k) for k in keys]]
        return [dict(zip(columns, row)) for row in zip(*columns.values())]


class TFDSSource:
    """A prepared TensorFlow Datasets split, read by random access through `tfds.data_source` (ArrayRecord;
    TensorFlow is not needed to read). `TFDSSource("cifar10", "train")`; the data directory is `data_dir`, else
    TFDS's own `TFDS_DATA_DIR`, else ~/tensorflow_datasets. Prepare a dataset once, on a machine with
    TensorFlow and internet: `tfds build cifar10 --file_format=array_record`."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        tfds = require("tensorflow_datasets", "data", "streaming input")
        self.spec = f"tfds:{name}"
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - DatasetNotFoundError, a tfrecord-only dataset, a missing split
            where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR)"
            raise DataSourceError(
                f"no prepared TFDS dataset {name!r} split {split!r} in {where} ({type(e).__name__}: "
                f"{first_line(e)}); prepare it once with `tfds build {name} --file_format=array_record` "
                f"(needs TensorFlow and internet), then copy its directory here") from None
        check_nonempty(f"{self.spec} split {split!r}", len(self.source))
        self.split, self.data_dir = split, data_dir
        info = self.source.dataset_info
        label = info.features["label"] if "label" in info.features else None
        self.classes = list(label.names) if label is not None and hasattr(label, "names") else None
        image = info.features["image"] if "image" in info.features else None
        self.image_shape = list(image.shape) if image is not None and None not in image.shape else None

    @property
    def splits(self) -> list[str]:
        return list(self.source.dataset_info.splits)

    def __len__(self) -> int:
        return len(self.source)

    def where(self, key: int) -> str:
        return f"example {int(key)} of {self.spec} split {self.split!r}"

    def read(self, keys: Sequence[int]) -> list[dict]:
        try:
            return list(self.source.__getitems__([int(k) for k in keys]))
        except Exception as e:  # noqa: BLE001
            raise DataSourceError(f"cannot read {self.where(keys[0])} (or another of this batch): "
                                  f"{type(e).__name__}: {first_line(e)}; the prepared files are damaged: "
                                  f"prepare the dataset again") from None


def open_source(spec: str, columns: Sequence[str] | None = None, split: str = "train") -> Source:
    """A data source from its spec: 'arrayrecord:PATTERN', 'parquet:PATTERN', 'hf:BUILDER:PATH' (a Hugging Face
    `datasets` builder over local files: parquet, json, csv, text, arrow or imagefolder) or 'tfds:NAME' (a
    prepared TFDS dataset; `split` is its split). A bare pattern goes by its files' suffix."""
    kind, _, pattern = spec.partition(":") if ":" in spec else ("", "", spec)
    kind = kind.lower()
    if not kind:
        kind = "parquet" if pattern.rstrip("*").endswith((".parquet", ".pq")) else "arrayrecord"
    if kind in ("arrayrecord", "array_record"):
        return ArrayRecordSource(pattern)
    if kind == "parquet":
        return ParquetSource(pattern, columns=columns)
    if kind == "hf":
        builder, _, path = pattern.partition(":")
        if not path:
            raise DataSourceError(f"data.source={spec!r}: write hf:BUILDER:PATH, e.g. hf:parquet:data/train-*.parquet "
                                  f"or hf:imagefolder:photos/train")
        return HFSource(builder, path)
    if kind == "tfds":
        if not pattern:
            raise DataSourceError(f"data.source={spec!r}: write tfds:NAME, e.g. tfds:cifar10")
        return TFDSSource(pattern, split=split)
    raise DataSourceError(f"unknown data source kind {kind!r} in {spec!r}; use arrayrecord:PATTERN, parquet:PATTERN, "
                          f"hf:BUILDER:PATH, tfds:NAME or tokens:PATH")
