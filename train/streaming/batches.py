"""Batches on Grain: `stream_batches` (training), `stream_eval_batches` (one ordered pass) and `token_batches`
(random windows of a TokenFile), each a `StreamIterator`; and the workarounds Grain's worker processes need.

Batch i of a run is a pure function of (seed, i): the global order is Grain's seeded `IndexSampler` (a fresh
shuffle of every record each epoch, O(1) memory), and the pipeline is a `MapDataset` over step numbers started
at `start_step`, so the checkpointed step is the whole iterator state. Decoding and augmentation run inside a
step's element, hence in the workers when `num_workers > 0`; the batches do not depend on the number of workers.

Example:
    >>> batches = stream_batches(ArrayRecordSource("data/train-*.array_record"), 256, seed=0, start_step=1000,
    ...                          decode=ImageExample(), num_workers=2)
    >>> next(batches)["inputs"].shape        # (256, 32, 32, 3): this process's rows of global batch 1000
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from depthlab.train import data as data_lib
from depthlab.train.optional import require
from depthlab.train.streaming.decode import read_decoded, stack_examples, takes_where
from depthlab.train.streaming.records import DataSourceError
from depthlab.train.streaming.sources import Source, TokenFile

_STEPS = 2 ** 62            # an "infinite" range of step numbers for Grain's MapDataset
_MAX_SKIPS = 16             # skip_bad_records: bad records in a row before giving up
_SEED_SALT = 0x5EED


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
        grain = require("grain", "stream", "streaming input")

        self.source, self.batch_size, self.rows = source, batch_size, rows
        self.decode, self.takes_where, self.transform = decode, takes_where(decode), transform
        self.skip_bad_records = bool(skip_bad_records)
        self.sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=grain_seed(seed),
                                                   num_epochs=None)

    def _read(self, keys: list[int]) -> list[dict]:
        return read_decoded(self.source, self.decode, self.takes_where, keys)

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
        self.takes_where, self.skip_bad_records = takes_where(decode), bool(skip_bad_records)

    def __call__(self, index: int) -> dict:
        n = len(self.source)
        idx = np.arange(index * self.batch_size, (index + 1) * self.batch_size)[self.rows]
        mask = (idx < n).astype(np.float32)
        keys = [int(k) for k in np.minimum(idx, n - 1)]
        read = lambda ks: read_decoded(self.source, self.decode, self.takes_where, ks)  # noqa: E731
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
    grain = require("grain", "stream", "streaming input")

    return grain.ReadOptions(num_threads=max(1, int(num_threads)), prefetch_buffer_size=max(1, int(buffer)))


def _pipeline(map_fn, start: int, stop: int, num_workers: int, num_threads: int, buffer: int) -> Callable:
    def make():
        grain = require("grain", "stream", "streaming input")

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


def stream_batches(source: Source, batch_size: int, seed: int, start_step: int = 0, *,
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
    batch_size, num_workers = data_lib.check_batch_size(batch_size), _check_workers(num_workers)
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
    examples = read_decoded(source, make.decode, make.takes_where, keys)
    stack_examples(examples, keys, source.where)


def stream_eval_batches(source: Source, batch_size: int, *, decode: Callable[[dict], dict] | None = None,
                        process_index: int | None = None, process_count: int | None = None, shard_options=None,
                        num_threads: int = 2, buffer: int = 2, max_batches: int | None = None,
                        skip_bad_records: bool = False) -> StreamIterator:
    """One pass over `source` in order: batches of `batch_size` rows with a `mask` (the last padded), as
    train.data.eval_batches gives for arrays; read by threads of this process (no worker start-up per
    evaluation). skip_bad_records: a bad record gets mask 0 (left out of the means) instead of stopping."""
    batch_size = data_lib.check_batch_size(batch_size)
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
    batch_size, num_workers = data_lib.check_batch_size(batch_size), _check_workers(num_workers)
    if len(tokens) <= context + 1:
        raise ValueError(f"{tokens.path} holds {len(tokens)} tokens, too few for context={context}; lower the "
                         f"context")
    rows = _rows(batch_size, process_index, process_count, shard_options)
    make = _TokenBatch(tokens, batch_size, int(context), rows, int(seed))
    return StreamIterator(_pipeline(make, int(start_step), _STEPS, num_workers, num_threads, buffer), num_workers)
