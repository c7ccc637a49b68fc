"""Tokens/second of the GPT train step (forward, backward, AdamW update), as a table; MFU on accelerators.

    python benchmarks/gpt_throughput.py                       # small CPU-sized models
    python benchmarks/gpt_throughput.py --sizes nanogpt --dtype bfloat16 --batch 64 --context 256

MFU = achieved FLOP/s / peak FLOP/s, with the FLOPs of a training step counted as
6 * parameters + 12 * layers * width * context per token (PaLM's accounting). Peak FLOP/s comes from a
small table of known accelerators (dense bfloat16) or --peak_tflops; on CPU MFU is not reported.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from depthlab.models.transformer import GPT, train_flops_per_token

SIZES = {  # layers, heads, width
    "tiny": (2, 2, 64),
    "small": (4, 4, 128),
    "nanogpt": (6, 6, 384),
    "gpt2": (12, 12, 768),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
                    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0}


def peak_tflops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return value
    return None


def measure(size: str, batch: int, context: int, vocab: int, dtype: str, steps: int) -> dict:
    layers, heads, width = SIZES[size]
    model = GPT(vocab_size=vocab, num_layers=layers, num_heads=heads, embed_dim=width, max_len=context,
                dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(batch, context + 1)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens[:, :-1])["params"])
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, tokens):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    params, opt, value = step(params, opt, tokens)       # compile
    value.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt, value = step(params, opt, tokens)
    value.block_until_ready()
    seconds = (time.perf_counter() - start) / steps
    num_params = sum(p.size for p in jax.tree.leaves(params))
    tokens_per_sec = batch * context / seconds
    flops = train_flops_per_token(num_params, layers, width, context) * tokens_per_sec
    peak = peak_tflops(jax.devices()[0])
    return {"size": size, "params_M": num_params / 1e6, "batch": batch, "context": context, "dtype": dtype,
            "step_ms": seconds * 1e3, "tokens_per_s": tokens_per_sec, "TFLOP/s": flops / 1e12,
            "MFU": flops / (peak * 1e12) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated of {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the device's peak")
    args = parser.parse_args()
    if args.peak_tflops:
        PEAK_BF16_TFLOPS[jax.devices()[0].device_kind] = args.peak_tflops
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {len(jax.devices())} device(s)")
    header = f"{'size':<8}{'params':>9}{'batch':>7}{'ctx':>6}{'dtype':>10}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        r = measure(size.strip(), args.batch, args.context, args.vocab, args.dtype, args.steps)
        mfu = f"{r['MFU']:.1%}" if r["MFU"] is not None else "-"
        print(f"{r['size']:<8}{r['params_M']:>8.2f}M{r['batch']:>7}{r['context']:>6}{r['dtype']:>10}"
              f"{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['TFLOP/s']:>9.3f}{mfu:>7}")


if __name__ == "__main__":
    main()
