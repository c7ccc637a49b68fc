"""Overhead of depthlab's train step and `fit` loop against a minimal hand-written JAX + Optax loop.

Same model, same batches (depthlab's epoch iterator), same optimizer (Adam 1e-3), same process; the
three loops run interleaved, in a rotating order, `--repeats` times. Each run times `--windows`
windows of `log_every` steps (after one compile/warm-up window); a run's figure is the median window,
the table shows the median over repeats. Ratios are taken within a repeat, then the median (and the
range) over repeats: with other jobs on the machine, only same-process ratios are meaningful.

  hand      the hand-written loop (HandWrittenLoop in _common.py)
  step      depthlab's make_train_step + TrainState, driven by the same hand-written loop
  step +gn  the same with make_train_step(grad_norm=True): the price of the gradient-norm metric
  fit k=K   depthlab's fit (its defaults) with train.steps_per_call=K: batch checks, metrics.jsonl +
            TensorBoard, progress bar, non-finite checks, bounded dispatch (and, on accelerators, the
            prefetch thread); its own perf/steps_per_sec

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


def measure(work: common.Workload, repeats: int, windows: int, peak: float | None,
            ks: tuple[int, ...] = (1, 8, 32)) -> list[dict]:
    """Rows for `work`: depthlab's step, then fit with each steps_per_call k, each against the hand loop of
    the same repeat (ratios within a repeat, then their median and range over repeats)."""
    hand = common.HandWrittenLoop(work)
    step, step_gn = common.DepthlabStep(work), common.DepthlabStep(work, grad_norm=True)
    runners = {"hand": hand.run, "step": step.run, "step +gn": step_gn.run}
    for k in ks:
        runners[f"fit k={k}"] = lambda w, k=k: common.run_fit(work, w, steps_per_call=k)
    per_repeat = {name: [] for name in runners}
    order = list(runners)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:   # rotate: no loop always runs first
            per_repeat[name].append(common.median(runners[name](windows)))
    rows = []
    for name in order[1:]:
        ratios = [a / b for a, b in zip(per_repeat[name], per_repeat["hand"])]
        rate = common.median(per_repeat[name])
        row = {"workload": work.name, "loop": name, "batch": work.batch_size,
               "hand steps/s": common.median(per_repeat["hand"]), "steps/s": rate,
               "x/hand": common.median(ratios), "range": f"{min(ratios):.3f}-{max(ratios):.3f}",
               "items/s": rate * work.items_per_step, "item": work.item,
               "load": f"{os.getloadavg()[0]:.1f}"}
        if peak and name.startswith("fit"):
            flops = hand.flops_per_step()
            row["MFU"] = flops * rate / peak if flops else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=common.SIZES)
    parser.add_argument("--workloads", default="", help="comma-separated subset, e.g. mlp,gpt")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default by size)")
    parser.add_argument("--windows", type=int, default=0, help="timed windows per run (default by size)")
    parser.add_argument("--steps-per-call", default="1,8,32", help="fit's train.steps_per_call values to time")
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
    ks = tuple(int(k) for k in args.steps_per_call.split(","))
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for name in names:
        rows += measure(common.workload(name, args.size), repeats, windows, peak, ks)
        common.print_table([r for r in rows if r["workload"] == name])
    print(f"All workloads (x/hand: steps/s over the hand-written loop's in the same repeat; load average at end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}):")
    common.print_table(rows)
    return rows


if __name__ == "__main__":
    main()
