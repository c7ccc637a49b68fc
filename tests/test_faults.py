import pytest
"""Surviving faults: SIGKILL at random steps, a corrupted newest checkpoint, and FSDP memory."""
import logging
import os
import random
import signal
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import numpy as np

from depthlab.research import build_config, load_experiment, run_experiment
from depthlab.research.experiment import classification_loss, init_state
from depthlab.models import MLP
from depthlab.train import Checkpointer, default_optim_config, make_optimizer, make_train_step, parallel, read_metrics

FAST = {"train.steps": 30, "train.log_every": 5, "train.eval_every": 15, "train.checkpoint_every": 10,
        "train.progress": False, "train.async_checkpoint": False, "data.batch_size": 32}


def _cli(workdir, steps=120, *extra):
    return [sys.executable, "-m", "depthlab.research", "run", "vision/digits_mlp", "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.train.log_every=5", "--config.train.eval_every=60",
            "--config.train.checkpoint_every=5", "--config.train.progress=false",
            "--config.train.async_checkpoint=false", "--config.data.batch_size=32", *extra]


def _restore_params(workdir):
    config = build_config("vision/digits_mlp", overrides={"data.batch_size": 32})
    experiment = load_experiment("vision/digits_mlp").make_experiment(config)
    mesh = parallel.make_mesh({"data": -1})
    abstract = jax.eval_shape(experiment.init, jax.random.key(0))
    sh = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(abstract), sh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state, step = ckpt.restore_latest(abstract)
    ckpt.close()
    return jax.device_get(state), step


def _finished_checkpoints(workdir):
    path = workdir / "checkpoints"
    return {int(d) for d in os.listdir(path) if d.isdigit()} if path.exists() else set()


def test_sigkill_at_random_steps_resumes_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    assert subprocess.run(_cli(reference), capture_output=True, timeout=600).returncode == 0
    rng = random.Random(0)
    killed = tmp_path / "killed"
    for trial in range(3):
        before = _finished_checkpoints(killed)
        proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill at a random moment after this process wrote a checkpoint of its own (maybe mid-checkpoint),
        # so that every trial makes progress and the last run really resumes.
        deadline = time.time() + 300
        while not _finished_checkpoints(killed) - before and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert max(_finished_checkpoints(killed)) > max(before, default=0)
    final = subprocess.run(_cli(killed), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Resuming" in final.stdout
    state, step = _restore_params(killed)
    ref_state, ref_step = _restore_params(reference)
    assert step == ref_step == 120
    chex.assert_trees_all_equal(state.params, ref_state.params)        # bit for bit
    chex.assert_trees_all_equal(state.opt_state, ref_state.opt_state)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert strip(read_metrics(killed)) == strip(read_metrics(reference))


@pytest.mark.slow   # 23 s loaded; SIGKILL at random steps (k=1) stays fast
def test_sigkill_with_steps_per_call_resumes_bit_for_bit(tmp_path):
    k = ("--config.train.steps_per_call=5",)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert subprocess.run(_cli(reference, 60, *k), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(_cli(killed, 60, *k), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _finished_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = subprocess.run(_cli(killed, 60, *k), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0 and "Resuming" in final.stdout, final.stderr[-2000:]
    state, step = _restore_params(killed)
    ref_state, ref_step = _restore_params(reference)
    assert step == ref_step == 60
    chex.assert_trees_all_equal(state.params, ref_state.params)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert strip(read_metrics(killed)) == strip(read_metrics(reference))


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    run_experiment("vision/digits_mlp", overrides=FAST, workdir=str(tmp_path))
    newest = tmp_path / "checkpoints" / "30"
    assert newest.is_dir()
    for dirpath, _, filenames in os.walk(newest / "state"):
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(path) // 3))
    caplog.set_level(logging.WARNING, logger="depthlab")
    resumed = run_experiment("vision/digits_mlp", overrides={**FAST, "train.steps": 40}, workdir=str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.name == "depthlab"]
    assert any("skipping checkpoint" in w and w.count("/30") for w in warnings), warnings
    assert resumed["metrics"]["step"] == 40
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == sorted(steps) and steps[-1] == 40 and 25 in steps   # resumed from step 20


def test_fsdp_holds_a_fraction_of_the_replicated_state_per_device():
    model = MLP(features=(512, 512, 10))
    x = np.zeros((64, 32, 1), np.float32)
    tx = make_optimizer(default_optim_config())
    init = lambda key: init_state(model, x, tx, key)
    abstract = jax.eval_shape(init, jax.random.key(0))
    step = make_train_step(model, classification_loss())
    batch = {"inputs": jax.ShapeDtypeStruct(x.shape, x.dtype), "labels": jax.ShapeDtypeStruct((64,), np.int32)}
    sizes = {}
    for name, axes, strategy in [("replicated", {"data": 4}, "replicated"), ("fsdp", {"fsdp": 4}, "fsdp")]:
        mesh = parallel.make_mesh(axes)
        sh = parallel.state_shardings(abstract, mesh, strategy)
        compiled = jax.jit(step, in_shardings=(sh, parallel.batch_sharding(mesh)), out_shardings=(sh, None),
                           donate_argnums=0).lower(abstract, batch).compile()
        sizes[name] = parallel.per_device_bytes(compiled)["argument"]
    # Parameters + Adam moments dominate; FSDP over 4 devices holds about 1/4 of them per device.
    assert sizes["fsdp"] < sizes["replicated"] / 3, sizes
