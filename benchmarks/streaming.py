"""Streaming input (train/streaming.py): images/s of the pipeline alone, and the share of step time a small
ResNet run waits for data, with 0, 1 and 2 Grain worker processes.

Data: N random 32x32x3 uint8 images (noise: PNG compresses it as little as real photos) written by
`depthlab data convert` as 4 ArrayRecord shards of PNG records. Each record is read, PNG-decoded, scaled to
float32, and (with --augment) shifted by up to 2 pixels (mnist_resnet's augmentation), per example.

  pipeline alone   next(batches) in a loop, after the first batch (worker start-up excluded): images/s
  wait share       mnist_resnet's default ResNet (3 stages of 1 basic block, 16 filters) trained on the
                   stream through train.data.prefetch_to_device(2), as fit feeds it: the time the loop blocks
                   in next(batches) over the loop's time; the in-memory path (epoch_batches) for reference

Usage:
    python benchmarks/streaming.py                 # ~3 minutes on 2 cores
    python benchmarks/streaming.py --size tiny     # seconds (the smoke setting)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common as common  # noqa: E402

SETTINGS = {"tiny": {"images": 256, "batches": 4, "steps": 6, "workers": (0, 1)},
            "small": {"images": 4096, "batches": 40, "steps": 60, "workers": (0, 1, 2)}}


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
    except OSError:
        return "?"


def make_dataset(folder: str, images: int) -> dict:
    from depthlab.research.datasets import convert

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, images)
    np.savez(os.path.join(folder, "d.npz"), x_train=x, y_train=y, x_test=x[:256], y_test=y[:256])
    return convert.convert_npz(os.path.join(folder, "d.npz"), os.path.join(folder, "ar"), shards=4, progress=False)


def pipeline_rate(pattern: str, batch_size: int, workers: int, augment: bool, batches: int) -> float:
    from depthlab.research.experiment import PerExample, random_shift
    from depthlab.train import streaming

    source = streaming.ArrayRecordSource(pattern)
    it = streaming.stream_batches(source, batch_size, 0, decode=streaming.ImageExample(),
                                  transform=PerExample(random_shift(2)) if augment else None, num_workers=workers)
    next(it)                                        # start-up (workers spawned, first batch) not counted
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    it.close()
    return batches * batch_size / seconds


def resnet_config(pattern: str, workers: int, batch_size: int):
    from depthlab.research import runner

    return runner.build_config("vision/mnist_resnet", None, [
        f"data.source=arrayrecord:{pattern}", f"data.num_workers={workers}", f"data.batch_size={batch_size}"])


def wait_share(experiment, steps: int, log_every: int = 10) -> tuple[float, float]:
    """(share of loop time blocked on next(batches), steps/s) after a compiled first step."""
    from depthlab.train import data, parallel

    sharding = parallel.batch_sharding(common.single_device_mesh())
    state = jax.jit(experiment.init)(jax.random.key(0))
    step = jax.jit(experiment.train_step, donate_argnums=0)
    batches = data.prefetch_to_device(experiment.train_batches(0), sharding, 2)
    state, metrics = step(state, next(batches))
    jax.device_get(metrics)
    waited, start = 0.0, time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        state, metrics = step(state, batch)
        if (i + 1) % log_every == 0:
            jax.device_get(metrics)               # as fit does once per log window
    jax.device_get(metrics)
    total = time.perf_counter() - start
    batches.close()
    return waited / total, steps / total


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="", help="worker counts to measure, in this order (e.g. 2,1,0)")
    args = parser.parse_args(argv)
    s = dict(SETTINGS[args.size])
    if args.workers:
        s["workers"] = tuple(int(w) for w in args.workers.split(","))
    common.enable_compilation_cache(tempfile.mkdtemp(prefix="depthlab_bench_cache_"))
    common.print_header(f"Streaming input: ArrayRecord of PNG 32x32x3 (size={args.size}, batch {args.batch_size}); "
                        f"load at start {load()}")
    folder = tempfile.mkdtemp(prefix="depthlab_stream_bench_")
    summary = make_dataset(folder, s["images"])
    pattern = os.path.join(folder, "ar", "train-*.array_record")
    rows = []
    for augment in (False, True):
        for workers in s["workers"]:
            rows.append({"measure": "pipeline alone", "workers": workers, "augment": "shift 2px" if augment else "-",
                         "images/s": pipeline_rate(pattern, args.batch_size, workers, augment, s["batches"]),
                         "load": load()})
    from depthlab.research.vision import mnist_resnet
    for workers in s["workers"]:
        experiment = mnist_resnet.make_experiment(resnet_config(pattern, workers, args.batch_size))
        share, rate = wait_share(experiment, s["steps"])
        rows.append({"measure": "ResNet wait share", "workers": workers, "augment": "shift 2px",
                     "wait share": share, "steps/s": rate, "images/s": rate * args.batch_size, "load": load()})
    from depthlab.research.experiment import classification_experiment, random_shift
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (s["images"], 32, 32, 3), dtype=np.uint8).astype(np.float32) / 255
    arrays = {"inputs": x, "labels": rng.integers(0, 10, s["images"]).astype(np.int32)}
    memory = classification_experiment(resnet_config(pattern, 0, args.batch_size), {"train": arrays, "test": arrays},
                                       transform=random_shift(2))
    share, rate = wait_share(memory, s["steps"])
    rows.append({"measure": "ResNet wait share (in memory)", "workers": "-", "augment": "shift 2px",
                 "wait share": share, "steps/s": rate, "images/s": rate * args.batch_size, "load": load()})
    common.print_table(rows, ["measure", "workers", "augment", "images/s", "wait share", "steps/s", "load"])
    print(f"dataset: {summary['records']:,} records, {summary['bytes'] / 1e6:.1f} MB in {summary['files']} files")
    return rows


if __name__ == "__main__":
    main()
