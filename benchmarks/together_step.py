"""One train step of a together group against one step of a single run: what bounds `depthlab sweep --together`.

The experiment's own jitted train step on a fixed batch (its first), timed over `--steps` calls after a warm-up
call, for one run and for a group of `--members` points (seeds 0..N-1, the stacked experiment of
research/together.py) over the members by vmap and by unroll. `member-steps/s` is steps/s times the members; the
ratio is against the single run's steps/s. No data pipeline, evaluation or checkpoint: the step alone, which is
what the end-to-end table of sweep_together.py cannot go below.

Usage:
    python benchmarks/together_step.py                                  # digits_mlp, 8 members
    python benchmarks/together_step.py --set model.dropout=0.0          # without dropout
    python benchmarks/together_step.py --members 2 --steps 20           # seconds (a smoke run)
"""
from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax

from depthlab.research import together
from depthlab.research.registry import load_experiment
from depthlab.research.runner import build_config
from depthlab.train.data import first_batch


def seconds_per_step(step, state, batch, steps: int) -> float:
    """Seconds per call of `step`: the wall time of `steps` calls after one warm-up (compiling) call."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="vision/digits_mlp")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500, help="timed calls of the single step (groups: / 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every member, e.g. --set model.dropout=0.0")
    args = parser.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    module = load_experiment(args.experiment)
    configs = [build_config(args.experiment, None, {**overrides, "seed": i}) for i in range(args.members)]
    experiments = [module.make_experiment(c) for c in configs]

    single = experiments[0]
    state = nn.meta.unbox(jax.jit(single.init)(jax.random.key(0)))
    batch = jax.device_put(first_batch(single.train_batches(0)))
    base = seconds_per_step(jax.jit(single.train_step, donate_argnums=0), state, batch, args.steps)
    rows = [{"mode": "single run", "ms": base * 1e3, "member_steps": 1 / base, "ratio": 1.0}]
    for mode in ("vmap", "unroll"):
        group = together.stacked_experiment(experiments, configs, mode=mode)
        state = nn.meta.unbox(jax.jit(group.init)(jax.random.key(0)))
        batch = jax.device_put(first_batch(group.train_batches(0)))
        t = seconds_per_step(jax.jit(group.train_step, donate_argnums=0), state, batch, max(args.steps // 4, 1))
        rows.append({"mode": f"{args.members} members, {mode}", "ms": t * 1e3, "member_steps": args.members / t,
                     "ratio": args.members * base / t})

    print(f"{args.experiment}{''.join(' --set ' + s for s in args.set)}: one train step on a fixed batch, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"| {'step':<20} | {'ms per step':>11} | {'member-steps/s':>14} | {'vs one run':>10} |")
    print(f"|{'-' * 22}|{'-' * 13}|{'-' * 16}|{'-' * 12}|")
    for r in rows:
        print(f"| {r['mode']:<20} | {r['ms']:>11.3f} | {r['member_steps']:>14.0f} | {r['ratio']:>9.2f}x |")
    return rows


if __name__ == "__main__":
    main()
