"""Metric writers: console, JSON lines (`workdir/metrics.jsonl`) and TensorBoard event files.

Each metrics.jsonl line is one JSON object: `step` plus metric names; evaluation metrics are
prefixed `eval/`. Only process 0 writes.

Example:
    >>> writer = MetricWriter(workdir)
    >>> writer.write(100, {"loss": 0.3, "eval/accuracy": 0.97})
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import stat
import time
from typing import Iterable

import jax

log = logging.getLogger("depthlab")


def _clean(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def _metrics_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


@dataclasses.dataclass
class MetricsScan:
    """What a metrics.jsonl holds: its valid records in file order and the lines that are not one (a JSON
    object with an integer `step`), as (1-based line number, raw bytes). `last_unreadable`: its last
    non-empty line is one of them (a line cut by a kill), so its valid records may end before the run did."""
    path: str
    records: list[dict]
    unreadable: list[tuple[int, bytes]]
    last_unreadable: bool


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:   # JSONDecodeError and UnicodeDecodeError
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def scan_metrics(path: str | os.PathLike) -> MetricsScan:
    """Reads every line of a metrics.jsonl (or of `path/metrics.jsonl`); a missing file holds nothing. A line
    that cannot be parsed is reported, never a reason to drop the lines after it. Raises OSError naming the
    file when it is not a regular file (a FIFO would block the read)."""
    path = _metrics_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return MetricsScan(path, [], [], False)
    if not stat.S_ISREG(mode):
        raise OSError(f"{path} is not a regular file: move it away (the run's metric records live there)")
    records, unreadable, last_bad = [], [], False
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse(line.strip())
            if record is None:
                unreadable.append((number, line))
            else:
                records.append(record)
            last_bad = record is None
    return MetricsScan(path, records, unreadable, last_bad)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All valid records of a metrics.jsonl file, in file order (a missing file gives []). Lines that cannot
    be parsed are skipped, not the lines after them; `scan_metrics` reports them, and a resumed run sets them
    aside (`truncate_metrics`)."""
    return scan_metrics(path).records


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


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class MetricWriter:
    """Writes metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(self.workdir, exist_ok=True)
            path = os.path.join(self.workdir, "metrics.jsonl")
            self._file = open(path, "a")
            if self._file.tell() and not _ends_with_newline(path):   # a line cut by a kill stays its own line
                self._file.write("\n")
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


def truncate_metrics(workdir: str | os.PathLike, after_step: int) -> MetricsScan:
    """Drops metrics.jsonl records with step > after_step (a resumed run re-does those steps) and returns the
    scan of the file before the change. Lines that cannot be parsed are not lost: they are appended, as they
    were, to `metrics.jsonl.unreadable-<time>` beside it, with one warning; every valid record up to
    after_step is kept. The file is only rewritten when something changes (atomically, via a tmp file)."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    scan = scan_metrics(path)
    if jax.process_index() != 0 or not os.path.exists(path):
        return scan
    keep = [r for r in scan.records if r["step"] <= after_step]
    if not scan.unreadable and len(keep) == len(scan.records):
        return scan
    if scan.unreadable:
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        with open(aside, "ab") as f:
            for _, line in scan.unreadable:
                f.write(line if line.endswith(b"\n") else line + b"\n")
        numbers = ", ".join(str(n) for n, _ in scan.unreadable[:5]) + (", ..." if len(scan.unreadable) > 5 else "")
        log.warning("%s: %d line(s) could not be parsed (line %s%s); kept them in %s and kept its %d valid records",
                    path, len(scan.unreadable), numbers, ", the last one: cut short" if scan.last_unreadable else "",
                    aside, len(scan.records))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in keep:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return scan


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


def style_metric_axis(ax, name: str, values: Iterable[float]) -> None:
    """Labels a metric's axes (x: step, y: the metric's name) and puts a loss-like curve (loss, perplexity,
    error) that spans two decades or more on a log y axis."""
    values = [float(v) for v in values if math.isfinite(float(v))]
    lossy = any(word in name.lower() for word in ("loss", "perplexity", "ppl", "error", "mse"))
    log = lossy and bool(values) and min(values) > 0 and max(values) / min(values) >= 100
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name + (" (log scale)" if log else ""))


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
        style_metric_axis(ax, name, [y for _, y in points])
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = os.path.join(os.fspath(workdir), filename)
    fig.savefig(path, dpi=100)
    return path

