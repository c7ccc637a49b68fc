"""depthlab sweep: a signal stops the sweep, a failed point is recorded while the others run, stable point
indices split into shards (also from SLURM / Kubernetes variables), random search, seeds grouped in tables."""
import json
import os
import signal
import subprocess
import sys

import pytest

from depthlab.research import runner
from depthlab.research.cli import main
from depthlab.research.report import collect_runs, format_settings_table

EXP = ["vision/digits_mlp", "--preset", "smoke"]
FAST = ["--config.train.steps=20", "--config.train.log_every=10", "--config.train.eval_every=20",
        "--config.train.checkpoint_every=20", "--config.train.progress=false"]


def sweep_json(path):
    with open(path) as f:
        return {p["index"]: p for p in json.load(f)["points"]}


def test_a_failed_point_is_recorded_and_the_others_run(tmp_path, capsys):
    code = main(["sweep", *EXP, "--workdir", str(tmp_path), "--sweep", "optim.learning_rate=1e38,0.002", *FAST])
    captured = capsys.readouterr()
    assert code == 1
    points = sweep_json(tmp_path / "sweep.json")
    assert points[0]["status"] == "failed" and "NonFiniteError: non-finite training metric" in points[0]["error"]
    assert "\n" not in points[0]["error"]
    assert points[1]["status"] == "finished" and points[1]["metrics"]["step"] == 20
    assert "1 of 2 points failed" in captured.err and "#0 optim.learning_rate=1e38: NonFiniteError" in captured.err
    assert "failed" in captured.out and "optim.learning_rate=0.002" in captured.out


def test_a_signal_during_training_stops_the_sweep_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    from depthlab.train import loop

    calls, sent = [], []
    real_run = runner.run_experiment

    def counting_run(*args, **kwargs):
        calls.append(kwargs["workdir"])
        return real_run(*args, **kwargs)

    class CtrlCInSecondPoint(loop.LogWindow):
        def drain(self):   # at the first log (step 10) of the second point: a real SIGINT to this process
            if len(calls) == 2 and not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            return super().drain()

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(runner, "run_experiment", counting_run)
    monkeypatch.setattr(loop, "LogWindow", CtrlCInSecondPoint)
    argv = ["sweep", *EXP, "--workdir", str(tmp_path), "--sweep", "seed=0,1,2", *FAST]
    assert main(argv) == 128 + signal.SIGINT
    out = capsys.readouterr().out
    assert len(calls) == 2                                    # the third point never started
    points = sweep_json(tmp_path / "sweep.json")
    assert [points[i]["status"] for i in range(3)] == ["finished", "interrupted", "not started"]
    stopped_at = points[1]["metrics"]["step"]     # the loop stops at the call after the signal's
    assert points[1]["signal"] == "SIGINT" and 10 <= stopped_at < 20
    assert "interrupted" in out and "not started" in out and "Stopped by SIGINT" in out
    assert not (tmp_path / "seed=2").exists()
    assert sent and signal.getsignal(signal.SIGINT) is before

    # The same command again: the first point is kept, the second resumes from its checkpoint.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and f"from its checkpoint at step {stopped_at}." in out
    points = sweep_json(tmp_path / "sweep.json")
    assert all(points[i]["status"] == "finished" and points[i]["metrics"]["step"] == 20 for i in range(3))


def test_a_signal_between_points_stops_the_sweep(tmp_path, monkeypatch, capsys):
    real_run, calls = runner.run_experiment, []

    def terminated_before_the_second(*args, **kwargs):
        calls.append(kwargs["workdir"])
        if len(calls) == 2:   # while the point is being built (no training loop yet): the sweep's handler
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(runner, "run_experiment", terminated_before_the_second)
    assert main(["sweep", *EXP, "--workdir", str(tmp_path), "--sweep", "seed=0,1,2", *FAST]) == 128 + signal.SIGTERM
    points = sweep_json(tmp_path / "sweep.json")
    assert [points[i]["status"] for i in range(3)] == ["finished", "interrupted", "not started"]
    assert points[1]["signal"] == "SIGTERM" and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is before     # the sweep's handlers are gone with it


def test_points_have_stable_indices_and_shards_split_them():
    points = runner.sweep_points("vision/digits_mlp", ["optim.name=sgd,adam", "seed=0,1,2"], workdir="/w")
    assert [p.index for p in points] == list(range(6))
    assert points[4].tag == "optim.name=adam,seed=1" and points[4].workdir == "/w/optim.name=adam,seed=1"
    shards = [runner.shard_points(points, (i, 4)) for i in range(4)]
    assert sorted(p.index for s in shards for p in s) == list(range(6))
    assert [p.index for p in shards[1]] == [1, 5]
    assert runner.parse_shard("3/4") == (3, 4)
    # a together sweep deals whole groups (configs equal but for seed and optimizer scalars) to the shards, so no
    # shard trains a group cut in pieces; with fewer groups than shards each group is cut into equal runs
    from depthlab.research.together import shard_groups
    configs = {p.index: runner.build_config("vision/digits_mlp", "smoke", p.overrides) for p in points}
    assert [[p.index for p in shard_groups(points, configs, (i, 2))] for i in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert [[p.index for p in shard_groups(points, configs, (i, 4))] for i in range(4)] == [[0, 1], [2], [3, 4], [5]]
    assert [[p.index for p in shard_groups(points, configs, (i, 3))] for i in range(3)] == [[0, 1, 5], [2], [3, 4]]
    assert runner.split_values("(32,10),(64,10),[1,2]") == ["(32,10)", "(64,10)", "[1,2]"]
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            runner.parse_shard(bad)


def test_the_shard_comes_from_slurm_or_kubernetes():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}   # --array=1-7:2 -> tasks 1, 3, 5, 7
    assert runner.shard_from_environment(env) == (3, 4, "SLURM_ARRAY_TASK_ID")
    assert runner.shard_from_environment({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"})[:2] == (2, 3)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=9"):
        runner.shard_from_environment({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert runner.shard_from_environment({"JOB_COMPLETION_INDEX": "2", "DEPTHLAB_SHARD_COUNT": "5"})[:2] == (2, 5)
    with pytest.raises(ValueError, match="DEPTHLAB_SHARD_COUNT"):
        runner.shard_from_environment({"JOB_COMPLETION_INDEX": "2"})
    assert runner.shard_from_environment({}) is None


def test_random_search_is_seeded_and_its_indices_stable():
    samples = ["optim.learning_rate=loguniform:1e-4:1e-2", "model.activation=choice:relu,tanh",
               "optim.weight_decay=uniform:0:0.1"]
    few = runner.sweep_points("vision/digits_mlp", ["seed=0,1"], samples=samples, trials=3, workdir="/w")
    more = runner.sweep_points("vision/digits_mlp", ["seed=0,1"], samples=samples[::-1], trials=5, workdir="/w")
    assert len(few) == 6 and len(more) == 10
    for a, b in zip(few, more):          # more trials (and another flag order) keep the first ones
        assert a.index == b.index and a.overrides == {**b.overrides}
    assert runner.sample_trials(samples, 3, seed=1) != runner.sample_trials(samples, 3, seed=0)
    lrs = [p.overrides["optim.learning_rate"] for p in more]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 5
    assert {p.overrides["model.activation"] for p in more} <= {"relu", "tanh"}
    assert few[1].tag.startswith("trial=0,optim.learning_rate=") and few[1].tag.endswith(",seed=1")
    lr = few[0].overrides["optim.learning_rate"]
    assert f"optim.learning_rate={lr:g}," in few[0].tag and float(f"{lr:g}") == lr   # the name is the value
    for bad in ("lr=normal:0:1", "lr=loguniform:0:1", "lr=uniform:2:1", "lr"):
        with pytest.raises(ValueError, match="sample"):
            runner.parse_sample(bad)


def test_print_lists_points_without_running(tmp_path, capsys):
    assert main(["sweep", *EXP, "--workdir", str(tmp_path), "--sweep", "seed=0,1,2", "--shard", "1/2", "--print"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("shard 1/2 (from --shard): 1 of 3 points")
    assert out[1].split() == ["1", "new", str(tmp_path / "seed=1")]
    assert not tmp_path.exists() or not os.listdir(tmp_path)


def test_settings_table_gives_mean_std_and_n_over_seeds(tmp_path):
    for opt, accuracies in (("sgd", [0.5, 0.7]), ("adam", [0.9, 0.9, 0.96])):
        for seed, acc in enumerate(accuracies):
            path = tmp_path / f"optim.name={opt},seed={seed}"
            path.mkdir()
            (path / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/accuracy": acc}) + "\n")
    (tmp_path / "optim.name=sgd,seed=9").mkdir()   # a run stopped early: not in the means
    (tmp_path / "optim.name=sgd,seed=9" / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/accuracy": 0.1}))
    (tmp_path / "optim.name=sgd,seed=9" / "config.json").write_text(json.dumps({"train": {"steps": 5}}))
    rows = collect_runs(str(tmp_path))
    assert [r.get("status") for r in rows if r["run"].endswith("seed=9")] == ["unfinished"]
    lines = format_settings_table(rows).splitlines()
    assert lines[0].startswith("Over seeds") and lines[1].split() == ["setting", "n", "eval/accuracy"]
    assert lines[3].split() == ["optim.name=adam", "3", "0.92", "±", "0.035"]
    assert lines[4].split() == ["optim.name=sgd", "2", "0.6", "±", "0.14"]
    assert format_settings_table([r for r in rows if r["run"].endswith("seed=0")]) == ""   # nothing to average


@pytest.mark.slow   # two or more CLI processes (~45 s of CPU); run with -m slow
def test_two_shard_processes_cover_the_sweep_and_report_like_one(tmp_path, capsys):
    grid = ["--sweep", "seed=0,1,2"]
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    base = [sys.executable, "-m", "depthlab.research", "sweep", *EXP, "--workdir", str(sharded), *grid, *FAST]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    for cmd, extra_env in ((base + ["--shard", "0/2"], {}),
                           (base, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})):
        out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra_env})
        assert out.returncode == 0, out.stderr[-2000:]
    ran = [sweep_json(sharded / f"sweep.shard-{i}-of-2.json") for i in range(2)]
    assert sorted(ran[0]) == [0, 2] and sorted(ran[1]) == [1]          # every point once, round robin
    assert all(p["status"] == "finished" for r in ran for p in r.values())

    assert main(["sweep", *EXP, "--workdir", str(single), *grid, *FAST]) == 0
    capsys.readouterr()
    tables = []
    for root in (sharded, single):
        assert main(["report", str(root), "--no-cost"]) == 0
        tables.append([line for line in capsys.readouterr().out.splitlines() if "plots written" not in line])
    assert tables[0] == tables[1] and any(line.startswith("Over seeds") for line in tables[0])
    assert sum(line.startswith("seed=") for line in tables[0]) == 3 and any(line.split()[:3] == ["all", "seeds", "3"] for line in tables[0])
