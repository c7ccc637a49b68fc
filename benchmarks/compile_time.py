"""Time to the first training step, without and with JAX's persistent compilation cache.

Each measurement is a fresh Python process (so nothing is cached in memory):
  no cache      the cache is off
  cold cache    the cache is on, in an empty directory (compiles and writes the cache)
  warm cache    a second process with the same directory (reads the compiled step from it)

A child process reports, in seconds from its own start (the parent adds the interpreter start-up,
measured from launch):
  import        `import jax, depthlab.train, depthlab.models`
  first step    `fit` called -> the first step's metrics fetched: the iterator's second batch is
                requested right after fit logged step 1 (prefetch=0, log_every=1)
  compile       the train step's `jax.jit(...).lower(...).compile()` alone, in its own process
                (trace + lower + XLA compile, or cache read)

The "fit" children switch the cache on the way users do, with config.train.compilation_cache=<dir>
(the same as DEPTHLAB_COMPILATION_CACHE=<dir>); the "compile" children call the engine's
`enable_compilation_cache(dir)` (jax_compilation_cache_dir, and a zero minimum compile time so that
small steps are cached too).

Usage:
    python benchmarks/compile_time.py                      # cnn, gpt, resnet18 (small)
    python benchmarks/compile_time.py --size tiny --workloads mlp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args) -> None:
    """Runs in the measured process: prints one JSON line of timings."""
    t0 = time.perf_counter()
    sys.path.insert(0, HERE)
    import jax
    import depthlab.models  # noqa: F401
    import depthlab.train  # noqa: F401
    import _common as common
    out = {"import": time.perf_counter() - t0}
    work = common.workload(args.workload, args.size)
    if args.what == "compile":
        if args.cache:
            common.enable_compilation_cache(args.cache)
        _, init, train_step = common.depthlab_parts(work)
        import flax.linen as nn
        state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
        batch = next(work.batches())
        t = time.perf_counter()
        lowered = jax.jit(train_step, donate_argnums=0).lower(state, batch)
        out["lower"] = time.perf_counter() - t
        t = time.perf_counter()
        compiled = lowered.compile()
        out["compile"] = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, batch))
        out["run"] = time.perf_counter() - t
    else:
        from depthlab.train import Experiment, fit
        _, init, train_step = common.depthlab_parts(work)
        marks = {}

        def batches(start):
            for i, batch in enumerate(work.batches(start)):
                if i == 1:   # asked for step 2: step 1 has run and been logged
                    marks["first_step"] = time.perf_counter()
                yield batch

        config = common.fit_config(work, steps=2, prefetch=0)
        config.train.update({"log_every": 1, "progress": False})
        if args.cache:
            if "compilation_cache" in config.train:
                config.train.compilation_cache = args.cache
            else:  # an engine without the switch
                common.enable_compilation_cache(args.cache)
        workdir = tempfile.mkdtemp(prefix="bench_compile_")
        try:
            t = time.perf_counter()
            fit(Experiment(init=init, train_step=train_step, train_batches=batches), config, workdir,
                mesh=common.single_device_mesh())
            out["fit_first_step"] = marks["first_step"] - t
            out["first_step"] = marks["first_step"] - t0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(workload: str, size: str, what: str, cache: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--workloads", workload, "--size", size,
           "--what", what] + (["--cache", cache] if cache else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("DEPTHLAB_COMPILATION_CACHE", None)
    launch = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - launch
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process"] = wall
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "full", "gpu"))
    parser.add_argument("--workloads", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--what", default="fit", choices=("fit", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.workload = args.workloads
        child(args)
        return []
    sys.path.insert(0, HERE)
    import _common as common
    names = [n for n in args.workloads.split(",") if n] or (["mlp"] if args.size == "tiny" else ["cnn", "gpt", "resnet18"])
    common.print_header(f"Time to first step, fresh processes (size={args.size})")
    rows = []
    for name in names:
        for what in ("fit", "compile"):
            cache_dir = tempfile.mkdtemp(prefix="depthlab_cache_")
            try:
                for mode, cache in (("no cache", None), ("cold cache", cache_dir), ("warm cache", cache_dir)):
                    r = run_child(name, args.size, what, cache)
                    row = {"workload": name, "cache": mode, "import s": r["import"]}
                    if what == "fit":
                        row.update({"fit: first step s": r["fit_first_step"],
                                    "start->first step s": r["first_step"], "process total s": r["process"]})
                        rows.append(row)
                    else:
                        match = next(x for x in rows if x["workload"] == name and x["cache"] == mode)
                        match.update({"step lower s": r["lower"], "step compile s": r["compile"]})
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
        common.print_table([r for r in rows if r["workload"] == name])
    print("All workloads:")
    common.print_table(rows)
    return rows


if __name__ == "__main__":
    main()
