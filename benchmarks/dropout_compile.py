"""Compile time of a dropout train step for a TPU topology, per PRNG implementation (train.prng_impl).

Each row is a fresh Python process that builds the experiment from its config (as `depthlab run` would),
places it on the devices of a TPU topology (libtpu, no TPU needed), wraps its train step with
`depthlab.train.step.with_prng_impl` and AOT-compiles it with the engine's `place` + `compile_steps`:

  no dropout              model.dropout=0: the floor
  threefry                JAX's default keys (partitionable threefry): the hash is fused into, and
                          recompiled in, every consumer of each mask
  threefry_materialized   the same bits computed once (identical masks and losses)
  rbg / unsafe_rbg        XLA's RngBitGenerator (other masks)
  rbg+flag                rbg with LIBTPU_INIT_ARGS=--xla_tpu_spmd_rng_bit_generator_unsafe=true (each chip
                          generates only its shard's bits; MaxText's setting)

Columns: trace+lower and XLA compile seconds, per-chip temporaries (compiler's memory analysis), and the
1-minute load average when the row finished (the machine is shared: compare rows of one table only).

Usage:
    python benchmarks/dropout_compile.py                                  # char_gpt default, v5e:2x2
    python benchmarks/dropout_compile.py --config.model.num_layers=2 --config.data.context=256 \
        --config.data.batch_size=64 --variants threefry,threefry_materialized
    python benchmarks/dropout_compile.py --preset nanogpt --variants threefry_materialized --timeout 3600
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

VARIANTS = ("no dropout", "threefry", "threefry_materialized", "rbg", "unsafe_rbg", "rbg+flag")
RBG_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"


def child(args) -> None:
    """Runs in the measured process: prints one JSON line."""
    import jax
    from jax.experimental import topologies

    from depthlab.research import registry
    from depthlab.research.runner import build_config
    from depthlab.train import parallel
    from depthlab.train.loop import compile_steps, place
    from depthlab.train.step import with_prng_impl

    variant = args.child
    overrides = list(args.overrides) + [f"model.dropout={0.0 if variant == 'no dropout' else args.dropout}"]
    config = build_config(args.experiment, args.preset, overrides)
    experiment = registry.load_experiment(args.experiment).make_experiment(config)
    impl = {"no dropout": "threefry", "rbg+flag": "rbg"}.get(variant, variant)
    experiment = dataclasses.replace(experiment, train_step=with_prng_impl(experiment.train_step, impl))
    devices = topologies.get_topology_desc(args.topology, platform="tpu").devices
    mesh_cfg = config.mesh
    mesh = parallel.make_mesh({k: mesh_cfg[k] for k in parallel.MESH_AXES if k in mesh_cfg}, devices)
    t0 = time.perf_counter()
    placement = place(experiment, config, mesh)
    steps = compile_steps(experiment, placement)
    batch = next(iter(experiment.train_batches(0)))
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placement.batch_sharding) for k, v in batch.items()}
    lowered = steps.train.lower(placement.abstract_state, spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "temp_bytes": memory.temp_size_in_bytes,
                      "argument_bytes": memory.argument_size_in_bytes, "chips": len(devices),
                      "load": os.getloadavg()[0]}))


def run_variant(args, variant: str) -> dict:
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu",
               TPU_WORKER_HOSTNAMES=os.environ.get("TPU_WORKER_HOSTNAMES", "localhost"))
    if variant == "rbg+flag":
        env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + RBG_FLAG).strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--experiment", args.experiment,
           "--topology", args.topology, "--dropout", str(args.dropout)]
    cmd += (["--preset", args.preset] if args.preset else []) + [f"--config.{o}" for o in args.overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished after {args.timeout:.0f} s", "load": os.getloadavg()[0]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "wall_s": time.perf_counter() - start}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:120], "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="language/char_gpt")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--dropout", type=float, default=0.2, help="model.dropout of the dropout rows")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--config.") and "=" in r)]
    if bad:
        parser.error(f"unrecognised {bad[0]!r}: config overrides look like --config.model.num_layers=2")
    args.overrides = [r[len("--config."):] for r in rest]
    if args.child:
        return child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
    print(f"{args.experiment} preset={args.preset} {' '.join(args.overrides)} on {args.topology}, "
          f"dropout {args.dropout}; load {os.getloadavg()[0]:.1f} at start (nproc {os.cpu_count()})")
    print(f"{'variant':<24}{'lower s':>9}{'compile s':>11}{'temp MiB/chip':>15}{'load':>6}")
    for variant in variants:
        row = run_variant(args, variant)
        if "error" in row:
            print(f"{variant:<24}  {row['error']}  (load {row['load']:.1f})", flush=True)
            continue
        print(f"{variant:<24}{row['lower_s']:>9.1f}{row['compile_s']:>11.1f}{row['temp_bytes'] / 2**20:>15.1f}"
              f"{row['load']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
