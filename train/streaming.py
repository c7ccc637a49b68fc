"""Streaming input on Grain: datasets too large for memory, read record by record from files.

Sources (random access, opened lazily, picklable so Grain's worker processes can read them):
  * `ArrayRecordSource("data/train-*.array_record")`: ArrayRecord shards, one `encode_record` dict per
    record (what `depthlab data convert` writes);
  * `ParquetSource("data/*.parquet")`: one row per example, columns as features;
  * `HFSource("imagefolder", "photos/train")`: a Hugging Face `datasets` dataset from local files (parquet, json,
    csv, text, arrow, imagefolder);
  * `TFDSSource("cifar10", "train")`: a prepared TFDS split through `tfds.data_source` (no TensorFlow needed);
  * `TokenFile("data/train.bin")`: a nanoGPT-style flat file of uint16/uint32 token ids, read through a
    memory map as random windows.

Batches: `stream_batches(source, batch_size, seed, start_step)` is what `Experiment.train_batches` returns.
Batch i of a run is a pure function of (seed, i): the global order is Grain's seeded `IndexSampler` (a
fresh shuffle of every record each epoch, O(1) memory), so position p of the stream is record
`sampler[p].record_key`, and batch i holds positions [i * batch_size, (i + 1) * batch_size). The pipeline is
Grain's random-access `MapDataset` over step numbers, started at `start_step`, so a resumed run reads exactly
the batches an uninterrupted run would have read and no iterator state is checkpointed: the step is the
state. Decoding and augmentation (`decode(features)`, `transform(example, rng)` with an rng drawn from the
sampler for that position) run inside the step's element, hence in Grain's worker processes when
`num_workers > 0`; the batches do not depend on the number of workers.

Per-process sharding: with P processes, process p reads only rows [p * B / P, (p + 1) * B / P) of every
global batch (B / P records per step; its share of the dataset). The global batch does not depend on P.

Example:
    >>> source = ArrayRecordSource("data/train-*.array_record")
    >>> batches = stream_batches(source, 256, seed=0, start_step=1000, decode=ImageExample(),
    ...                          num_workers=2)
    >>> next(batches)["inputs"].shape        # (256, 32, 32, 3): this process's rows of global batch 1000
"""
from __future__ import annotations

import bisect
import collections
import glob
import io
import json
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from depthlab.train import data as data_lib


_EXTRAS = {"stream": "grain, array-record, pyarrow", "hf": "Hugging Face datasets", "data": "tensorflow-datasets"}


def require(module: str, extra: str = "stream"):
    """An optional dependency of streaming input, or one line naming the extra that brings it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"streaming input needs {module.split('.')[0]}: pip install 'depthlab[{extra}]' "
                                  f"({_EXTRAS[extra]})") from None

_STEPS = 2 ** 62            # an "infinite" range of step numbers for Grain's MapDataset
_MAX_SKIPS = 16             # skip_bad_records: bad records in a row before giving up
_SEED_SALT = 0x5EED


class DataSourceError(ValueError):
    """A data file or record that cannot be used: the message names the file (and record) and the fix."""


# ----------------------------------------------------------------------------------------------
# Records: a dict of named features (bytes, str, numbers, numpy arrays) as one msgpack blob
# ----------------------------------------------------------------------------------------------
_ARRAY_EXT = 1


def _pack_default(value):
    msgpack = require("msgpack")

    if isinstance(value, np.ndarray):
        return msgpack.ExtType(_ARRAY_EXT, msgpack.packb(
            [value.dtype.str, list(value.shape), np.ascontiguousarray(value).tobytes()]))
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a record; use bytes, str, numbers or numpy arrays")


def _unpack_ext(code, payload):
    msgpack = require("msgpack")

    if code != _ARRAY_EXT:
        return msgpack.ExtType(code, payload)
    dtype, shape, raw = msgpack.unpackb(payload)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def encode_record(features: dict) -> bytes:
    """{name: bytes | str | int | float | np.ndarray} -> bytes (msgpack; arrays keep dtype and shape)."""
    msgpack = require("msgpack")

    return msgpack.packb(dict(features), default=_pack_default, use_bin_type=True)


def decode_record(blob: bytes) -> dict:
    """The inverse of `encode_record`."""
    msgpack = require("msgpack")

    features = msgpack.unpackb(blob, ext_hook=_unpack_ext, raw=False)
    if not isinstance(features, dict):
        raise ValueError(f"a record holds a {type(features).__name__}, not a dict of features")
    return features


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def expand_paths(pattern: str, what: str = "data.source") -> list[str]:
    """The files a pattern names: comma-separated paths or globs, each glob sorted; one error when a part
    matches nothing."""
    paths = []
    for part in (p.strip() for p in str(pattern).split(",")):
        if not part:
            continue
        matched = sorted(glob.glob(os.path.expanduser(part))) if glob.has_magic(part) else (
            [os.path.expanduser(part)] if os.path.exists(os.path.expanduser(part)) else [])
        if not matched:
            raise DataSourceError(f"no file matches {part!r} ({what}); check the path, or make the files with "
                                  f"`depthlab data convert` first")
        paths.extend(p for p in matched if os.path.isfile(p) or not os.path.isdir(p))
    if not paths:
        raise DataSourceError(f"{what}={pattern!r} names no files")
    return paths


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class _Shards:
    """Global record keys over files of known sizes: key -> (file index, position in the file)."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths, self.counts = list(paths), list(counts)
        self.ends = list(np.cumsum(self.counts))

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.ends else 0

    def locate(self, key: int) -> tuple[int, int]:
        f = bisect.bisect_right(self.ends, key)
        return f, int(key - (self.ends[f - 1] if f else 0))

    def where(self, key: int) -> str:
        f, pos = self.locate(int(key))
        return f"record {pos} of {self.paths[f]}"

    def first_keys(self, limit: int = 16) -> list[int]:
        """The first record of up to `limit` files (spread over all), checked before training starts."""
        files = np.unique(np.linspace(0, len(self.paths) - 1, min(limit, len(self.paths))).astype(int))
        return [int(self.ends[f] - self.counts[f]) for f in files]


def _check_nonempty(path: str, count: int) -> None:
    if count <= 0:
        raise DataSourceError(f"{path} is an empty shard (0 records); delete it, or re-convert with fewer shards "
                              f"(depthlab data convert --shards)")


class _ShardedSource:
    """What a record source over several files shares: its files, its length, where a record lives."""

    shards: _Shards

    @property
    def paths(self) -> list[str]:
        return self.shards.paths

    def __len__(self) -> int:
        return len(self.shards)

    def where(self, key: int) -> str:
        return self.shards.where(key)


class ArrayRecordSource(_ShardedSource):
    """Records of ArrayRecord files (each an `encode_record` blob, or bytes that `parse` turns into a dict).

    `read(keys)` -> list of feature dicts; `where(key)` -> "record r of FILE" (for error messages).
    """

    def __init__(self, pattern: str | Sequence[str], parse: Callable[[bytes], dict] = decode_record):
        ArrayRecordReader = require("array_record.python.array_record_module").ArrayRecordReader

        paths = expand_paths(pattern) if isinstance(pattern, str) else [os.fspath(p) for p in pattern]
        counts = []
        for path in paths:
            if not os.path.exists(path):
                raise DataSourceError(f"no such ArrayRecord file {path!r}; check data.source")
            try:
                reader = ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except RuntimeError as e:
                raise DataSourceError(f"{path} is not a readable ArrayRecord file ({_first_line(e)}); re-create it "
                                      f"with `depthlab data convert`, or leave it out of data.source") from None
            _check_nonempty(path, counts[-1])
        self.shards, self.parse = _Shards(paths, counts), parse
        self._source = None

    def _grain_source(self):
        if self._source is None:
            grain = require("grain")

            # "path[0:n]" read instructions: Grain does not reopen every file to count its records.
            self._source = grain.sources.ArrayRecordDataSource(
                [f"{p}[0:{n}]" for p, n in zip(self.shards.paths, self.shards.counts)])
        return self._source

    def read(self, keys: Sequence[int]) -> list[dict]:
        try:
            blobs = self._grain_source().__getitems__([int(k) for k in keys])
        except RuntimeError as e:
            raise DataSourceError(f"cannot read {self.where(keys[0])} (or another record of this batch): "
                                  f"{_first_line(e)}; the file is damaged: re-create it with `depthlab data "
                                  f"convert`") from None
        out = []
        for key, blob in zip(keys, blobs):
            try:
                out.append(self.parse(blob))
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt record
                raise DataSourceError(f"{self.where(key)} is corrupt: it does not decode as a record "
                                      f"({type(e).__name__}: {_first_line(e)}); re-create the file with "
                                      f"`depthlab data convert`") from None
        return out

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


class ParquetSource(_ShardedSource):
    """Rows of Parquet files as feature dicts (column name -> value). Reads whole row groups, the unit
    Parquet decodes, and keeps the last few per process; write files with small row groups (the converter
    and `pyarrow.parquet.write_table(..., row_group_size=1024)`) for cheap random access."""

    def __init__(self, pattern: str | Sequence[str], columns: Sequence[str] | None = None, cache_groups: int = 4):
        pq = require("pyarrow.parquet")

        paths = expand_paths(pattern) if isinstance(pattern, str) else [os.fspath(p) for p in pattern]
        counts, groups = [], []
        for path in paths:
            try:
                meta = pq.ParquetFile(path).metadata
            except FileNotFoundError:
                raise DataSourceError(f"no such Parquet file {path!r}; check data.source") from None
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError on a damaged file
                raise DataSourceError(f"{path} is not a readable Parquet file ({_first_line(e)}); re-write it, "
                                      f"or leave it out of data.source") from None
            counts.append(meta.num_rows)
            groups.append(np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
            _check_nonempty(path, counts[-1])
        self.shards, self.group_ends = _Shards(paths, counts), groups
        self.columns, self.cache_groups = list(columns) if columns else None, int(cache_groups)
        self._init_cache()

    def _init_cache(self):
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _group(self, f: int, g: int):
        pq = require("pyarrow.parquet")

        with self._lock:
            if (f, g) in self._cache:
                self._cache.move_to_end((f, g))
                return self._cache[(f, g)]
        try:
            table = pq.ParquetFile(self.shards.paths[f]).read_row_group(g, columns=self.columns)
        except Exception as e:  # noqa: BLE001
            raise DataSourceError(f"cannot read row group {g} of {self.shards.paths[f]} ({_first_line(e)}); the file "
                                  f"is damaged or a column in data.columns is missing: re-write it") from None
        with self._lock:
            self._cache[(f, g)] = table
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        return table

    def read(self, keys: Sequence[int]) -> list[dict]:
        wanted: dict = collections.defaultdict(list)     # (file, group) -> [(row in group, slot)]
        for slot, key in enumerate(keys):
            f, pos = self.shards.locate(int(key))
            g = int(np.searchsorted(self.group_ends[f], pos, side="right"))
            wanted[(f, g)].append((pos - (int(self.group_ends[f][g - 1]) if g else 0), slot))
        out: list = [None] * len(keys)
        for (f, g), rows in wanted.items():
            for (_, slot), row in zip(rows, self._group(f, g).take([r for r, _ in rows]).to_pylist()):
                out[slot] = row
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache"), state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()


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
        datasets = require("datasets", "hf")
        try:
            dataset = datasets.load_dataset(builder, split=split, **kwargs)
        except Exception as e:  # noqa: BLE001 - `datasets` raises many types (some bare) on unreadable files
            raise DataSourceError(f"`datasets` cannot load {self.spec} ({type(e).__name__}: {_first_line(e)}); "
                                  f"check that the files are {builder} files with one example per row") from None
        for name, feature in dataset.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
        _check_nonempty(self.spec, len(dataset))
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
        tfds = require("tensorflow_datasets", "data")
        self.spec = f"tfds:{name}"
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - DatasetNotFoundError, a tfrecord-only dataset, a missing split
            where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR)"
            raise DataSourceError(
                f"no prepared TFDS dataset {name!r} split {split!r} in {where} ({type(e).__name__}: "
                f"{_first_line(e)}); prepare it once with `tfds build {name} --file_format=array_record` "
                f"(needs TensorFlow and internet), then copy its directory here") from None
        _check_nonempty(f"{self.spec} split {split!r}", len(self.source))
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
                                  f"{type(e).__name__}: {_first_line(e)}; the prepared files are damaged: "
                                  f"prepare the dataset again") from None


def open_source(spec: str, columns: Sequence[str] | None = None, split: str = "train"):
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


# ----------------------------------------------------------------------------------------------
# Token files (nanoGPT's train.bin / val.bin)
# ----------------------------------------------------------------------------------------------
class TokenFile:
    """A flat binary file of token ids (uint16 by default; uint32 for vocabularies over 65,536), memory-mapped.

    The dtype comes from `dtype`, else from a `meta.json` beside the file ({"dtype": "uint16", ...}), else
    uint16 (nanoGPT's convention)."""

    def __init__(self, path: str, dtype: str | None = None):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise DataSourceError(f"no such token file {path!r}; make one with `depthlab data convert text FILE "
                                  f"--out DIR` (tokens:DIR/train.bin)")
        meta_path = os.path.join(os.path.dirname(path), "meta.json")
        if dtype is None and os.path.exists(meta_path):
            with open(meta_path) as f:
                dtype = json.load(f).get("dtype")
        self.path, self.dtype = path, np.dtype(dtype or "uint16")
        if self.dtype not in (np.uint16, np.uint32, np.int32):
            raise DataSourceError(f"token dtype {self.dtype} of {path} is not uint16, uint32 or int32")
        size = os.path.getsize(path)
        if size == 0 or size % self.dtype.itemsize:
            raise DataSourceError(f"{path} holds {size} bytes, not a whole number of {self.dtype} tokens (or none); "
                                  f"pass the dtype it was written with (meta.json 'dtype') or re-convert it")
        self.num_tokens = size // self.dtype.itemsize
        self._tokens = None

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def windows(self, starts: Sequence[int], length: int) -> np.ndarray:
        """[len(starts), length] int32 token windows."""
        tokens = self.tokens
        return np.stack([np.asarray(tokens[s:s + length], np.int32) for s in starts])

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}


# ----------------------------------------------------------------------------------------------
# Decoding: features -> model inputs (runs in the workers)
# ----------------------------------------------------------------------------------------------
def decode_image(value: Any, where: str = "a record") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ... via Pillow), a {'bytes': ...} dict (Hugging Face's Parquet
    layout) or an array -> [H, W, C] array (uint8 stays uint8)."""
    if isinstance(value, dict) and "bytes" in value:      # Hugging Face's image layout: bytes, or a file's path
        if value["bytes"] is None and value.get("path"):
            try:
                with open(value["path"], "rb") as f:
                    value = f.read()
            except OSError as e:
                raise DataSourceError(f"{where}: cannot read its image file ({e}); the dataset's files moved: "
                                      f"load it again") from None
        else:
            value = value["bytes"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        Image = require("PIL.Image")

        try:
            with Image.open(io.BytesIO(bytes(value))) as image:
                array = np.asarray(image)
        except Exception as e:  # noqa: BLE001 - Pillow raises several types on bad bytes
            raise DataSourceError(f"{where}: its image bytes do not decode ({_first_line(e)}); the record is "
                                  f"corrupt: re-convert the dataset") from None
    else:
        array = np.asarray(value)
    return array[..., None] if array.ndim == 2 else array


class ImageExample:
    """decode(features) for classification: {image_key: encoded image or array, label_key: int} ->
    {"inputs": float32 [H, W, C] in [0, 1] (uint8 / 255), "labels": int32}."""

    def __init__(self, image_key: str = "image", label_key: str = "label", scale: float | None = None):
        self.image_key, self.label_key, self.scale = image_key, label_key, scale

    def __call__(self, features: dict, where: str = "a record") -> dict:
        for key in (self.image_key, self.label_key):
            if key not in features:
                present = ", ".join(sorted(features)) or "none"
                raise DataSourceError(f"{where} has no feature {key!r} (it has {present}); name the right one "
                                      f"(data.image_key / data.label_key) or re-convert")
        image = decode_image(features[self.image_key], where)
        scale = self.scale if self.scale is not None else (255.0 if image.dtype == np.uint8 else 1.0)
        return {"inputs": image.astype(np.float32) / np.float32(scale),
                "labels": np.asarray(features[self.label_key], np.int32)}


def _takes_where(decode: Callable | None) -> bool:
    """Whether decode takes the record's description (`decode(features, where)`) or only the features."""
    import inspect

    if decode is None:
        return False
    try:
        params = list(inspect.signature(decode).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _decode(decode: Callable | None, takes_where: bool, features: dict, where: str) -> dict:
    if decode is None:
        return {k: np.asarray(v) for k, v in features.items()}
    return decode(features, where) if takes_where else decode(features)


def _read_decoded(source, decode: Callable | None, takes_where: bool, keys: Sequence[int]) -> list[dict]:
    """The records at `keys`, read and decoded (a bad one raises DataSourceError naming it)."""
    return [_decode(decode, takes_where, f, source.where(k)) for f, k in zip(source.read(keys), keys)]


def stack_examples(examples: list[dict], keys: Sequence[int], where: Callable[[int], str]) -> dict:
    """[{name: array}] -> {name: [n, ...] array}; one line naming both records when shapes disagree."""
    first = examples[0]
    for i, example in enumerate(examples[1:], 1):
        if example.keys() != first.keys():
            raise DataSourceError(f"{where(keys[i])} has features {sorted(example)} but {where(keys[0])} has "
                                  f"{sorted(first)}; every record needs the same features")
        for name, value in example.items():
            if np.shape(value) != np.shape(first[name]):
                raise DataSourceError(
                    f"mixed shapes: {where(keys[i])} has {name!r} of shape {np.shape(value)} but {where(keys[0])} "
                    f"has {np.shape(first[name])}; resize the images to one size (`depthlab data convert DIR "
                    f"--out OUT --size HxW`) or crop them in the data transform")
    return {name: np.stack([np.asarray(e[name]) for e in examples]) for name in first}


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def grain_seed(seed: int) -> int:
    """The run's seed hashed to the 32 bits Grain's shuffles take (Grain shuffles epoch e with seed + e, so
    raw seeds 0 and 1 would share epochs; hashed ones do not)."""
    return int(np.random.SeedSequence([int(seed), _SEED_SALT]).generate_state(1, np.uint32)[0])


def _rows(batch_size: int, process_index, process_count, shard_options) -> slice:
    if shard_options is not None:
        process_index, process_count = shard_options.shard_index, shard_options.shard_count
    return data_lib.process_slice(batch_size, process_index, process_count)


class _TrainBatch:
    """step -> this process's rows of global batch `step` (a Grain map function, pickled to the workers)."""

    def __init__(self, source, batch_size: int, rows: slice, seed: int, decode, transform,
                 skip_bad_records: bool = False):
        grain = require("grain")

        self.source, self.batch_size, self.rows = source, batch_size, rows
        self.decode, self.takes_where, self.transform = decode, _takes_where(decode), transform
        self.skip_bad_records = bool(skip_bad_records)
        self.sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=grain_seed(seed),
                                                   num_epochs=None)

    def _read(self, keys: list[int]) -> list[dict]:
        return _read_decoded(self.source, self.decode, self.takes_where, keys)

    def examples(self, positions: Sequence[int], augment: bool = True) -> tuple[list[dict], list[int], list[int]]:
        """(examples, record keys, skipped flags) at these stream positions. With skip_bad_records, a record
        that fails to read or decode is replaced by the next position's record that does (flag 1)."""
        metas = [self.sampler[int(p)] for p in positions]
        keys, skipped = [int(m.record_key) for m in metas], [0] * len(metas)
        try:
            examples = self._read(keys)
        except DataSourceError:
            if not self.skip_bad_records:
                raise
            examples = []
            for i, p in enumerate(positions):
                for offset in range(_MAX_SKIPS + 1):
                    key = int(self.sampler[int(p) + offset].record_key)
                    try:
                        examples.append(self._read([key])[0])
                        break
                    except DataSourceError:
                        if offset == _MAX_SKIPS:
                            raise
                keys[i], skipped[i] = key, int(offset > 0)
        if augment and self.transform is not None:
            examples = [self.transform(e, m.rng) for e, m in zip(examples, metas)]
        return examples, keys, skipped

    def __call__(self, step: int) -> dict:
        first = int(step) * self.batch_size
        examples, keys, skipped = self.examples(range(first + self.rows.start, first + self.rows.stop))
        batch = stack_examples(examples, keys, self.source.where)
        if self.skip_bad_records:
            batch["skipped"] = np.asarray(skipped, np.int32)    # per row: 1 where a bad record was replaced
        return batch


class _EvalBatch:
    """index -> this process's rows of eval batch `index` (in order, the last padded, with a `mask`)."""

    def __init__(self, source, batch_size: int, rows: slice, decode, skip_bad_records: bool = False):
        self.source, self.batch_size, self.rows, self.decode = source, batch_size, rows, decode
        self.takes_where, self.skip_bad_records = _takes_where(decode), bool(skip_bad_records)

    def __call__(self, index: int) -> dict:
        n = len(self.source)
        idx = np.arange(index * self.batch_size, (index + 1) * self.batch_size)[self.rows]
        mask = (idx < n).astype(np.float32)
        keys = [int(k) for k in np.minimum(idx, n - 1)]
        read = lambda ks: _read_decoded(self.source, self.decode, self.takes_where, ks)  # noqa: E731
        try:
            examples = read(keys)
        except DataSourceError:
            if not self.skip_bad_records:
                raise
            examples = []                   # a bad record is left out of the means: mask 0, a good one's copy
            for i, key in enumerate(keys):
                try:
                    examples.append(read([key])[0])
                except DataSourceError:
                    examples.append(None)
                    mask[i] = 0.0
            good = next((e for e in examples if e is not None), None)
            if good is None:
                raise
            examples = [good if e is None else e for e in examples]
        return {**stack_examples(examples, keys, self.source.where), "mask": mask}


class _TokenBatch:
    """step -> this process's rows of global batch `step` of random windows (as text.random_windows)."""

    def __init__(self, tokens: TokenFile, batch_size: int, context: int, rows: slice, seed: int):
        self.tokens, self.batch_size, self.context, self.rows, self.seed = tokens, batch_size, context, rows, seed

    def __call__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, int(step)])
        starts = rng.integers(0, len(self.tokens) - self.context - 1, size=self.batch_size)[self.rows]
        windows = self.tokens.windows(starts, self.context + 1)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Grain worker init. Ctrl-C (SIGINT, sent to the whole process group) is left to the training process,
    which checkpoints and closes the pipeline (Grain stops its workers then); and the worker exits when the
    training process is gone: one killed with SIGKILL (or by the OOM killer) runs no clean-up, and its
    workers, blocked on a full buffer, would otherwise live on."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="depthlab-parent-watch").start()


def _allow_grain_workers() -> None:
    """Grain (0.2.18 with jaxlib >= 0.10) reads its absl flag --grain_enable_multiprocess_worker_profiling
    when it starts a worker, which fails in a program that never parsed absl flags (anything not run by
    absl.app). Marks that one flag as given, with its default (off); nothing else changes."""
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
        flags.FLAGS[name].present = 1


class StreamIterator:
    """An iterator over a Grain dataset that starts the pipeline (and its workers) on the first `next`, so
    building it (as `fit`'s input check does) costs nothing; `close()` stops the workers. Yields plain numpy
    arrays (Grain's shared-memory outputs are copied out, so no batch outlives its worker's buffer)."""

    def __init__(self, make_dataset: Callable[[], Any], num_workers: int = 0):
        self._make, self._num_workers, self._it = make_dataset, num_workers, None

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            if self._num_workers:
                _allow_grain_workers()
            self._it = iter(self._make())
        try:
            batch = next(self._it)
        except BaseException:
            self.close()        # a failed pipeline stops its workers and frees their buffers now, not at exit
            raise
        return {k: np.array(v) for k, v in batch.items()}

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _read_options(num_threads: int, buffer: int):
    grain = require("grain")

    return grain.ReadOptions(num_threads=max(1, int(num_threads)), prefetch_buffer_size=max(1, int(buffer)))


def _pipeline(map_fn, start: int, stop: int, num_workers: int, num_threads: int, buffer: int) -> Callable:
    def make():
        grain = require("grain")

        # Workers read whole batches (one element = one step), each thread reading one: few threads and a
        # short buffer, since an element is a batch, not a record (Grain's defaults: 16 threads, 500 elements).
        threads = 1 if num_workers else num_threads
        ds = grain.MapDataset.range(start, stop).map(map_fn).to_iter_dataset(_read_options(threads, buffer))
        if num_workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers),
                                                             per_worker_buffer_size=max(1, int(buffer))),
                                worker_init_fn=_worker_init)
        return ds
    return make


def _check_workers(num_workers) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}; set data.num_workers "
                         f"(0 reads in this process's threads)")
    return int(num_workers)


def stream_batches(source, batch_size: int, seed: int, start_step: int = 0, *,
                   decode: Callable[[dict], dict] | None = None,
                   transform: Callable[[dict, np.random.Generator], dict] | None = None,
                   process_index: int | None = None, process_count: int | None = None, shard_options=None,
                   num_workers: int = 0, num_threads: int = 2, buffer: int = 2,
                   skip_bad_records: bool = False) -> StreamIterator:
    """Infinite iterator of training batches of `source` (ArrayRecordSource, ParquetSource, ...).

    decode(features[, where]) -> example dict of arrays (e.g. `ImageExample()`); transform(example, rng) ->
    example, an augmentation with a numpy Generator that is a function of (seed, position in the stream).
    process_index/process_count (or Grain's `ShardOptions(shard_index, shard_count)`; default: JAX's
    processes): this process yields only its rows of each global batch. num_workers > 0: Grain worker
    processes (spawned) read, decode and augment; 0: `num_threads` threads of this process do.
    A few records are read and decoded here and now, so bad data fails before training starts.
    skip_bad_records: a record that fails to read or decode is replaced by the next one in the stream that
    does, and the batch gets `skipped` (per row: 1 where replaced) so the step can count them; without it
    (the default) a bad record stops the run with one line naming it.
    """
    batch_size, num_workers = data_lib._check_batch_size(batch_size), _check_workers(num_workers)
    if batch_size > len(source):
        raise ValueError(f"batch size {batch_size} exceeds the {len(source)} training records; lower "
                         f"data.batch_size")
    rows = _rows(batch_size, process_index, process_count, shard_options)
    make = _TrainBatch(source, batch_size, rows, seed, decode, transform, skip_bad_records)
    if not skip_bad_records:
        _check_first_records(source, make)
    return StreamIterator(_pipeline(make, int(start_step), _STEPS, num_workers, num_threads, buffer), num_workers)


def _check_first_records(source, make: _TrainBatch) -> None:
    """Reads and decodes the first record of (up to 16 of) the files: a missing feature, a corrupt record or
    mixed image sizes across files fail now, in this process, with the file named."""
    keys = source.shards.first_keys() if hasattr(source, "shards") else [0]
    examples = _read_decoded(source, make.decode, make.takes_where, keys)
    stack_examples(examples, keys, source.where)


def stream_eval_batches(source, batch_size: int, *, decode: Callable[[dict], dict] | None = None,
                        process_index: int | None = None, process_count: int | None = None, shard_options=None,
                        num_threads: int = 2, buffer: int = 2, max_batches: int | None = None,
                        skip_bad_records: bool = False) -> StreamIterator:
    """One pass over `source` in order: batches of `batch_size` rows with a `mask` (the last padded), as
    train.data.eval_batches gives for arrays; read by threads of this process (no worker start-up per
    evaluation). skip_bad_records: a bad record gets mask 0 (left out of the means) instead of stopping."""
    batch_size = data_lib._check_batch_size(batch_size)
    rows = _rows(batch_size, process_index, process_count, shard_options)
    count = -(-len(source) // batch_size)
    if max_batches:
        count = min(count, int(max_batches))
    make = _EvalBatch(source, batch_size, rows, decode, skip_bad_records)
    return StreamIterator(_pipeline(make, 0, count, 0, num_threads, buffer))


def token_batches(tokens: TokenFile, batch_size: int, context: int, seed: int, start_step: int = 0, *,
                  process_index: int | None = None, process_count: int | None = None, shard_options=None,
                  num_workers: int = 0, num_threads: int = 1, buffer: int = 2) -> StreamIterator:
    """Infinite batches of random windows of a token file: {'inputs': [B, context], 'targets': shifted by 1},
    int32. Batch s draws its window starts from numpy's Generator seeded by (seed, s), as
    research/datasets/text.random_windows does on an in-memory array: the same ids give the same batches."""
    batch_size, num_workers = data_lib._check_batch_size(batch_size), _check_workers(num_workers)
    if len(tokens) <= context + 1:
        raise ValueError(f"{tokens.path} holds {len(tokens)} tokens, too few for context={context}; lower the "
                         f"context")
    rows = _rows(batch_size, process_index, process_count, shard_options)
    make = _TokenBatch(tokens, batch_size, int(context), rows, int(seed))
    return StreamIterator(_pipeline(make, int(start_step), _STEPS, num_workers, num_threads, buffer), num_workers)
