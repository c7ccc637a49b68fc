"""Reading run directories: tables of final metrics and PNG plots of the curves.

Example:
    >>> rows = collect_runs("runs/")          # one dict per run directory (holding metrics.jsonl)
    >>> print(format_table(rows))
    >>> plot_runs(rows, "runs/report")
"""
from __future__ import annotations

import json
import os
import re

from depthlab.train.metric_writers import final_metrics, plot_curves, read_metrics


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


# Line styles of the settings on one plot: ten colours, then the same colours dashed, dash-dotted, dotted.
LINE_STYLES = ("-", "--", "-.", ":")
_SEED = re.compile(r"(^|,)seed=[^,/]*")


def setting_name(run: str) -> str:
    """A run's name without its seed: the runs of a sweep `optim.name=sgd,seed=0` and
    `optim.name=sgd,seed=1` share the setting `optim.name=sgd`."""
    name = _SEED.sub("", run.replace("/", "/,")).replace("/,", "/").strip(",").rstrip("/")
    return name or "all seeds"


def group_by_setting(rows: list[dict]) -> dict[str, list[dict]]:
    """{setting name: its runs}, in the order the settings first appear (see `setting_name`)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(setting_name(row["run"]), []).append(row)
    return groups


def line_style(index: int) -> dict:
    """Colour and line style of the index-th setting on a plot, distinct for the first 40."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](index % 10), "linestyle": LINE_STYLES[(index // 10) % 4]}


def _curve(row: dict, name: str) -> dict[int, float]:
    return {r["step"]: float(r[name]) for r in row["records"] if isinstance(r.get(name), (int, float))}


def _plot_metric(ax, rows: list[dict], name: str) -> bool:
    """Draws metric `name` over steps, one line per setting: a single run as it is; the seeds of one
    setting as their mean (over the steps they all logged) with a band of +- one standard deviation."""
    import numpy as np

    drawn = False
    marker = "o" if name.startswith("eval/") else None
    for index, (setting, members) in enumerate(group_by_setting(rows).items()):
        curves = [c for c in (_curve(row, name) for row in members) if c]
        if not curves:
            continue
        style = line_style(index)
        if len(curves) == 1:
            xs, ys = zip(*sorted(curves[0].items()))
            ax.plot(xs, ys, marker=marker, markersize=3, label=setting, **style)
        else:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[step] for step in steps] for c in curves])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, marker=marker, markersize=3, label=f"{setting} (mean of {len(curves)} seeds)",
                    **style)
            ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.2, linewidth=0)
        drawn = True
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return drawn


def plot_runs(rows: list[dict], out_dir: str, names: list[str] | None = None) -> list[str]:
    """One PNG per metric, every setting on it in its own colour and line style; the seeds of one setting
    (runs whose names differ only in `seed=`) drawn as mean +- std. Returns the written paths."""
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    if names is None:
        names = sorted({k for row in rows for r in row["records"] for k in r
                        if k != "step" and not k.startswith("perf/")})
    paths = []
    for name in names:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        if _plot_metric(ax, rows, name):
            if len(rows) > 1:
                ax.legend(fontsize=7)
            path = os.path.join(out_dir, name.replace("/", "_") + ".png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            paths.append(path)
    return paths


def plot_run(workdir: str) -> dict:
    """curves.png in `workdir` (the engine's `plot_curves`: training loss and every eval metric over steps).
    Returns {"plot": path} ({} when nothing was logged); show it in a notebook with
    `IPython.display.Image(path)`."""
    path = plot_curves(workdir)
    return {"plot": path} if path else {}
