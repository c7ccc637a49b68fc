"""Two processes x 4 CPU devices (jax.distributed on a loopback coordinator, gloo collectives) train
exactly like one process with 8 devices, and their checkpoints restore across device counts."""
import os
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from depthlab.research import build_config, load_experiment
from depthlab.train import Checkpointer, parallel, read_metrics

ARGS = ["--config.train.log_every=4", "--config.train.eval_every=8", "--config.train.checkpoint_every=8",
        "--config.train.progress=false", "--config.train.async_checkpoint=false", "--config.data.batch_size=32",
        "--config.data.eval_batch_size=120"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir, steps, processes):
    cmd = [sys.executable, "-m", "depthlab.research", "run", "vision/digits_mlp", "--workdir", str(workdir),
           f"--config.train.steps={steps}", *ARGS]
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHLAB_")}
    if processes == 1:
        env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return
    port = _free_port()
    procs = []
    for i in range(processes):
        env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
                   DEPTHLAB_COORDINATOR=f"127.0.0.1:{port}", DEPTHLAB_NUM_PROCESSES=str(processes),
                   DEPTHLAB_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def _final_params(workdir):
    config = build_config("vision/digits_mlp", overrides={"data.batch_size": 32})
    experiment = load_experiment("vision/digits_mlp").make_experiment(config)
    mesh = parallel.make_mesh({"data": -1})
    abstract = jax.eval_shape(experiment.init, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(abstract), shardings)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state, step = ckpt.restore_latest(abstract)
    ckpt.close()
    return jax.device_get(state.params), step


def _values(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(workdir)]


def _assert_same_run(a, b):
    ra, rb = _values(a), _values(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    _run(workdir, 16, processes=1)
    return workdir


def test_two_processes_equal_one_process(tmp_path, one_process_run):
    _run(tmp_path, 16, processes=2)
    _assert_same_run(tmp_path, one_process_run)
    # The 2-process checkpoint restores here (one process, 4 devices) and equals the 1-process one.
    params, step = _final_params(tmp_path)
    ref, ref_step = _final_params(one_process_run)
    assert step == ref_step == 16
    chex.assert_trees_all_close(params, ref, rtol=1e-5, atol=1e-6)


def test_one_process_checkpoint_resumes_in_two_processes(tmp_path, one_process_run):
    _run(tmp_path, 8, processes=1)
    _run(tmp_path, 16, processes=2)          # resumes the 1-process checkpoint at step 8
    _assert_same_run(tmp_path, one_process_run)
