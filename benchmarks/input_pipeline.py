"""Share of step time spent waiting for data, without and with device prefetch.

Two measurements per workload and prefetch setting (config.train.prefetch = 0 and 2):
  wait share    fit's input path rebuilt around a stopwatch: depthlab's epoch iterator (with the
                experiment's host-side augmentation) -> train.data.prefetch_to_device(size) -> the
                jitted step; the time the loop blocks in next(batches) divided by the loop's time
  fit steps/s   fit itself with train.prefetch = 0 / 2 (its own perf/steps_per_sec), interleaved

Workloads: the digits CNN with digits_cnn's random 1-pixel shift augmentation (numpy fancy
indexing on the host, the costliest input step in the project's vision experiments), and the
small GPT on random token windows.

Usage:
    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --size tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import _common as common  # noqa: E402


def wait_share(work: common.Workload, prefetch: int, step: common.DepthlabStep, windows: int) -> tuple[float, float]:
    """(share of loop time blocked on the next batch, steps/s) over `windows` windows after a warm-up one."""
    from depthlab.train import data, parallel
    sharding = parallel.batch_sharding(common.single_device_mesh())
    batches = data.prefetch_to_device(work.batches(), sharding, prefetch)
    waited = total = 0.0
    steps = 0
    for w in range(windows + 1):
        start = time.perf_counter()
        wait = 0.0
        for _ in range(work.log_every):
            t = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t
            metrics = step.step(batch)
        jax.device_get(metrics)
        if w:
            waited += wait
            total += time.perf_counter() - start
            steps += work.log_every
    batches.close()
    return waited / total, steps / total


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=common.SIZES)
    parser.add_argument("--workloads", default="cnn,gpt")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--windows", type=int, default=0)
    args = parser.parse_args(argv)
    repeats = args.repeats or {"tiny": 1}.get(args.size, 3)
    windows = args.windows or {"tiny": 1}.get(args.size, 4)
    common.enable_compilation_cache(tempfile.mkdtemp(prefix="depthlab_bench_cache_"))
    from depthlab.research.experiment import random_shift
    common.print_header(f"Input pipeline: waiting for data (size={args.size}, {repeats} repeats x {windows} windows)")
    rows = []
    for name in args.workloads.split(","):
        work = common.workload(name, args.size)
        if work.label_key == "labels" and work.arrays["inputs"].ndim == 4:
            work.transform = random_shift(1)   # digits_cnn's augmentation
        step = common.DepthlabStep(work)
        results = {p: {"share": [], "loop": [], "fit": []} for p in (0, 2)}
        for r in range(repeats):
            for prefetch in ((0, 2) if r % 2 == 0 else (2, 0)):
                share, rate = wait_share(work, prefetch, step, windows)
                results[prefetch]["share"].append(share)
                results[prefetch]["loop"].append(rate)
                results[prefetch]["fit"].append(common.median(common.run_fit(work, windows, prefetch=prefetch)))
        for prefetch in (0, 2):
            res = results[prefetch]
            rows.append({"workload": name, "augment": "shift 1px" if work.transform else "-",
                         "batch": work.batch_size, "prefetch": prefetch,
                         "wait share": common.median(res["share"]), "loop steps/s": common.median(res["loop"]),
                         "fit steps/s": common.median(res["fit"]),
                         "fit vs prefetch 0": common.median([a / b for a, b in zip(res["fit"], results[0]["fit"])])})
        common.print_table(rows)
    return rows


if __name__ == "__main__":
    main()
