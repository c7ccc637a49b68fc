"""Reading run directories: tables of final metrics and PNG plots of the curves.

Example:
    >>> rows = collect_runs("runs/")          # one dict per run directory (holding metrics.jsonl)
    >>> print(format_runs_table(rows))        # one row per run
    >>> print(format_settings_table(rows))    # one row per setting: mean ± std over its seeds, and n
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
        # hidden folders are work in progress (a together group's scratch run, .together/), not runs
        dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "tensorboard") and not d.startswith("."))
        if "metrics.jsonl" in filenames:
            records = read_metrics(os.path.join(dirpath, "metrics.jsonl"))
            config = {}
            if os.path.exists(os.path.join(dirpath, "config.json")):
                with open(os.path.join(dirpath, "config.json")) as f:
                    config = json.load(f)
            row = {"run": os.path.relpath(dirpath, root) if dirpath != root else os.path.basename(root),
                   "path": dirpath, "metrics": final_metrics(records), "records": records, "config": config}
            steps = (config.get("train") or {}).get("steps") if isinstance(config.get("train"), dict) else None
            if isinstance(steps, int) and row["metrics"].get("step", steps) < steps:
                row["status"] = "unfinished"    # stopped early (a signal, a failure): left out of the seed means
            runs.append(row)
    return runs


def run_cost(path: str, cache: dict | None = None) -> dict:
    """Parameters and FLOPs per example of a run's compiled train step (XLA cost analysis), for any
    experiment trained by `fit`: rebuilt from the run's experiment.json and config.json with the engine's
    own phases (`place`, `compile_steps`), as `depthlab eval` does. {} if unknown. Pass one `cache` dict for
    many runs: runs whose configs differ only in `seed` (a sweep's seeds) share one compilation."""
    from depthlab.research.evaluation import recorded_experiment, run_config
    from depthlab.research.registry import load_experiment

    info = recorded_experiment(path)
    if not info:
        return {}
    module = load_experiment(info["experiment"])
    if not hasattr(module, "make_experiment"):
        return {}
    config = run_config(info["experiment"], path, info.get("preset"), None)
    settings = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k != "seed"}
    key = json.dumps([info["experiment"], settings], sort_keys=True, default=str)
    if cache is None or key not in cache:
        cost = compiled_cost(module.make_experiment(config), config)
        if cache is None:
            return cost
        cache[key] = cost
    return dict(cache[key])


def compiled_cost(experiment, config) -> dict:
    """{"params", "train_flops_per_example"} of `experiment`'s train step as `fit` compiles it (`place` +
    `compile_steps`, one step per call), lowered on abstract inputs: nothing is initialised or run."""
    import jax
    import numpy as np

    from depthlab.train import compile_steps, place
    from depthlab.train.data import batch_spec, first_batch

    placement = place(experiment, config)
    compiled = compile_steps(experiment, placement)
    params = getattr(placement.abstract_state, "params", placement.abstract_state)
    num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    batch, examples = None, 1
    if experiment.train_batches is not None:
        first = first_batch(experiment.train_batches(0))
        batch = batch_spec(first, placement.batch_sharding)
        examples = len(next(iter(first.values())))
    cost = compiled.train.lower(placement.abstract_state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    # XLA counts one device's share of the partitioned step: the step's total is that times the devices
    flops = float(cost.get("flops", float("nan"))) * placement.mesh.devices.size
    return {"params": num_params, "train_flops_per_example": flops / examples}


def _table_keys(rows: list[dict]) -> list[str]:
    names = set()
    for row in rows:
        names.update(k for k in row["metrics"] if k.startswith("eval/"))
    keys = ["step"] + sorted(names)
    return keys + [k for k in ("params", "train_flops_per_example") if any(k in row["metrics"] for row in rows)]


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def format_runs_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A plain-text table: one row per run, columns = final eval metrics (and step, loss). When some row's
    "status" is not "finished" (a sweep's failed, interrupted or not started points; a report's unfinished
    runs), a status column says so."""
    if not rows:
        return "(no runs)"
    keys = _table_keys(rows) if keys is None else keys
    status = any(row.get("status", "finished") != "finished" for row in rows)
    header = ["run"] + (["status"] if status else []) + keys
    body = []
    for row in rows:
        cells = [row["run"]] + ([row.get("status", "finished")] if status else [])
        for k in keys:
            v = row["metrics"].get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body.append(cells)
    return _text_table(header, body)


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """{setting: its finished runs} (see `setting_name`); runs whose "status" says they did not finish are
    left out. Empty when no setting has two or more runs (nothing to average)."""
    groups = group_by_setting([row for row in rows if row.get("status", "finished") == "finished"])
    return groups if any(len(members) > 1 for members in groups.values()) else {}


def format_settings_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """One row per setting (the runs whose names differ only in `seed=`): n, the number of finished runs, and
    each final metric as mean ± std over them (the sample standard deviation, ddof=1; the mean alone for
    n = 1). "" when no setting has several runs. Beside `format_runs_table`'s per-run rows."""
    import numpy as np

    groups = seed_groups(rows)
    if not groups:
        return ""
    keys = [k for k in (_table_keys(rows) if keys is None else keys) if k != "step"]
    body = []
    for setting, members in groups.items():
        cells = [setting, str(len(members))]
        for k in keys:
            values = [m["metrics"][k] for m in members if isinstance(m["metrics"].get(k), (int, float))]
            if not values:
                cells.append("")
            elif len(set(values)) == 1:   # one run, or a figure the seeds share (params, FLOPs)
                cells.append(f"{values[0]:.4g}" if isinstance(values[0], float) else str(values[0]))
            else:
                cells.append(f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"
                             + (f" (n={len(values)})" if len(values) != len(members) else ""))
        body.append(cells)
    return "Over seeds (mean ± sample std, ddof=1):\n" + _text_table(["setting", "n"] + keys, body)


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

    from depthlab.train.metric_writers import style_metric_axis

    drawn, drawn_values = False, []
    marker = "o" if name.startswith("eval/") else None
    for index, (setting, members) in enumerate(group_by_setting(rows).items()):
        curves = [c for c in (_curve(row, name) for row in members) if c]
        if not curves:
            continue
        style = line_style(index)
        if len(curves) == 1:
            xs, ys = zip(*sorted(curves[0].items()))
            ax.plot(xs, ys, marker=marker, markersize=3, label=setting, **style)
            drawn_values += ys
        else:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[step] for step in steps] for c in curves])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, marker=marker, markersize=3, label=f"{setting} (mean of {len(curves)} seeds)",
                    **style)
            ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.2, linewidth=0)
            drawn_values += [v for v in mean - std if v > 0] + list(mean + std)
        drawn = True
    ax.set_title(name)
    style_metric_axis(ax, name, drawn_values)
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
        fig = Figure(figsize=(7.5 if len(rows) > 1 else 5, 3.5))
        ax = fig.subplots()
        if _plot_metric(ax, rows, name):
            if len(rows) > 1:   # outside the axes, to their right: it never covers a curve
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
            path = os.path.join(out_dir, name.replace("/", "_") + ".png")
            fig.tight_layout()
            fig.savefig(path, dpi=100, bbox_inches="tight")
            paths.append(path)
    return paths


def plot_run(workdir: str) -> dict:
    """curves.png in `workdir` (the engine's `plot_curves`: training loss and every eval metric over steps).
    Returns {"plot": path} ({} when nothing was logged); show it in a notebook with
    `IPython.display.Image(path)`."""
    path = plot_curves(workdir)
    return {"plot": path} if path else {}
