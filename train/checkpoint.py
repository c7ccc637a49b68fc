"""Orbax checkpoints of any state pytree: save every N steps and on preemption, keep the last K and
the best by a metric, resume from the newest *intact* checkpoint into the current sharding.

Trust, in order: a checkpoint folder is only ever one Orbax finalised (a kill mid-save leaves a tmp
folder Orbax discards); each finalised checkpoint gets a manifest of its files' sizes and CRC32s
(`checkpoints/integrity/<step>.json`, Orbax and TensorStore keep no checksums of their own), verified
before a restore; a checkpoint whose files fail that check or cannot be decoded is *corrupt* and is moved
aside (`unreadable-<step>-<time>`, never deleted) in favour of an older one, but never the last one left
(unless `discard_last_corrupt`). Anything else that stops a restore is not corruption and stops the run
with one line: a structure or shape mismatch (`CheckpointMismatchError`: a different model or optimizer),
a permission or I/O error. A full disk at save time is one line too (`CheckpointWriteError`), with the
previous checkpoint intact and the half-written folder removed.

The state is stored as a flat dict {"params.Dense_0.kernel": array, ...} so any pytree (TrainState,
a GAN's two-network state, an RL agent) round-trips, PRNG key arrays included, and restores onto any
device layout: the abstract target carries the shardings of the current mesh.

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3, best_metric="eval/accuracy")
    >>> ckpt.save(100, state, metrics={"eval/accuracy": 0.97})
    >>> state, step = ckpt.restore_latest(abstract_state)      # (None, None) when there is none
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger("depthlab")


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) or "root"


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(state: Any) -> dict:
    """{dotted path: array}; typed PRNG keys become their raw uint32 data."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    flat = {}
    for path, leaf in leaves:
        flat[_path_name(path)] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return flat


def _abstract_flat(abstract_state: Any) -> dict:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        sharding = getattr(leaf, "sharding", None)
        if _is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            if sharding is not None:
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            flat[_path_name(path)] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        else:
            flat[_path_name(path)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return flat


def unflatten_state(abstract_state: Any, flat: dict) -> Any:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    leaves = []
    for path, leaf in leaves_with_path:
        name = _path_name(path)
        if name not in flat:
            raise KeyError(f"checkpoint has no entry {name!r}: it was written by a different model or "
                           f"optimizer; use a new --workdir")
        value = flat[name]
        if _is_key(leaf):
            value = jax.random.wrap_key_data(value)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint holds a different structure (model, optimizer) than the run's state."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's files fail their integrity check or cannot be decoded."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a permission error)."""

    def __str__(self) -> str:
        return str(self.strerror)


INTEGRITY_DIR = "integrity"


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_manifest(step_dir: str) -> dict:
    """{relative path: [size, crc32]} of every file of a finalised checkpoint folder."""
    files = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, step_dir)] = [os.path.getsize(path), _crc32(path)]
    return files


def _first_difference(saved: dict, expected: dict) -> str | None:
    """The first entry whose presence, shape or dtype differs between a checkpoint and the run's state."""
    for name in sorted(set(saved) | set(expected)):
        if name not in saved:
            return f"the run's state has {name!r} {tuple(expected[name].shape)}, the checkpoint has no such entry"
        if name not in expected:
            return f"the checkpoint has {name!r} {tuple(saved[name].shape)}, the run's state has no such entry"
        a, b = saved[name], expected[name]
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
            return (f"{name!r} is {np.dtype(a.dtype).name}{list(a.shape)} in the checkpoint but "
                    f"{np.dtype(b.dtype).name}{list(b.shape)} in the run's state")
    return None


class Checkpointer:
    """Orbax CheckpointManager with last-K and best-by-metric retention, integrity manifests, and a restore
    that tells corruption (fall back to an older checkpoint) from a mismatch or an I/O error (stop)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, discard_last_corrupt: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.discard_last_corrupt = discard_last_corrupt
        policies = [cm.LatestN(n=max(1, int(keep)))]
        best_fn = None
        if best_metric:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            # best_fn makes Orbax write each step's metrics to disk, so that the best checkpoint is still
            # known (and kept) after a restart; without it BestN ranks nothing once the process is gone.
            best_fn=best_fn, best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        # Handlers named up front, so a fresh process can read a step's metadata before restoring it.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._unsealed: list[int] = []
        self._needed_bytes = 0

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # --- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: dict | None = None, meta: dict | None = None) -> None:
        """Saves `state` at `step` (asynchronously if so configured; the previous save is sealed first)."""
        self.wait()
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        flat = flatten_state(state)
        self._needed_bytes = self._expected_size(flat)
        if shutil.disk_usage(self.directory).free < self._needed_bytes:   # refuse before Orbax writes anything
            self._write_failed(int(step), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        try:
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat),
                meta=ocp.args.JsonSave(dict(meta or {}, step=int(step)))), metrics=metrics, force=True)
        except (OSError, ValueError) as e:
            self._write_failed(int(step), e)
        self._unsealed.append(int(step))
        if not self.manager._options.enable_async_checkpointing:  # noqa: SLF001 (the option we set)
            self.wait()

    def _expected_size(self, flat: dict) -> int:
        """Bytes the next checkpoint needs: the newest one's size on disk (Orbax compresses), else the raw
        size of the arrays; with 5% and 64 KiB to spare for metadata."""
        steps = self.all_steps()
        if steps:
            size = sum(sum(os.path.getsize(os.path.join(root, f)) for f in files)
                       for root, _, files in os.walk(os.path.join(self.directory, str(steps[-1]))))
        else:
            size = int(sum(np.prod(np.shape(v)) * np.dtype(v.dtype).itemsize for v in flat.values()))
        return int(size * 1.05) + 2**16

    def wait(self) -> None:
        """Waits for a pending save and writes the integrity manifest of every checkpoint it finalised."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            self._write_failed(self._unsealed[-1] if self._unsealed else -1, e)
        self._seal()

    def _seal(self) -> None:
        if jax.process_index() != 0:
            self._unsealed.clear()
            return
        folder = os.path.join(self.directory, INTEGRITY_DIR)
        os.makedirs(folder, exist_ok=True)
        steps = set(self.all_steps())
        for step in self._unsealed:
            step_dir = os.path.join(self.directory, str(step))
            if step in steps and os.path.isdir(step_dir):
                tmp = os.path.join(folder, f".{step}.json.tmp")
                with open(tmp, "w") as f:
                    json.dump({"step": step, "files": _file_manifest(step_dir)}, f)
                os.replace(tmp, os.path.join(folder, f"{step}.json"))
        self._unsealed.clear()
        for name in os.listdir(folder):   # manifests of checkpoints the retention policy deleted
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) not in steps:
                os.remove(os.path.join(folder, name))

    def _write_failed(self, step: int, error: Exception) -> None:
        """A failed save: the half-written folder goes, the previous checkpoints stay, one line says why.
        TensorStore reports a full disk as a ValueError (RESOURCE_EXHAUSTED ... os_error_code='28')."""
        no_space = getattr(error, "errno", None) == errno.ENOSPC or any(
            text in str(error) for text in ("No space left", "os_error_code='28'"))
        if not no_space and not isinstance(error, OSError):
            raise error
        for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(tmp, ignore_errors=True)
        self._unsealed = [s for s in self._unsealed if s != step]
        last = [s for s in self.all_steps() if s != step]
        kept = f"the last checkpoint (step {last[-1]}) is intact" if last else "no earlier checkpoint exists"
        if no_space:
            free = shutil.disk_usage(self.directory).free / 2**20
            raise CheckpointWriteError(
                errno.ENOSPC, f"no space left to write the checkpoint of step {step} in {self.directory}: it needs "
                f"about {self._needed_bytes / 2**20:.1f} MB and {free:.1f} MB are free; {kept}. Free some space "
                f"and run the same command to resume") from None
        raise CheckpointWriteError(error.errno, f"could not write the checkpoint of step {step} in "
                                   f"{self.directory} ({error.strerror or error}); {kept}") from None

    # --- restoring ------------------------------------------------------------------------------

    def verify(self, step: int) -> bool:
        """Checks the files of checkpoint `step` against its manifest (False: it has none, e.g. the process
        was killed between finalising and sealing it); raises CheckpointCorruptError on a difference."""
        path = os.path.join(self.directory, INTEGRITY_DIR, f"{step}.json")
        if not os.path.exists(path):
            return False
        try:
            with open(path) as f:
                expected = json.load(f)["files"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointCorruptError(f"its integrity manifest {path} is unreadable ({e})") from None
        actual = _file_manifest(os.path.join(self.directory, str(step)))
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                raise CheckpointCorruptError(f"file {name} is missing")
            if name not in expected:
                raise CheckpointCorruptError(f"file {name} was not part of it when it was written")
            if list(actual[name]) != list(expected[name]):
                raise CheckpointCorruptError(f"file {name} changed since it was written (size, CRC32 "
                                             f"{actual[name]} vs {expected[name]})")
        return True

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, checked against its manifest and the run's state structure."""
        expected = _abstract_flat(abstract_state)
        try:
            saved = dict(self.manager.item_metadata(int(step))["state"].tree)
        except ValueError as e:   # its metadata files cannot be parsed (JSON or TensorStore decode errors)
            raise CheckpointCorruptError(f"its metadata cannot be read ({_first_line(e)})") from None
        difference = _first_difference(saved, expected)
        if difference:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written by a different model or optimizer: {difference}. "
                f"Use a new --workdir, or the config that wrote it (its config.json)")
        self.verify(step)
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(expected), meta=ocp.args.JsonRestore()))
        except OSError as e:      # permissions, storage: not the checkpoint's fault, nothing is moved
            raise CheckpointError(f"checkpoint {self.directory}/{step} could not be read ({e.strerror or e}); it "
                                  f"was left as it is: fix the permissions or the storage and run again") from None
        except ValueError as e:   # TensorStore could not decode its bytes
            raise CheckpointCorruptError(_first_line(e)) from None
        return unflatten_state(abstract_state, dict(restored["state"])), dict(restored["meta"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
        """(state, step) of the newest intact checkpoint, (None, None) when there is none. Corrupt newer ones
        are moved aside with a warning, except the last one left (CheckpointCorruptError, unless
        `discard_last_corrupt`); a mismatch or an I/O error raises at once and moves nothing."""
        moved = False
        try:
            steps = self.all_steps()
            for i in reversed(range(len(steps))):
                step = steps[i]
                try:
                    state, _ = self.restore(step, abstract_state)
                    return state, step
                except CheckpointCorruptError as e:
                    if i == 0 and not self.discard_last_corrupt:
                        raise CheckpointCorruptError(
                            f"checkpoint {self.directory}/{step} is corrupt ({e}) and it is the only one left, so "
                            f"it was not moved. Inspect it, or pass "
                            f"--config.train.allow_discard_last_checkpoint=true to set it aside and start over"
                        ) from None
                    aside = self._move_aside(step)
                    moved = True
                    log.warning("skipping checkpoint %s/%d: it is corrupt (%s); moved it to %s and trying an older "
                                "one", self.directory, step, e, aside)
            return None, None
        finally:
            if moved:
                self.manager.reload()

    def _move_aside(self, step: int) -> str:
        """Renames a corrupt step folder out of Orbax's view (kept for inspection, never deleted)."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"unreadable-{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.isdir(source):
            os.replace(source, target)
            manifest = os.path.join(self.directory, INTEGRITY_DIR, f"{step}.json")
            if os.path.exists(manifest):
                os.replace(manifest, os.path.join(target, "depthlab_integrity.json"))
        return target

    def close(self) -> None:
        self.wait()
        self.manager.close()
