"""Per-device memory and step time on 1, 2, 4, 8 devices, replicated vs FSDP.

Runs on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax
is imported; on a real multi-accelerator host it uses the real devices). For each device count N and
strategy the train step is jitted exactly as fit does it (train.parallel.state_shardings for the
state, batch split over data+fsdp, state donated):
  replicated   config.mesh = {data: N}, strategy "replicated": every device holds all of the state
  fsdp         config.mesh = {fsdp: N}, strategy "fsdp": parameters and Adam moments split over N

Columns: the state's parameter + optimizer bytes held by one device (from the shardings), the
compiled step's per-device argument and temporary bytes (compiled.memory_analysis()), and the median
step time. On fake CPU devices all "devices" share the same cores, so step times show the cost of the
collectives and of splitting the work, not a speed-up.

Usage:
    python benchmarks/scaling.py                 # GPT 4 layers x 256 wide (3.3M parameters)
    python benchmarks/scaling.py --size tiny
"""
from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common as common  # noqa: E402


def scaling_workload(size: str) -> common.Workload:
    from depthlab.models.transformer import GPT
    if size == "tiny":
        model, batch, context = GPT(vocab_size=65, num_layers=1, num_heads=2, embed_dim=32, max_len=16), 8, 16
    elif size == "small":
        model, batch, context = GPT(vocab_size=65, num_layers=4, num_heads=4, embed_dim=256, max_len=64), 16, 64
    else:
        model, batch, context = common.gpt("full")
        batch = 16 if size == "full" else batch
    return common.Workload("gpt", model, common._tokens(batch * 4, context, 65), batch, "targets", "tokens",
                           batch * context, 5)


def state_bytes_per_device(abstract_state, shardings) -> int:
    """Bytes of params + opt_state one device holds under `shardings` (the largest shard)."""
    total = 0
    for part in ("params", "opt_state"):
        leaves = jax.tree.leaves(getattr(abstract_state, part))
        shards = jax.tree.leaves(getattr(shardings, part))
        for leaf, sharding in zip(leaves, shards):
            total += int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return total


def measure(work: common.Workload, devices: int, strategy: str, steps: int) -> dict:
    from depthlab.train import parallel
    axes = {"data": devices} if strategy == "replicated" else {"data": 1, "fsdp": devices}
    mesh = parallel.make_mesh(axes, devices=jax.devices()[:devices])
    _, init, train_step = common.depthlab_parts(work)
    rng = jax.random.key(0)
    boxed = jax.eval_shape(init, rng)
    shardings = parallel.state_shardings(boxed, mesh, strategy=strategy)
    abstract = nn.meta.unbox(boxed)
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    step = jax.jit(train_step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep), donate_argnums=0)
    batches = work.batches()
    example = next(batches)
    compiled = step.lower(abstract, example).compile()
    memory = parallel.per_device_bytes(compiled)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    from depthlab.train import data
    times = []
    for i in range(steps + 1):
        batch = data.to_global(next(batches), batch_sh)
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t)
    return {"devices": devices, "strategy": strategy,
            "state MB/device": state_bytes_per_device(abstract, shardings) / 2**20,
            "args MB/device": memory.get("argument", 0) / 2**20, "temp MB/device": memory.get("temp", 0) / 2**20,
            "step ms": 1e3 * common.median(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=common.SIZES)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per setting")
    parser.add_argument("--devices", default="1,2,4,8")
    args = parser.parse_args(argv)
    steps = args.steps or {"tiny": 2}.get(args.size, 5)
    work = scaling_workload(args.size)
    counts = [n for n in (int(x) for x in args.devices.split(",")) if n <= jax.device_count()]
    common.print_header(f"Scaling: per-device memory and step time (size={args.size}, global batch "
                        f"{work.batch_size}, {jax.device_count()} {jax.devices()[0].platform} devices)")
    params = common.count_params(common.init_variables(work, jax.random.key(0))["params"])
    print(f"model: {work.name}, {params} parameters; Adam: params + 2 moments = {3 * 4 * params / 2**20:.2f} MB fp32")
    rows = []
    for n in counts:
        for strategy in ("replicated", "fsdp"):
            rows.append(measure(work, n, strategy, steps))
    base = {r["strategy"]: r["state MB/device"] for r in rows if r["devices"] == counts[0]}
    for r in rows:
        r["state vs 1 device"] = r["state MB/device"] / base[r["strategy"]]
    common.print_table(rows)
    return rows


if __name__ == "__main__":
    main()
