"""Sweeps together (research/together.py): the seeds of a point as one compiled program equal separate runs."""
from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from depthlab.research import runner, together
from depthlab.research.registry import load_experiment
from depthlab.research.report import collect_runs
from depthlab.train import open_checkpoints, place, restore_or_init

QUIET = {"train.progress": False, "train.tensorboard": False}


def _final_state(name: str, preset: str, workdir: str):
    """The run's state restored from its own checkpoint (config.json's values rebuilt through the runner)."""
    recorded = json.load(open(os.path.join(workdir, "experiment.json")))
    config = runner.build_config(name, preset, recorded["overrides"])
    experiment = load_experiment(name).make_experiment(config)
    ckpt = open_checkpoints(workdir, config)
    try:
        state, step = restore_or_init(experiment, config, place(experiment, config), ckpt)
    finally:
        ckpt.close()
    assert step == config.train.steps
    return state


def _assert_close(actual, desired) -> None:
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = float(np.max(np.abs(desired))) if desired.size and np.issubdtype(desired.dtype, np.floating) else 0.0
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=max(1e-5 * scale, 1e-6))


def _without_perf(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _assert_same_runs(name: str, preset: str, a: str, b: str, tags: list[str]) -> None:
    rows_a = {r["run"]: r for r in collect_runs(a)}
    rows_b = {r["run"]: r for r in collect_runs(b)}
    assert sorted(rows_a) == sorted(rows_b) == sorted(tags)
    for tag in tags:
        ra, rb = rows_a[tag], rows_b[tag]
        ca, cb = (json.load(open(os.path.join(r["path"], "config.json"))) for r in (ra, rb))
        assert ca == cb
        ma, mb = _without_perf(ra["records"]), _without_perf(rb["records"])
        assert [sorted(r) for r in ma] == [sorted(r) for r in mb]
        for x, y in zip(ma, mb):
            np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(x)], rtol=1e-5)
        for path in (ra["path"], rb["path"]):
            assert os.path.isfile(os.path.join(path, "summary.json"))
        sa, sb = (_final_state(name, preset, r["path"]) for r in (ra, rb))
        # rtol 1e-5, and an atol of 1e-5 of the leaf's largest value or 1e-6: an entry near 0 differs by rounding
        # noise that no relative tolerance holds (char_gpt: an Adam moment whose true gradient is 0, all ~1e-7)
        jax.tree.map(_assert_close, (sa.params, sa.opt_state, sa.model_state),
                     (sb.params, sb.opt_state, sb.model_state))
        assert int(sa.step) == int(sb.step)


def _together_vs_sequential(tmp_path, name: str, preset: str, seeds: str, extra: dict | None = None,
                            mode: str = "vmap", also: list[str] = (), samples: list[str] = (), trials: int = 0):
    overrides = {**QUIET, **(extra or {})}
    sweep = [f"seed={seeds}", *also]
    random = {"samples": samples, "trials": trials}
    together_records = runner.run_sweep(name, sweep, preset=preset, overrides=overrides,
                                        workdir=str(tmp_path / "together"), together=mode, **random)
    sequential_records = runner.run_sweep(name, sweep, preset=preset, overrides=overrides,
                                          workdir=str(tmp_path / "sequential"), **random)
    assert [r["status"] for r in together_records] == ["finished"] * len(sequential_records)
    assert all(r.get("together") for r in together_records)
    assert not os.path.exists(tmp_path / "together" / together.GROUP_FOLDER)   # the scratch group dir is gone
    tags = [r["point"] for r in sequential_records]
    _assert_same_runs(name, preset, str(tmp_path / "together"), str(tmp_path / "sequential"), tags)
    return together_records


RANDOM = ["optim.learning_rate=loguniform:1e-3:1e-2", "model.dropout=uniform:0.05:0.5",
          "loss.label_smoothing=uniform:0.01:0.2"]


def test_digits_mlp_members_equal_separate_runs(tmp_path, capsys):
    # two random trials x two seeds in one program: the learning rates held in each member's optimizer state,
    # the dropout rates and label smoothings as each member's constants of the one step (`lift`); each member's
    # params, optimizer state (in a separate run's layout) and metrics equal its separate run's
    assert jax.device_count() == 4   # conftest's fake CPU devices: batch rows over `data`, members replicated
    fast = {"train.steps": 30, "train.log_every": 10, "train.eval_every": 15}
    _together_vs_sequential(tmp_path, "vision/digits_mlp", "smoke", "0,1", fast, samples=RANDOM, trials=2)
    out = capsys.readouterr().out
    assert "group 0: 4 members in one program" in out
    # run again: every member is a finished run, for a together sweep and for a sequential one alike
    again = runner.run_sweep("vision/digits_mlp", ["seed=0,1"], samples=RANDOM, trials=2, preset="smoke",
                             together=True, overrides={**QUIET, **fast}, workdir=str(tmp_path / "together"))
    assert "Every member already finished" in capsys.readouterr().out
    assert [r["status"] for r in again] == ["finished"] * 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["map", "unroll"])
def test_batchnorm_dropout_cnn_members_equal_separate_runs(tmp_path, mode):
    # "map"/"unroll": XLA:CPU's vectorised (vmap) convolution rounds differently from the single one (~1e-7
    # relative per step, 1.1e-5 on the eval loss after 20 steps); these run the separate run's arithmetic.
    # seeds x dropout rates (model.dropout: a constant of each member's step, `lift`)
    _together_vs_sequential(tmp_path, "vision/mnist1d_cnn", "smoke", "0,1", {"train.steps": 20}, mode=mode,
                            also=["model.dropout=0.1,0.3"])


@pytest.mark.slow
def test_scanned_rematerialised_gpt_dropout_members_equal_separate_runs(tmp_path):
    # the dropout's constants sit inside the nn.scan'd, remat'd blocks (lift reaches loop bodies and remats)
    _together_vs_sequential(tmp_path, "language/gpt_pretrain", "smoke", "0,1",
                            {"model.remat": "full", "model.scan_layers": True, "model.num_layers": 2,
                             "train.steps": 10}, also=["model.dropout=0.1,0.2"])


@pytest.mark.slow
def test_char_gpt_members_equal_separate_runs(tmp_path):
    _together_vs_sequential(tmp_path, "language/char_gpt", "smoke", "0,1", also=["model.dropout=0.1,0.2"])


def test_plan_groups_by_setting_and_notes(tmp_path, capsys):
    # seeds and optimizer scalars vary inside a group; the width (a shape) and turning weight decay on or off
    # (a part of the optimizer chain) make groups of their own
    sweep = ["model.features=(32,10),(64,10)", "optim.learning_rate=1e-3,3e-3", "optim.weight_decay=0,0.1,0.3",
             "seed=0,1"]
    points = runner.sweep_points("vision/digits_mlp", sweep, workdir=str(tmp_path))
    configs = {p.index: runner.build_config("vision/digits_mlp", "smoke", p.overrides) for p in points}
    groups = together.plan_groups(points, configs)
    assert [len(g) for g in groups] == [4, 8, 4, 8]
    assert {p.overrides["model.features"] for p in groups[1]} == {"(32,10)"}
    assert {p.overrides["optim.weight_decay"] for p in groups[1]} == {"0.1", "0.3"}
    assert {p.overrides["optim.learning_rate"] for p in groups[1]} == {"1e-3", "3e-3"}
    assert together.varying_keys([configs[p.index] for p in groups[1]]) == [
        "optim.learning_rate", "optim.weight_decay", "seed"]
    injected = together.injected_configs([configs[p.index] for p in groups[1]])
    assert {c.optim.inject for c in injected} == {"learning_rate,weight_decay"}
    assert together.member_hyperparams(injected)["weight_decay"].tolist() == [
        float(p.overrides["optim.weight_decay"]) for p in groups[1]]
    # model and loss floats vary inside a group too (constants of the step, `lift`); dropout off is its own group
    points = runner.sweep_points("vision/digits_mlp", ["model.dropout=0,0.1,0.3", "loss.label_smoothing=0.1,0.2"],
                                 workdir=str(tmp_path))
    configs = {p.index: runner.build_config("vision/digits_mlp", "smoke", p.overrides) for p in points}
    groups = together.plan_groups(points, configs)
    assert [[p.overrides["model.dropout"] for p in g] for g in groups] == [["0", "0"], ["0.1", "0.1", "0.3", "0.3"]]
    members = [configs[p.index] for p in groups[1]]
    assert together.injected_configs(members) is members   # nothing for the optimizer to hold

    alone = runner.sweep_points("vision/digits_mlp", ["optim.name=adamw,lion"], workdir=str(tmp_path))
    ran = []
    alone_configs = {p.index: runner.build_config("vision/digits_mlp", "smoke", p.overrides) for p in alone}
    records = together.run_together("vision/digits_mlp", alone, alone_configs, "smoke", {},
                                    lambda p: ran.append(p.index) or {"index": p.index, "status": "finished"})
    assert ran == [0, 1] and [r["index"] for r in records] == [0, 1]   # each point alone, through the runner's path
    out = capsys.readouterr().out.replace("\n", " ")
    assert "no two points differ only in seed, optimizer scalars" in out and "differ in optim.name" in out

    from depthlab.research.cli import main   # --print --together: the points, then the groups they would form
    assert main(["sweep", "vision/digits_mlp", "--preset", "smoke", "--workdir", str(tmp_path), "--print",
                 "--together", "--sweep", "optim.name=adam,sgd", "--sweep", "seed=0,1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == ["Together: 4 points in 2 group(s):",
                        "  group 0: 2 members in one program: optim.name=adam,seed=0, optim.name=adam,seed=1",
                        "  group 1: 2 members in one program: optim.name=sgd,seed=0, optim.name=sgd,seed=1"]


def test_member_records_split_the_group_metrics():
    group = [{"step": 10, "member0/loss": 1.0, "member1/loss": 2.0, "member11/loss": 3.0, "perf/steps_per_sec": 5.0},
             {"step": 20, "eval/member1/accuracy": 0.5, "member1/loss": 1.5, "eval/member0/accuracy": 0.25}]
    assert together.member_records(group, 1) == [{"step": 10, "loss": 2.0, "perf/steps_per_sec": 5.0},
                                                 {"step": 20, "eval/accuracy": 0.5, "loss": 1.5}]
    assert together.member_records(group, 11) == [{"step": 10, "loss": 3.0, "perf/steps_per_sec": 5.0},
                                                  {"step": 20}]


@pytest.mark.slow
def test_cli_signal_stops_the_group_and_the_rerun_resumes_every_member(tmp_path, monkeypatch, capsys):
    import signal

    from depthlab.research.cli import main
    from depthlab.train import loop

    sent = []

    class CtrlCAtFirstLog(loop.LogWindow):
        def drain(self):   # at the group's first log (step 10): a real SIGINT to this process
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            return super().drain()

    fast = ["--config.train.steps=20", "--config.train.log_every=10", "--config.train.eval_every=20",
            "--config.train.checkpoint_every=20", "--config.train.progress=false"]
    argv = ["sweep", "vision/digits_mlp", "--preset", "smoke", "--sweep", "seed=0,1", "--together", "map", *fast]
    monkeypatch.setattr(loop, "LogWindow", CtrlCAtFirstLog)
    assert main([*argv, "--workdir", str(tmp_path / "a")]) == 128 + signal.SIGINT
    points = json.load(open(tmp_path / "a" / "sweep.json"))["points"]
    assert [p["status"] for p in points] == ["interrupted", "interrupted"]
    assert all(10 <= p["metrics"]["step"] < 20 for p in points)
    assert not (tmp_path / "a" / "seed=0").exists()                # members are written when the group finishes
    monkeypatch.undo()

    assert main([*argv, "--workdir", str(tmp_path / "a")]) == 0
    assert "from its checkpoint at step" in capsys.readouterr().out
    assert not (tmp_path / "a" / together.GROUP_FOLDER).exists()
    assert main([*argv, "--workdir", str(tmp_path / "b")]) == 0    # the same sweep, never interrupted
    for seed in (0, 1):
        resumed, straight = (_without_perf(collect_runs(str(tmp_path / d / f"seed={seed}"))[0]["records"])
                             for d in ("a", "b"))
        assert resumed == straight and resumed[-1]["step"] == 20


@pytest.mark.slow
def test_finished_points_are_kept_and_only_the_others_train_together(tmp_path, capsys):
    overrides = {**QUIET, "train.steps": 20, "train.log_every": 10, "train.eval_every": 20}
    runner.run_sweep("vision/digits_mlp", ["seed=0"], preset="smoke", overrides=overrides, workdir=str(tmp_path))
    summary = tmp_path / "seed=0" / "summary.json"
    written = summary.stat().st_mtime_ns
    records = runner.run_sweep("vision/digits_mlp", ["seed=0,1,2"], preset="smoke", overrides=overrides,
                               workdir=str(tmp_path), together=True)
    out = capsys.readouterr().out
    assert "1 of 3 members already finished (seed=0); the others train." in out
    assert "2 members (seed=1, seed=2)" in out
    assert [r["status"] for r in records] == ["finished"] * 3 and summary.stat().st_mtime_ns == written
    assert sorted(r["run"] for r in collect_runs(str(tmp_path))) == ["seed=0", "seed=1", "seed=2"]


@pytest.mark.slow
def test_a_member_that_goes_nonfinite_fails_alone_and_the_others_finish(tmp_path, monkeypatch):
    import dataclasses

    from depthlab.research import registry

    real = registry.load_experiment

    class Poisoned:   # the experiment, but seed 1's inputs turn NaN from its 6th batch (step 6)
        def __init__(self, module):
            self.module = module

        def make_experiment(self, config):
            experiment = self.module.make_experiment(config)
            if config.seed != 1:
                return experiment
            batches = experiment.train_batches

            def poisoned(start):
                for i, batch in enumerate(batches(start), start):
                    yield {**batch, "inputs": batch["inputs"] * np.nan} if i >= 5 else batch
            return dataclasses.replace(experiment, train_batches=poisoned)

    overrides = {**QUIET, "train.steps": 20, "train.log_every": 5, "train.eval_every": 20}
    monkeypatch.setattr(registry, "load_experiment", lambda name: Poisoned(real(name)))   # together's import only
    records = runner.run_sweep("vision/digits_mlp", ["seed=0,1"], preset="smoke", overrides=overrides,
                               workdir=str(tmp_path / "together"), together=True)
    monkeypatch.undo()
    assert [r["status"] for r in records] == ["finished", "failed"]
    assert "at step 6" in records[1]["error"] and records[1]["metrics"]["step"] == 5
    assert runner.sweep_exit_code(records) == 1
    failed = tmp_path / "together" / "seed=1"
    assert [r["step"] for r in collect_runs(str(failed))[0]["records"]] == [5] and not (failed / "summary.json").exists()
    # the other member is untouched: its records equal its separate run's
    runner.run_sweep("vision/digits_mlp", ["seed=0"], preset="smoke", overrides=overrides,
                     workdir=str(tmp_path / "separate"))
    together_records, separate_records = (_without_perf(collect_runs(str(tmp_path / d / "seed=0"))[0]["records"])
                                          for d in ("together", "separate"))
    assert [sorted(r) for r in together_records] == [sorted(r) for r in separate_records]
    for x, y in zip(together_records, separate_records):
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(x)], rtol=1e-5)


def test_an_optimizer_that_ignores_inject_is_not_trained_together(tmp_path, monkeypatch, capsys):
    # an experiment whose optimizer does not read optim.inject would train every member at the first member's
    # learning rate; the group check sees no injected scalars in its state and runs the points one by one
    import dataclasses

    from depthlab.research import registry

    real = registry.load_experiment

    class IgnoresInject:
        def __init__(self, module):
            self.module = module

        def make_experiment(self, config):
            config = config.copy_and_resolve_references()
            if "inject" in config.optim:
                config.optim.inject = ""
            return dataclasses.replace(self.module.make_experiment(config))

    monkeypatch.setattr(registry, "load_experiment", lambda name: IgnoresInject(real(name)))   # together's import only
    overrides = {**QUIET, "train.steps": 10, "train.log_every": 5, "train.eval_every": 10}
    records = runner.run_sweep("vision/digits_mlp", ["optim.learning_rate=1e-3,3e-2"], preset="smoke",
                               overrides=overrides, workdir=str(tmp_path), together=True)
    out = capsys.readouterr().out.replace("\n", " ")
    assert "group 0: 2 members in one program" in out
    assert "cannot train together" in out and "does not hold them" in out and "optim.inject" in out
    assert [r["status"] for r in records] == ["finished"] * 2 and not any(r.get("together") for r in records)
    assert records[0]["metrics"]["loss"] != records[1]["metrics"]["loss"]   # each at its own learning rate


@pytest.mark.slow
def test_nonfinite_skip_skips_per_member_as_separate_runs_do(tmp_path, monkeypatch):
    # train.nonfinite=skip: seed 1's steps 6-8 are non-finite, seed 2's from step 3 on. Together, seed 1 skips
    # just its own three updates (seed 0 is untouched) and seed 2 fails alone where its separate run stops (its
    # skipped share above train.max_skipped_fraction at a logged step); every member's files equal the
    # separate run's, `skipped_steps` included
    import dataclasses

    from depthlab.research import registry

    real = registry.load_experiment

    class Poisoned:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def make_experiment(self, config):
            experiment = self.module.make_experiment(config)
            bad = {0: range(0), 1: range(5, 8), 2: range(2, 10**6)}[int(config.seed)]
            batches = experiment.train_batches

            def poisoned(start):
                for i, batch in enumerate(batches(start), start):
                    yield {**batch, "inputs": batch["inputs"] * np.nan} if i in bad else batch
            return dataclasses.replace(experiment, train_batches=poisoned)

    monkeypatch.setattr(registry, "load_experiment", lambda name: Poisoned(real(name)))
    monkeypatch.setattr(runner, "load_experiment", lambda name: Poisoned(real(name)))
    overrides = {**QUIET, "train.steps": 20, "train.log_every": 5, "train.eval_every": 20, "train.nonfinite": "skip",
                 "train.max_skipped_fraction": 0.5}
    runs = {}
    for how, together_mode in (("together", True), ("separate", False)):
        runs[how] = runner.run_sweep("vision/digits_mlp", ["seed=0,1,2"], preset="smoke", overrides=overrides,
                                     workdir=str(tmp_path / how), together=together_mode)
    assert [r["status"] for r in runs["together"]] == [r["status"] for r in runs["separate"]] == [
        "finished", "finished", "failed"]
    assert "dropped 3 of the first 5 steps' updates" in runs["together"][2]["error"]
    assert "dropped 3 of the first 5 steps' updates" in runs["separate"][2]["error"]
    assert runs["together"][1]["metrics"]["skipped_steps"] == 3 and all(r.get("together") for r in runs["together"])
    _assert_same_runs("vision/digits_mlp", "smoke", str(tmp_path / "together" / "seed=0"),
                      str(tmp_path / "separate" / "seed=0"), ["seed=0"])
    _assert_same_runs("vision/digits_mlp", "smoke", str(tmp_path / "together" / "seed=1"),
                      str(tmp_path / "separate" / "seed=1"), ["seed=1"])
    for how in runs:
        assert not (tmp_path / how / "seed=2" / "summary.json").exists()


def _member_placements(strategy: str):
    from depthlab.research.registry import load_experiment
    from depthlab.train import with_resolved_train

    overrides = {"mesh.strategy": strategy, "mesh.fsdp": -1 if strategy == "fsdp" else 1, "mesh.data": 1 if
                 strategy == "fsdp" else -1}
    configs = [with_resolved_train(runner.build_config("vision/digits_mlp", "smoke", {**overrides, "seed": s,
                                                                                       "optim.learning_rate": lr}))
               for s, lr in ((0, 1e-3), (1, 3e-3), (2, 1e-3), (3, 3e-3))]   # 4: a stacked bias reaches fsdp_min_size
    module = load_experiment("vision/digits_mlp")
    injected = together.injected_configs(configs)
    experiments = [module.make_experiment(c) for c in injected]
    stacked = together.stacked_experiment(experiments, injected)
    group, single = place(stacked, injected[0]), place(experiments[0], injected[0])
    return group, single


@pytest.mark.parametrize("strategy", ["fsdp", "replicated"])
def test_members_are_replicated_and_each_placed_as_its_separate_run(strategy):
    # on 4 fake devices: the member axis is never sharded, and each member's leaves are sharded exactly as the
    # separate run's (fsdp: the weights over the fsdp axis; replicated: whole on every device), so every device
    # holds every member
    group, single = _member_placements(strategy)
    group_specs = [tuple(s.spec) for s in jax.tree.leaves(group.state_shardings.members)]
    single_specs = [tuple(s.spec) for s in jax.tree.leaves(single.state_shardings)]
    assert len(group_specs) == len(single_specs)

    def padded(spec, rank):
        return tuple(spec) + (None,) * (rank - len(spec))
    for g, s in zip(group_specs, single_specs):
        rank = max(len(g) - 1, len(s))
        assert padded(g, rank + 1)[0] is None and padded(g, rank + 1)[1:] == padded(s, rank)
    assert any("fsdp" in g for g in group_specs) == (strategy == "fsdp")


@pytest.mark.slow
def test_members_under_fsdp_equal_separate_fsdp_runs(tmp_path):
    # 4 fake devices, strategy=fsdp: each member's weights sharded as its separate run's, rows over the devices
    _together_vs_sequential(tmp_path, "vision/digits_mlp", "smoke", "0,1",
                            {"train.steps": 20, "train.log_every": 10, "train.eval_every": 20, "mesh.strategy": "fsdp",
                             "mesh.fsdp": -1, "mesh.data": 1},
                            also=["optim.learning_rate=1e-3,3e-3", "model.dropout=0.1,0.3"])


@pytest.mark.slow
def test_sigkill_of_a_group_and_the_rerun_resumes_every_member_bit_for_bit(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import chex

    def cli(workdir):
        return [sys.executable, "-m", "depthlab.research", "sweep", "vision/digits_mlp", "--preset", "smoke",
                "--workdir", str(workdir), "--sweep", "seed=0,1", "--sweep", "optim.learning_rate=1e-3,3e-3",
                "--sweep", "model.dropout=0.1,0.3", "--together", "--config.train.steps=60",
                "--config.train.log_every=5", "--config.train.eval_every=30", "--config.train.checkpoint_every=5",
                "--config.train.progress=false", "--config.train.async_checkpoint=false"]

    def checkpoints(root):
        found = set()
        for folder, _, _ in os.walk(root / together.GROUP_FOLDER) if (root / together.GROUP_FOLDER).exists() else ():
            if os.path.basename(folder) == "checkpoints":
                found |= {int(d) for d in os.listdir(folder) if d.isdigit()}
        return found

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert subprocess.run(cli(reference), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while max(checkpoints(killed), default=0) < 15 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the group ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any((killed / d / "summary.json").exists() for d in os.listdir(killed) if not d.startswith("."))
    final = subprocess.run(cli(killed), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "from its checkpoint at step" in final.stdout
    for tag in ("seed=0,optim.learning_rate=1e-3,model.dropout=0.1",
                "seed=1,optim.learning_rate=3e-3,model.dropout=0.3"):
        a, b = (_final_state("vision/digits_mlp", "smoke", str(root / tag)) for root in (killed, reference))
        chex.assert_trees_all_equal(jax.device_get((a.params, a.opt_state)), jax.device_get((b.params, b.opt_state)))
        ra, rb = (_without_perf(collect_runs(str(root / tag))[0]["records"]) for root in (killed, reference))
        assert ra == rb


def test_auto_mode_runs_convolutions_one_by_one_on_cpu_and_vmaps_the_rest():
    from depthlab.research.registry import load_experiment

    def experiment(name):
        config = runner.build_config(name, "smoke", {})
        return load_experiment(name).make_experiment(config), config

    cnn, cnn_config = experiment("vision/digits_cnn")
    mlp, mlp_config = experiment("vision/digits_mlp")
    assert together.resolve_mode("auto", cnn, cnn_config, "cpu")[0] is None      # XLA:CPU: faster one by one
    assert together.resolve_mode("auto", mlp, mlp_config, "cpu")[0] == "vmap"
    assert together.resolve_mode("auto", cnn, cnn_config, "tpu")[0] == "vmap"
    assert together.resolve_mode("vmap", cnn, cnn_config, "cpu") == ("vmap", "")
    with pytest.raises(ValueError, match="together mode must be one of auto, vmap, map, unroll"):
        together.resolve_mode("pmap", cnn, cnn_config, "cpu")


def test_lift_makes_the_constants_members_differ_in_inputs_and_refuses_anything_else():
    import jax.numpy as jnp

    def scaled(rate, table):
        return lambda x: (jnp.tanh(x / (1.0 - rate)) + table, jnp.sum(x) * 2.0)

    x = jnp.linspace(-1.0, 1.0, 6)
    fns = [scaled(0.1, np.arange(6.0)), scaled(0.3, np.arange(6.0)), scaled(0.5, np.ones(6))]
    lifted = together.lift(fns, x)
    assert lifted is not None and len(lifted.values) == 2     # the differing table, and 1 - rate once
    for i, fn in enumerate(fns):   # each member's own constants: its own function's outputs, bit for bit
        chex.assert_trees_all_equal(lifted([v[i] for v in lifted.values], x), fn(x))
    stacked = jax.vmap(lifted, in_axes=(0, None))(list(lifted.values), x)
    np.testing.assert_allclose(stacked[0][2], fns[2](x)[0], rtol=1e-6)
    assert not together.lift([scaled(0.1, np.zeros(6)), scaled(0.1, np.zeros(6))], x).values   # nothing differs
    # constants inside a loop body (a scanned layer) and inside a remat are reached too
    def looped(scale):
        return lambda v: jax.lax.scan(lambda c, u: (c + jax.checkpoint(lambda w: jnp.sin(w) * scale)(u), None),
                                      0.0, v)[0]
    fns = [looped(0.5), looped(2.0)]
    lifted = together.lift(fns, x)
    assert lifted is not None and len(lifted.values) == 1
    for i, fn in enumerate(fns):
        chex.assert_trees_all_equal(lifted([v[i] for v in lifted.values], x), fn(x))
    chex.assert_trees_all_close(jax.grad(lambda v: lifted([lifted.values[0][1]], v))(x), jax.grad(fns[1])(x))
    # a different operation, or a constant inside another nested computation (a custom derivative), is not one
    def custom(scale):
        @jax.custom_jvp
        def f(v):
            return v * scale
        f.defjvp(lambda primals, tangents: (f(primals[0]), tangents[0] * scale))
        return f
    assert together.lift([lambda v: v * 2.0, lambda v: v + 2.0], x) is None
    assert together.lift([custom(2.0), custom(3.0)], x) is None
    # an array closed over inside a jitted inner function stays a constant of that nested program, which the
    # programs' text does not print: members whose such constants differ are refused, not run with the first's
    def jitted(table):
        inner = jax.jit(lambda v, t=jnp.asarray(table): v + t)
        return lambda v: inner(v) * 2.0
    assert together.lift([jitted(np.arange(6.0)), jitted(np.arange(6.0))], x) is not None
    assert together.lift([jitted(np.arange(6.0)), jitted(np.ones(6))], x) is None
    # closed-over arrays of different shapes are different programs, not constants to stack
    assert together.lift([lambda v: v + np.zeros(6), lambda v: v + np.zeros((1, 6))], x) is None


def test_members_whose_constants_sit_inside_a_cond_are_refused_naming_the_keys():
    # a remat'd step is one program (lift reaches inside remats and loop bodies); a step computed inside a
    # lax.cond holds the label smoothing in its branches, which lift does not reach: the check refuses, naming
    # the varying key, instead of training every member at the first member's value
    import dataclasses

    module = load_experiment("vision/digits_mlp")
    configs = [runner.build_config("vision/digits_mlp", "smoke", {"seed": seed, "loss.label_smoothing": smoothing})
               for seed, smoothing in ((0, 0.1), (1, 0.2))]
    plain = [module.make_experiment(c) for c in configs]
    assert together.check_members(plain, configs) is None
    remat = [dataclasses.replace(e, train_step=jax.checkpoint(e.train_step)) for e in plain]
    assert together.check_members(remat, configs) is None
    branched = [dataclasses.replace(e, train_step=lambda state, batch, step=e.train_step: jax.lax.cond(
        state.step >= 0, step, step, state, batch)) for e in plain]
    why = together.check_members(branched, configs)
    assert why.startswith("their train steps differ in more than the constants that loss.label_smoothing set")
