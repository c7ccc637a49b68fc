"""The fit loop: metrics format, determinism, resume after SIGKILL, preemption, non-finite loss,
bad batches, config mismatches, unwritable run directories, compile-once."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from depthlab.research import build_config, load_experiment, run_experiment
from toys import toy_experiment as _toy

from depthlab.train import (BatchSpecError, ConfigMismatchError, Experiment, NonFiniteError, default_train_config,
                            fit, read_metrics)

SMALL = {"train.steps": 40, "train.log_every": 10, "train.eval_every": 20, "train.checkpoint_every": 20,
         "train.progress": False, "data.batch_size": 32}


def _strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def test_metrics_jsonl_format_and_determinism(tmp_path):
    a = run_experiment("vision/digits_mlp", overrides=SMALL, workdir=str(tmp_path / "a"))
    b = run_experiment("vision/digits_mlp", overrides=SMALL, workdir=str(tmp_path / "b"))
    records = read_metrics(tmp_path / "a")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for line in open(tmp_path / "a" / "metrics.jsonl"):
        assert isinstance(json.loads(line), dict)
    assert {"loss", "accuracy"} <= set(records[0]) and "grad_norm" not in records[0]   # opt-in: costs a pass
    assert {"eval/accuracy", "eval/loss"} <= set(records[1]) and {"eval/accuracy", "eval/loss"} <= set(records[-1])
    assert not any(k.startswith("eval/") for k in records[0])
    assert _strip_perf(records) == _strip_perf(read_metrics(tmp_path / "b"))   # same seed, same values
    assert a["metrics"]["eval/accuracy"] == b["metrics"]["eval/accuracy"]
    assert (tmp_path / "a" / "curves.png").exists() and (tmp_path / "a" / "config.json").exists()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "a" / "tensorboard"))


def test_finished_run_is_not_redone(tmp_path):
    first = run_experiment("vision/digits_mlp", overrides=SMALL, workdir=str(tmp_path))
    before = open(tmp_path / "metrics.jsonl").read()
    again = run_experiment("vision/digits_mlp", overrides=SMALL, workdir=str(tmp_path))
    assert open(tmp_path / "metrics.jsonl").read() == before
    assert again["metrics"]["eval/accuracy"] == first["metrics"]["eval/accuracy"]


def _cli(workdir, *extra):
    args = [sys.executable, "-m", "depthlab.research", "run", "vision/digits_mlp", "--workdir", str(workdir),
            "--config.train.steps=300", "--config.train.log_every=10", "--config.train.eval_every=100",
            "--config.train.checkpoint_every=20", "--config.train.progress=false",
            "--config.train.async_checkpoint=false", "--config.data.batch_size=32", *extra]
    return args


def _wait_for_checkpoint(workdir, proc, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = workdir / "checkpoints"
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


@pytest.mark.slow   # test_faults kills at random steps three times and compares params bit for bit (fast suite)
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ)
    proc = subprocess.Popen(_cli(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    _wait_for_checkpoint(tmp_path / "killed", proc, at_least=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cli(tmp_path / "killed"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout
    straight = subprocess.run(_cli(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed, clean = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
    assert [r["step"] for r in killed] == [r["step"] for r in clean]
    assert _strip_perf(killed) == _strip_perf(clean)   # bit-identical values, eval/ included


def test_sigterm_saves_a_checkpoint_and_exits_preempted(tmp_path):
    proc = subprocess.Popen(_cli(tmp_path, "--config.train.steps=100000", "--config.train.checkpoint_every=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out     # a scheduler tells it from a finished run
    assert "preempted at step" in out and "by SIGTERM" in out
    steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert steps and max(steps) >= read_metrics(tmp_path)[0]["step"]


# --- the fault paths, on a tiny hand-written experiment (tests/toys.py) ------------------------------

def test_nonfinite_loss_stops_with_the_step_and_no_bad_checkpoint(tmp_path):
    experiment, config = _toy(nan_at=7)
    with pytest.raises(NonFiniteError, match="non-finite training metric at step 7: loss=nan.*last good one is step 5"):
        fit(experiment, config, tmp_path)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [5]


def test_nonfinite_skip_drops_the_update(tmp_path):
    experiment, config = _toy(nan_at=7)
    config.train.nonfinite = "skip"
    result = fit(experiment, config, tmp_path)
    assert np.all(np.isfinite(np.asarray(result.state.w)))
    assert int(result.state.step) == 20 and result.metrics["skipped_steps"] == 1


def test_bad_batch_shape_names_expected_and_actual(tmp_path):
    def batches(start):
        for i in range(start, 10**9):
            yield {"x": np.ones((8, 2) if i != 3 else (8, 3), np.float32)}

    experiment, config = _toy(batches=batches)
    with pytest.raises(BatchSpecError, match=r"'x' has shape/dtype \(\(8, 3\), 'float32'\) but the run expects "
                                             r"\(\(8, 2\), 'float32'\)"):
        fit(experiment, config, tmp_path)


def test_config_mismatch_is_refused_unless_allowed(tmp_path):
    experiment, config = _toy(steps=5)
    fit(experiment, config, tmp_path)
    config.train.checkpoint_every = 3
    with pytest.raises(ConfigMismatchError, match="train.checkpoint_every: 5 .saved. vs 3 .now."):
        fit(experiment, config, tmp_path)
    config.train.allow_config_change = True
    config.train.steps = 8
    assert int(fit(experiment, config, tmp_path).state.step) == 8


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    experiment, config = _toy()
    with pytest.raises(PermissionError, match="is not writable"):
        fit(experiment, config, blocker / "run")
    config.train.min_free_mb = 10**12
    with pytest.raises(OSError, match="MB free"):
        fit(experiment, config, tmp_path / "run")


def test_train_and_eval_steps_compile_once(tmp_path):
    module = load_experiment("vision/digits_mlp")
    config = build_config("vision/digits_mlp", overrides=SMALL)
    experiment = module.make_experiment(config)
    # train_step: one abstract trace by check_experiment (jax.eval_shape, nothing compiled) + the one compile
    experiment.train_step = chex.assert_max_traces(experiment.train_step, n=2)
    experiment.eval_step = chex.assert_max_traces(experiment.eval_step, n=1)
    result = fit(experiment, config, tmp_path)   # 40 steps + 2 evaluations of 12 batches each
    assert result.metrics["step"] == 40


# --- bounded dispatch-ahead (the XLA:CPU rendezvous abort) ----------------------------------------

def test_dispatch_bound_blocks_on_the_oldest():
    from depthlab.train.loop import DispatchBound

    class Pending:
        def __init__(self):
            self.waited = False

        def block_until_ready(self):
            self.waited = True
            return self

    bound, items = DispatchBound(2), [Pending() for _ in range(5)]
    for item in items:
        bound.push(item)
    assert [i.waited for i in items] == [True, True, True, False, False]


def test_fit_keeps_at_most_max_calls_in_flight(tmp_path, monkeypatch):
    from depthlab.train import loop

    pushes, most = [], []

    class Spy(loop.DispatchBound):
        def push(self, x):
            super().push(x)
            pushes.append(x)
            most.append(len(self._queue))

    monkeypatch.setattr(loop, "DispatchBound", Spy)
    experiment, config = _toy(steps=12)
    config.train.max_calls_in_flight = 3
    fit(experiment, config, tmp_path)
    assert len(pushes) == 12 and max(most) == 3     # every train call went through the bound


def test_prefetch_default_is_no_thread_on_cpu_and_two_on_accelerators(tmp_path, monkeypatch):
    from depthlab.train import data as data_lib, loop

    class Device:
        def __init__(self, platform):
            self.platform = platform

    class Mesh:
        def __init__(self, platform):
            self.devices = np.array([Device(platform)] * 2)

    assert loop.prefetch_depth(-1, Mesh("cpu")) == 0 and loop.prefetch_depth(-1, Mesh("tpu")) == 2
    assert loop.prefetch_depth(-1, Mesh("gpu")) == 2 and loop.prefetch_depth(3, Mesh("cpu")) == 3
    sizes = []
    real = data_lib.prefetch_to_device
    monkeypatch.setattr(data_lib, "prefetch_to_device", lambda b, s, size=2: (sizes.append(size), real(b, s, size))[1])
    experiment, config = _toy(steps=4)
    fit(experiment, config, tmp_path / "auto")
    config.train.prefetch = 2
    fit(experiment, config, tmp_path / "two")
    assert sizes[0] == 0 and sizes[-1] == 2      # what fit used: the default on CPU, then the explicit 2


# --- several steps per call -----------------------------------------------------------------------

K_SMALL = {"train.steps": 32, "train.log_every": 8, "train.eval_every": 16, "train.checkpoint_every": 16,
           "train.progress": False, "data.batch_size": 32}


def _final_state(workdir):
    from depthlab.research.evaluation import restore_run
    *_, state, step = restore_run("vision/digits_mlp", str(workdir))
    return jax.device_get(state), step


def test_steps_per_call_equals_single_steps(tmp_path):
    run_experiment("vision/digits_mlp", overrides=K_SMALL, workdir=str(tmp_path / "k1"))
    module = load_experiment("vision/digits_mlp")
    config = build_config("vision/digits_mlp", overrides={**K_SMALL, "train.steps_per_call": 4})
    experiment = module.make_experiment(config)
    # one scan body, compiled once (+ check_experiment's abstract trace of the step: eval_shape, no compile)
    experiment.train_step = chex.assert_max_traces(experiment.train_step, n=2)
    fit(experiment, config, tmp_path / "k4")
    single, scanned = read_metrics(tmp_path / "k1"), read_metrics(tmp_path / "k4")
    assert [r["step"] for r in scanned] == [r["step"] for r in single] == [8, 16, 24, 32]
    for a, b in zip(_strip_perf(single), _strip_perf(scanned)):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-5)   # float32 rounding at most
    (p1, s1), (p4, s4) = _final_state(tmp_path / "k1"), _final_state(tmp_path / "k4")
    assert s1 == s4 == 32
    chex.assert_trees_all_close(p4.params, p1.params, rtol=1e-5, atol=1e-6)


def test_steps_per_call_resumes_bit_for_bit(tmp_path):
    k4 = {**K_SMALL, "train.steps_per_call": 4}
    run_experiment("vision/digits_mlp", overrides={**k4, "train.steps": 16}, workdir=str(tmp_path / "resumed"))
    run_experiment("vision/digits_mlp", overrides=k4, workdir=str(tmp_path / "resumed"))   # resumes at 16
    run_experiment("vision/digits_mlp", overrides=k4, workdir=str(tmp_path / "straight"))
    assert _strip_perf(read_metrics(tmp_path / "resumed")) == _strip_perf(read_metrics(tmp_path / "straight"))
    chex.assert_trees_all_equal(_final_state(tmp_path / "resumed")[0].params,
                                _final_state(tmp_path / "straight")[0].params)


def test_steps_per_call_without_batches_and_a_remainder(tmp_path):
    # An RL-style step (no batches): k iterations per call; 10 steps = calls of 4, 4 and the remaining 2.
    @flax.struct.dataclass
    class Counter:
        step: jax.Array
        total: jax.Array

    def train_step(state, batch):
        assert batch is None
        return Counter(state.step + 1, state.total + state.step), {"loss": state.total.astype(jnp.float32)}

    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config()})
    config.train.update({"steps": 10, "log_every": 4, "eval_every": 0, "checkpoint_every": 0, "progress": False,
                         "async_checkpoint": False, "steps_per_call": 4})
    init = lambda rng: Counter(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    result = fit(Experiment(init=init, train_step=train_step), config, tmp_path)
    assert int(result.state.step) == 10 and int(result.state.total) == sum(range(10))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [4, 8, 10]
    assert records[0]["loss"] == np.mean([0, 0, 1, 3]) and records[-1]["loss"] == np.mean([28, 36])
    # One log window holding calls of 4, 4 and 2 steps: every step's metric is in its mean.
    config.train.log_every = 100
    fit(Experiment(init=init, train_step=train_step), config, tmp_path / "one_window")
    (record,) = read_metrics(tmp_path / "one_window")
    assert record["step"] == 10 and record["loss"] == np.mean([sum(range(i)) for i in range(10)])


# --- one entry: fit checks, then enters the run directory once ----------------------------------------

def _count_entries(monkeypatch):
    from depthlab.train import rundir

    entries = []   # the paths of the locks taken (acquire on a held lock, as `with` does, takes nothing)
    real = rundir.RunLock.acquire
    monkeypatch.setattr(rundir.RunLock, "acquire",
                        lambda self: (self._fd is None and entries.append(self.path), real(self))[1])
    return entries


def test_run_experiment_and_fit_enter_the_run_directory_once(tmp_path, monkeypatch):
    entries = _count_entries(monkeypatch)
    run_experiment("vision/digits_mlp", preset="smoke", overrides={"train.progress": False},
                   workdir=str(tmp_path / "r"))
    assert entries == [str(tmp_path / "r" / ".lock")]
    recorded = json.load(open(tmp_path / "r" / "experiment.json"))
    assert {k: recorded[k] for k in ("experiment", "preset")} == {"experiment": "vision/digits_mlp", "preset": "smoke"}
    experiment, config = _toy(steps=3)
    fit(experiment, config, tmp_path / "f", record={"experiment": "toy", "preset": None})
    assert entries[1:] == [str(tmp_path / "f" / ".lock")]
    assert json.load(open(tmp_path / "f" / "experiment.json")) == {"experiment": "toy", "preset": None}
    fit(experiment, config, tmp_path / "plain")                   # no record: no experiment.json
    assert not (tmp_path / "plain" / "experiment.json").exists()


def test_train_config_is_merged_onto_the_defaults_once_and_unknown_keys_fail(tmp_path):
    experiment, _ = _toy()
    partial = ml_collections.ConfigDict({"seed": 0, "train": {"steps": 3, "progress": False, "tensorboard": False}})
    result = fit(experiment, partial, tmp_path / "partial")
    assert int(result.state.step) == 3 and "plot" in result.summary
    saved = json.load(open(tmp_path / "partial" / "config.json"))["train"]
    assert saved == {**default_train_config().to_dict(), "steps": 3, "progress": False, "tensorboard": False}
    assert "keep" not in partial.train                            # the caller's config is left as it was
    typo = ml_collections.ConfigDict({"seed": 0, "train": {"steps": 3, "stpes": 4}})
    with pytest.raises(ValueError, match="unknown config key 'train.stpes'; valid keys under train: .*steps"):
        fit(experiment, typo, tmp_path / "typo")
    assert not (tmp_path / "typo").exists()                       # failed before the directory was made


def test_finish_run_returns_the_curves_it_drew(tmp_path):
    experiment, config = _toy(steps=4)
    config.train.log_every = 2
    result = fit(experiment, config, tmp_path)
    assert result.summary["plot"] == str(tmp_path / "curves.png") and os.path.exists(result.summary["plot"])
    assert json.load(open(tmp_path / "summary.json"))["summary"]["plot"] == result.summary["plot"]
    # train.plot=false: no curves.png (a together sweep's scratch group), and a run made before the key existed
    # resumes (train.plot is a resumable key: absent from an old config.json is no config change)
    config.train.plot = False
    config.train.steps = 6
    quiet = fit(experiment, config, tmp_path / "no_plot")
    assert "plot" not in quiet.summary and not (tmp_path / "no_plot" / "curves.png").exists()
    saved = json.load(open(tmp_path / "config.json"))
    del saved["train"]["plot"]
    json.dump(saved, open(tmp_path / "config.json", "w"))
    assert int(fit(experiment, config, tmp_path).state.step) == 6
