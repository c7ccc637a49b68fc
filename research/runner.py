"""Running experiments from Python: configs with overrides, one run, a sweep.

Example:
    >>> from depthlab.research import run_experiment
    >>> result = run_experiment("vision/digits_cnn", overrides={"train.steps": 300}, workdir="runs/quick")
    >>> result["metrics"]["eval/accuracy"]
"""
from __future__ import annotations

import ast
import itertools
import json
import os
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
    """Converts a parsed override to the type of the value it replaces."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} is a boolean; got {value!r} (use true or false)")
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
    if isinstance(value, type(current)):
        return value
    raise ValueError(f"config key {key!r} expects a {type(current).__name__} (now {current!r}); got {value!r}")


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


def build_config(name: str, preset: str | None = None, overrides=None) -> ml_collections.ConfigDict:
    """The experiment's config with a preset and overrides applied (locked)."""
    module = load_experiment(name)
    config = module.get_config(preset)
    return apply_overrides(config, overrides)


def default_workdir(name: str) -> str:
    return os.path.join("runs", name.replace("/", "_"))


def run_experiment(name: str, *, preset: str | None = None, overrides=None, workdir: str | None = None,
                   config: ml_collections.ConfigDict | None = None) -> dict:
    """Runs (or resumes) one experiment; returns {"metrics", "summary", "workdir", "seconds", "preempted"}
    ("preempted": None, or the signal that stopped the run at a checkpoint)."""
    from depthlab.train import fit, open_run
    from depthlab.train.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    module = load_experiment(name)
    config = config if config is not None else build_config(name, preset, overrides)
    workdir = os.path.abspath(workdir or default_workdir(name))
    record = {"experiment": name, "preset": preset}   # experiment.json: `depthlab eval`/`report` rebuild the run
    start = time.perf_counter()
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


def sweep_grid(sweeps: Mapping[str, Iterable[Any]] | Iterable[str]) -> list[dict]:
    """Cartesian product of {"key": [v1, v2]} (or "key=v1,v2" strings) as a list of override dicts."""
    if not isinstance(sweeps, Mapping):
        parsed = {}
        for item in sweeps:
            if "=" not in item:
                raise ValueError(f"sweep {item!r} must look like key=v1,v2 (e.g. optim.name=sgd,adam)")
            k, v = item.split("=", 1)
            parsed[k] = v.split(",")
        sweeps = parsed
    keys = list(sweeps)
    return [dict(zip(keys, values)) for values in itertools.product(*[list(sweeps[k]) for k in keys])]


def run_sweep(name: str, sweeps, *, preset: str | None = None, overrides=None, workdir: str | None = None
              ) -> list[dict]:
    """One run directory per point of the grid, `workdir/key=value,...`; returns their results."""
    root = os.path.abspath(workdir or default_workdir(name) + "_sweep")
    results = []
    for point in sweep_grid(sweeps):
        tag = ",".join(f"{k}={v}" for k, v in point.items())
        merged = dict(_as_dict(overrides))
        merged.update(point)
        # Validate every point before running any (a typo should not surface after an hour): the config,
        # and the model and optimizer it builds (traced, not run).
        validate_point(name, build_config(name, preset, merged))
        results.append((tag, merged))
    out = []
    for tag, merged in results:
        result = run_experiment(name, preset=preset, overrides=merged, workdir=os.path.join(root, tag))
        result["point"] = tag
        out.append(result)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump([{"point": r["point"], "metrics": r["metrics"]} for r in out], f, indent=2)
    return out


def _as_dict(overrides) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(item.split("=", 1) for item in overrides)
