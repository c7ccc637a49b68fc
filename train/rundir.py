"""The run directory (`fit`'s phase after its checks and `place`): writable, with room for checkpoints, one
writer at a time, and the config that made it.

`open_run(workdir, config)` does, before anything else is written: a write probe and a free-space check, an
exclusive lock (`workdir/.lock`, released by the OS when the holder dies, so a stale lock never blocks a
restart), then, under that lock, the comparison with the directory's `config.json` and its (atomic) rewrite,
and `experiment.json` (what made the run) when a record is given. A second command on the same directory
stops at once with the holder's host and PID.

Example:
    >>> with open_run("runs/a", config):      # raises RunLockedError / ConfigMismatchError
    ...     ...                               # train; the lock is released on exit
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any

import jax
import ml_collections


class ConfigMismatchError(ValueError):
    """The run directory was created by a different config."""


class RunLockedError(RuntimeError):
    """Another process is writing to this run directory."""


# Keys that may change between a run and its resumption without changing what is computed. Not among them:
# train.steps_per_call and train.scan_unroll. k steps in a `lax.scan` are not bit-identical to k single steps:
# XLA compiles a loop body apart, and XLA:CPU runs a convolution inside a rolled loop with another kernel
# (digits_cnn, 48 steps: k=8 rolled ends 1.45e-07 away from k=1 in its parameters; k=8 fully unrolled and the
# MLP were equal there, which no backend promises). A run resumes with the k it was started with.
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.progress", "train.tensorboard", "train.prefetch", "train.allow_config_change",
    "train.async_checkpoint", "train.min_free_mb", "train.keep", "train.log_every", "train.compilation_cache",
    "train.max_calls_in_flight", "train.allow_discard_last_checkpoint", "train.max_skipped_fraction",
    "train.plot"})


def flat_config(tree: Any, prefix: str = "") -> dict:
    """{"a.b.c": value} of a nested dict (a ConfigDict's `to_dict()` or a parsed config.json)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def read_json_object(path: str) -> dict | None:
    """The JSON object in the run file `path`; None when there is none. Raises OSError or ValueError (JSON and
    UTF-8 errors are ValueErrors) for a file that is not a regular file (a FIFO would block the read; a
    directory or dangling link fails raw) or does not hold a JSON object."""
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise ValueError("not a regular file")
    with open(path, "rb") as f:
        value = json.loads(f.read().decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def read_config(workdir: str) -> dict | None:
    """The parsed `config.json` of a run directory (None if absent); a broken file is one clear error."""
    path = os.path.join(workdir, "config.json")
    try:
        return read_json_object(path)
    except (OSError, ValueError) as e:    # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ConfigMismatchError(
            f"{path} cannot be read ({reason}); restore it from a backup, or move it away to continue the run "
            f"with the current config") from None


class RunLock:
    """An exclusive `flock` on `workdir/.lock`, holding the owner's host and PID. Only process 0 of a
    multi-process job takes it (once for the job). The OS drops the lock when its process dies."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if jax.process_index() != 0 or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            with open(self.path) as f:
                holder = f.read().strip() or "an unknown process"
            raise RunLockedError(
                f"run directory {os.path.dirname(self.path)!r} is in use by {holder}; wait for it to finish, "
                f"stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _check_writable(workdir: str, min_free_mb: float) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"run directory {workdir!r} is not writable ({e.strerror}); choose another "
                              f"--workdir or fix its permissions") from None
    free_mb = shutil.disk_usage(workdir).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"only {free_mb:.0f} MB free in {workdir!r}; training needs at least {min_free_mb:.0f} MB "
                      f"for checkpoints (train.min_free_mb). Free some space or choose another --workdir")


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a run directory whose config.json differs from `config` in a key that changes what is
    computed (unless train.allow_config_change)."""
    saved = read_config(workdir)
    if saved is None or config.get("train", {}).get("allow_config_change", False):
        return
    old, new = flat_config(saved), flat_config(json.loads(config.to_json_best_effort()))
    diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if diffs:
        shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} (saved) vs {new.get(k, '<absent>')!r} (now)"
                          for k in diffs[:5])
        raise ConfigMismatchError(
            f"run directory {workdir!r} was created by a different config ({shown}). Use a new --workdir, "
            f"or pass --config.train.allow_config_change=true to continue it with the new config")


def _write_atomically(path: str, text: str) -> None:
    """A kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json atomically."""
    if jax.process_index() == 0:
        _write_atomically(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))


def write_record(workdir: str, record: dict) -> None:
    """Writes experiment.json atomically: what made the run ({"experiment": name, "preset": preset}), from
    which `depthlab eval` and `depthlab report` rebuild it."""
    if jax.process_index() == 0:
        _write_atomically(os.path.join(workdir, "experiment.json"), json.dumps(record))


def open_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict, record: dict | None = None) -> RunLock:
    """Checks, locks and records the run directory; returns the held lock (release it, or use `with`).

    The config check and the writes of config.json (and of `record` as experiment.json) happen under the
    lock, so two commands can never both pass the check and then write."""
    workdir = os.path.abspath(os.fspath(workdir))
    _check_writable(workdir, float(config.get("train", {}).get("min_free_mb", 64)))
    lock = RunLock(workdir).acquire()
    try:
        if jax.process_index() == 0:
            check_config(workdir, config)
            write_config(workdir, config)
            if record is not None:
                write_record(workdir, record)
    except BaseException:
        lock.release()
        raise
    return lock
