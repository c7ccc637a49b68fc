"""Metric writers: console, JSON lines (`workdir/metrics.jsonl`) and TensorBoard event files.

Each metrics.jsonl line is one JSON object: `step` plus metric names; evaluation metrics are
prefixed `eval/`. Only process 0 writes.

Example:
    >>> writer = MetricWriter(workdir)
    >>> writer.write(100, {"loss": 0.3, "eval/accuracy": 0.97})
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

import jax


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file (a missing file gives [])."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: everything before it is intact
                    break
    return records


def final_metrics(records: Iterable[dict]) -> dict:
    """The last record carrying eval/ metrics merged over the last record (the run's result)."""
    records = list(records)
    if not records:
        return {}
    result = dict(records[-1])
    for record in reversed(records):
        if any(k.startswith("eval/") for k in record):
            result.update(record)
            break
    return result


class MetricWriter:
    """Writes metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(self.workdir, exist_ok=True)
            self._file = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
                except ImportError:  # TensorBoard files are optional; metrics.jsonl always exists
                    self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def truncate_metrics(workdir: str | os.PathLike, after_step: int) -> None:
    """Drops metrics.jsonl records with step > after_step (a resumed run re-does those steps)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    records = read_metrics(path)
    if not os.path.exists(path):
        return
    keep = [r for r in records if r.get("step", 0) <= after_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in keep:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def format_metrics(metrics: dict, keys: Iterable[str] | None = None) -> str:
    """'name=value' pairs, 4 significant digits."""
    keys = list(keys) if keys is not None else sorted(metrics)
    return ", ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


def result_line(metrics: dict) -> str:
    """The run's result in one line: its eval/ metrics (accuracies in %), else its other final metrics."""
    shown = {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    if not shown:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"
                 and not k.startswith("perf/")}
    return ", ".join(f"{k}={100 * v:.2f}%" if k.endswith(("accuracy", "/acc")) else f"{k}={v:.4g}"
                     for k, v in sorted(shown.items()))


def plot_curves(workdir: str | os.PathLike, filename: str = "curves.png") -> str | None:
    """`workdir/curves.png`: the training loss and every eval metric of metrics.jsonl over steps, one panel
    each, at most 4 to a row. Drawn on a `matplotlib.figure.Figure` (the global backend is left alone, so a
    notebook keeps its inline figures). Returns the path, or None when nothing was logged."""
    from matplotlib.figure import Figure

    records = read_metrics(workdir)
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith("eval/")})
    names = [n for n in names if any(isinstance(r.get(n), (int, float)) for r in records)]
    if not names:
        return None
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, name in zip(axes, names):
        points = sorted((r["step"], float(r[name])) for r in records if isinstance(r.get(name), (int, float)))
        ax.plot(*zip(*points), marker="o" if name.startswith("eval/") else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = os.path.join(os.fspath(workdir), filename)
    fig.savefig(path, dpi=100)
    return path

