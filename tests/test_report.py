"""depthlab report's plots: seeds of one setting drawn as mean +- std, one style per setting, panels in a grid,
and no change to matplotlib's global backend."""
import json
import os

import matplotlib
import numpy as np

from depthlab.research.report import collect_runs, group_by_setting, line_style, plot_run, plot_runs, setting_name


def write_run(path, losses, accuracy=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, 1):
            record = {"step": step * 10, "loss": loss}
            if accuracy is not None and step == len(losses):
                record.update({"eval/accuracy": accuracy, "eval/loss": loss, "eval/a": 1.0, "eval/b": 2.0,
                               "eval/c": 3.0})
            f.write(json.dumps(record) + "\n")


def test_setting_name_drops_only_the_seed():
    assert setting_name("sweep/optim.name=sgd,seed=0") == "sweep/optim.name=sgd"
    assert setting_name("sweep/seed=2,optim.name=adam") == "sweep/optim.name=adam"
    assert setting_name("sweep/seed=2") == "sweep"
    assert setting_name("reseed=1") == "reseed=1"
    assert setting_name("run_a") == "run_a"


def test_sweep_plots_group_seeds_with_mean_and_std(tmp_path):
    for opt, base in (("sgd", 2.0), ("adam", 1.0)):
        for seed in range(3):
            write_run(tmp_path / f"optim.name={opt},seed={seed}", [base + seed, base + seed - 0.5], 0.9)
    rows = collect_runs(str(tmp_path))
    groups = group_by_setting(rows)
    assert sorted(groups) == ["optim.name=adam", "optim.name=sgd"]
    assert all(len(members) == 3 for members in groups.values())

    backend = matplotlib.get_backend()
    paths = plot_runs(rows, str(tmp_path / "report"), names=["loss"])
    assert matplotlib.get_backend() == backend
    assert [os.path.basename(p) for p in paths] == ["loss.png"]

    from matplotlib.figure import Figure
    from depthlab.research.report import _plot_metric
    ax = Figure().subplots()
    assert _plot_metric(ax, rows, "loss")
    lines = ax.get_lines()
    assert len(lines) == 2                                   # one line per setting, not per seed
    assert {line.get_label() for line in lines} == {"optim.name=adam (mean of 3 seeds)",
                                                    "optim.name=sgd (mean of 3 seeds)"}
    adam = next(line for line in lines if "adam" in line.get_label())
    np.testing.assert_allclose(adam.get_ydata(), [2.0, 1.5])  # the mean over seeds 0, 1, 2
    assert len(ax.collections) == 2                          # the +- std bands
    assert lines[0].get_color() != lines[1].get_color()


def test_line_styles_stay_distinct_past_ten_settings():
    styles = [line_style(i) for i in range(25)]
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 25


def test_plot_run_wraps_many_panels_into_a_grid(tmp_path):
    write_run(tmp_path, [2.0, 1.0], 0.9)     # loss + 5 eval metrics = 6 panels: 2 rows of at most 4
    path = plot_run(str(tmp_path))["plot"]
    import matplotlib.image
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (1600, 640)


def test_run_cost_compiles_once_per_config_and_seeds_share_it(tmp_path, monkeypatch):
    # Three run directories as `fit` records them; two differ only in their seed.
    from depthlab.research import build_config, report

    for run, seed, hidden in (("seed=0", 0, 256), ("seed=1", 1, 256), ("wide", 0, 512)):
        os.makedirs(tmp_path / run)
        (tmp_path / run / "experiment.json").write_text(json.dumps({"experiment": "vision/digits_mlp",
                                                                    "preset": "smoke"}))
        config = build_config("vision/digits_mlp", "smoke", {"seed": seed,
                                                             "model.features": (hidden, hidden, 10)})
        (tmp_path / run / "config.json").write_text(config.to_json_best_effort())
    calls = []
    real = report.compiled_cost
    monkeypatch.setattr(report, "compiled_cost", lambda *a: (calls.append(1), real(*a))[1])
    cache = {}
    costs = {run: report.run_cost(str(tmp_path / run), cache=cache) for run in ("seed=0", "seed=1", "wide")}
    assert len(calls) == 2 and costs["seed=0"] == costs["seed=1"]
    assert costs["seed=0"]["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10   # 85,002
    assert costs["wide"]["params"] > costs["seed=0"]["params"]
    assert costs["wide"]["train_flops_per_example"] > costs["seed=0"]["train_flops_per_example"] > 0
    assert report.run_cost(str(tmp_path)) == {}                                   # no experiment.json
