"""Running experiments from Python: configs with overrides, one run, a sweep.

Example:
    >>> from depthlab.research import run_experiment
    >>> result = run_experiment("vision/digits_cnn", overrides={"train.steps": 300}, workdir="runs/quick")
    >>> result["metrics"]["eval/accuracy"]
"""
from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import signal
import threading
import time
from typing import Any, Iterable, Mapping

import ml_collections

from depthlab.research.registry import load_experiment


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Converts a parsed override to the type of the value it replaces (its domain is checked later, by
    config_schema.check_config_domains); a value of another kind fails as "KEY=VALUE: expected ...; fix: ..."."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, current, "true or false")
    if isinstance(current, int) and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, str):
        return str(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, (tuple, list)):
            return tuple(value)
    if isinstance(value, type(current)) and not (isinstance(value, bool) and not isinstance(current, bool)):
        return value
    kind = {int: "an integer", float: "a number"}.get(type(current), f"a {type(current).__name__}")
    raise _type_error(key, value, current, kind)


def _type_error(key: str, value: Any, current: Any, kind: str) -> ValueError:
    from depthlab.train.schema import ConfigValueError

    shown = repr(value) if isinstance(value, str) else str(value)
    held = {bool: "a boolean", int: "an int", float: "a float"}.get(type(current), f"a {type(current).__name__}")
    return ConfigValueError(f"{key}={shown}: expected {kind} (config key {key!r} is {held}, now {current!r}); fix: "
                            f"pass --config.{key}=VALUE with VALUE {kind}", key)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | Iterable[str] | None
                    ) -> ml_collections.ConfigDict:
    """Sets "a.b.c" keys (values may be strings from a command line). Unknown keys fail, naming the
    valid keys at that level."""
    if not overrides:
        return config
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
            k, v = item.split("=", 1)
            pairs[k] = v
        overrides = pairs
    for key, value in overrides.items():
        key = key.removeprefix("config.")
        parent = config
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
                where = ".".join(parts[:i]) or "the config"
                raise ValueError(f"unknown config key {key!r}: {where} has no section {part!r}; valid keys: "
                                 f"{', '.join(sorted(parent.keys()))}")
            parent = parent[part]
        leaf = parts[-1]
        if leaf not in parent:
            where = ".".join(parts[:-1]) or "the config"
            raise ValueError(f"unknown config key {key!r}; valid keys under {where}: {', '.join(sorted(parent.keys()))}")
        if isinstance(value, str):
            value = _parse_value(value)
        parent[leaf] = _coerce(value, parent[leaf], key)
    return config


def build_config(name: str, preset: str | None = None, overrides=None, *, module=None
                 ) -> ml_collections.ConfigDict:
    """The experiment's config with a preset and overrides applied (locked), every value checked against its
    declared domain (research/config_schema.py; a bad one raises ConfigValueError, a ValueError naming it).
    `module`: the experiment's module, when the caller has loaded it."""
    module = module if module is not None else load_experiment(name)
    config = module.get_config(preset)
    config = apply_overrides(config, overrides)
    from depthlab.research.config_schema import check_config_domains
    check_config_domains(name, config, preset, module=module)   # every key's domain, before anything is built or written
    return config


def check_workdir(workdir: str) -> None:
    """A run directory that exists must be a directory (a file there fails now, naming it)."""
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir {workdir!r} is a file, not a directory; fix: choose another --workdir "
                                 f"(or move that file away)")


def default_workdir(name: str) -> str:
    """runs/<field>_<name> (runs/<stem> for an experiment file)."""
    from depthlab.research.registry import short_name
    return os.path.join("runs", short_name(name))


def run_experiment(name: str, *, preset: str | None = None, overrides=None, workdir: str | None = None,
                   config: ml_collections.ConfigDict | None = None) -> dict:
    """Runs (or resumes) one experiment; returns {"metrics", "summary", "workdir", "seconds", "preempted"}
    ("preempted": None, or the signal that stopped the run at a checkpoint).

    `name`: "field/name", the path of your own experiment file, or an installed entry point (registry.py).
    A run that the same command already finished (see `finished_run`) returns at once, without importing JAX,
    with "already_finished": True."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir or default_workdir(name))
    check_workdir(workdir)
    record = _run_record(name, preset, overrides, known=config is None)
    if config is None and (done := finished_run(name, workdir, preset, overrides, record=record)) is not None:
        done.update(seconds=time.perf_counter() - start)
        print(f"{workdir} already finished at step {done['metrics'].get('step')}; nothing to do. Result: "
              f"{_result_text(done['metrics'])}")
        return done
    from depthlab.train import fit, open_run
    from depthlab.train.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    module = load_experiment(name)
    if config is None:
        config = build_config(name, preset, overrides, module=module)
    else:
        from depthlab.research.config_schema import check_config_domains
        check_config_domains(name, config, preset, module=module)
    if hasattr(module, "make_experiment"):
        # fit checks everything, then enters the run directory once (lock, config.json, experiment.json)
        result = fit(module.make_experiment(config), config, workdir, record=record)
        out = {"metrics": result.metrics, "summary": result.summary, "preempted": result.preempted_by, "kind": "fit"}
    else:
        from depthlab.train.loop import enable_compilation_cache
        enable_compilation_cache(os.environ.get("DEPTHLAB_COMPILATION_CACHE", ""))   # as fit does
        with open_run(workdir, config, record=record):   # a study's only entry: the same lock and files as fit's
            summary = _finished_study(workdir, config)
            if summary is None:
                summary = module.run(config, workdir) or {}
        out = {"metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
               "summary": summary, "preempted": None, "kind": "study"}
    out.update(workdir=workdir, seconds=time.perf_counter() - start, name=name)
    return out


def _run_record(name: str, preset: str | None, overrides, known: bool = True) -> dict:
    """experiment.json: what made the run, from which `depthlab eval`/`report` rebuild it ("experiment": the
    registry's canonical name, a file by its absolute path) and `finished_run` recognises the same command
    ("overrides" as given, when `known`: not for a config built by the caller; "code": the registry's
    fingerprint of the code that builds the config)."""
    from depthlab.research.registry import canonical_name, code_fingerprint

    record = {"experiment": canonical_name(name), "preset": preset}
    if known:
        record["overrides"] = {k.removeprefix("config."): str(v) for k, v in sorted(_as_dict(overrides).items())}
        record["code"] = code_fingerprint(name)
    return record


def finished_run(name: str, workdir: str, preset: str | None = None, overrides=None, *,
                 record: dict | None = None) -> dict | None:
    """run_experiment's result for a run directory that this same command (experiment, preset, overrides, and
    unchanged code: experiment.json) already finished, read from its files only (no JAX): config.json's
    train.steps, the last record of metrics.jsonl at that step with eval/ metrics, a readable summary.json, and
    the newest checkpoint at that step with its integrity record. None on any doubt (the full path decides)."""
    if os.environ.get("DEPTHLAB_COORDINATOR") or os.environ.get("DEPTHLAB_DISTRIBUTED"):
        return None   # every process of a job must take the same path
    try:
        record = record if record is not None else _run_record(name, preset, overrides)
        workdir = os.path.abspath(workdir)
        if record.get("code") is None or _read_json(os.path.join(workdir, "experiment.json")) != record:
            return None
        steps = _read_json(os.path.join(workdir, "config.json"))["train"]["steps"]
        summary = _read_json(os.path.join(workdir, "summary.json"))["summary"]
        records = _tail_records(os.path.join(workdir, "metrics.jsonl"))
        folder = os.path.join(workdir, "checkpoints")
        saved = [int(n) for n in os.listdir(folder) if n.isdigit()]
        if not (isinstance(steps, int) and isinstance(summary, dict) and records and saved
                and records[-1].get("step") == steps == max(saved)
                and any(k.startswith("eval/") for k in records[-1])
                and os.path.isfile(os.path.join(folder, str(steps), "depthlab_integrity.json"))):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    metrics = dict(records[-1])   # the last record carries the eval/ metrics: it is final_metrics' result
    return {"metrics": metrics, "summary": summary, "preempted": None, "kind": "fit", "already_finished": True,
            "workdir": workdir, "name": name}


def _read_json(path: str):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def _tail_records(path: str, size: int = 1 << 16) -> list[dict]:
    """The complete records of the last `size` bytes of metrics.jsonl (a line that does not parse: ValueError)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(0, end - size))
        text = f.read().decode("utf-8")
    lines = text.split("\n")
    if end > size:
        lines = lines[1:]   # the first may be cut
    if lines and lines[-1] == "":
        lines.pop()
    else:
        raise ValueError("metrics.jsonl does not end with a complete line")
    return [json.loads(line) for line in lines if line.strip()]


def _result_text(metrics: dict) -> str:
    """metric_writers.result_line's text (that module imports JAX; this path must not)."""
    shown = {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    return ", ".join(f"{k}={100 * v:.2f}%" if k.endswith(("accuracy", "/acc")) else f"{k}={v:.4g}"
                     for k, v in sorted(shown.items()))


def _finished_study(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    """The summary of a study that already finished in `workdir` with this config (its results.json), so
    that running the same command again prints the result instead of recomputing it; None otherwise."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if "config" in saved and json.loads(json.dumps(saved["config"])) != json.loads(config.to_json_best_effort()):
        return None
    print(f"{workdir} already holds this study's results (results.json); nothing to do.")
    return saved.get("summary", {})


def validate_point(name: str, config: ml_collections.ConfigDict) -> None:
    """Builds the experiment of `config` and traces its init (shapes only), so a bad model or optimizer value
    fails now, naming the value, instead of after the earlier points of a sweep have trained."""
    module = load_experiment(name)
    if hasattr(module, "make_experiment"):
        from depthlab.train import check_experiment
        check_experiment(module.make_experiment(config), config)


# ==============================================================================================
# Sweeps: a list of points with stable indices; a shard of it per machine; each point a run directory
# ==============================================================================================

@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep. `index` is stable: every process that builds the sweep from the same arguments
    numbers its points the same way, so `--shard I/N` (point i runs in shard i % N) splits it reproducibly.
    `tag` ("key=value,...") names its run directory `workdir`; `overrides` are its config settings."""
    index: int
    tag: str
    overrides: dict
    workdir: str


def split_values(text: str) -> list[str]:
    """"1e-3,3e-3" -> ["1e-3", "3e-3"]; commas inside brackets stay: "(32,10),(64,10)" -> ["(32,10)", "(64,10)"]."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return values + [text[start:]]


def sweep_grid(sweeps: Mapping[str, Iterable[Any]] | Iterable[str]) -> list[dict]:
    """Cartesian product of {"key": [v1, v2]} (or "key=v1,v2" strings) as a list of override dicts, the last
    key varying fastest."""
    if not isinstance(sweeps, Mapping):
        parsed = {}
        for item in sweeps:
            if "=" not in item:
                raise ValueError(f"sweep {item!r} must look like key=v1,v2 (e.g. optim.name=sgd,adam)")
            k, v = item.split("=", 1)
            parsed[k] = split_values(v)
        sweeps = parsed
    keys = list(sweeps)
    return [dict(zip(keys, values)) for values in itertools.product(*[list(sweeps[k]) for k in keys])]


_DISTRIBUTIONS = ("loguniform:LOW:HIGH", "uniform:LOW:HIGH", "choice:A,B,...")


def parse_sample(item: str) -> tuple[str, str, tuple]:
    """"key=loguniform:1e-4:1e-2" -> ("key", "loguniform", (1e-4, 1e-2)); also uniform:LOW:HIGH and
    choice:A,B,C (values as on a command line)."""
    key, sep, spec = item.partition("=")
    kind, _, args = spec.partition(":")
    if not sep or not key or kind not in ("loguniform", "uniform", "choice") or not args:
        raise ValueError(f"sample {item!r} must look like key=DISTRIBUTION with DISTRIBUTION one of "
                         f"{', '.join(_DISTRIBUTIONS)} (e.g. optim.learning_rate=loguniform:1e-4:1e-2)")
    if kind == "choice":
        return key, kind, tuple(args.split(","))
    try:
        low, high = (float(x) for x in args.split(":"))
    except ValueError:
        raise ValueError(f"sample {item!r}: {kind} needs two numbers LOW:HIGH, e.g. {key}={kind}:1e-4:1e-2") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(f"sample {item!r}: needs LOW < HIGH" + (" and LOW > 0 for loguniform" if kind ==
                         "loguniform" else ""))
    return key, kind, (low, high)


def sample_trials(samples: Iterable[str], trials: int, seed: int = 0) -> list[dict]:
    """`trials` override dicts drawn from the --sample distributions. Trial t's value of key k depends only on
    (seed, t, k): it is the same whatever the number of trials or the order of the flags, so indices are as
    stable as a grid's. Floats are rounded to 6 significant digits, so the run directory's name (`%g`)
    is exactly the value in its config.json."""
    import zlib

    import numpy as np

    specs = [parse_sample(s) for s in samples]
    if trials < 1 or not specs:
        raise ValueError(f"random search needs --sample key=DISTRIBUTION and --trials N >= 1 (got {len(specs)} "
                         f"samples, trials={trials})")
    out = []
    for trial in range(trials):
        values = {}
        for key, kind, args in specs:
            rng = np.random.default_rng([int(seed), trial, zlib.crc32(key.encode())])
            if kind == "choice":
                values[key] = args[int(rng.integers(len(args)))]
            else:
                low, high = (np.log(args[0]), np.log(args[1])) if kind == "loguniform" else args
                x = float(rng.uniform(low, high))
                values[key] = float(f"{np.exp(x) if kind == 'loguniform' else x:.6g}")
        out.append(values)
    return out


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_points(name: str, sweeps: Mapping[str, Iterable[Any]] | Iterable[str] = (), *,
                 samples: Iterable[str] = (), trials: int = 0, sample_seed: int = 0,
                 workdir: str | None = None) -> list[SweepPoint]:
    """The points of a sweep, in a stable order: the grid of `sweeps` ("key=v1,v2"), or, with `samples`
    ("key=loguniform:1e-4:1e-2") and `trials`, each random trial crossed with that grid (trial outer, so
    `--sweep seed=0,1,2` gives every trial three seeds). Point i's run directory is `workdir/tag`."""
    if not sweeps and not (samples or trials):
        raise ValueError("a sweep needs --sweep key=v1,v2 or --sample key=DISTRIBUTION --trials N")
    root = os.path.abspath(workdir or default_workdir(name) + "_sweep")
    grid = sweep_grid(sweeps) if sweeps else [{}]
    drawn = sample_trials(samples, trials, sample_seed) if (samples or trials) else None
    points = []
    for trial, sampled in enumerate(drawn if drawn is not None else [{}]):
        for setting in grid:
            overrides = {**sampled, **setting}
            pairs = ([("trial", trial)] if drawn is not None else []) + list(overrides.items())
            tag = ",".join(f"{k}={_format_value(v)}" for k, v in pairs)
            points.append(SweepPoint(len(points), tag, overrides, os.path.join(root, tag)))
    return points


def parse_shard(text: str) -> tuple[int, int]:
    """"2/4" -> (2, 4): the third of four shards (indices from 0)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} must look like INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: INDEX must be 0..{count - 1} (COUNT={count}), e.g. 0/{max(count, 1)}")
    return index, count


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int, str] | None:
    """(index, count, where it came from) of a scheduler's array job, or None outside one:
    SLURM job arrays (SLURM_ARRAY_TASK_ID counted from SLURM_ARRAY_TASK_MIN in SLURM_ARRAY_TASK_STEP steps,
    of SLURM_ARRAY_TASK_COUNT), or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with the count in
    DEPTHLAB_SHARD_COUNT: the Job's `completions`, which Kubernetes does not export)."""
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
        low, step = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        index = (task - low) // step
        if (task - low) % step or not 0 <= index < count:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is not one of {count} evenly spaced tasks from "
                             f"SLURM_ARRAY_TASK_MIN={low}: use a range such as --array=0-{count - 1}, or pass "
                             f"--shard INDEX/COUNT")
        return index, count, "SLURM_ARRAY_TASK_ID"
    if "JOB_COMPLETION_INDEX" in environ:
        if "DEPTHLAB_SHARD_COUNT" not in environ:
            raise ValueError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the number of shards is "
                             "not: set DEPTHLAB_SHARD_COUNT to the Job's completions, or pass --shard INDEX/COUNT")
        index, count = parse_shard(f"{environ['JOB_COMPLETION_INDEX']}/{environ['DEPTHLAB_SHARD_COUNT']}")
        return index, count, "JOB_COMPLETION_INDEX"
    return None


def shard_points(points: list[SweepPoint], shard: tuple[int, int] | None) -> list[SweepPoint]:
    """The points of shard (index, count): point i belongs to shard i % count (round robin, so the seeds and
    settings of a grid spread over the machines). None: every point."""
    if shard is None:
        return list(points)
    index, count = shard
    return [p for p in points if p.index % count == index]


def point_status(workdir: str) -> str:
    """"finished" (summary.json written), "started" (metrics or a checkpoint) or "new"."""
    if os.path.exists(os.path.join(workdir, "summary.json")) or os.path.exists(os.path.join(workdir,
                                                                                           "results.json")):
        return "finished"
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) or os.path.exists(os.path.join(workdir,
                                                                                            "checkpoints")):
        return "started"
    return "new"


class SweepInterrupted(BaseException):
    """A signal arrived while a point was being built, compiled or restored (outside its training loop, where
    fit checkpoints instead): that point is abandoned (its directory resumes) and no further point starts."""


class _SweepSignals:
    """SIGINT and SIGTERM for the duration of a sweep. Inside a point's training loop fit's own handler takes
    them (checkpoint, stop the point); anywhere else this one records the signal, and raises
    SweepInterrupted while a point is being prepared. Installed only from the main thread; restored after."""

    def __init__(self):
        self.signal_name: str | None = None
        self.armed = False
        self._old: dict = {}

    def __enter__(self) -> "_SweepSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if self.armed:
            self.armed = False
            raise SweepInterrupted(self.signal_name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def is_point_error(e: BaseException) -> bool:
    """The errors that fail one point of a sweep (recorded with their one-line reason; the other points run):
    a bad value, a non-finite stop, a missing file, a locked run directory, a bad checkpoint. Anything else
    is a bug and stops the sweep with its traceback."""
    from depthlab.train.checkpoint import CheckpointError
    from depthlab.train.rundir import RunLockedError

    return isinstance(e, (ValueError, KeyError, FileNotFoundError, PermissionError, OSError, FloatingPointError,
                          RunLockedError, CheckpointError, ImportError))


def _metrics_so_far(workdir: str) -> dict:
    from depthlab.train.metric_writers import final_metrics, read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    return final_metrics(read_metrics(path)) if os.path.exists(path) else {}


def _run_point(name: str, point: SweepPoint, preset: str | None, overrides: dict, signals: _SweepSignals) -> dict:
    """Runs one point; returns its record: {"index", "point", "workdir", "status", "metrics", "seconds"} with
    status "finished", "failed" (and "error", one line), or "interrupted" (and "signal")."""
    out = {"index": point.index, "point": point.tag, "workdir": point.workdir, "metrics": {}}
    start = time.perf_counter()
    try:
        signals.armed = True
        try:
            result = run_experiment(name, preset=preset, overrides={**overrides, **point.overrides},
                                    workdir=point.workdir)
        finally:
            signals.armed = False
    except (SweepInterrupted, KeyboardInterrupt) as e:
        signals.signal_name = signals.signal_name or (str(e) if isinstance(e, SweepInterrupted) else "SIGINT")
        out.update(status="interrupted", signal=signals.signal_name, metrics=_metrics_so_far(point.workdir))
    except Exception as e:
        if not is_point_error(e):
            raise
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        print(f"\nSweep point #{point.index} ({point.tag}) failed: {reason}")
        out.update(status="failed", error=reason, metrics=_metrics_so_far(point.workdir))
    else:
        out.update(metrics=result["metrics"], summary=result.get("summary") or {})
        if result.get("preempted"):
            signals.signal_name = signals.signal_name or result["preempted"]
            out.update(status="interrupted", signal=result["preempted"])
        else:
            out["status"] = "finished"
    out["seconds"] = time.perf_counter() - start
    return out


def sweep_record_path(root: str, shard: tuple[int, int] | None) -> str:
    """sweep.json, or sweep.shard-I-of-N.json for a shard (shards share the sweep directory)."""
    if shard is None or shard[1] == 1:
        return os.path.join(root, "sweep.json")
    return os.path.join(root, f"sweep.shard-{shard[0]}-of-{shard[1]}.json")


def run_sweep(name: str, sweeps=(), *, preset: str | None = None, overrides=None, workdir: str | None = None,
              samples: Iterable[str] = (), trials: int = 0, sample_seed: int = 0,
              shard: tuple[int, int] | None = None, together: bool | str = False) -> list[dict]:
    """Runs the points of a sweep (`sweep_points`) one after the other, each in its own run directory
    `workdir/tag` (resumed if it holds a checkpoint), or only shard (index, count) of them.

    Every point's config is built, and this shard's experiments traced, before any trains: a typo fails at
    once. A point that fails (a non-finite stop, a bad value only training reveals, a locked directory) is
    recorded with its one-line reason and the others run. SIGINT/SIGTERM stops the sweep: the running point
    checkpoints (fit does), no further point starts. Returns one record per point of the shard, in order:
    {"index", "point", "workdir", "status", "metrics", ...}, status "finished", "failed" (with "error"),
    "interrupted" (with "signal") or "not started"; the same records go to sweep.json in the sweep directory.
    together: True ("auto"), "vmap" or "map": points that differ only in the seed and optimizer scalars train as one
    program (research/together.py); a shard then takes whole groups (`together.shard_groups`), so every shard
    must be run with the same --together.
    """
    points = sweep_points(name, sweeps, samples=samples, trials=trials, sample_seed=sample_seed, workdir=workdir)
    base = _as_dict(overrides)
    configs = {p.index: build_config(name, preset, {**base, **p.overrides}) for p in points}   # typos: all points
    if together and shard is not None:   # whole groups per shard, so each shard's program holds many members
        from depthlab.research.together import shard_groups
        mine = shard_groups(points, configs, shard)
    else:
        mine = shard_points(points, shard)
    for p in mine:
        validate_point(name, configs[p.index])
    root = os.path.dirname(points[0].workdir)
    records = [{"index": p.index, "point": p.tag, "workdir": p.workdir, "status": "not started", "metrics": {}}
               for p in mine]
    if shard is not None and shard[1] > 1:
        print(f"Sweep shard {shard[0]}/{shard[1]}: points {', '.join(str(p.index) for p in mine) or 'none'} of "
              f"{len(points)}.")
    try:
        with _SweepSignals() as signals:
            if together:
                from depthlab.research.together import run_together
                records[:] = run_together(name, mine, configs, preset, base,
                                          lambda p: _run_point(name, p, preset, base, signals), signals,
                                          "auto" if together is True else together)
            for i, p in enumerate(mine if not together else ()):
                if signals.signal_name:
                    break
                print(f"\n== Sweep point #{p.index} ({i + 1}/{len(mine)}{' of this shard' if shard else ''}): "
                      f"{p.tag}")
                records[i] = _run_point(name, p, preset, base, signals)
    finally:
        _write_sweep_record(sweep_record_path(root, shard), name, preset, shard, len(points), records)
    return records


def _write_sweep_record(path: str, name: str, preset: str | None, shard, total: int, records: list[dict]) -> None:
    import jax

    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root = os.path.dirname(path)
    points = [{k: (os.path.relpath(v, root) if k == "workdir" else v) for k, v in r.items() if k != "summary"}
              for r in records]
    with open(path + ".tmp", "w") as f:
        json.dump({"experiment": name, "preset": preset, "shard": list(shard) if shard else None,
                   "points_in_sweep": total, "points": points}, f, indent=2, default=float)
    os.replace(path + ".tmp", path)


def sweep_exit_code(records: list[dict]) -> int:
    """128 + the signal's number if a signal stopped the sweep; 1 if a point failed; else 0."""
    stopped = next((r["signal"] for r in records if r.get("signal")), None)
    if stopped:
        return 128 + int(getattr(signal, stopped))
    return 1 if any(r["status"] == "failed" for r in records) else 0


def _as_dict(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(item.split("=", 1) for item in overrides)
