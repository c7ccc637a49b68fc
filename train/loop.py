"""`fit(experiment, config, workdir)`: the one training loop of depthlab.

It initialises (or resumes) the state sharded over the device mesh, streams batches to the devices,
runs the jitted step with the state donated, evaluates, logs (console, metrics.jsonl, TensorBoard),
checkpoints with Orbax, and stops with a clear error on a non-finite loss. An experiment is any
`Experiment`: supervised ones build their step with `train.step`, a GAN or an RL agent brings its own
pure `train_step(state, batch)` (RL collects its own data: `train_batches=None`).

Example:
    >>> experiment = Experiment(init=init, train_step=train_step, train_batches=batches,
    ...                         eval_step=eval_step, eval_batches=eval_batches)
    >>> result = fit(experiment, config, "runs/a")
    >>> result.metrics["eval/accuracy"]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
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
from depthlab.train.checkpoint import Checkpointer
from depthlab.train.logging import MetricWriter, final_metrics, format_metrics, read_metrics, truncate_metrics


class NonFiniteError(FloatingPointError):
    """A training metric (loss, gradient norm, ...) became NaN or infinite."""


class ConfigMismatchError(ValueError):
    """The run directory was created by a different config."""


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
    preempted: bool = False


def default_train_config() -> ml_collections.ConfigDict:
    """Every key `fit` reads under config.train."""
    return ml_collections.ConfigDict({
        "steps": 1000,
        "log_every": 50,
        "eval_every": 500,          # 0: only at the end
        "checkpoint_every": 500,    # 0: only at the end (and on SIGTERM)
        "keep": 3,                  # checkpoints kept besides the best
        "best_metric": "",          # e.g. "eval/accuracy": also keep the best checkpoint by it
        "best_mode": "max",
        "progress": True,           # progress bar
        "tensorboard": True,
        "nonfinite": "stop",        # "stop": raise with the step number; "skip": drop that update
        "prefetch": 2,              # batches moved to devices ahead of use (0 disables)
        "async_checkpoint": True,
        "allow_config_change": False,  # resume a run directory whose config.json differs
        "min_free_mb": 64,          # refuse to start with less free disk in the run directory
        "compilation_cache": "",    # a folder for JAX's persistent compilation cache (faster restarts);
                                    # the environment variable DEPTHLAB_COMPILATION_CACHE does the same
    })


def enable_compilation_cache(directory: str | None) -> bool:
    """Turns on JAX's persistent compilation cache in `directory` (compiled steps reused across runs)."""
    if not directory:
        return False
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True


def default_mesh_config() -> ml_collections.ConfigDict:
    """Every key `fit` reads under config.mesh (see train/parallel.py)."""
    return ml_collections.ConfigDict({
        "data": -1, "fsdp": 1, "tensor": 1,
        "strategy": "replicated",     # or "fsdp": shard un-annotated parameters over the fsdp axis
        "fsdp_min_size": 1024,
    })


# Keys that may change between a run and its resumption without changing what is computed.
_RESUMABLE_KEYS = {"train.steps", "train.progress", "train.tensorboard", "train.prefetch",
                   "train.allow_config_change", "train.async_checkpoint", "train.min_free_mb",
                   "train.keep", "train.log_every", "train.compilation_cache"}


def _flat_config(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Checks the run directory is writable with free space, and that it holds this run's config."""
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
    min_free = float(config.train.get("min_free_mb", 64))
    if free_mb < min_free:
        raise OSError(f"only {free_mb:.0f} MB free in {workdir!r}; training needs at least {min_free:.0f} MB "
                      f"for checkpoints (train.min_free_mb). Free some space or choose another --workdir")
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path) and jax.process_index() == 0:
        with open(path) as f:
            saved = json.load(f)
        old, new = _flat_config(saved), _flat_config(current)
        diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_KEYS)
        if diffs and not config.train.get("allow_config_change", False):
            shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} (saved) vs {new.get(k, '<absent>')!r} (now)"
                              for k in diffs[:5])
            raise ConfigMismatchError(
                f"run directory {workdir!r} was created by a different config ({shown}). Use a new --workdir, "
                f"or pass --config.train.allow_config_change=true to continue it with the new config")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)


def _spec(batch: dict) -> dict:
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in batch.items()}


def checked_batches(batches: Iterable[dict], what: str, divisor: int) -> Iterator[dict]:
    """Passes batches through, failing clearly when one differs in shape/dtype from the first."""
    expected = None
    for i, batch in enumerate(batches):
        spec = _spec(batch)
        if expected is None:
            expected = spec
            sizes = {v[0][0] for v in spec.values() if v[0]}
            for size in sizes:
                if size % divisor:
                    raise BatchSpecError(f"{what} batch has {size} rows per process, which the {divisor} "
                                         f"local data shards do not divide; use a batch size that is a "
                                         f"multiple of {divisor * jax.process_count()}")
        elif spec != expected:
            bad = sorted(k for k in set(spec) | set(expected) if spec.get(k) != expected.get(k))
            k = bad[0]
            raise BatchSpecError(f"{what} batch {i}: {k!r} has shape/dtype {spec.get(k)} but the run expects "
                                 f"{expected.get(k)} (from its first batch); fix the data pipeline")
        yield batch


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _finite(metrics: dict) -> jax.Array:
    values = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)
              if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    return jnp.all(jnp.stack(values)) if values else jnp.array(True)


def _make_step(experiment: Experiment, skip_nonfinite: bool) -> Callable:
    def step(state, batch):
        new_state, metrics = experiment.train_step(state, batch)
        ok = _finite(metrics)
        if skip_nonfinite:
            keep_old = state.replace(step=new_state.step) if hasattr(state, "replace") else state
            new_state = jax.lax.cond(ok, lambda: new_state, lambda: keep_old)
        return new_state, (metrics, ok)
    return step


def _make_eval_step(experiment: Experiment) -> Callable:
    def step(state, batch):
        metrics = experiment.eval_step(state, batch)
        leading = jax.tree.leaves(batch)[0].shape[0]
        weight = jnp.sum(batch["mask"]) if "mask" in batch else jnp.asarray(leading, jnp.float32)
        return metrics, weight
    return step


def fit(experiment: Experiment, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        mesh: jax.sharding.Mesh | None = None) -> FitResult:
    """Trains `experiment` for config.train.steps steps in `workdir`, resuming from its checkpoints.

    config needs `seed`, `train` (see default_train_config) and optionally `mesh` (default_mesh_config).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    tc = config.train
    steps, log_every = int(tc.steps), max(1, int(tc.log_every))
    eval_every, ckpt_every = int(tc.eval_every), int(tc.checkpoint_every)
    if tc.nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite must be 'stop' or 'skip', got {tc.nonfinite!r}")
    prepare_workdir(workdir, config)
    enable_compilation_cache(os.environ.get("DEPTHLAB_COMPILATION_CACHE") or tc.get("compilation_cache", ""))

    mesh_cfg = config.get("mesh") or default_mesh_config()
    if mesh is None:
        mesh = parallel.make_mesh({k: mesh_cfg[k] for k in parallel.MESH_AXES if k in mesh_cfg})
    strategy = mesh_cfg.get("strategy", "replicated")
    rng = jax.random.key(int(config.seed))

    abstract_boxed = jax.eval_shape(experiment.init, rng)
    shardings = parallel.state_shardings(abstract_boxed, mesh, strategy=strategy,
                                         fsdp_min_size=int(mesh_cfg.get("fsdp_min_size", 1024)))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(abstract_boxed), shardings)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(tc.keep),
                        best_metric=tc.best_metric or None, best_mode=tc.best_mode,
                        async_save=bool(tc.async_checkpoint))
    state, restored_step = ckpt.restore_latest(abstract) if ckpt.all_steps() else (None, None)
    if state is None:
        init = jax.jit(lambda r: nn.meta.unbox(experiment.init(r)), out_shardings=shardings)
        state = init(rng)
    start_step = int(jax.device_get(state.step))
    records = read_metrics(workdir)
    if restored_step is not None:
        print(f"Resuming {workdir} from its checkpoint at step {start_step}.")
        truncate_metrics(workdir, start_step)
        records = [r for r in records if r.get("step", 0) <= start_step]
    elif records:
        truncate_metrics(workdir, 0)  # no checkpoint survived: the old records describe nothing we have
        records = []

    if start_step >= steps and any(k.startswith("eval/") for k in (records[-1] if records else {})):
        ckpt.close()
        print(f"{workdir} already finished at step {start_step}; nothing to do.")
        return FitResult(state, final_metrics(records), workdir, _read_summary(workdir))

    rep = parallel.replicated(mesh)
    batch_sh = parallel.batch_sharding(mesh)
    local_shards = max(1, (mesh.shape["data"] * mesh.shape["fsdp"]) // jax.process_count())
    step_fn = _make_step(experiment, skip_nonfinite=tc.nonfinite == "skip")
    has_data = experiment.train_batches is not None
    if has_data:
        train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                             donate_argnums=0)
    else:
        train_step = jax.jit(lambda s: step_fn(s, None), in_shardings=(shardings,),
                             out_shardings=(shardings, rep), donate_argnums=0)
    eval_step = None
    if experiment.eval_step is not None and experiment.eval_batches is not None:
        eval_step = jax.jit(_make_eval_step(experiment), in_shardings=(shardings, batch_sh), out_shardings=rep)

    def evaluate(state) -> dict:
        out = {}
        if eval_step is not None:
            results = [eval_step(state, b) for b in data_lib.prefetch_to_device(
                checked_batches(experiment.eval_batches(), "eval", local_shards), batch_sh, int(tc.prefetch))]
            results = jax.device_get(results)
            total = sum(float(w) for _, w in results)
            for name in results[0][0] if results else {}:
                out[f"eval/{name}"] = sum(float(m[name]) * float(w) for m, w in results) / max(total, 1e-12)
        if experiment.evaluate is not None:
            out.update({f"eval/{k}" if not k.startswith("eval/") else k: float(v)
                        for k, v in experiment.evaluate(state).items()})
        return out

    writer = MetricWriter(workdir, tensorboard=bool(tc.tensorboard))
    batches = None
    if has_data and start_step < steps:
        batches = data_lib.prefetch_to_device(
            checked_batches(experiment.train_batches(start_step), "train", local_shards), batch_sh, int(tc.prefetch))
    pbar = tqdm(total=steps, initial=start_step, desc=os.path.basename(workdir), dynamic_ncols=True,
                disable=not tc.progress or jax.process_index() != 0, unit="step")
    pending: list[tuple[int, Any]] = []
    skipped = 0
    last_time, last_step = time.perf_counter(), start_step
    eval_metrics: dict = {}
    preempted = False

    def drain() -> dict:
        """Fetches pending step metrics, checks they are finite, returns their means."""
        nonlocal skipped
        if not pending:
            return {}
        # One stack on the device and one transfer per log window (not one per step and metric).
        stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *[m for _, m in pending]))
        fetched = [jax.tree.map(lambda x: x[i], stacked) for i in range(len(pending))]
        good = []
        for (s, _), (metrics, ok) in zip(pending, fetched):
            if not bool(ok):
                if tc.nonfinite == "skip":
                    skipped += 1
                    continue
                bad = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not math.isfinite(float(v))}
                last = ckpt.all_steps()
                raise NonFiniteError(
                    f"non-finite training metric at step {s}: {format_metrics(bad)}. No checkpoint of this "
                    f"state was written" + (f"; the last good one is step {last[-1]}" if last else "") +
                    ". Lower optim.learning_rate, set optim.clip_norm (e.g. 1.0), or set "
                    "train.nonfinite=skip to drop such updates")
            good.append(metrics)
        pending.clear()
        if not good:
            return {"skipped_steps": skipped}
        means = {k: float(np.mean([np.asarray(m[k], np.float64) for m in good])) for k in good[0]
                 if np.ndim(good[0][k]) == 0}
        if tc.nonfinite == "skip":
            means["skipped_steps"] = skipped
        return means

    try:
        with _Preemption() as preemption:
            for step in range(start_step + 1, steps + 1):
                batch = next(batches) if has_data else None
                state, out = train_step(state, batch) if has_data else train_step(state)
                pending.append((step, out))
                pbar.update(1)
                is_last = step == steps
                record = {}
                if step % log_every == 0 or is_last or preemption.requested:
                    record.update(drain())
                    now = time.perf_counter()
                    record["perf/steps_per_sec"] = (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    if "loss" in record:
                        pbar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                if (eval_every and step % eval_every == 0) or is_last:
                    record.update(drain())
                    eval_metrics = evaluate(state)
                    record.update(eval_metrics)
                    pbar.write(f"step {step}: " + format_metrics(eval_metrics))
                    last_time = time.perf_counter()  # evaluation time is not training time
                if record:
                    writer.write(step, record)
                if (ckpt_every and step % ckpt_every == 0) or is_last or preemption.requested:
                    record.update(drain())  # never checkpoint a state whose metrics were not checked
                    best = {tc.best_metric: eval_metrics[tc.best_metric]} if (
                        tc.best_metric and tc.best_metric in record) else None
                    ckpt.save(step, state, metrics=best)
                if preemption.requested and not is_last:
                    preempted = True
                    ckpt.wait()
                    pbar.write(f"SIGTERM: saved a checkpoint at step {step} in {workdir}; "
                               f"run the same command to resume.")
                    break
    finally:
        if batches is not None:
            batches.close()  # stops the prefetch thread
        pbar.close()
        writer.close()
        ckpt.close()

    records = read_metrics(workdir)
    result = FitResult(state, final_metrics(records), workdir, preempted=preempted)
    if not preempted:
        # Every process calls finish: it may run jitted code on the (global) state.
        if experiment.finish is not None:
            result.summary = {k: v for k, v in (experiment.finish(state, workdir) or {}).items()}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump({"metrics": result.metrics, "summary": _jsonable(result.summary)}, f, indent=2)
    return result


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    return out


def _read_summary(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("summary", {})
    return {}
