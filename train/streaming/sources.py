"""Record sources over files: the `Source` protocol that the batch pipelines read, and the sources that read
files directly (`ArrayRecordSource`, `ParquetSource`), plus `TokenFile`, a flat file of token ids read as windows.

A source is random access, opened lazily and picklable, so Grain's worker processes can read it: record key k
(0 <= k < len(source)) of a source over several files is record k - (records in the files before) of its file.

Example:
    >>> source = ArrayRecordSource("data/train-*.array_record")
    >>> len(source), source.where(1000)       # (50000, "record 1000 of data/train-00000-of-00004.array_record")
    >>> source.read([0, 1])[0]["label"]
"""
from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import threading
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from depthlab.train.optional import require
from depthlab.train.streaming.records import DataSourceError, decode_record, first_line


@runtime_checkable
class Source(Protocol):
    """What `stream_batches` and `stream_eval_batches` read: records by integer key, in any order.

    len(source): the number of records (keys 0 .. len - 1); read(keys) -> one feature dict per key, in order
    (a record that cannot be read or parsed raises DataSourceError naming it); where(key) -> "record r of FILE",
    for error messages. A source is pickled to Grain's workers, so it opens its files lazily. A source over
    several files may also have `shards` (a `Shards`): the first record of each file is then checked before
    training starts. Every source here implements it: ArrayRecordSource, ParquetSource, HFSource, TFDSSource
    (TokenFile is read as windows of tokens by `token_batches`, not as records).
    """

    def __len__(self) -> int: ...

    def read(self, keys: Sequence[int]) -> list[dict]: ...

    def where(self, key: int) -> str: ...


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


class Shards:
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


def check_nonempty(path: str, count: int) -> None:
    """One error naming an empty shard (a source of 0 records would fail later, less clearly)."""
    if count <= 0:
        raise DataSourceError(f"{path} is an empty shard (0 records); delete it, or re-convert with fewer shards "
                              f"(depthlab data convert --shards)")


class _ShardedSource:
    """What a record source over several files shares: its files, its length, where a record lives."""

    shards: Shards

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
        reader_module = require("array_record.python.array_record_module", "stream", "streaming input")

        paths = expand_paths(pattern) if isinstance(pattern, str) else [os.fspath(p) for p in pattern]
        counts = []
        for path in paths:
            if not os.path.exists(path):
                raise DataSourceError(f"no such ArrayRecord file {path!r}; check data.source")
            try:
                reader = reader_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except RuntimeError as e:
                raise DataSourceError(f"{path} is not a readable ArrayRecord file ({first_line(e)}); re-create it "
                                      f"with `depthlab data convert`, or leave it out of data.source") from None
            check_nonempty(path, counts[-1])
        self.shards, self.parse = Shards(paths, counts), parse
        self._source = None

    def _grain_source(self):
        if self._source is None:
            grain = require("grain", "stream", "streaming input")

            # "path[0:n]" read instructions: Grain does not reopen every file to count its records.
            self._source = grain.sources.ArrayRecordDataSource(
                [f"{p}[0:{n}]" for p, n in zip(self.shards.paths, self.shards.counts)])
        return self._source

    def read(self, keys: Sequence[int]) -> list[dict]:
        try:
            blobs = self._grain_source().__getitems__([int(k) for k in keys])
        except RuntimeError as e:
            raise DataSourceError(f"cannot read {self.where(keys[0])} (or another record of this batch): "
                                  f"{first_line(e)}; the file is damaged: re-create it with `depthlab data "
                                  f"convert`") from None
        out = []
        for key, blob in zip(keys, blobs):
            try:
                out.append(self.parse(blob))
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt record
                raise DataSourceError(f"{self.where(key)} is corrupt: it does not decode as a record "
                                      f"({type(e).__name__}: {first_line(e)}); re-create the file with "
                                      f"`depthlab data convert`") from None
        return out

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


class ParquetSource(_ShardedSource):
    """Rows of Parquet files as feature dicts (column name -> value). Reads whole row groups, the unit
    Parquet decodes, and keeps the last few per process; write files with small row groups (the converter
    and `pyarrow.parquet.write_table(..., row_group_size=1024)`) for cheap random access."""

    def __init__(self, pattern: str | Sequence[str], columns: Sequence[str] | None = None, cache_groups: int = 4):
        pq = require("pyarrow.parquet", "stream", "streaming input")

        paths = expand_paths(pattern) if isinstance(pattern, str) else [os.fspath(p) for p in pattern]
        counts, groups = [], []
        for path in paths:
            try:
                meta = pq.ParquetFile(path).metadata
            except FileNotFoundError:
                raise DataSourceError(f"no such Parquet file {path!r}; check data.source") from None
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError on a damaged file
                raise DataSourceError(f"{path} is not a readable Parquet file ({first_line(e)}); re-write it, "
                                      f"or leave it out of data.source") from None
            counts.append(meta.num_rows)
            groups.append(np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
            check_nonempty(path, counts[-1])
        self.shards, self.group_ends = Shards(paths, counts), groups
        self.columns, self.cache_groups = list(columns) if columns else None, int(cache_groups)
        self._init_cache()

    def _init_cache(self):
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _group(self, f: int, g: int):
        pq = require("pyarrow.parquet", "stream", "streaming input")

        with self._lock:
            if (f, g) in self._cache:
                self._cache.move_to_end((f, g))
                return self._cache[(f, g)]
        try:
            table = pq.ParquetFile(self.shards.paths[f]).read_row_group(g, columns=self.columns)
        except Exception as e:  # noqa: BLE001
            raise DataSourceError(f"cannot read row group {g} of {self.shards.paths[f]} ({first_line(e)}); the file "
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
