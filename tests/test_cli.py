"""The depthlab command: list, run with overrides, clear errors, sweep, report."""
import os
import subprocess
import sys

import pytest

from depthlab.research import apply_overrides, build_config
from depthlab.research.cli import main

FAST = ["--config.train.steps=20", "--config.train.log_every=10", "--config.train.eval_every=20",
        "--config.train.checkpoint_every=20", "--config.train.progress=false"]


def test_list_names_every_vision_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("vision/digits_cnn", "vision/digits_mlp", "vision/mnist1d_cnn", "vision/mnist1d_mlp",
                 "vision/mnist_resnet"):
        assert name in out


def test_console_script_runs():
    # The `depthlab` script pip installs beside this interpreter (the venv's bin/), and the module form.
    import shutil
    script = shutil.which("depthlab", path=os.path.dirname(sys.executable)) or shutil.which("depthlab")
    assert script, "the console script `depthlab` is not installed"
    for cmd in ([script, "list"], [sys.executable, "-m", "depthlab.research", "list"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0 and "vision/digits_cnn" in out.stdout, (cmd, out.stderr[-500:])


def test_run_prints_a_readable_result(tmp_path, capsys):
    assert main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), "--config.optim.name", "sgd",
                 "--config.optim.learning_rate=0.1", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Result at step 20 (" in out and "eval/accuracy=" in out and out.count("Result") == 1
    assert '"name": "sgd"' in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--config.train.stpes=5"], "unknown config key 'train.stpes'; valid keys under train: .*steps"),
    (["--config.optim.name=adamm"], "optim.name='adamm': expected one of sgd"),
    (["--config.model.name=vgg"], "unknown model 'vgg'; valid models: .*cnn"),
    (["--config.train.steps=abc"], "train.steps='abc': expected an integer"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, message):
    import re
    assert main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_unknown_experiment_suggests_close_names(capsys):
    assert main(["run", "vision/digits_cnnn"]) == 2
    assert "Did you mean vision/digits_cnn" in capsys.readouterr().err


def test_overrides_coerce_types():
    config = build_config("vision/digits_cnn", overrides={"optim.learning_rate": "1", "model.channels": "(8,16)",
                                                          "train.progress": "false"})
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert tuple(config.model.channels) == (8, 16) and config.train.progress is False
    with pytest.raises(ValueError, match="is a boolean"):
        apply_overrides(config, {"train.progress": "3"})


def test_sweep_and_report(tmp_path, capsys):
    assert main(["sweep", "vision/digits_mlp", "--workdir", str(tmp_path), "--sweep", "optim.name=sgd,adam",
                 "--sweep", "seed=0,1", *FAST]) == 0
    out = capsys.readouterr().out
    runs = sorted(os.listdir(tmp_path))
    assert runs == ["optim.name=adam,seed=0", "optim.name=adam,seed=1", "optim.name=sgd,seed=0",
                    "optim.name=sgd,seed=1", "sweep.json"]
    assert "optim.name=sgd,seed=1" in out and "eval/accuracy" in out
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("optim.name=") == 4 + 2     # a row per run, then one per setting over its seeds
    assert "train_flops_per_example" not in out  # the report reads files; costs only when asked
    assert main(["report", str(tmp_path), "--cost"]) == 0
    out = capsys.readouterr().out
    # Efficiency figures for any run: the digits MLP (64->256->256->10) has 85,002 parameters.
    assert "params" in out and "train_flops_per_example" in out and "85002" in out
    assert (tmp_path / "report" / "eval_accuracy.png").exists() and (tmp_path / "report" / "loss.png").exists()


def test_eval_restores_the_checkpoint(tmp_path, capsys):
    import json
    assert main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", "vision/digits_mlp", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    final = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
    assert out["step"] == 20 and abs(out["eval/accuracy"] - final["eval/accuracy"]) < 1e-6
    # The run directory knows its experiment; naming another one is an error that names the right one.
    assert main(["eval", "--workdir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 20
    assert main(["eval", "vision/digits_cnn", "--workdir", str(tmp_path)]) == 2
    assert "belongs to 'vision/digits_mlp', not 'vision/digits_cnn'" in capsys.readouterr().err


def test_a_typo_in_a_model_value_leaves_the_directory_usable(tmp_path, capsys):
    assert main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), "--config.model.activation=reluu",
                 *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reluu" in err, err
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    assert main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), "--config.model.activation=relu", *FAST]) == 0


def test_a_sweep_with_one_bad_value_trains_nothing(tmp_path, capsys):
    assert main(["sweep", "vision/digits_mlp", "--workdir", str(tmp_path), "--sweep",
                 "model.activation=relu,tanhh", *FAST]) == 2
    assert "tanhh" in capsys.readouterr().err
    assert not tmp_path.exists() or not any((tmp_path / d / "metrics.jsonl").exists() for d in os.listdir(tmp_path))


def test_run_help_shows_the_override_syntax_and_the_presets(capsys):
    assert main(["run", "vision/mnist_resnet", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out and "presets (--preset NAME): cifar10" in out and "train: " in out


def test_help_and_list_import_no_jax():
    # The CLI imports each sub-command's modules inside it: `depthlab --help` and `list` start in a blink.
    code = ("import sys, contextlib, io\nfrom depthlab.research.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['list']) == 0\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'ml_collections', 'numpy')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-500:])


def test_plots_label_their_axes_and_put_a_loss_spanning_decades_on_a_log_axis():
    from matplotlib.figure import Figure

    from depthlab.research.report import _plot_metric
    from depthlab.train.metric_writers import style_metric_axis

    ax = Figure().subplots()
    style_metric_axis(ax, "loss", [5.0, 0.5, 0.01])
    assert ax.get_yscale() == "log" and ax.get_ylabel().startswith("loss") and ax.get_xlabel() == "step"
    ax = Figure().subplots()
    style_metric_axis(ax, "eval/accuracy", [0.01, 0.9])   # not a loss: linear whatever its range
    assert ax.get_yscale() == "linear" and ax.get_ylabel() == "eval/accuracy"
    ax = Figure().subplots()
    style_metric_axis(ax, "loss", [2.0, 0.5])             # less than two decades: linear
    assert ax.get_yscale() == "linear"
    rows = [{"run": f"lr={lr}", "metrics": {}, "records": [{"step": s, "loss": lr * 10.0 ** -s} for s in range(4)]}
            for lr in (1, 2)]
    ax = Figure().subplots()
    assert _plot_metric(ax, rows, "loss") and ax.get_yscale() == "log" and "loss" in ax.get_ylabel()


def test_report_reads_files_only_unless_cost_is_asked(tmp_path, capsys):
    import json as _json

    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.01, "eval/accuracy": 0.5})))
    (run / "config.json").write_text(_json.dumps({"train": {"steps": 2}}))
    (run / "experiment.json").write_text(_json.dumps({"experiment": "vision/digits_mlp", "preset": None}))
    code = ("import sys, contextlib, io\nfrom depthlab.research.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n    assert main(['report', {str(tmp_path)!r}]) == 0\n"
            "print('params' in out.getvalue(), 'depthlab.research.vision.digits_mlp' in sys.modules)")   # not rebuilt
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], (out.stdout, out.stderr[-800:])
    assert os.path.isfile(tmp_path / "report" / "loss.png")


def test_libtpu_off_a_tpu_host_is_kept_quiet_for_runs(monkeypatch):
    """With the [tpu] extra installed on a machine without TPU chips, a run asks JAX for the CPU (no libtpu
    warnings); a JAX_PLATFORMS the user set is never overridden."""
    import importlib.util

    from depthlab.research import cli
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert cli.quiet_libtpu_off_tpu() is False and os.environ["JAX_PLATFORMS"] == "tpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    import glob
    monkeypatch.setattr(glob, "glob", lambda pattern: [])          # no /dev/accel*, no /dev/vfio/N
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else (None if "plugin" in name else real(name, *a)))
    assert cli.quiet_libtpu_off_tpu() is True and os.environ["JAX_PLATFORMS"] == "cpu"


def test_print_schema_lists_every_key_with_its_domain(capsys):
    assert main(["run", "vision/digits_mlp", "--print-schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "model.dropout: a number in [0, 1) (a dropout rate)  [*dropout]" in lines
    assert any(line.startswith("seed: an integer in [0, 2**32)") for line in lines)
    assert len(lines) >= 40                       # every key of the config, one line each
