"""Smoke tests of benchmarks/: each script's smallest setting runs and produces sane figures, so the
scripts do not rot. The benchmarks themselves are run by hand (see benchmarks/README.md).
"""
import importlib
import math
import os
import sys

import jax
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)


def _module(name):
    return importlib.import_module(name)


def _positive(x):
    return x is not None and math.isfinite(x) and x > 0


def test_workloads_give_batches_of_the_declared_size():
    common = _module("_common")
    for name in ("mlp", "cnn", "resnet18", "gpt"):
        work = common.workload(name, "tiny")
        batch = next(work.batches())
        assert batch["inputs"].shape[0] == work.batch_size
        assert batch[work.label_key].shape[:1] == (work.batch_size,)
        per_example = batch["inputs"].shape[1] if work.item == "tokens" else 1
        assert work.items_per_step == work.batch_size * per_example
    with pytest.raises(ValueError, match="valid sizes"):
        common.workload("mlp", "huge")


def test_hand_written_loop_and_depthlab_step_train_and_time():
    common = _module("_common")
    work = common.workload("mlp", "tiny")
    hand, step = common.HandWrittenLoop(work), common.DepthlabStep(work)
    for loop in (hand, step):
        rates = loop.run(windows=2)
        assert len(rates) == 2 and all(_positive(r) for r in rates)
    # Both loops really train: the loss falls on a batch they keep seeing.
    batch = next(work.batches())
    first = [float(hand.step(batch)["loss"]), float(step.step(batch)["loss"])]
    for _ in range(30):
        last = [float(hand.step(batch)["loss"]), float(step.step(batch)["loss"])]
    assert last[0] < first[0] and last[1] < first[1]


def test_fsdp_state_bytes_fall_with_devices():
    scaling = _module("scaling")
    from depthlab.train import parallel
    import flax.linen as nn
    work = scaling.scaling_workload("tiny")
    _, init, _ = _module("_common").depthlab_parts(work)
    boxed = jax.eval_shape(init, jax.random.key(0))
    sizes = {}
    for n in (1, 2, 4):
        for strategy in ("replicated", "fsdp"):
            axes = {"data": n} if strategy == "replicated" else {"data": 1, "fsdp": n}
            mesh = parallel.make_mesh(axes, devices=jax.devices()[:n])
            shardings = parallel.state_shardings(boxed, mesh, strategy=strategy, fsdp_min_size=64)
            sizes[n, strategy] = scaling.state_bytes_per_device(nn.meta.unbox(boxed), shardings)
    assert sizes[1, "replicated"] == sizes[4, "replicated"] == sizes[1, "fsdp"]
    assert sizes[2, "fsdp"] < 0.6 * sizes[1, "fsdp"]
    assert sizes[4, "fsdp"] < 0.35 * sizes[1, "fsdp"]


@pytest.mark.slow
def test_scaling_script_tiny():
    rows = _module("scaling").main(["--size", "tiny", "--devices", "1,2", "--steps", "1"])
    assert {(r["devices"], r["strategy"]) for r in rows} == {(1, "replicated"), (1, "fsdp"), (2, "replicated"), (2, "fsdp")}
    assert all(_positive(r["step ms"]) for r in rows)
    fsdp = {r["devices"]: r["state MB/device"] for r in rows if r["strategy"] == "fsdp"}
    assert fsdp[2] < fsdp[1]


@pytest.mark.slow
def test_overhead_script_tiny():
    rows = _module("overhead").main(["--size", "tiny", "--workloads", "mlp", "--repeats", "1", "--windows", "1",
                                     "--steps-per-call", "1,5"])
    assert [r["loop"] for r in rows] == ["step", "step +gn", "fit k=1", "fit k=5"]
    for row in rows:
        for key in ("hand steps/s", "steps/s", "x/hand"):
            assert _positive(row[key]), (key, row)


@pytest.mark.slow
def test_input_pipeline_script_tiny():
    rows = _module("input_pipeline").main(["--size", "tiny", "--workloads", "cnn", "--repeats", "1", "--windows", "1"])
    assert [r["prefetch"] for r in rows] == [0, 2]
    assert all(0 <= r["wait share"] < 1 and _positive(r["fit steps/s"]) for r in rows)


@pytest.mark.slow
def test_compile_time_script_tiny():
    rows = _module("compile_time").main(["--size", "tiny", "--workloads", "mlp"])
    assert [r["cache"] for r in rows] == ["no cache", "cold cache", "warm cache"]
    assert all(_positive(r["fit: first step s"]) for r in rows)
    # Reading the compiled step from the cache beats compiling it.
    assert rows[2]["step compile s"] < rows[0]["step compile s"]


@pytest.mark.slow
def test_vs_pytorch_script_tiny():
    pytest.importorskip("torch")
    rows = _module("vs_pytorch").main(["--size", "tiny", "--workloads", "cnn", "--repeats", "1", "--windows", "1",
                                      "--no-compile"])
    assert {r["contender"] for r in rows} == {"torch eager", "depthlab step", "depthlab fit"}
    assert all(_positive(r["steps/s"]) for r in rows)


@pytest.mark.slow
def test_together_step_script_tiny():
    rows = _module("together_step").main(["--members", "2", "--steps", "8", "--set", "model.features=(16,10)"])
    assert [r["mode"] for r in rows] == ["single run", "2 members, vmap", "2 members, unroll"]
    assert all(_positive(r["ms"]) and _positive(r["member_steps"]) for r in rows)


@pytest.mark.slow
def test_sweep_together_script_tiny():
    rows = _module("sweep_together").main(["--seeds", "2", "--steps", "10", "--modes", "sequential,together (vmap)",
                                           "--set", "model.features=(16,10)", "--set", "train.log_every=2",
                                           "--sweep", "model.dropout=0.1,0.2"])
    assert [r["mode"] for r in rows] == ["sequential", "together (vmap)"]
    assert all(_positive(r["wall"]) and _positive(r["member_steps_per_sec"]) for r in rows)
