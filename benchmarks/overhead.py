"""Overhead of depthlab's train step and `fit` loop against a minimal hand-written JAX + Optax loop.

Same model, same batches (depthlab's epoch iterator), same optimizer (Adam 1e-3), same process; the
three loops run interleaved, in a rotating order, `--repeats` times. Each run times `--windows`
windows of `log_every` steps (after one compile/warm-up window); a run's figure is the median window,
the table shows the median over repeats. Ratios are taken within a repeat, then the median (and the
range) over repeats: with other jobs on the machine, only same-process ratios are meaningful.

  hand      the hand-written loop (HandWrittenLoop in _common.py)
  step      depthlab's make_train_step + TrainState, driven by the same hand-written loop
  fit       depthlab's fit: prefetch thread, batch checks, metrics.jsonl + TensorBoard, progress bar,
            non-finite check; its own perf/steps_per_sec records

Usage:
    python benchmarks/overhead.py                     # mlp, cnn, resnet18 (16x16), small gpt on CPU
    python benchmarks/overhead.py --size tiny         # seconds (the smoke test)
    python benchmarks/overhead.py --size full         # resnet18 on 32x32 x128, nanoGPT-char GPT, ...
    python benchmarks/overhead.py --size gpu          # accelerator: GPT Shakespeare-char and 124M in
                                                      # bf16 (tokens/s, MFU), ResNet-50 x256 (images/s)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

WORKLOADS = {
    "tiny": ("mlp", "cnn", "resnet18", "gpt"),
    "small": ("mlp", "cnn", "resnet18", "gpt"),
    "full": ("mlp", "cnn", "resnet18", "gpt"),
    "gpu": ("gpt_char", "gpt2_124m", "resnet50"),
}
DEFAULTS = {"tiny": (1, 2), "small": (3, 4), "full": (3, 4), "gpu": (3, 5)}   # (repeats, windows)


def measure(work: common.Workload, repeats: int, windows: int, peak: float | None) -> dict:
    hand = common.HandWrittenLoop(work)
    step = common.DepthlabStep(work)
    runners = {"hand": hand.run, "step": step.run,
               "fit": lambda w: common.run_fit(work, w)}
    per_repeat = {name: [] for name in runners}
    order = list(runners)
    for r in range(repeats):
        for name in order[r % 3:] + order[:r % 3]:   # rotate so no loop always runs first
            per_repeat[name].append(common.median(runners[name](windows)))
    ratio = lambda name: [a / b for a, b in zip(per_repeat[name], per_repeat["hand"])]  # noqa: E731
    fit_rate = common.median(per_repeat["fit"])
    row = {
        "workload": work.name,
        "params": common.count_params(hand.carry[0]),
        "batch": work.batch_size,
        "hand steps/s": common.median(per_repeat["hand"]),
        "step steps/s": common.median(per_repeat["step"]),
        "fit steps/s": fit_rate,
        "step/hand": common.median(ratio("step")),
        "fit/hand": common.median(ratio("fit")),
        "fit/hand range": f"{min(ratio('fit')):.3f}-{max(ratio('fit')):.3f}",
        "fit items/s": fit_rate * work.items_per_step,
        "item": work.item,
    }
    if peak:
        flops = hand.flops_per_step()
        row["fit MFU"] = flops * fit_rate / peak if flops else None
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=common.SIZES)
    parser.add_argument("--workloads", default="", help="comma-separated subset, e.g. mlp,gpt")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default by size)")
    parser.add_argument("--windows", type=int, default=0, help="timed windows per run (default by size)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (auto on known GPUs/TPUs)")
    args = parser.parse_args(argv)
    repeats, windows = DEFAULTS[args.size]
    repeats, windows = args.repeats or repeats, args.windows or windows
    names = [n for n in args.workloads.split(",") if n] or WORKLOADS[args.size]
    # fit compiles afresh each call: the persistent cache makes repeats 2.. cheap (compile time is
    # not part of the throughput anyway, it only shortens the benchmark).
    common.enable_compilation_cache(tempfile.mkdtemp(prefix="depthlab_bench_cache_"))
    peak = common.peak_flops(args.peak_tflops)
    common.print_header(f"Overhead vs hand-written JAX+Optax (size={args.size}, {repeats} repeats x {windows} windows)")
    rows = []
    for name in names:
        rows.append(measure(common.workload(name, args.size), repeats, windows, peak))
        common.print_table(rows[-1:])
    print("All workloads:")
    common.print_table(rows)
    return rows


if __name__ == "__main__":
    main()
