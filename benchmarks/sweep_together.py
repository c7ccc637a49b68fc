"""A sweep's seeds together (`depthlab sweep --together`) against the sequential `depthlab sweep` of the same points.

Each row is one `depthlab sweep EXP --sweep seed=0,...,N-1` command in a fresh process and a fresh sweep
directory, end to end: Python and JAX start-up, building and checking every point, compiling, training,
evaluating, checkpointing and writing every run directory. Wall time, and the CPU time of the process (user +
system, and its peak resident memory, from `os.wait4`); the 1-minute load average before and after each row,
since the machine may be shared. Rows run in a rotating order over `--repeats`; the table shows medians.
`member-steps/s` is the training loop's own rate (perf/steps_per_sec, compile and evaluation left out) summed
over the members: the per-step row, beside the end-to-end one.

The CLI keeps JAX's persistent compilation cache (DEPTHLAB_COMPILATION_CACHE): a sequential sweep's seeds
after the first reuse the first one's compiled steps. `--cache cold` (the default) gives each row a fresh,
empty cache (a user's first sweep of an experiment: the sequential sweep compiles once and hits the cache
for the other seeds), `--cache off` none (every point compiles: a sweep from Python, or a cache switched off),
`--cache warm` one cache shared by all rows, warmed by a first unmeasured run of each row.

  sequential        today's sweep: one point after the other, each a separate `fit`
  together (auto)   `--together`: vmap; on CPU a step with convolutions runs one point after the other
  together (unroll) the members' steps traced one after the other inside the one program
  together (vmap)   one `fit` of a member-stacked experiment, the steps vmapped over the members
  together (map)    the same with `lax.map` over the members (the separate runs' arithmetic)

Usage:
    python benchmarks/sweep_together.py                          # 8 seeds of vision/digits_mlp, its defaults
    python benchmarks/sweep_together.py --experiment vision/mnist1d_cnn
    python benchmarks/sweep_together.py --seeds 4 --steps 100    # seconds (a smoke run)
    python benchmarks/sweep_together.py --set "model.features=(32,10)" --set data.batch_size=32   # a small step
    python benchmarks/sweep_together.py --seeds 2 --sweep model.dropout=0.1,0.2,0.3,0.4   # 8 points, 2 x 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MODES = {"sequential": [], "together (auto)": ["--together"], "together (vmap)": ["--together", "vmap"],
         "together (map)": ["--together", "map"], "together (unroll)": ["--together", "unroll"]}


def run_sweep(experiment: str, seeds: int, steps: int | None, mode: str, workdir: str, cache: str,
              settings: list[str] = (), sweeps: list[str] = ()) -> dict:
    """One `depthlab sweep` command, timed: {"wall", "cpu", "load_before", "load_after"}. `cache`: the
    compilation cache folder (or "off"); `sweeps`: more `--sweep KEY=V1,V2` axes beside the seeds."""
    command = [sys.executable, "-m", "depthlab.research", "sweep", experiment,
               "--sweep", "seed=" + ",".join(str(s) for s in range(seeds)), "--workdir", workdir,
               "--config.train.progress=false", *MODES[mode]]
    for sweep in sweeps:
        command += ["--sweep", sweep]
    if steps:
        command.append(f"--config.train.steps={steps}")
    command += [f"--config.{setting}" for setting in settings]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "DEPTHLAB_COMPILATION_CACHE": cache})
        _, status, usage = os.wait4(proc.pid, 0)    # this process's own rusage: CPU time and peak RSS
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            out.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{out.read()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "member_steps_per_sec": member_step_rate(workdir)}


def member_step_rate(workdir: str) -> float:
    """Training steps per second summed over the members, from the runs' own perf/steps_per_sec (the loop's
    rate between logs, compile and evaluation left out): the median logged rate of the first point's run,
    times the number of members of its group when they trained together (a group logs its own rate into each
    member's records; the sweep's records say whether it did: `--together auto` may run the points one after
    the other)."""
    with open(os.path.join(workdir, "sweep.json")) as f:
        points = json.load(f)["points"]
    group = points[0].get("together")
    members = sum(1 for p in points if group and p.get("together") == group) or 1
    with open(os.path.join(workdir, points[0]["workdir"], "metrics.jsonl")) as f:   # relative to the sweep
        rates = [r["perf/steps_per_sec"] for r in map(json.loads, f) if "perf/steps_per_sec" in r][1:]
    return median(rates) * members if rates else float("nan")


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="vision/digits_mlp")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the experiment's own)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every row, e.g. --set model.features=(32,10) (a small step)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="another sweep axis beside the seeds, e.g. --sweep model.dropout=0.1,0.2,0.3,0.4")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--cache", default="cold", choices=("cold", "off", "warm"),
                        help="the compilation cache of each row (see above)")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `timeout`) as an exception: subprocess.run then kills the sweep it is waiting for
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; valid: {', '.join(MODES)}")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    root = tempfile.mkdtemp(prefix="sweep_together_")
    try:
        shared = os.path.join(root, "cache")
        if args.cache == "warm":
            for mode in modes:
                run_sweep(args.experiment, args.seeds, args.steps, mode, os.path.join(root, "warm-up"), shared,
                          args.set, args.sweep)
                shutil.rmtree(os.path.join(root, "warm-up"), ignore_errors=True)
        for r in range(args.repeats):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                name = f"{r}-{mode.replace(' ', '_').replace('(', '').replace(')', '')}"
                cache = {"off": "off", "warm": shared}.get(args.cache, os.path.join(root, name + "-cache"))
                workdir = os.path.join(root, name)
                results[mode].append(run_sweep(args.experiment, args.seeds, args.steps, mode, workdir, cache,
                                               args.set, args.sweep))
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = median([x["wall"] for x in results["sequential"]]) if "sequential" in results else None
    rows = []
    print(f"{args.experiment}{''.join(' --set ' + x for x in args.set)}{''.join(' --sweep ' + x for x in args.sweep)}"
          f", {args.seeds} seeds, "
          f"train.steps={args.steps or 'default'}, {os.cpu_count()} CPUs, "
          f"medians of {args.repeats} repeat(s), end to end (process start to exit), compilation cache "
          f"{args.cache}")
    print(f"{'mode':<18}{'wall s':>9}{'CPU s':>9}{'speed-up (wall)':>17}{'member-steps/s':>16}"
          f"{'peak RSS MB':>13}{'load before/after':>20}")
    for mode in modes:
        wall, cpu = median([x["wall"] for x in results[mode]]), median([x["cpu"] for x in results[mode]])
        load = f"{median([x['load_before'] for x in results[mode]]):.1f}/" \
               f"{median([x['load_after'] for x in results[mode]]):.1f}"
        speed = f"{base / wall:.2f}x" if base else "-"
        rate = median([x["member_steps_per_sec"] for x in results[mode]])
        rss = median([x["rss_mb"] for x in results[mode]])
        print(f"{mode:<18}{wall:>9.1f}{cpu:>9.1f}{speed:>17}{rate:>16.0f}{rss:>13.0f}{load:>20}")
        rows.append({"mode": mode, "wall": wall, "cpu": cpu, "member_steps_per_sec": rate, "rss_mb": rss})
    return rows


if __name__ == "__main__":
    main()
