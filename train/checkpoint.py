"""Orbax checkpoints of any state pytree: save every N steps and on preemption, keep the last K and
the best by a metric, resume from the newest *readable* checkpoint into the current sharding.

The state is stored as a flat dict {"params.Dense_0.kernel": array, ...} so any pytree (TrainState,
a GAN's two-network state, an RL agent) round-trips, PRNG key arrays included, and restores onto any
device layout: the abstract target carries the shardings of the current mesh.

Example:
    >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3, best_metric="eval/accuracy")
    >>> ckpt.save(100, state, metrics={"eval/accuracy": 0.97})
    >>> state, step = ckpt.restore_latest(abstract_state)      # (None, None) when there is none
"""
from __future__ import annotations

import logging
import os
import time
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


class Checkpointer:
    """Orbax CheckpointManager with last-K and best-by-metric retention, and fallback on bad files."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"train.best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        policies = [cm.LatestN(n=max(1, int(keep)))]
        if best_metric:
            policies.append(cm.BestN(get_metric_fn=lambda metrics: float(metrics[best_metric]),
                                     reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, metrics: dict | None = None, meta: dict | None = None) -> None:
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(flatten_state(state)),
            meta=ocp.args.JsonSave(dict(meta or {}, step=int(step)))), metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_flat(abstract_state)),
            meta=ocp.args.JsonRestore()))
        return unflatten_state(abstract_state, dict(restored["state"])), dict(restored["meta"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int | None]:
        """Newest checkpoint that reads back; unreadable newer ones are skipped with a warning."""
        moved = False
        try:
            for step in reversed(self.all_steps()):
                try:
                    state, _ = self.restore(step, abstract_state)
                    return state, step
                except Exception as e:  # a truncated or corrupted checkpoint: try the one before it
                    aside = self._move_aside(step)
                    moved = True
                    log.warning("skipping checkpoint %s/%d: it could not be read (%s: %s); moved it to %s and "
                                "trying an older one", self.directory, step, type(e).__name__,
                                (str(e).splitlines() or [""])[0][:200], aside)
            return None, None
        finally:
            if moved:
                self.manager.reload()

    def _move_aside(self, step: int) -> str:
        """Renames an unreadable step folder out of Orbax's view (kept for inspection, never deleted)."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"unreadable-{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.isdir(source):
            os.replace(source, target)
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
