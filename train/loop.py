"""`fit(experiment, config, workdir)`: the one training loop of depthlab, as named phases.

    check_experiment the train values in their domains, the data, `init` and `train_step` traced: nothing written
    place            the device mesh and where every leaf of the state and of a batch lives
    open_run         the run directory: writable, locked to one writer, its config checked and recorded
    restore_or_init  the newest intact checkpoint, or a fresh state initialised directly in its sharding
    compile_steps    the jitted train step (k steps per call with `lax.scan`) and eval step
    train_loop       the steps, with the periodic actions: log, evaluate, checkpoint, preemption
    finish_run       the experiment's own `finish` (plots, samples), curves.png and summary.json

`config.train` is merged onto `default_train_config()` once, by `resolved_train_config`, at the top of
`fit`; the phases read its keys bare. Each phase is a public function a user can call alone: `depthlab eval`
is `place` + `restore_or_init` + `compile_steps` + `evaluate_state`. An experiment is any `Experiment`:
supervised ones build their step with `train.step`, a GAN or an RL agent brings its own pure
`train_step(state, batch)` (RL collects its own data: `train_batches=None`).

Example:
    >>> experiment = Experiment(init=init, train_step=train_step, train_batches=batches,
    ...                         eval_step=eval_step, eval_batches=eval_batches)
    >>> result = fit(experiment, config, "runs/a")
    >>> result.metrics["eval/accuracy"], result.summary["plot"]      # the final evaluation, curves.png
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from depthlab.train import data as data_lib
from depthlab.train import parallel
from depthlab.train.checkpoint import Checkpointer, open_checkpoints  # noqa: F401 (re-exported)
from depthlab.train.metric_writers import (MetricWriter, final_metrics, format_metrics, plot_curves, read_metrics,
                                           result_line, truncate_metrics)
from depthlab.train.step import PRNG_IMPLS, resolve_prng_impl, with_prng_impl
from depthlab.train.rundir import ConfigMismatchError, RunLockedError, open_run, read_json_object  # noqa: F401 (re-exported)

log = logging.getLogger("depthlab")


class NonFiniteError(FloatingPointError):
    """A training metric (loss, gradient norm, ...) or the updated state became NaN or infinite."""


class BatchSpecError(ValueError):
    """A data batch does not have the shape or dtype of the others."""


@dataclasses.dataclass
class Experiment:
    """What `fit` needs to train something. Only `init` and `train_step` are required.

    init(rng) -> state: any pytree with a `.step` (usually a TrainState); may carry Flax logical
        partitioning boxes, which decide its sharding.
    train_step(state, batch) -> (state, metrics): pure and jittable; metrics a dict of scalars.
    train_batches(start_step) -> iterator of dicts of numpy arrays (leading dim = the global batch,
        or this process's rows of it); None when the step makes its own data (RL).
    eval_step(state, batch) -> metrics (per-batch means); eval_batches() -> iterable of batches.
        A batch's `mask` entry (1 real, 0 padding) weights the mean over batches.
    evaluate(state) -> dict: host-side evaluation (sample quality, returns); logged as eval/<name>.
    finish(state, workdir) -> dict: after training (plots, samples); saved to summary.json.
    """

    init: Callable[[jax.Array], Any]
    train_step: Callable[[Any, Any], tuple[Any, dict]]
    train_batches: Callable[[int], Iterator[dict]] | None = None
    eval_step: Callable[[Any, dict], dict] | None = None
    eval_batches: Callable[[], Iterable[dict]] | None = None
    evaluate: Callable[[Any], dict] | None = None
    finish: Callable[[Any, str], dict] | None = None


@dataclasses.dataclass
class FitResult:
    state: Any
    metrics: dict            # the last metrics.jsonl record merged with the final evaluation
    workdir: str
    summary: dict = dataclasses.field(default_factory=dict)
    preempted_by: str | None = None   # "SIGTERM" / "SIGINT" / "stop" (fit's stop=) when it stopped early

    @property
    def preempted(self) -> bool:
        return self.preempted_by is not None


def default_train_config() -> ml_collections.ConfigDict:
    """Every key `fit` reads under config.train."""
    return ml_collections.ConfigDict({
        "steps": 1000,
        "log_every": 50,
        "eval_every": 500,          # 0: only at the end
        "checkpoint_every": 500,    # 0: only at the end (and on SIGTERM/SIGINT)
        "keep": 3,                  # checkpoints kept besides the best
        "best_metric": "",          # e.g. "eval/accuracy": also keep the best checkpoint by it
        "best_mode": "max",
        "progress": True,           # progress bar
        "tensorboard": True,
        "plot": True,               # curves.png at the end of the run (a sweep's scratch group needs none)
        "nonfinite": "stop",        # "stop": raise with the step number; "skip": drop that update
        "max_skipped_fraction": 0.1,  # nonfinite=skip: stop once more than this share of the steps was dropped
        "prefetch": -1,             # batches moved to devices ahead of use by a thread (0 disables); -1: 2 on
                                    # accelerators, 0 on CPU devices (the host is the device there: the thread
                                    # only competes with the step for the cores and the GIL)
        "steps_per_call": 1,        # k > 1: k steps per jitted call (lax.scan over a [k, batch, ...] block)
        "scan_unroll": 1,           # steps unrolled per scan iteration (k: fully; helps convolutions on CPU)
        "prng_impl": "auto",        # the step's random numbers (dropout): "auto" = threefry_materialized on TPU (the
                                    # same bits, hashed once: dropout steps compile ~2.5x faster), threefry elsewhere;
                                    # or threefry, threefry_materialized, rbg, unsafe_rbg (train/step.py)
        "max_calls_in_flight": 2,   # dispatched calls not yet finished (bounds device queues and memory)
        "async_checkpoint": True,
        "allow_config_change": False,  # resume a run directory whose config.json differs
        "allow_discard_last_checkpoint": False,  # set a corrupt only-checkpoint aside and start over
        "min_free_mb": 64,          # refuse to start with less free disk in the run directory
        "compilation_cache": "",    # a folder for JAX's persistent compilation cache (faster restarts);
                                    # the environment variable DEPTHLAB_COMPILATION_CACHE does the same
    })


def default_mesh_config() -> ml_collections.ConfigDict:
    """Every key `fit` reads under config.mesh (see train/parallel.py)."""
    return ml_collections.ConfigDict({
        "data": -1, "fsdp": 1, "tensor": 1,
        "strategy": "replicated",     # or "fsdp": shard un-annotated parameters over the fsdp axis
        "fsdp_min_size": 1024,
    })


def _merged(config: ml_collections.ConfigDict, section: str, defaults: ml_collections.ConfigDict
            ) -> ml_collections.ConfigDict:
    """config[section] (absent: {}) over `defaults`; a key the defaults lack fails, naming the valid ones."""
    given = config.get(section) or {}
    unknown = sorted(set(given.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"unknown config key '{section}.{unknown[0]}'; valid keys under {section}: "
                         f"{', '.join(sorted(defaults.keys()))}")
    given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
    return ml_collections.ConfigDict({**defaults.to_dict(), **given})


def resolved_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.train merged onto `default_train_config()`: every key present, so it is read bare. A key the
    defaults do not have fails, naming the valid ones."""
    return _merged(config, "train", default_train_config())


def resolved_mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.mesh (absent: all defaults) merged onto `default_mesh_config()`; unknown keys fail."""
    return _merged(config, "mesh", default_mesh_config())


def with_resolved_train(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `train` is `resolved_train_config(config)` (what `fit` runs and records)."""
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        resolved.train = resolved_train_config(config)
    if config.is_locked:
        resolved.lock()                       # a typo'd key still fails in the copy
    return resolved


def enable_compilation_cache(directory: str | None) -> bool:
    """Turns on JAX's persistent compilation cache in `directory` (compiled steps reused across runs).
    An empty value or "off" leaves JAX's config alone."""
    if not directory or directory.lower() in ("off", "0", "false", "none"):
        return False
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


# ==============================================================================================
# Placement: the mesh, and where the state and the batches live
# ==============================================================================================

@dataclasses.dataclass(frozen=True)
class Placement:
    mesh: jax.sharding.Mesh
    abstract_state: Any          # the unboxed state as ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    local_shards: int            # data shards of this process: its batch rows must divide by it


def place(experiment: Experiment, config: ml_collections.ConfigDict,
          mesh: jax.sharding.Mesh | None = None) -> Placement:
    """The mesh from config.mesh (unless given) and the shardings of the state `experiment.init` builds."""
    mesh_cfg = resolved_mesh_config(config)
    if mesh is None:
        mesh = parallel.make_mesh({k: mesh_cfg[k] for k in parallel.MESH_AXES})
    boxed = jax.eval_shape(experiment.init, jax.random.key(int(config.seed)))
    shardings = parallel.state_shardings(boxed, mesh, strategy=mesh_cfg.strategy,
                                         fsdp_min_size=int(mesh_cfg.fsdp_min_size))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    local_shards = max(1, (mesh.shape["data"] * mesh.shape["fsdp"]) // jax.process_count())
    return Placement(mesh, abstract, shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh),
                     local_shards)


def restore_or_init(experiment: Experiment, config: ml_collections.ConfigDict, placement: Placement,
                    ckpt: Checkpointer) -> tuple[Any, int | None]:
    """(state, restored step): the newest intact checkpoint, else `experiment.init` jitted straight into
    the state's shardings (restored step None)."""
    if ckpt.all_steps():
        state, step = ckpt.restore_latest(placement.abstract_state)
        if state is not None:
            return state, step
    init = jax.jit(lambda r: nn.meta.unbox(experiment.init(r)), out_shardings=placement.state_shardings)
    return init(jax.random.key(int(config.seed))), None


# ==============================================================================================
# Compiled steps
# ==============================================================================================

def _finite(tree) -> jax.Array:
    """True when every floating leaf of `tree` is finite (one fused reduction on device)."""
    values = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    return jnp.all(jnp.stack(values)) if values else jnp.array(True)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """`train(state, block) -> (state, (metrics, ok))`: one call runs `steps_per_call` steps; with k > 1,
    block is a [k, batch, ...] stack (None for RL) and metrics/ok have a leading [k] axis. `eval(state,
    batch) -> (metrics, weight)`. `state_finite(state) -> bool array` guards checkpoints."""
    train: Callable
    steps_per_call: int
    eval: Callable | None
    state_finite: Callable
    block_sharding: jax.sharding.NamedSharding


def compile_steps(experiment: Experiment, placement: Placement, *, nonfinite: str = "stop",
                  steps_per_call: int = 1, scan_unroll: int = 1, prng_impl: str = "auto") -> CompiledSteps:
    """Jits the experiment's steps with in/out shardings and the state donated. `prng_impl` (train.prng_impl)
    names the random-number implementation the train step draws with (resolved for the mesh's platform)."""
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
    k = int(steps_per_call)
    if k < 1:
        raise ValueError(f"train.steps_per_call must be >= 1, got {k}")

    # The models' logical activation constraints bind to this mesh while the steps are traced.
    train_step = parallel.with_activation_sharding(
        with_prng_impl(experiment.train_step, resolve_prng_impl(prng_impl, placement.mesh.devices.flat[0].platform)),
        placement.mesh)
    experiment_eval_step = (parallel.with_activation_sharding(experiment.eval_step, placement.mesh)
                            if experiment.eval_step is not None else None)

    def one_step(state, batch):
        new_state, metrics = train_step(state, batch)
        ok = _finite(metrics)
        if nonfinite == "skip":
            keep_old = state.replace(step=new_state.step) if hasattr(state, "replace") else state
            new_state = jax.lax.cond(ok, lambda: new_state, lambda: keep_old)
        return new_state, (metrics, ok)

    sh, rep, has_data = placement.state_shardings, placement.replicated, experiment.train_batches is not None
    if k == 1:
        block_sharding = placement.batch_sharding
        if has_data:
            train = jax.jit(one_step, in_shardings=(sh, block_sharding), out_shardings=(sh, rep), donate_argnums=0)
        else:
            train = jax.jit(lambda s, _: one_step(s, None), in_shardings=(sh, None), out_shardings=(sh, rep),
                            donate_argnums=0)
    else:
        block_sharding = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec(
            None, parallel.BATCH_AXES))
        # `scan_unroll` copies of the step per loop iteration. XLA:CPU runs convolutions inside a rolled loop
        # several times slower (a digits CNN: 0.18x the single-step rate rolled, 0.83x unrolled; dense and
        # attention steps gain from the rolled loop): see benchmarks/README.md.
        unroll = max(1, min(int(scan_unroll), k))
        if has_data:
            train = jax.jit(lambda s, block: jax.lax.scan(one_step, s, block, unroll=unroll),
                            in_shardings=(sh, block_sharding), out_shardings=(sh, rep), donate_argnums=0)
        else:   # the block is the number of steps (static): k, or the shorter last call
            train = jax.jit(lambda s, n: jax.lax.scan(lambda c, _: one_step(c, None), s, None, length=n,
                                                      unroll=min(unroll, n)),
                            in_shardings=(sh,), out_shardings=(sh, rep), donate_argnums=0, static_argnums=1)

    eval_step = None
    if experiment.eval_step is not None and experiment.eval_batches is not None:
        def weighted(state, batch):
            leading = jax.tree.leaves(batch)[0].shape[0]
            weight = jnp.sum(batch["mask"]) if "mask" in batch else jnp.asarray(leading, jnp.float32)
            return experiment_eval_step(state, batch), weight
        eval_step = jax.jit(weighted, in_shardings=(sh, placement.batch_sharding), out_shardings=rep)
    state_finite = jax.jit(_finite, in_shardings=(sh,), out_shardings=rep)
    return CompiledSteps(train, k, eval_step, state_finite, block_sharding)


# ==============================================================================================
# Input
# ==============================================================================================

def _spec(batch: dict) -> dict:
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()}


def _signature(batch: dict) -> tuple:
    """A cheap (key, shape, dtype) signature of a batch of arrays, compared per batch."""
    return tuple((k, getattr(v, "shape", None), getattr(v, "dtype", None)) for k, v in batch.items())


def checked_batches(batches: Iterable[dict], what: str, divisor: int) -> Iterator[dict]:
    """Passes batches through, failing clearly when one differs in shape/dtype from the first (the first
    batch is checked in full, the others by a cheap signature: a few microseconds per batch)."""
    expected, signature = None, None
    for i, batch in enumerate(batches):
        if expected is None:
            expected, signature = _spec(batch), _signature(batch)
            for size in {v[0][0] for v in expected.values() if v[0]}:
                if size % divisor:
                    raise BatchSpecError(f"{what} batch has {size} rows per process, which the {divisor} "
                                         f"local data shards do not divide; use a batch size that is a "
                                         f"multiple of {divisor * jax.process_count()}")
        elif _signature(batch) != signature and (spec := _spec(batch)) != expected:
            k = sorted(k for k in set(spec) | set(expected) if spec.get(k) != expected.get(k))[0]
            raise BatchSpecError(f"{what} batch {i}: {k!r} has shape/dtype {spec.get(k)} but the run expects "
                                 f"{expected.get(k)} (from its first batch); fix the data pipeline")
        yield batch


def _calls(start: int, steps: int, k: int) -> list[int]:
    """Steps per call from `start` to `steps`: k each, a shorter last one if k does not divide."""
    n = steps - start
    return [k] * (n // k) + ([n % k] if n % k else [])


def _blocks(batches: Iterator[dict], sizes: list[int]) -> Iterator[dict]:
    """Stacks consecutive batches into [size, batch, ...] blocks, one per call."""
    for size in sizes:
        group = [next(batches) for _ in range(size)]
        yield {key: np.stack([b[key] for b in group]) for key in group[0]}


def prefetch_depth(prefetch: int, mesh: jax.sharding.Mesh) -> int:
    """train.prefetch resolved: -1 (the default) is 2 on accelerators and 0 where the mesh's devices are CPUs.
    On a CPU backend the "device" is the host: a prefetch thread has no transfer to hide and takes the GIL and
    a core from the step (fit/hand-written loop 0.95 -> 0.98 on the MLP and GPT of benchmarks/overhead.py)."""
    if int(prefetch) >= 0:
        return int(prefetch)
    return 0 if all(d.platform == "cpu" for d in mesh.devices.flat) else 2


def train_inputs(experiment: Experiment, compiled: CompiledSteps, placement: Placement, start: int,
                 sizes: list[int], prefetch: int) -> Iterator | None:
    """One device-resident input per call: a batch (k = 1), a [k, batch, ...] block, or None (RL)."""
    if experiment.train_batches is None:
        return None
    batches = checked_batches(experiment.train_batches(start), "train", placement.local_shards)
    if compiled.steps_per_call > 1:
        batches = _blocks(batches, sizes)
    return data_lib.prefetch_to_device(batches, compiled.block_sharding, prefetch_depth(prefetch, placement.mesh))


class DispatchBound:
    """Keeps at most `limit` dispatched computations unfinished: `push(x)` blocks on the oldest beyond it.

    Why: JAX dispatches asynchronously, and XLA:CPU launches each device's part of a multi-device
    computation from a small client thread pool (as many threads as devices), where a launch blocks while
    its device already has 32 computations queued. With many steps dispatched ahead, one launch blocked
    there holds the pool thread that another device's part of the *current* step needs, and that step's
    collective (gradient all-reduce, Dropout's random bits) waits for it until XLA aborts the process
    ("Termination timeout for `collective permute ...` ... only 7 of them arrived"). A bound far below 32
    removes that, costs nothing while the device is busy, and bounds the memory of queued inputs."""

    def __init__(self, limit: int):
        self.limit, self._queue = max(1, int(limit)), collections.deque()

    def push(self, x: jax.Array) -> None:
        self._queue.append(x)
        while len(self._queue) > self.limit:
            self._queue.popleft().block_until_ready()


# ==============================================================================================
# Evaluation
# ==============================================================================================

def evaluate_state(experiment: Experiment, compiled: CompiledSteps, placement: Placement, state: Any,
                   prefetch: int = -1, max_in_flight: int = 2) -> dict:
    """{"eval/<name>": value}: the eval step's means over all eval batches (weighted by their masks), and
    the experiment's host-side `evaluate(state)`."""
    out = {}
    if compiled.eval is not None:
        results, in_flight = [], DispatchBound(max_in_flight)
        batches = checked_batches(experiment.eval_batches(), "eval", placement.local_shards)
        for batch in data_lib.prefetch_to_device(batches, placement.batch_sharding,
                                                 prefetch_depth(prefetch, placement.mesh)):
            results.append(compiled.eval(state, batch))
            in_flight.push(results[-1][1])
        results = jax.device_get(results)
        total = sum(float(w) for _, w in results)
        for name in results[0][0] if results else {}:
            out[f"eval/{name}"] = sum(float(m[name]) * float(w) for m, w in results) / max(total, 1e-12)
    if experiment.evaluate is not None:
        out.update({k if k.startswith("eval/") else f"eval/{k}": float(v)
                    for k, v in experiment.evaluate(state).items()})
    return out


# ==============================================================================================
# The training loop and its periodic actions
# ==============================================================================================

def stop_check(stop: Any) -> Callable[[], bool] | None:
    """fit's `stop=` as a function of no arguments: a `threading.Event` (or anything with `is_set`) or a
    callable returning true to stop; None: none. Anything else fails naming it."""
    if stop is None:
        return None
    if callable(getattr(stop, "is_set", None)):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise TypeError(f"fit(stop=...) must be a threading.Event or a callable returning True to stop, got "
                    f"{type(stop).__name__}")


class Preemption:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C, a notebook's interrupt) become a flag the
    loop checks after each call: it checkpoints and stops. A second SIGINT interrupts at once. Installed
    only from the main thread, and only for the duration of the loop. `stop` (see `stop_check`) does the
    same from any thread (a fit running in a thread, which signals never reach): `signal_name` "stop"."""

    def __init__(self, stop: Any = None):
        self.signal_name: str | None = None
        self._old: dict = {}
        self._stop = stop_check(stop)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self._stop is not None and self._stop():
            self.signal_name = "stop"
        return self.signal_name is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@functools.partial(jax.jit, static_argnums=1)
def _gather(outs: tuple, stacked: bool):
    """The window's per-call outputs as one array per metric over its steps, on device (compiled once per
    window shape): stacked single steps, or the k-step blocks of several-steps calls concatenated."""
    join = jnp.concatenate if stacked else jnp.stack
    return jax.tree.map(lambda *xs: join(xs), *outs)


class LogWindow:
    """The train metrics dispatched since the last log: fetched in one transfer, checked finite, averaged.

    `collect` fetches and checks the pending calls and keeps their rows (a checkpoint needs its state's
    metrics checked, not yet logged); `drain` averages the rows into the next record. `rows` and `skipped`
    (steps whose update train.nonfinite=skip dropped, since step 0) go beside each checkpoint
    (metrics.window.json), so a resumed run logs the same means as an uninterrupted one."""

    def __init__(self, nonfinite: str, ckpt: Checkpointer, max_skipped_fraction: float = 1.0,
                 rows: list[dict] | None = None, skipped: int = 0):
        self.pending: list[tuple[int, bool, Any]] = []   # (first step, stacked over a call's steps, (metrics, ok))
        self.nonfinite, self.ckpt, self.max_skipped_fraction = nonfinite, ckpt, float(max_skipped_fraction)
        self.rows: list[dict] = list(rows or [])        # checked scalar metrics (floats) of steps not yet logged
        self.skipped = int(skipped)

    def add(self, first_step: int, stacked: bool, out: Any) -> None:
        self.pending.append((first_step, stacked, out))

    def collect(self) -> None:
        """Fetches the pending calls' metrics (one transfer) into `rows`; raises NonFiniteError naming the first
        bad step (train.nonfinite=stop), or once the skipped share passes train.max_skipped_fraction."""
        if not self.pending:
            return
        stacked = self.pending[0][1]
        steps = [first + i for first, _, (_, ok) in self.pending for i in range(ok.shape[0] if stacked else 1)]
        metrics, ok = jax.device_get(_gather(tuple(out for _, _, out in self.pending), stacked))   # one transfer
        self.pending.clear()
        for i, step in enumerate(steps):
            row = {k: v[i] for k, v in metrics.items()}
            if not ok[i]:
                if self.nonfinite == "skip":
                    self.skipped += 1
                    continue
                self._raise(step, row)
            self.rows.append({k: float(v) for k, v in row.items() if np.ndim(v) == 0})   # float32 -> float: exact
        if self.nonfinite == "skip" and self.skipped > self.max_skipped_fraction * steps[-1]:
            last = self.ckpt.all_steps()
            raise NonFiniteError(
                f"train.nonfinite=skip dropped {self.skipped} of the first {steps[-1]} steps' updates "
                f"({self.skipped / steps[-1]:.0%}, more than train.max_skipped_fraction="
                f"{self.max_skipped_fraction:g}): the loss or gradients are non-finite" +
                (f"; the last checkpoint is step {last[-1]}" if last else "") +
                ". Lower optim.learning_rate or set optim.clip_norm (e.g. 1.0), or raise train.max_skipped_fraction")

    def drain(self) -> dict:
        """Means of the steps' metrics since the last drain (collecting the pending ones first)."""
        self.collect()
        rows, self.rows = self.rows, []
        means = {k: float(np.mean([np.asarray(r[k], np.float64) for r in rows])) for k in (rows[0] if rows else {})}
        if self.nonfinite == "skip":
            means["skipped_steps"] = self.skipped
        return means

    def _raise(self, step: int, metrics: dict):
        bad = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not math.isfinite(float(v))}
        last = self.ckpt.all_steps()
        raise NonFiniteError(
            f"non-finite training metric at step {step}: {format_metrics(bad)}. No checkpoint of this state was "
            f"written" + (f"; the last good one is step {last[-1]}" if last else "") +
            ". Lower optim.learning_rate, set optim.clip_norm (e.g. 1.0), or set train.nonfinite=skip to drop "
            "such updates")


WINDOW_FILE = "metrics.window.json"   # per checkpoint step: the log window's rows not yet in metrics.jsonl


def save_window(workdir: str, step: int, window: LogWindow, keep_steps: Iterable[int]) -> None:
    """Records the window's unlogged rows and skipped count for the checkpoint at `step` (written before that
    checkpoint, atomically; entries of steps no longer in `keep_steps` are dropped). Process 0 only."""
    if jax.process_index() != 0:
        return
    entries = {k: v for k, v in (_read_window_file(workdir) or {}).items() if k.isdigit() and int(k) in
               set(keep_steps)}
    entries[str(step)] = {"rows": window.rows, "skipped": window.skipped}
    path = os.path.join(workdir, WINDOW_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f)
    os.replace(path + ".tmp", path)


def _read_window_file(workdir: str) -> dict | None:
    """metrics.window.json's entries; None when absent or unreadable (a warning names it: then a resumed run's
    first log mean covers only the steps after its checkpoint)."""
    path = os.path.join(workdir, WINDOW_FILE)
    try:
        return read_json_object(path)
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s); ignoring it", path, str(e).splitlines()[0][:200] if str(e) else
                    type(e).__name__)
        return None


def restored_window(workdir: str, step: int) -> tuple[list[dict], int]:
    """(rows, skipped) of the log window as it was when the checkpoint at `step` was saved: from
    metrics.window.json, else no rows and the skipped count of the last record at or before `step`."""
    entry = (_read_window_file(workdir) or {}).get(str(step)) if step else None
    try:
        rows = [{str(k): float(v) for k, v in r.items()} for r in entry["rows"]]
        return rows, int(entry["skipped"])
    except (TypeError, KeyError, ValueError, AttributeError):   # no entry, or a malformed one
        pass
    records = [r for r in read_metrics(workdir) if r["step"] <= step] if step else []
    skipped = next((r["skipped_steps"] for r in reversed(records) if "skipped_steps" in r), 0)
    return [], int(skipped) if isinstance(skipped, (int, float)) else 0


def _due(every: int, before: int, after: int) -> bool:
    """True when a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every > before // every


@dataclasses.dataclass
class LoopOutcome:
    state: Any
    step: int
    preempted_by: str | None = None   # "SIGTERM" / "SIGINT" / "stop" when the loop stopped early


def train_loop(experiment: Experiment, config: ml_collections.ConfigDict, compiled: CompiledSteps,
               placement: Placement, state: Any, start_step: int, ckpt: Checkpointer, writer: MetricWriter,
               workdir: str, stop: Any = None) -> LoopOutcome:
    """Runs the steps from `start_step` to config.train.steps with the periodic actions: log (every
    log_every), evaluate (eval_every and at the end), checkpoint (checkpoint_every, at the end and on a
    preemption signal or `stop`, see `Preemption`). With k steps per call, each action happens at the first
    call boundary at or after its step. At most `max_calls_in_flight` calls run ahead of the host.

    A preemption checkpoints the state where it is and writes no record: the steps since the last log wait,
    with every checkpoint's, in metrics.window.json, so the resumed run's metrics.jsonl is the uninterrupted
    run's (timing keys `perf/*` aside)."""
    tc = config.train
    steps, k = int(tc.steps), compiled.steps_per_call
    log_every, eval_every, ckpt_every = max(1, int(tc.log_every)), int(tc.eval_every), int(tc.checkpoint_every)
    sizes = _calls(start_step, steps, k)
    inputs = train_inputs(experiment, compiled, placement, start_step, sizes, int(tc.prefetch))
    window = LogWindow(tc.nonfinite, ckpt, float(tc.max_skipped_fraction), *restored_window(workdir, start_step))
    in_flight = DispatchBound(tc.max_calls_in_flight)
    pbar = tqdm(total=steps, initial=start_step, desc=os.path.basename(workdir), dynamic_ncols=True, unit="step",
                disable=not tc.progress or jax.process_index() != 0, mininterval=0.5)
    eval_metrics: dict = {}
    step, last_log = start_step, (time.perf_counter(), start_step)
    try:
        with Preemption(stop) as preemption:
            for size in sizes:
                block = next(inputs) if inputs is not None else (None if k == 1 else size)
                state, out = compiled.train(state, block)
                window.add(step + 1, k > 1, out)
                in_flight.push(out[1])
                if step == start_step:            # compilation is not training time: rate and ETA leave it out
                    out[1].block_until_ready()
                    pbar.unpause()
                before, step = step, step + size
                pbar.update(size)
                is_last, stopping = step == steps, preemption.requested
                record = {}
                if _due(log_every, before, step) or is_last:
                    record.update(window.drain())
                    now = time.perf_counter()
                    record["perf/steps_per_sec"] = (step - last_log[1]) / max(now - last_log[0], 1e-9)
                    last_log = (now, step)
                    if "loss" in record:
                        pbar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                if _due(eval_every, before, step) or is_last:
                    record.update(window.drain())
                    eval_metrics = evaluate_state(experiment, compiled, placement, state, int(tc.prefetch),
                                                  in_flight.limit)
                    record.update(eval_metrics)
                    if eval_metrics:
                        pbar.write(f"step {step}: " + format_metrics(eval_metrics))
                    last_log = (time.perf_counter(), last_log[1])   # evaluation time is not training time
                    pbar.unpause()
                writer.write(step, record)
                if _due(ckpt_every, before, step) or is_last or stopping:
                    window.collect()                  # never checkpoint a state whose metrics were not checked
                    save_window(workdir, step, window, ckpt.all_steps())
                    save_checkpoint(ckpt, compiled, state, step, tc.best_metric, eval_metrics if (
                        tc.best_metric and tc.best_metric in record) else None)
                if stopping and not is_last:
                    ckpt.wait()
                    by = "stop requested (fit's stop=)" if preemption.signal_name == "stop" else preemption.signal_name
                    pbar.write(f"{by}: preempted at step {step}; saved a checkpoint in {workdir}; run the same "
                               f"command to resume.")
                    return LoopOutcome(state, step, preemption.signal_name)
    finally:
        if inputs is not None:
            inputs.close()  # stops the prefetch thread
        pbar.close()
    return LoopOutcome(state, step)


def save_checkpoint(ckpt: Checkpointer, compiled: CompiledSteps, state: Any, step: int, best_metric: str,
                    eval_metrics: dict | None) -> None:
    """Saves `state` at `step` after checking on device that every parameter and optimizer value is finite
    (an update can make them NaN/inf while the step's loss was still finite)."""
    if not bool(compiled.state_finite(state)):
        last = ckpt.all_steps()
        raise NonFiniteError(
            f"the state became non-finite (NaN/inf parameters or optimizer values) by step {step}; it was not "
            f"checkpointed" + (f" and the last good checkpoint is step {last[-1]}" if last else "") +
            ". Lower optim.learning_rate or set optim.clip_norm (e.g. 1.0)")
    best = {best_metric: eval_metrics[best_metric]} if eval_metrics else None
    ckpt.save(step, state, metrics=best)


# ==============================================================================================
# Finishing
# ==============================================================================================

def finish_run(experiment: Experiment, state: Any, workdir: str, preempted_by: str | None = None, *,
               plot: bool = True) -> FitResult:
    """The FitResult from metrics.jsonl; when training completed, the experiment's `finish` (every process
    calls it: it may run jitted code on the global state), curves.png (its path is `summary["plot"]`, on
    process 0, when anything was logged) and summary.json (with `skipped_steps` under train.nonfinite=skip).
    A preempted run's `metrics["step"]` is the step its state reached (the last record may be older)."""
    result = FitResult(state, final_metrics(read_metrics(workdir)), workdir, preempted_by=preempted_by)
    if preempted_by is not None:
        result.metrics["step"] = int(jax.device_get(state.step))
        return result
    if experiment.finish is not None:
        result.summary = dict(experiment.finish(state, workdir) or {})
    if "skipped_steps" in result.metrics:
        result.summary["skipped_steps"] = int(result.metrics["skipped_steps"])
    if jax.process_index() == 0:
        drawn = plot_curves(workdir) if plot else None      # redrawn: a run continued to more steps has new points
        if drawn:
            result.summary["plot"] = drawn
        path = os.path.join(workdir, "summary.json")
        with open(path + ".tmp", "w") as f:      # a kill mid-write leaves the old file, not half a new one
            json.dump({"metrics": result.metrics, "summary": _jsonable(result.summary)}, f, indent=2)
        os.replace(path + ".tmp", path)
    return result


def result_text(metrics: dict) -> str:
    """`result_line` of the metrics, and how many steps' updates train.nonfinite=skip dropped, if any."""
    text = result_line(metrics)
    if metrics.get("skipped_steps"):
        text += (f"; {int(metrics['skipped_steps'])} of {metrics.get('step')} steps skipped (non-finite updates "
                 f"dropped: train.nonfinite=skip)")
    return text


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    return out


def _read_summary(workdir: str) -> dict | None:
    """summary.json's summary; None when it is missing or cannot be read (a derived file: the caller rebuilds
    it from the state instead of trusting it), with a warning naming it in the second case."""
    path = os.path.join(workdir, "summary.json")
    try:
        saved = read_json_object(path)
        if saved is None:
            return None
        summary = saved["summary"]
        if isinstance(summary, dict):
            return summary
        raise ValueError(f"its 'summary' is a {type(summary).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s cannot be read (%s: %s); rebuilding it from the run's state", path, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return None


# The domains of config.train's keys, declared once (train/schema.py reads them for the config check that runs
# before anything is built; check_train_config applies them to a config given to fit directly).
TRAIN_AT_LEAST = {"steps": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "keep": 1, "prefetch": -1,
                  "steps_per_call": 1, "scan_unroll": 1, "max_calls_in_flight": 1, "min_free_mb": 0}
TRAIN_CHOICES = {"nonfinite": ("stop", "skip"), "best_mode": ("max", "min"), "prng_impl": PRNG_IMPLS}


def check_train_config(tc: ml_collections.ConfigDict) -> None:
    """One line naming a config.train value outside its domain (e.g. train.steps=0, train.keep=-1)."""
    for key, low in TRAIN_AT_LEAST.items():
        if key in tc and (isinstance(tc[key], bool) or not isinstance(tc[key], (int, float)) or tc[key] < low):
            raise ValueError(f"train.{key} must be a number >= {low}, got {tc[key]!r}; set --config.train.{key}")
    for key, valid in TRAIN_CHOICES.items():
        if key in tc and tc[key] not in valid:
            raise ValueError(f"train.{key} must be one of {', '.join(valid)}, got {tc[key]!r}")
    fraction = tc.get("max_skipped_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"train.max_skipped_fraction must be a number in [0, 1], got {fraction!r}; set "
                         f"--config.train.max_skipped_fraction (1 never stops a train.nonfinite=skip run)")


def check_experiment(experiment: Experiment, config: ml_collections.ConfigDict) -> None:
    """Everything checkable before a run directory is touched: the train config (its keys and their
    domains), the data (shapes, emptiness, NaN), and the model and optimizer: `init` and then `train_step`
    traced with `jax.eval_shape` on the abstract state and the first train batch's shapes (None for a step
    that makes its own data), so a module/state mismatch (BatchNorm's batch_stats missing) fails here.
    Nothing is compiled or computed."""
    check_train_config(resolved_train_config(config))
    first = check_inputs(experiment)
    state = nn.meta.unbox(jax.eval_shape(experiment.init, jax.random.key(int(config.seed))))
    batch = None if first is None else data_lib.batch_spec(first)
    jax.eval_shape(experiment.train_step, state, batch)


def check_inputs(experiment: Experiment) -> dict | None:
    """Builds the train and eval iterators and returns the first train batch (None without train data; the
    eval iterator is not drawn from): in-memory data validates itself here (train.data.check_arrays), before
    the run directory is written."""
    first = None
    if experiment.train_batches is not None:
        iterator = experiment.train_batches(0)
        try:
            first = next(iter(iterator), None)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()
        if first is None:
            raise ValueError("experiment.train_batches(0) yields no batch; the training data is empty")
    if experiment.eval_batches is not None:
        iterator = experiment.eval_batches()
        if hasattr(iterator, "close"):
            iterator.close()
    return first


def _reconcile_metrics(workdir: str, restored_step: int | None) -> list[dict]:
    """metrics.jsonl cut back to the restored step (a resumed run re-does the later steps); emptied, with
    metrics.window.json removed, when no checkpoint survived (their records describe nothing we have). Lines
    that cannot be parsed are kept aside (metrics.jsonl.unreadable-TIME) with one warning, never a reason to
    drop the valid ones."""
    after = 0 if restored_step is None else restored_step
    records = [r for r in truncate_metrics(workdir, after).records if r["step"] <= after]
    if restored_step is None:
        if jax.process_index() == 0 and os.path.lexists(os.path.join(workdir, WINDOW_FILE)):
            os.remove(os.path.join(workdir, WINDOW_FILE))
        return []
    return records


# ==============================================================================================
# fit
# ==============================================================================================

def fit(experiment: Experiment, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        mesh: jax.sharding.Mesh | None = None, *, record: dict | None = None, stop: Any = None) -> FitResult:
    """Trains `experiment` for config.train.steps steps in `workdir`, resuming from its checkpoints.

    config needs `seed`, and `train` and `mesh` sections with any of the keys of default_train_config and
    default_mesh_config (the rest take their defaults; config.json records the merged train section).
    record: a small JSON dict written to `workdir/experiment.json` under the run's lock (`run_experiment`
    passes {"experiment": name, "preset": preset}, from which `depthlab eval` and `report` rebuild the run).
    stop: a `threading.Event` (or a callable returning True) checked after each call: once set, the run
    checkpoints and returns as on SIGTERM, with `preempted_by="stop"` (signals reach only the main thread;
    this stops a fit running in a thread, a notebook's or a GUI's). Calling fit again resumes.

    A finished run's result is its state's: the last record when it is that state's evaluation and
    summary.json is readable, else the state is evaluated again and summary.json rebuilt.
    """
    workdir, started = os.path.abspath(os.fspath(workdir)), time.perf_counter()
    stop_check(stop)                           # a wrong kind of stop handle fails before anything else
    config = with_resolved_train(config)      # train defaults merged once: every key below is read bare
    tc = config.train
    check_experiment(experiment, config)      # a bad value fails here, before the run directory is touched
    placement = place(experiment, config, mesh)
    with open_run(workdir, config, record=record):
        enable_compilation_cache(os.environ.get("DEPTHLAB_COMPILATION_CACHE") or tc.compilation_cache)
        ckpt = open_checkpoints(workdir, config)
        try:
            state, restored_step = restore_or_init(experiment, config, placement, ckpt)
            start_step = int(jax.device_get(state.step))
            records = _reconcile_metrics(workdir, restored_step)
            # Finished: the result is the last record only when it is the state's own evaluation (a record cut by
            # a kill leaves an older one last) and summary.json is readable; else the state is evaluated again.
            last = records[-1] if records else {}
            finished = start_step >= int(tc.steps)
            has_result = last.get("step") == start_step and any(key.startswith("eval/") for key in last)
            summary = _read_summary(workdir) if finished and has_result else None
            if summary is not None:
                result = FitResult(state, final_metrics(records), workdir, summary)
                print(f"{workdir} already finished at step {start_step}; nothing to do. Result: "
                      f"{result_text(result.metrics)}")
                return result
            if restored_step is not None:   # after the finished check: a finished run prints one line
                print(f"Resuming {workdir} from its checkpoint at step {start_step}.")
            k = int(tc.steps_per_call)
            if k > 1 and any(int(tc[key]) % k for key in ("log_every", "eval_every", "checkpoint_every", "steps")):
                print(f"Note: train.steps_per_call={k} does not divide train.steps/log_every/eval_every/"
                      f"checkpoint_every; those actions happen at the first multiple of {k} at or after their "
                      f"step, and the last call runs the remainder.")
            compiled = compile_steps(experiment, placement, nonfinite=tc.nonfinite, steps_per_call=k,
                                     scan_unroll=int(tc.scan_unroll), prng_impl=tc.prng_impl)
            writer = MetricWriter(workdir, tensorboard=bool(tc.tensorboard))
            try:
                if finished and not has_result:   # no step to run: the result is the evaluation of the state
                    writer.write(start_step, evaluate_state(experiment, compiled, placement, state,
                                                            int(tc.prefetch), int(tc.max_calls_in_flight)))
                outcome = train_loop(experiment, config, compiled, placement, state, start_step, ckpt, writer,
                                     workdir, stop=stop)
            finally:
                writer.close()
        finally:
            ckpt.close()
        result = finish_run(experiment, outcome.state, workdir, outcome.preempted_by, plot=bool(tc.plot))
    if not result.preempted and jax.process_index() == 0:
        print(f"Result at step {result.metrics.get('step')} ({time.perf_counter() - started:.1f} s): "
              f"{result_text(result.metrics)}")
    return result
