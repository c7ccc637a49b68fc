"""Reading run directories: tables of final metrics and PNG plots of the curves.

Example:
    >>> rows = collect_runs("runs/")          # one dict per run directory (holding metrics.jsonl)
    >>> print(format_table(rows))
    >>> plot_runs(rows, "runs/report")
"""
from __future__ import annotations

import json
import os

from depthlab.train.metric_writers import final_metrics, read_metrics


def collect_runs(root: str) -> list[dict]:
    """Every run directory below `root` (or `root` itself): {"run", "metrics", "records", "config"}."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "tensorboard"))
        if "metrics.jsonl" in filenames:
            records = read_metrics(os.path.join(dirpath, "metrics.jsonl"))
            config = {}
            if os.path.exists(os.path.join(dirpath, "config.json")):
                with open(os.path.join(dirpath, "config.json")) as f:
                    config = json.load(f)
            runs.append({"run": os.path.relpath(dirpath, root) if dirpath != root else os.path.basename(root),
                         "path": dirpath, "metrics": final_metrics(records), "records": records, "config": config})
    return runs


def run_cost(path: str) -> dict:
    """Parameters and FLOPs per example of a run's compiled train step (XLA cost analysis), for any
    experiment trained by `fit`: rebuilt from the run's experiment.json and config.json. {} if unknown."""
    import jax
    import numpy as np

    from depthlab.research.evaluation import run_config
    from depthlab.research.registry import load_experiment

    info_path = os.path.join(path, "experiment.json")
    if not os.path.exists(info_path):
        return {}
    with open(info_path) as f:
        info = json.load(f)
    module = load_experiment(info["experiment"])
    if not hasattr(module, "make_experiment"):
        return {}
    config = run_config(info["experiment"], path, info.get("preset"), None)
    experiment = module.make_experiment(config)
    import flax.linen as nn
    state = jax.eval_shape(lambda r: nn.meta.unbox(experiment.init(r)), jax.random.key(0))
    params = getattr(state, "params", state)
    num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    batch = next(iter(experiment.train_batches(0))) if experiment.train_batches is not None else None
    compiled = jax.jit(experiment.train_step).lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    examples = len(next(iter(batch.values()))) if batch else 1
    return {"params": num_params, "train_flops_per_example": float(cost.get("flops", float("nan"))) / examples}


def format_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A plain-text table: one row per run, columns = final eval metrics (and step, loss)."""
    if not rows:
        return "(no runs)"
    if keys is None:
        names = set()
        for row in rows:
            names.update(k for k in row["metrics"] if k.startswith("eval/"))
        keys = ["step"] + sorted(names)
        keys += [k for k in ("params", "train_flops_per_example") if any(k in row["metrics"] for row in rows)]
    header = ["run"] + keys
    body = []
    for row in rows:
        cells = [row["run"]]
        for k in keys:
            v = row["metrics"].get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def _plot_metric(ax, rows: list[dict], name: str) -> bool:
    drawn = False
    for row in rows:
        points = [(r["step"], r[name]) for r in row["records"] if isinstance(r.get(name), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if name.startswith("eval/") else None, markersize=3, label=row["run"])
            drawn = True
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drawn


def plot_runs(rows: list[dict], out_dir: str, names: list[str] | None = None) -> list[str]:
    """One PNG per metric (all runs overlaid); returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    if names is None:
        names = sorted({k for row in rows for r in row["records"] for k in r
                        if k != "step" and not k.startswith("perf/")})
    paths = []
    for name in names:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if _plot_metric(ax, rows, name):
            if len(rows) > 1:
                ax.legend(fontsize=7)
            path = os.path.join(out_dir, name.replace("/", "_") + ".png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            paths.append(path)
        plt.close(fig)
    return paths


def plot_run(workdir: str) -> dict:
    """curves.png in `workdir`: training loss and every eval metric over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith("eval/")})
    names = [n for n in names if any(isinstance(r.get(n), (int, float)) for r in records)]
    if not names:
        return {}
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    row = {"run": os.path.basename(workdir), "records": records}
    for ax, name in zip(axes[0], names):
        _plot_metric(ax, [row], name)
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"plot": path}
