"""A user's own experiment is first class: `depthlab run FILE.py`, `list`, `eval --workdir` (also on a run made
by `fit` from Python), installed packages' entry points, and a finished run answered from its files (no JAX)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from depthlab.research import registry, runner
from depthlab.research.cli import main

# A user's experiment file outside depthlab, with a helper module beside it (imported as `python FILE.py` would).
EXPERIMENT = '''
"""My MLP on the digits: a user's own experiment file."""
from depthlab.research.experiment import base_config, image_classification, smoke_preset, with_preset

from my_helpers import FEATURES


def get_config(preset=None):
    config = base_config(
        model={"name": "mlp", "features": FEATURES, "activation": "relu", "dropout": 0.0, "batch_norm": False,
               "residual": False, "output": "logits"},
        data={"name": "digits", "batch_size": 32, "eval_batch_size": 360},
        optim={"name": "adam", "learning_rate": 3e-3},
        train={"steps": 6, "log_every": 3, "eval_every": 6, "checkpoint_every": 6, "progress": False,
               "tensorboard": False},
    )
    return with_preset(config, preset, PRESETS)


PRESETS = {"smoke": smoke_preset(4)}


def make_experiment(config):
    return image_classification(config)
'''


@pytest.fixture(scope="module")
def experiment_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mylab")
    (folder / "my_helpers.py").write_text("FEATURES = (16, 10)\n")
    path = folder / "my_mlp.py"
    path.write_text(EXPERIMENT)
    sys.path.insert(0, str(folder))   # what the CLI does for a file it is given (in-process calls below)
    yield path
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def trained(experiment_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "mine"
    assert main(["run", str(experiment_file), "--workdir", str(workdir)]) == 0
    return workdir


def test_run_records_the_file_and_eval_rebuilds_it(experiment_file, trained, capsys):
    record = json.loads((trained / "experiment.json").read_text())
    assert record["experiment"] == str(experiment_file.resolve()) and record["preset"] is None
    capsys.readouterr()
    assert main(["eval", "--workdir", str(trained)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 6 and 0.0 <= out["eval/accuracy"] <= 1.0


def test_list_shows_experiment_files(experiment_file, capsys):
    assert main(["list", str(experiment_file.parent)]) == 0
    out = capsys.readouterr().out
    assert str(experiment_file) in out and "a user's own experiment file" in out and "my_helpers" not in out


def test_a_run_made_by_fit_from_python(experiment_file, tmp_path, capsys):
    from depthlab.train import fit

    module = registry.load_experiment(str(experiment_file))
    assert registry.load_experiment(str(experiment_file)) is module   # imported once per path
    config = module.get_config("smoke")
    fit(module.make_experiment(config), config, str(tmp_path / "py"))
    capsys.readouterr()
    assert main(["eval", "--workdir", str(tmp_path / "py")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "record=" in err and "depthlab eval path/to/my_experiment.py" in err
    assert main(["eval", str(experiment_file), "--workdir", str(tmp_path / "py")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_a_finished_run_answers_in_one_line_without_jax(experiment_file, trained):
    code = ("import sys\nfrom depthlab.research.cli import main\n"
            f"code = main(['run', {str(experiment_file)!r}, '--workdir', {str(trained)!r}])\n"
            "print('jax imported' if 'jax' in sys.modules else 'no jax', code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[-1] == "no jax 0", (out.stdout, out.stderr[-800:])
    assert len(lines) == 2 and "already finished at step 6; nothing to do" in lines[0], lines


def test_the_fast_path_falls_back_on_any_doubt(experiment_file, trained, tmp_path):
    import shutil

    name = str(experiment_file)
    assert runner.finished_run(name, trained)["metrics"]["step"] == 6
    assert runner.finished_run(name, trained, overrides={"train.steps": 8}) is None   # another command
    assert runner.finished_run(name, trained, preset="smoke") is None
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert runner.finished_run(name, copy) is not None
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')   # a cut last line
    assert runner.finished_run(name, copy) is None
    shutil.rmtree(copy)
    shutil.copytree(trained, copy)
    os.remove(copy / "checkpoints" / "6" / "depthlab_integrity.json")   # an unverified newest checkpoint
    assert runner.finished_run(name, copy) is None


def test_an_installed_package_adds_experiments_by_entry_point(tmp_path):
    # A tiny installed distribution: a .dist-info with an entry_points.txt on sys.path, and its module.
    (tmp_path / "tinylab").mkdir()
    (tmp_path / "tinylab" / "__init__.py").write_text("")
    (tmp_path / "tinylab" / "study.py").write_text(textwrap.dedent('''
        """A tiny study from an installed package."""
        import ml_collections


        def get_config(preset=None):
            return ml_collections.ConfigDict({"seed": 0, "n": 3})


        def run(config, workdir):
            return {"total": sum(range(config.n))}
    '''))
    info = tmp_path / "tinylab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinylab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[depthlab.experiments]\ntinylab/study = tinylab.study\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "depthlab.research", "list"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert listed.returncode == 0 and "tinylab/study" in listed.stdout, listed.stderr[-500:]
    assert "A tiny study from an installed package." in listed.stdout
    ran = subprocess.run([sys.executable, "-m", "depthlab.research", "run", "tinylab/study", "--workdir",
                          str(tmp_path / "run"), "--config.n=5"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert ran.returncode == 0 and "total: 10" in ran.stdout, (ran.stdout[-500:], ran.stderr[-800:])
    assert json.loads((tmp_path / "run" / "experiment.json").read_text())["experiment"] == "tinylab/study"


def test_sweep_runs_a_file_and_each_point_records_it(experiment_file, tmp_path, capsys):
    assert main(["sweep", str(experiment_file), "--workdir", str(tmp_path), "--sweep", "seed=0,1"]) == 0
    capsys.readouterr()
    for point in ("seed=0", "seed=1"):
        assert (tmp_path / point / "summary.json").is_file()
        recorded = json.loads((tmp_path / point / "experiment.json").read_text())
        assert os.path.samefile(recorded["experiment"], experiment_file)
    # each point is evaluated from its directory alone
    assert main(["eval", "--workdir", str(tmp_path / "seed=1")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
