"""Generic input pipeline pieces: shuffled epoch iterators over in-memory arrays, eval batches with a
padding mask, per-process slicing, global arrays from process-local data, and device prefetch.

The training iterator is a pure function of (seed, start_step): a resumed run sees exactly the batches
an uninterrupted run would have seen, so the iterator's state is just the step and needs no checkpoint
of its own.

Example:
    >>> batches = epoch_batches({"inputs": x, "labels": y}, batch_size=128, seed=0, start_step=0)
    >>> batch = next(batches)          # {"inputs": [128, ...], "labels": [128]}
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

Batch = dict


def check_arrays(arrays: dict, what: str = "training") -> int:
    """The number of examples of a dict of equal-length arrays; one clear error when they are empty,
    disagree in length, or hold NaN/inf (which would otherwise surface as a 'non-finite loss')."""
    if not arrays:
        raise ValueError(f"no {what} arrays given: pass a dict such as {{'inputs': x, 'labels': y}}")
    sizes = {k: len(v) if np.ndim(v) else 0 for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the {what} arrays disagree on the number of examples: {sizes}; give every array one "
                         f"row per example")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"the {what} arrays are empty ({', '.join(sizes)}); check the data files or the split")
    for key, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            bad = int(np.sum(~np.all(np.isfinite(value.reshape(n, -1)), axis=1)))
            raise ValueError(f"{what} array {key!r} holds NaN or inf in {bad} of its {n} examples; drop those "
                             f"rows or replace the values (np.nan_to_num) before training")
    return n


def check_batch_size(batch_size) -> int:
    """`batch_size` as an int; one clear error when it is not a positive integer (bools are not)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}; set data.batch_size (e.g. 64)")
    return int(batch_size)


def process_slice(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """Rows of a global batch that this process loads (each process loads only its share)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes; "
                         f"choose a multiple of {process_count}")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def epoch_batches(arrays: dict, batch_size: int, seed: int, start_step: int = 0,
                  transform: Callable[[Batch, np.random.Generator], Batch] | None = None,
                  process_local: bool = True) -> Iterator[Batch]:
    """Infinite iterator of shuffled batches; epoch e uses the permutation seeded by (seed, e).

    Incomplete final batches of an epoch are dropped so every batch has `batch_size` rows.
    `transform(batch, rng)` (e.g. augmentation) gets a numpy Generator seeded by (seed, step).
    With `process_local`, each process yields only its rows of the global batch.
    """
    n, batch_size = check_arrays(arrays, "training"), check_batch_size(batch_size)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples; lower data.batch_size")
    rows = process_slice(batch_size) if process_local else slice(0, batch_size)
    return _epochs(arrays, n, batch_size, rows, seed, start_step, transform)   # checked now, not at first next()


def _epochs(arrays, n, batch_size, rows, seed, start_step, transform) -> Iterator[Batch]:
    steps_per_epoch = n // batch_size
    step = start_step
    epoch, perm = -1, None
    while True:
        e, i = divmod(step, steps_per_epoch)
        if e != epoch:
            epoch, perm = e, np.random.default_rng([seed, e]).permutation(n)
        idx = perm[i * batch_size:(i + 1) * batch_size][rows]
        batch = {k: v[idx] for k, v in arrays.items()}
        if transform is not None:
            batch = transform(batch, np.random.default_rng([seed, 1_000_003, step]))
        yield batch
        step += 1


def eval_batches(arrays: dict, batch_size: int, process_local: bool = True) -> Iterator[Batch]:
    """Finite pass over `arrays` in order. Every batch has `batch_size` rows and a `mask` (1 real,
    0 padding): the last batch is padded so one compiled eval step serves all, and masked means stay exact.
    """
    n, batch_size = check_arrays(arrays, "evaluation"), check_batch_size(batch_size)
    rows = process_slice(batch_size) if process_local else slice(0, batch_size)
    return _padded_pass(arrays, n, batch_size, rows)


def _padded_pass(arrays, n, batch_size, rows) -> Iterator[Batch]:
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["mask"] = mask
        yield {k: v[rows] for k, v in batch.items()}


def first_batch(batches: Iterable[Batch]) -> Batch:
    """The first batch of `batches` (e.g. `experiment.train_batches(0)`), closing the iterator after it (a
    streaming source's worker processes stop): what shape checks and AOT compiles read."""
    iterator = iter(batches)
    try:
        return next(iterator)
    finally:
        close = getattr(iterator, "close", None) or getattr(batches, "close", None)
        if close is not None:
            close()


def batch_spec(batch: Batch, sharding: jax.sharding.Sharding | None = None) -> Batch:
    """The batch as ShapeDtypeStructs (carrying `sharding` when given): what shape checks, traces and AOT
    compiles take instead of the arrays."""
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=sharding), batch)


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> Batch:
    """Process-local numpy batch -> global jax.Arrays laid out by `sharding` (works multi-host).

    In one process the local batch is the global one: a single `jax.device_put` of the whole dict (one
    batched C++ transfer) replaces a `make_array_from_process_local_data` per array."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def prefetch_to_device(batches: Iterable[Batch], sharding: jax.sharding.Sharding, size: int = 2) -> Iterator[Batch]:
    """Moves batches to devices `size` ahead of use, from a background thread, so the host's batch
    assembly and the host-to-device copy overlap the running step.

    `size=0`: no thread. In one process the numpy batches then pass through unchanged, and the jitted step
    (whose `in_shardings` lay them out) transfers them in its C++ dispatch, which costs less than a Python
    `jax.device_put` per batch (what a hand-written loop does too); with several processes each becomes a
    global array here.
    """
    if size <= 0:
        if jax.process_count() == 1:
            yield from batches
            return
        for batch in batches:
            yield to_global(batch, sharding)
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                buffer.put(to_global(batch, sharding))
            buffer.put(done)
        except BaseException as e:  # surfaced in the consumer
            buffer.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Unblock and end the producer so no thread (holding device arrays) outlives the run.
        stop.set()
        while thread.is_alive():
            while not buffer.empty():
                buffer.get_nowait()
            thread.join(timeout=0.05)
