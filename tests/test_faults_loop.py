"""The loop's fault paths (issue 28, items 2, 5-9), each done to a real run (tests/toys.py or digits_mlp).

- a preempted run (SIGTERM, SIGINT, or fit's stop= from another thread) names one step in every line, and
  once resumed its metrics.jsonl is an uninterrupted run's, record for record (timing keys `perf/*` aside);
- train.nonfinite=skip says how many steps it dropped, and stops past train.max_skipped_fraction;
- a finished run's result is its state's: a cut last record or a garbled summary.json is rebuilt;
- check_experiment traces the train step (a module/state mismatch fails before the run directory exists).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from toys import toy_experiment

from depthlab.research.cli import main
from depthlab.train import NonFiniteError, fit, read_metrics
from depthlab.train.loop import WINDOW_FILE
from depthlab.train.rundir import ConfigMismatchError


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _batches_that(at_batch, action):
    """The toy's batches, calling action() when batch `at_batch` is drawn (once): with prefetch 0 that is
    just before the call that runs step at_batch + 1, so the loop sees it after that call."""
    def batches(start):
        for i in range(start, 10**9):
            if i == at_batch:
                action()
            yield {"x": np.full((8, 2), 1.0 + (i % 3), np.float32)}
    return batches


def _toy(steps, log_every, k, batches=None, nonfinite="stop", nan_at=None):
    experiment, config = toy_experiment(steps=steps, score=lambda step: float(step) ** 0.5, batches=batches,
                                        nan_at=nan_at)
    config.train.update(log_every=log_every, eval_every=10, checkpoint_every=10, steps_per_call=k, prefetch=0,
                        nonfinite=nonfinite, max_skipped_fraction=0.5)
    return experiment, config


# --- item 6: preemption: one step number, and the same metrics as an uninterrupted run --------------------

@pytest.mark.parametrize("sig, k, nonfinite", [(signal.SIGTERM, 1, "stop"), (signal.SIGINT, 4, "skip")])
def test_preempt_and_resume_logs_what_an_uninterrupted_run_logs(tmp_path, capsys, sig, k, nonfinite):
    nan_at = 6 if nonfinite == "skip" else None          # a skipped step inside the cut window: its count carries
    straight = fit(*_toy(24, 12, k, nonfinite=nonfinite, nan_at=nan_at), tmp_path / "straight")
    preempted = fit(*_toy(24, 12, k, _batches_that(7, lambda: os.kill(os.getpid(), sig)), nonfinite, nan_at),
                    tmp_path / "run")
    out = capsys.readouterr().out
    # the signal lands before the call that ends at step 8 (k=1: step 8; k=4: steps 5-8): mid-window (log at 12)
    assert preempted.preempted_by == signal.Signals(sig).name and preempted.metrics["step"] == 8
    assert f"{signal.Signals(sig).name}: preempted at step 8;" in out and _steps(tmp_path / "run")[-1] == 8
    assert all(r["step"] < 8 for r in read_metrics(tmp_path / "run"))       # no record for a partial window
    assert os.path.exists(tmp_path / "run" / WINDOW_FILE)
    resumed = fit(*_toy(24, 12, k, nonfinite=nonfinite, nan_at=nan_at), tmp_path / "run")
    assert "Resuming" in capsys.readouterr().out and not resumed.preempted
    reference, got = _strip_perf(read_metrics(tmp_path / "straight")), _strip_perf(read_metrics(tmp_path / "run"))
    assert got == reference and [r["step"] for r in got][-2:] == [20, 24]
    if nonfinite == "skip":
        assert got[-1]["skipped_steps"] == 1 and resumed.metrics["skipped_steps"] == 1
    np.testing.assert_array_equal(np.asarray(resumed.state.w), np.asarray(straight.state.w))


def test_a_checkpoint_between_logs_loses_no_step_from_the_next_log_mean(tmp_path):
    """checkpoint_every that log_every does not divide: the log's mean still covers every step since the last
    log (a checkpoint checks the window's metrics, it does not consume them)."""
    means = []
    for name, every in (("between", 7), ("none", 0)):
        experiment, config = _toy(20, 20, 1)
        config.train.update(checkpoint_every=every, eval_every=0)
        fit(experiment, config, tmp_path / name)
        means.append(read_metrics(tmp_path / name)[-1]["loss"])
    assert _steps(tmp_path / "between") == [7, 14, 20]
    assert means[0] == means[1]


def _digits_mlp_cli(workdir, *extra):
    return [sys.executable, "-m", "depthlab.research", "run", "vision/digits_mlp", "--workdir", str(workdir),
            "--config.train.log_every=20", "--config.train.eval_every=100", "--config.train.checkpoint_every=100",
            "--config.train.progress=false", "--config.data.batch_size=32", *extra]


def test_the_engine_and_the_command_name_the_same_preemption_step(tmp_path):
    proc = subprocess.Popen(_digits_mlp_cli(tmp_path, "--config.train.steps=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not read_metrics(tmp_path):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    engine = [line for line in out.splitlines() if line.startswith("SIGTERM: preempted at step ")]
    command = [line for line in out.splitlines() if " preempted at step " in line and "by SIGTERM" in line]
    assert len(engine) == 1 and len(command) == 1, out
    step = int(engine[0].split("preempted at step ")[1].split(";")[0])
    assert int(command[0].split("preempted at step ")[1].split()[0]) == step and _steps(tmp_path)[-1] == step


@pytest.mark.slow
def test_a_preempted_digits_mlp_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    steps = "--config.train.steps=200"
    proc = subprocess.Popen(_digits_mlp_cli(tmp_path / "run", steps), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not read_metrics(tmp_path / "run"):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    for workdir in ("run", "straight"):
        done = subprocess.run(_digits_mlp_cli(tmp_path / workdir, steps), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert _strip_perf(read_metrics(tmp_path / "run")) == _strip_perf(read_metrics(tmp_path / "straight"))


# --- item 9: a stop handle for a fit in a thread --------------------------------------------------------

@pytest.mark.parametrize("kind", ["event", "callable"])
def test_a_fit_in_a_thread_stops_at_a_checkpoint_and_resumes(tmp_path, kind):
    event = threading.Event()
    stop = event if kind == "event" else event.is_set
    results = {}
    experiment, config = _toy(20, 5, 1, _batches_that(7, event.set))
    thread = threading.Thread(target=lambda: results.update(first=fit(experiment, config, tmp_path, stop=stop)))
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    first = results["first"]
    assert first.preempted_by == "stop" and first.metrics["step"] == 8 and _steps(tmp_path)[-1] == 8
    assert not os.path.exists(tmp_path / "summary.json")          # stopped, not finished
    event.clear()
    resumed = fit(*_toy(20, 5, 1), tmp_path, stop=stop)
    straight = fit(*_toy(20, 5, 1), tmp_path / "straight")
    assert not resumed.preempted and resumed.metrics["step"] == 20
    np.testing.assert_array_equal(np.asarray(resumed.state.w), np.asarray(straight.state.w))
    assert _strip_perf(read_metrics(tmp_path)) == _strip_perf(read_metrics(tmp_path / "straight"))


def test_a_stop_handle_of_the_wrong_kind_fails_before_the_run_directory(tmp_path):
    with pytest.raises(TypeError, match=r"fit\(stop=\.\.\.\) must be a threading.Event or a callable.*int"):
        fit(*_toy(20, 5, 1), tmp_path / "run", stop=3)
    assert not (tmp_path / "run").exists()


# --- item 7: train.nonfinite=skip is counted, and stops past train.max_skipped_fraction ------------------

def test_skipped_steps_are_in_the_result_line_and_summary(tmp_path, capsys):
    experiment, config = _toy(20, 5, 1, nonfinite="skip", nan_at=7)
    result = fit(experiment, config, tmp_path)
    assert result.metrics["skipped_steps"] == 1 and result.summary["skipped_steps"] == 1
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Result at step 20")]
    assert len(line) == 1 and "1 of 20 steps skipped" in line[0]
    assert json.load(open(tmp_path / "summary.json"))["summary"]["skipped_steps"] == 1


def test_a_run_that_skips_more_than_the_allowed_share_stops_in_one_line(tmp_path, capsys):
    """The issue's reproducer: digits_mlp, adam, learning_rate=1e38: every update non-finite."""
    code = main(["run", "vision/digits_mlp", "--workdir", str(tmp_path), "--config.train.steps=30",
                 "--config.train.nonfinite=skip", "--config.optim.name=adam", "--config.optim.learning_rate=1e38",
                 "--config.optim.schedule=constant", "--config.train.progress=false", "--config.train.log_every=10",
                 "--config.train.eval_every=0", "--config.train.checkpoint_every=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "train.nonfinite=skip dropped" in err and "train.max_skipped_fraction=0.1" in err
    assert not os.path.exists(tmp_path / "summary.json")


def test_max_skipped_fraction_out_of_range_is_one_line(tmp_path):
    experiment, config = _toy(20, 5, 1)
    config.train.max_skipped_fraction = 1.5
    with pytest.raises(ValueError, match=r"train.max_skipped_fraction must be a number in \[0, 1\], got 1.5"):
        fit(experiment, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- items 2 and 5, loop side: a finished run's result is its state's ----------------------------------

def _finished(tmp_path):
    experiment, config = _toy(20, 5, 1)
    result = fit(experiment, config, tmp_path)
    assert result.metrics["step"] == 20
    return experiment, config, result.metrics["eval/score"]


def test_a_finished_run_with_a_cut_last_record_is_evaluated_again(tmp_path, capsys):
    experiment, config, score = _finished(tmp_path)
    path = tmp_path / "metrics.jsonl"
    open(path, "r+b").truncate(os.path.getsize(path) - 20)        # the step-20 record cut by a kill
    result = fit(experiment, config, tmp_path)
    assert result.metrics["step"] == 20 and result.metrics["eval/score"] == score      # not step 15's record
    assert "Result at step 20" in capsys.readouterr().out
    assert json.load(open(tmp_path / "summary.json"))["metrics"]["step"] == 20
    assert read_metrics(tmp_path)[-1]["step"] == 20


@pytest.mark.parametrize("garble", ["{garbled", "[1, 2]", "latin-1", "dangling link"])
def test_a_garbled_summary_json_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog, garble):
    experiment, config, score = _finished(tmp_path)
    path = tmp_path / "summary.json"
    os.remove(path)
    if garble == "dangling link":
        os.symlink(tmp_path / "missing", path)
    else:
        open(path, "wb").write(b"\xff\xfe{" if garble == "latin-1" else garble.encode())
    result = fit(experiment, config, tmp_path)
    assert result.metrics["eval/score"] == score
    assert json.load(open(path))["metrics"]["step"] == 20
    assert any(str(path) in r.getMessage() and "rebuilding it" in r.getMessage() for r in caplog.records)


def test_a_garbled_window_file_warns_and_the_run_continues(tmp_path, caplog):
    experiment, config = _toy(24, 12, 1, _batches_that(7, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert fit(experiment, config, tmp_path).preempted
    open(tmp_path / WINDOW_FILE, "w").write("{not json")
    result = fit(*_toy(24, 12, 1), tmp_path)
    assert result.metrics["step"] == 24
    assert any(WINDOW_FILE in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fault", ["garbage", "fifo", "directory"])
def test_an_unreadable_config_json_names_itself_in_one_line(tmp_path, fault):
    experiment, config, _ = _finished(tmp_path)
    path = tmp_path / "config.json"
    os.remove(path)
    if fault == "garbage":
        open(path, "w").write("{")
    elif fault == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    with pytest.raises(ConfigMismatchError, match=f"{path} cannot be read") as info:
        fit(experiment, config, tmp_path)
    assert "\n" not in str(info.value)


# --- item 8: steps_per_call changes the bits, so it is not changed on resume ----------------------------

@pytest.mark.parametrize("key, value", [("steps_per_call", 4), ("scan_unroll", 2)])
def test_steps_per_call_is_not_changed_on_resume(tmp_path, key, value):
    experiment, config = _toy(20, 5, 2)
    config.train.steps = 10
    fit(experiment, config, tmp_path)
    config.train.update({"steps": 20, key: value})
    with pytest.raises(ConfigMismatchError, match=f"train.{key}: 2 \\(saved\\) vs {value} \\(now\\)" if key ==
                       "steps_per_call" else f"train.{key}: 1 \\(saved\\) vs {value} \\(now\\)"):
        fit(experiment, config, tmp_path)
    config.train.allow_config_change = True      # the stated way to continue it anyway
    assert fit(experiment, config, tmp_path).metrics["step"] == 20
