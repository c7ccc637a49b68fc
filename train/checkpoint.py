"""Orbax checkpoints of any state pytree: save every N steps and on preemption, keep the last K and
the best by a metric, resume from the newest *intact* checkpoint into the current sharding.

Trust, in order: a checkpoint folder is only ever one Orbax finalised (a kill mid-save leaves a tmp
folder Orbax discards); each carries an integrity record of its files' sizes and CRC32s
(`<step>/depthlab_integrity.json`; Orbax and TensorStore keep no checksums of their own) written into the
tmp folder just before Orbax's atomic rename, so no finalised checkpoint is without one. It is verified
before a restore. A checkpoint whose files fail that check, cannot be decoded, or hold anything but regular
files and folders (a FIFO would block a reader forever, a symlink may point nowhere) is *corrupt* and is
moved aside (`unreadable-<step>-<time>`, never deleted) in favour of an older one, but never the last one
left (unless `discard_last_corrupt`). A checkpoint with no record (written by an older depthlab, or its
record deleted) is *unverified*: never preferred over a verified one (a newer unverified one is moved to
`unverified-<step>-<time>` when an older verified one is restored), and restored only with a warning that
says so. Anything else that stops a restore is not corruption and stops the run with one line: a structure
or shape mismatch (`CheckpointMismatchError`: a different model or optimizer), a permission or I/O error.
A full disk at save time is one line too (`CheckpointWriteError`), with the previous checkpoint intact and
the half-written folder removed.

The state is stored as a flat dict {"params.Dense_0.kernel": array, ...} so any pytree (TrainState,
a GAN's two-network state, an RL agent) round-trips, PRNG key arrays included, and restores onto any
device layout: the abstract target carries the shardings of the current mesh.

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3, best_metric="eval/accuracy")
    >>> ckpt.save(100, state, metrics={"eval/accuracy": 0.97})
    >>> state, step = ckpt.restore_latest(abstract_state)      # (None, None) when there is none
"""
from __future__ import annotations

import asyncio
import errno
import glob
import json
import logging
import os
import shutil
import stat
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


RECORD_NAME = "depthlab_integrity.json"   # inside each step folder, part of Orbax's atomic commit
INTEGRITY_DIR = "integrity"   # older depthlab: records written after finalisation, checkpoints/integrity/<step>.json
# Files the rename step itself writes after the record (the step metadata's commit time, Orbax's commit
# marker): the record cannot hold their final bytes. The metadata (metrics for best-N, handler names; no
# state) is checked to parse; a change that keeps it valid JSON goes unnoticed and cannot alter the state.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _raise(error: OSError):
    raise error


def _checkpoint_files(step_dir: str) -> list[str]:
    """Relative paths of the regular files of a checkpoint folder, from directory entries only (no file is
    opened). Anything else in it is corruption: a FIFO blocks whoever opens it, a symlink may point nowhere
    or outside the run; neither is ever written by Orbax. Raises CheckpointCorruptError naming it."""
    files = []
    for root, dirs, names in os.walk(step_dir, onerror=_raise):
        for name in dirs + names:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                files.append(os.path.relpath(path, step_dir))
            elif not stat.S_ISDIR(mode):
                raise CheckpointCorruptError(f"{os.path.relpath(path, step_dir)} is a {_kind(mode)}, not a regular "
                                             f"file")
    return sorted(files)


def _file_manifest(step_dir: str, skip: tuple = ()) -> dict:
    """{relative path: [size, crc32]} of every file of a checkpoint folder but those named in `skip`."""
    return {name: [os.lstat(os.path.join(step_dir, name)).st_size, _crc32(os.path.join(step_dir, name))]
            for name in _checkpoint_files(step_dir) if name not in skip}


def _write_record(folder: str) -> None:
    """Writes `folder/depthlab_integrity.json`: the sizes and CRC32s of every file Orbax wrote into it."""
    record = {"files": _file_manifest(folder, skip=_COMMIT_FILES + (RECORD_NAME,))}
    with open(os.path.join(folder, RECORD_NAME), "w") as f:
        json.dump(record, f)


class _SealBeforeRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic rename of `<step>.orbax-checkpoint-tmp` to `<step>`, with the integrity record written
    into the tmp folder first: the record and the checkpoint become visible in one rename. Orbax calls
    `finalize` on the primary process once every process's writes are complete (sync and async saves), for
    each item folder (state/, meta/) and then for the step folder; only the step folder gets the record.
    `root` (the checkpoints directory) is set on a subclass per Checkpointer."""
    root = ""

    async def finalize(self, *args, **kwargs):
        if os.path.dirname(os.path.normpath(os.fspath(self.get_final()))) == self.root:
            await asyncio.to_thread(_write_record, os.fspath(self.get()))
        await super().finalize(*args, **kwargs)


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
            temporary_path_class=type("SealBeforeRename", (_SealBeforeRename,), {"root": self.directory}),
        )
        self._set_aside_non_regular()
        # Handlers named up front, so a fresh process can read a step's metadata before restoring it.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._saving: int | None = None
        self._needed_bytes = 0

    def _step_folders(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory)
                      if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)))

    def _set_aside_non_regular(self) -> None:
        """Before Orbax reads any step folder (it opens their metadata when it starts): a folder holding a FIFO,
        a symlink or another non-regular file is set aside, unless it is the only checkpoint (then it is left
        as it is and the run stops), so that nothing blocks on it or fails on a dangling link."""
        steps = self._step_folders()
        for step in list(steps):
            try:
                _checkpoint_files(os.path.join(self.directory, str(step)))
            except CheckpointCorruptError as e:
                if len(steps) == 1 and not self.discard_last_corrupt:
                    raise self._only_one_left(step, e) from None
                aside = self._move_aside(step)
                steps.remove(step)
                log.warning("skipping checkpoint %s/%d: it is corrupt (%s); moved it to %s", self.directory, step,
                            e, aside)

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
        self._saving = int(step)
        if not self.manager._options.enable_async_checkpointing:  # noqa: SLF001 (the option we set)
            self.wait()

    def _expected_size(self, flat: dict) -> int:
        """Bytes the next checkpoint needs: the newest one's size on disk (Orbax compresses), else the raw
        size of the arrays; with 5% and 64 KiB to spare for metadata."""
        size = int(sum(np.prod(np.shape(v)) * np.dtype(v.dtype).itemsize for v in flat.values()))
        steps = self.all_steps()
        if steps:
            step_dir = os.path.join(self.directory, str(steps[-1]))
            try:
                size = sum(os.lstat(os.path.join(step_dir, name)).st_size for name in _checkpoint_files(step_dir))
            except (CheckpointCorruptError, OSError):   # damaged since: its size says nothing, the raw size does
                pass
        return int(size * 1.05) + 2**16

    def wait(self) -> None:
        """Waits for a pending save (its integrity record is written inside Orbax's commit)."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            self._write_failed(self._saving if self._saving is not None else -1, e)
        self._saving = None
        self._drop_stale_records()

    def _drop_stale_records(self) -> None:
        """Removes older depthlab's records (checkpoints/integrity/<step>.json) of checkpoints retention deleted."""
        folder = os.path.join(self.directory, INTEGRITY_DIR)
        if jax.process_index() != 0 or not os.path.isdir(folder):
            return
        steps = set(self.all_steps())
        for name in os.listdir(folder):
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
        self._saving = None
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

    def _record_path(self, step: int) -> str | None:
        """The integrity record of checkpoint `step`: inside its folder, else an older depthlab's, else None."""
        for path in (os.path.join(self.directory, str(step), RECORD_NAME),
                     os.path.join(self.directory, INTEGRITY_DIR, f"{step}.json")):
            if os.path.lexists(path):
                return path
        return None

    def verify(self, step: int) -> bool:
        """Checks the files of checkpoint `step` against its integrity record. False: it has none (an older
        depthlab's checkpoint, or its record was deleted), so only its file types were checked. Raises
        CheckpointCorruptError on a difference, an unreadable record or a file that is not a regular file."""
        step_dir = os.path.join(self.directory, str(step))
        files = _checkpoint_files(step_dir)  # before anything is opened: a FIFO would block the reads below
        if _COMMIT_FILES[0] in files:        # not in the record (rewritten by the rename step): at least parsed
            try:
                with open(os.path.join(step_dir, _COMMIT_FILES[0]), "rb") as f:
                    if not isinstance(json.loads(f.read().decode("utf-8")), dict):
                        raise ValueError("not a JSON object")
            except ValueError as e:
                raise CheckpointCorruptError(f"its Orbax step metadata {_COMMIT_FILES[0]} is unreadable "
                                             f"({_first_line(e)})") from None
        path = self._record_path(step)
        if path is None:
            return False
        legacy = not path.startswith(step_dir + os.sep)
        if legacy and not stat.S_ISREG(os.lstat(path).st_mode):
            raise CheckpointCorruptError(f"its integrity record {path} is a {_kind(os.lstat(path).st_mode)}")
        try:
            with open(path, "rb") as f:
                expected = json.loads(f.read().decode("utf-8"))["files"]
            if not isinstance(expected, dict):
                raise TypeError(f"'files' is a {type(expected).__name__}")
        except (ValueError, KeyError, TypeError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointCorruptError(f"its integrity record {path} is unreadable ({_first_line(e)})") from None
        actual = _file_manifest(step_dir, skip=() if legacy else _COMMIT_FILES + (RECORD_NAME,))
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
        """(state, meta) of checkpoint `step`, checked against its integrity record (restored with a warning
        when it has none) and the run's state structure."""
        try:
            verified = self.verify(step)
        except OSError as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} could not be read ({e.strerror or e}); it "
                                  f"was left as it is: fix the permissions or the storage and run again") from None
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
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(expected), meta=ocp.args.JsonRestore()))
        except OSError as e:      # permissions, storage: not the checkpoint's fault, nothing is moved
            raise CheckpointError(f"checkpoint {self.directory}/{step} could not be read ({e.strerror or e}); it "
                                  f"was left as it is: fix the permissions or the storage and run again") from None
        except ValueError as e:   # TensorStore could not decode its bytes
            raise CheckpointCorruptError(_first_line(e)) from None
        if not verified:
            log.warning("restored checkpoint %s/%d UNVERIFIED: it has no integrity record (%s is missing: an older "
                        "depthlab wrote it, or the record was deleted), so a changed byte in it cannot be detected",
                        self.directory, step, RECORD_NAME)
        return unflatten_state(abstract_state, dict(restored["state"])), dict(restored["meta"] or {})

    def _only_one_left(self, step: int, error: Exception) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"checkpoint {self.directory}/{step} is corrupt ({error}) and it is the only one left, so it was not "
            f"moved. Inspect it, or pass --config.train.allow_discard_last_checkpoint=true to set it aside and "
            f"start over")

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
        """(state, step) of the newest intact checkpoint, (None, None) when there is none. Verified checkpoints
        are tried first, newest first, then unverified ones (no integrity record). Corrupt ones are moved aside
        with a warning, except the last one left (CheckpointCorruptError, unless `discard_last_corrupt`); an
        unverified one newer than the restored step is moved aside too (the run re-does those steps); a
        mismatch or an I/O error raises at once and moves nothing."""
        steps = self.all_steps()
        left = set(steps)
        sealed = {step for step in steps if self._record_path(step) is not None}
        order = sorted(sealed, reverse=True) + sorted(left - sealed, reverse=True)
        moved = False
        try:
            for step in order:
                try:
                    state, _ = self.restore(step, abstract_state)
                except CheckpointCorruptError as e:
                    if len(left) == 1 and not self.discard_last_corrupt:
                        raise self._only_one_left(step, e) from None
                    aside = self._move_aside(step)
                    left.discard(step)
                    moved = True
                    log.warning("skipping checkpoint %s/%d: it is corrupt (%s); moved it to %s and trying an older "
                                "one", self.directory, step, e, aside)
                    continue
                for newer in sorted(s for s in left if s > step):
                    aside = self._move_aside(newer, "unverified")
                    moved = True
                    log.warning("skipping checkpoint %s/%d: it has no integrity record, so the verified checkpoint "
                                "of step %d was restored instead; moved it to %s", self.directory, newer, step, aside)
                return state, step
            return None, None
        finally:
            if moved:
                self.manager.reload()

    def _move_aside(self, step: int, why: str = "unreadable") -> str:
        """Renames a step folder out of Orbax's view (kept for inspection, never deleted), with its older
        depthlab record if it has one."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"{why}-{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.isdir(source):
            os.replace(source, target)
            legacy = os.path.join(self.directory, INTEGRITY_DIR, f"{step}.json")
            if os.path.lexists(legacy):
                os.replace(legacy, os.path.join(target, "depthlab_integrity.legacy.json"))
        return target

    def close(self) -> None:
        self.wait()
        self.manager.close()


def open_checkpoints(workdir: str | os.PathLike, config) -> Checkpointer:
    """The Checkpointer of a run directory (`workdir/checkpoints`) as config.train sets it up: keep, the best
    metric and its mode, async saves, and whether a corrupt only-checkpoint may be set aside. config.train
    holds every key of `default_train_config()` (`fit` merges it; experiment configs start from it)."""
    tc = config.train
    return Checkpointer(os.path.join(os.fspath(workdir), "checkpoints"), keep=int(tc.keep),
                        best_metric=tc.best_metric or None, best_mode=tc.best_mode,
                        async_save=bool(tc.async_checkpoint),
                        discard_last_corrupt=bool(tc.allow_discard_last_checkpoint))
