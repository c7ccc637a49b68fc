"""Faults done to real runs: corrupt checkpoint bytes, a changed model, a second writer, a dead lock holder,
a restart that must keep the best checkpoint, an update that blows the parameters up, Ctrl-C, a full disk.

Each asserts that nothing valid is deleted or moved, and that the run either continues from the newest intact
checkpoint (bit-identical to an uninterrupted run) or stops with one line that names the problem and the fix.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from toys import toy_experiment

from depthlab.research.cli import main
from depthlab.train import (CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError, NonFiniteError,
                            RunLockedError, fit, read_metrics)
from depthlab.train.rundir import RunLock


def _listing(path):
    return sorted((os.path.relpath(os.path.join(root, f), path), os.path.getsize(os.path.join(root, f)))
                  for root, _, files in os.walk(path) for f in files)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _corrupt_middle(step_dir, seed=0):
    """4 KiB of random bytes (or half the file, if smaller) written into the middle of its largest data file."""
    files = [os.path.join(root, f) for root, _, fs in os.walk(step_dir) for f in fs]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    n = min(4096, size // 2)
    with open(target, "r+b") as f:
        f.seek((size - n) // 2)
        f.write(np.random.default_rng(seed).bytes(n))


def test_corrupt_bytes_are_caught_and_the_older_checkpoint_resumes_bit_for_bit(tmp_path, caplog):
    experiment, config = toy_experiment(steps=20, size=4096, random_init=True)
    fit(experiment, config, tmp_path / "run")
    assert _steps(tmp_path / "run") == [10, 15, 20]
    _corrupt_middle(tmp_path / "run" / "checkpoints" / "20")
    config.train.steps = 25
    result = fit(experiment, config, tmp_path / "run")          # falls back to step 15, warns
    assert any("skipping checkpoint" in r.getMessage() and "changed since it was written" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert [d for d in os.listdir(tmp_path / "run" / "checkpoints") if d.startswith("unreadable-20-")]   # kept
    straight = fit(*toy_experiment(steps=25, size=4096, random_init=True)[:1], config, tmp_path / "straight")
    chex.assert_trees_all_equal(jax.device_get(result.state), jax.device_get(straight.state))


def test_the_only_checkpoint_left_is_never_moved_without_the_flag(tmp_path):
    experiment, config = toy_experiment(steps=5)
    fit(experiment, config, tmp_path)
    _corrupt_middle(tmp_path / "checkpoints" / "5")
    before, records = _listing(tmp_path / "checkpoints"), read_metrics(tmp_path)
    config.train.steps = 10
    with pytest.raises(CheckpointCorruptError, match="only one left, so it was not moved.*allow_discard_last"):
        fit(experiment, config, tmp_path)
    assert _listing(tmp_path / "checkpoints") == before and read_metrics(tmp_path) == records
    config.train.allow_discard_last_checkpoint = True
    assert int(fit(experiment, config, tmp_path).state.step) == 10        # set aside, trained from scratch
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("unreadable-5-")]


@pytest.mark.parametrize("how", ["config.json deleted", "allow_config_change"])
def test_a_changed_model_stops_and_touches_no_checkpoint(tmp_path, how):
    experiment, config = toy_experiment(steps=15)
    fit(experiment, config, tmp_path)
    if how == "config.json deleted":
        os.remove(tmp_path / "config.json")
    else:
        config.train.allow_config_change = True
    before, records = _listing(tmp_path / "checkpoints"), read_metrics(tmp_path)
    changed, _ = toy_experiment(steps=15, size=3)
    with pytest.raises(CheckpointMismatchError, match=r"'w' is float32\[2\] in the checkpoint but float32\[3\]"):
        fit(changed, config, tmp_path)
    assert _listing(tmp_path / "checkpoints") == before and read_metrics(tmp_path) == records


def test_a_second_writer_is_refused_before_it_writes(tmp_path):
    experiment, config = toy_experiment(steps=5)
    with RunLock(str(tmp_path)):     # another run holds the directory
        with pytest.raises(RunLockedError, match=f"in use by host .* pid {os.getpid()}"):
            fit(experiment, config, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".lock"]       # no config.json, no metrics, no checkpoints
    assert int(fit(experiment, config, tmp_path).state.step) == 5   # released: the directory is usable


def _cli(workdir, *extra):
    return [sys.executable, "-m", "depthlab.research", "run", "vision/digits_mlp", "--workdir", str(workdir),
            "--config.train.log_every=5", "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000",
            "--config.train.progress=false", "--config.data.batch_size=32", *extra]


def _wait_for_metrics(workdir, proc, timeout=240):
    deadline = time.time() + timeout
    while not read_metrics(workdir):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)


def test_two_commands_on_one_run_directory(tmp_path):
    command = _cli(tmp_path, "--config.train.steps=100000")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_metrics(tmp_path, first)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run should still be training"
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0 and f"pid {first.pid}" in second.stderr, second.stderr
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out
    steps = [r["step"] for r in read_metrics(tmp_path)]
    # One writer: no record twice. The preempted run checkpoints the step it reached; the steps since its last
    # log wait in metrics.window.json (they are logged on resume), so no record is past the checkpoint.
    assert steps == sorted(set(steps)) and steps[-1] <= _steps(tmp_path)[-1]


def test_a_lock_whose_holder_died_does_not_block(tmp_path):
    code = (f"import time; from depthlab.train.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            f"print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    experiment, config = toy_experiment(steps=5)
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        fit(experiment, config, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert int(fit(experiment, config, tmp_path).state.step) == 5


def test_the_best_checkpoint_survives_restarts(tmp_path):
    # eval/score peaks at step 10; keep=1 + best: {newest, best} before and after a restart.
    experiment, config = toy_experiment(steps=20, score=lambda step: -abs(step - 10))
    config.train.update({"eval_every": 5, "keep": 1, "best_metric": "eval/score"})
    fit(experiment, config, tmp_path)
    assert _steps(tmp_path) == [10, 20]
    config.train.steps = 30
    fit(experiment, config, tmp_path)
    assert _steps(tmp_path) == [10, 30]


def test_parameters_that_became_non_finite_are_never_checkpointed(tmp_path):
    experiment, config = toy_experiment(steps=20, blow_up_at=15)   # the loss of step 15 is still finite
    with pytest.raises(NonFiniteError, match="state became non-finite .* by step 15.*last good checkpoint is step 10"):
        fit(experiment, config, tmp_path)
    assert _steps(tmp_path) == [5, 10]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_exits_preempted(tmp_path, sig):
    proc = subprocess.Popen(_cli(tmp_path, "--config.train.steps=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_metrics(tmp_path, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out and f"preempted at step" in out and f"by {signal.Signals(sig).name}" in out
    assert _steps(tmp_path) and max(_steps(tmp_path)) >= read_metrics(tmp_path)[-1]["step"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root can mount one); else the test is skipped with the reason."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk fault needs a real full disk")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_loses_nothing(small_disk, tmp_path, capsys):
    workdir = small_disk / "run"
    experiment, config = toy_experiment(steps=10, size=200_000, random_init=True)
    config.train.min_free_mb = 0
    fit(experiment, config, workdir)                              # checkpoints 5 and 10, ~0.8 MB each
    good = _listing(workdir / "checkpoints" / "10")
    free = shutil.disk_usage(small_disk).free
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (free - 300 * 1024))                      # 300 KB left
    config.train.steps = 20
    with pytest.raises(CheckpointWriteError) as error:
        fit(experiment, config, workdir)
    message = str(error.value)
    assert "\n" not in message and "no space left" in message and str(workdir) in message, message
    assert "the last checkpoint (step 10) is intact" in message
    assert _steps(workdir) == [5, 10] and _listing(workdir / "checkpoints" / "10") == good
    assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]     # no half-written folder
    os.remove(small_disk / "filler")
    resumed = fit(experiment, config, workdir)                     # space freed: the same command resumes
    straight = fit(*toy_experiment(steps=20, size=200_000, random_init=True)[:1], config, tmp_path / "straight")
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(straight.state))


def test_cli_prints_checkpoint_faults_as_one_line(tmp_path, capsys):
    args = ["run", "vision/digits_mlp", "--workdir", str(tmp_path), "--config.train.steps=10",
            "--config.train.checkpoint_every=5", "--config.train.progress=false", "--config.train.keep=1"]
    assert main(args) == 0
    _corrupt_middle(tmp_path / "checkpoints" / "10")
    capsys.readouterr()
    assert main([*args[:-1], "--config.train.steps=20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("depthlab: error: checkpoint") and "only one left" in err, err


# --- bad input: one line naming the problem and the fix, before anything is written --------------

@pytest.mark.parametrize("override,message", [
    ("--config.data.batch_size=0", "data.batch_size=0: expected an integer >= 1 (examples per batch); fix: pass --config.data.batch_size=64"),
    ("--config.data.batch_size=-8", "data.batch_size=-8: expected an integer >= 1"),
    ("--config.train.steps=0", "train.steps=0: expected an integer >= 1; fix: pass --config.train.steps="),
    ("--config.train.keep=0", "train.keep=0: expected an integer >= 1"),
    ("--config.train.nonfinite=ignore", "train.nonfinite='ignore': expected one of stop, skip"),
])
def test_bad_values_fail_before_anything_is_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert main(["run", "vision/digits_mlp", "--workdir", str(workdir), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not workdir.exists() or not os.listdir(workdir)


def test_nan_and_empty_inputs_are_named(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(100, 8, 8)).astype(np.float32)
    x[3, 2, 2] = np.nan
    y = np.arange(100) % 3
    np.savez(tmp_path / "nan.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    args = ["run", "vision/digits_cnn", "--workdir", str(tmp_path / "run"), "--config.model.num_classes=3",
            "--config.data.batch_size=16"]
    assert main([*args, f"--config.data.name=npz:{tmp_path / 'nan.npz'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'inputs' holds NaN or inf in 1 of its 80 examples" in err, err
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
    from depthlab.train import data
    with pytest.raises(ValueError, match="the training arrays are empty"):
        data.epoch_batches({"inputs": np.zeros((0, 4)), "labels": np.zeros(0)}, 8, seed=0)


def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"--config.data.name=npz:{path}"


def _images(n, shape=(8, 8), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, *shape)).astype(dtype)


@pytest.mark.parametrize("case,message", [
    ("labels out of range", "train labels run from 0 to 4, outside [0, 3); set --config.model.num_classes=5"),
    ("train and test differ", "train inputs are float32[8, 8, 1] per example but test inputs float32[6, 6, 1]"),
    ("not an npz", "is not an .npz archive of arrays"),
    ("negative learning rate", "optim.learning_rate=-0.001: expected a number > 0"),
])
def test_bad_data_and_config_are_one_line_before_anything_is_written(tmp_path, capsys, case, message):
    y = np.arange(40) % 3
    args = ["run", "vision/digits_cnn", "--workdir", str(tmp_path / "run"), "--config.model.num_classes=3",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=8"]
    if case == "labels out of range":
        args.append(_npz(tmp_path / "d.npz", _images(40), np.arange(40) % 5, _images(8), y[:8]))
    elif case == "train and test differ":
        args.append(_npz(tmp_path / "d.npz", _images(40), y, _images(8, (6, 6)), y[:8]))
    elif case == "not an npz":
        (tmp_path / "d.npz").write_text("x,y\n1,2\n")
        args.append(f"--config.data.name=npz:{tmp_path / 'd.npz'}")
    else:
        args = [a for a in args if "num_classes" not in a] + ["--config.optim.learning_rate=-0.001"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
