"""Shared pieces of the benchmarks: workloads (model + data + loss), a minimal hand-written JAX+Optax
loop to compare against, depthlab's step and `fit` timed the same way, and table printing.

Every throughput here is measured the way `fit` measures itself: steps between two metric fetches
(`log_every` steps, then a blocking `device_get` of the step metrics) divided by the wall time
between them; the first window (compilation) is dropped and the median of the rest is reported.

Example:
    >>> work = workload("cnn", "small")
    >>> hand = HandWrittenLoop(work)
    >>> hand.run(windows=3)            # steps/s of each timed window
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SIZES = ("tiny", "small", "full", "gpu")

# Dense bf16 peak of accelerators, for MFU (FLOP/s). CPUs have none listed: MFU is left blank there.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "v100": 125e12,
              "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12}


# ----------------------------------------------------------------------------------------------
# Machine and tables
# ----------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """nproc, CPU model, JAX version and the first device, for the header of every table."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return {"nproc": os.cpu_count(), "cpu": cpu, "jax": jax.__version__,
            "device": f"{device.platform}:{getattr(device, 'device_kind', '')}", "devices": jax.device_count()}


def print_header(title: str) -> None:
    info = machine_info()
    print(f"## {title}")
    print(f"machine: nproc={info['nproc']}, CPU {info['cpu']}, jax {info['jax']}, "
          f"{info['devices']} x {info['device']}")


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A Markdown table of `rows` (dicts); floats with 4 significant digits."""
    if not rows:
        print("(no rows)")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    print(flush=True)


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of device 0 (for MFU), from --peak-tflops or a table of known accelerators."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`, caching every compilation (even fast ones).

    Uses the engine's own switch (what fit does for train.compilation_cache or the environment variable
    DEPTHLAB_COMPILATION_CACHE) where it exists, else sets the same JAX options directly.
    """
    try:
        from depthlab.train.loop import enable_compilation_cache as engine_switch
    except ImportError:
        engine_switch = None
    if engine_switch is not None:
        engine_switch(path)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    """One model on one kind of batch.

    arrays: the training set as numpy arrays (inputs + labels or targets), batches are drawn from it.
    label_key: "labels" (classification, [batch]) or "targets" (language model, [batch, time]).
    items_per_step: images or tokens consumed by one step (for images/s, tokens/s).
    """

    name: str
    model: nn.Module
    arrays: dict
    batch_size: int
    label_key: str
    item: str                  # "images" or "tokens"
    items_per_step: int
    log_every: int             # steps per timing window
    dtype: str = "float32"
    transform: Callable | None = None   # host-side augmentation, e.g. research.experiment.random_shift(1)

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        """The batches every loop consumes: depthlab's shuffled epoch iterator over `arrays`."""
        from depthlab.train import data
        return data.epoch_batches(self.arrays, self.batch_size, seed=0, start_step=start_step,
                                  transform=self.transform, process_local=False)


def loss_fn(label_key: str) -> Callable:
    """(outputs, batch) -> (mean cross-entropy, {"accuracy"}): classification or next-token."""
    from depthlab.train import losses

    def compute(logits, batch):
        labels = batch[label_key]
        return losses.softmax_cross_entropy(logits, labels), {"accuracy": losses.accuracy(logits, labels)}

    return compute


def _images(n: int, shape: tuple, classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": rng.standard_normal((n, *shape)).astype(np.float32),
            "labels": rng.integers(0, classes, n).astype(np.int32)}


def _digits(flat: bool = False) -> dict:
    from depthlab.research.datasets.images import load_dataset
    train = load_dataset("digits", seed=0)["train"]
    x = train["inputs"].reshape(len(train["inputs"]), -1) if flat else train["inputs"]
    return {"inputs": x.astype(np.float32), "labels": train["labels"].astype(np.int32)}


def _tokens(n: int, context: int, vocab: int, seed: int = 0) -> dict:
    """n windows of context + 1 tokens from a random stream: inputs and next-token targets."""
    stream = np.random.default_rng(seed).integers(0, vocab, n * (context + 1)).astype(np.int32)
    windows = stream.reshape(n, context + 1)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def gpt(size: str):
    """(model kwargs, batch size, context) of the GPT at each size; gpu/full follow nanoGPT."""
    from depthlab.models.transformer import GPT
    table = {
        "tiny": (dict(vocab_size=65, num_layers=1, num_heads=2, embed_dim=32, max_len=16), 4, 16),
        "small": (dict(vocab_size=65, num_layers=2, num_heads=4, embed_dim=64, max_len=64), 8, 64),
        # nanoGPT's Shakespeare-char model: 6 layers, 6 heads, 384 wide, context 256, batch 64.
        "full": (dict(vocab_size=65, num_layers=6, num_heads=6, embed_dim=384, max_len=256), 64, 256),
    }
    kwargs, batch, context = table[size]
    return GPT(**kwargs), batch, context


def workload(name: str, size: str = "small") -> Workload:
    """The benchmark workload `name` (mlp, cnn, resnet18, gpt, gpt_char, gpt2_124m, resnet50) at `size`."""
    from depthlab.models.cnn import CNN
    from depthlab.models.mlp import MLP
    from depthlab.models.resnet import ResNet
    from depthlab.models.transformer import GPT
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if name == "mlp":
        widths, batch = {"tiny": ((32, 10), 16), "small": ((256, 256, 10), 128),
                         "full": ((1024, 1024, 10), 1024), "gpu": ((4096, 4096, 10), 4096)}[size]
        return Workload("mlp", MLP(features=widths), _digits(flat=True), batch, "labels", "images", batch,
                        {"tiny": 5, "small": 200}.get(size, 50))
    if name == "cnn":
        # The digits_cnn experiment's model (LeNet-style, 8x8 digits).
        if size == "tiny":
            model, batch = CNN(channels=(8, 16), dense=(32,), dropout=0.2), 16
        else:
            model = CNN(channels=(32, 64), dense=(128,), num_classes=10, pool="max", dropout=0.2)
            batch = {"small": 64, "full": 512, "gpu": 1024}[size]
        return Workload("cnn", model, _digits(), batch, "labels", "images", batch, {"tiny": 5, "small": 100}.get(size, 50))
    if name == "resnet18":
        if size == "tiny":
            model, shape, batch, n = ResNet(stage_sizes=(1, 1), num_filters=8, cifar_stem=True), (8, 8, 3), 8, 64
        elif size == "small":  # ResNet-18 at full width on small 16x16 inputs: minutes on 2 CPU cores
            model, shape, batch, n = ResNet(depth=18, cifar_stem=True), (16, 16, 3), 4, 256
        else:                  # ResNet-18 on CIFAR-sized inputs, batch 128
            dtype = jnp.bfloat16 if size == "gpu" else jnp.float32
            model, shape, batch, n = ResNet(depth=18, cifar_stem=True, dtype=dtype), (32, 32, 3), 128, 1024
        return Workload("resnet18", model, _images(n, shape, 10), batch, "labels", "images", batch,
                        {"tiny": 3, "small": 5}.get(size, 20))
    if name == "resnet50":
        # ImageNet-shaped ResNet-50, batch 256, bf16 compute: an accelerator workload.
        batch = 256 if size in ("full", "gpu") else 8
        shape = (224, 224, 3) if size in ("full", "gpu") else (32, 32, 3)
        model = ResNet(depth=50, num_classes=1000, dtype=jnp.bfloat16 if size == "gpu" else jnp.float32)
        return Workload("resnet50", model, _images(batch * 2, shape, 1000), batch, "labels", "images", batch,
                        20 if size in ("full", "gpu") else 2, "bfloat16" if size == "gpu" else "float32")
    if name == "gpt":
        model, batch, context = gpt(size if size != "gpu" else "full")
        return Workload("gpt", model, _tokens(max(batch * 8, 64), context, model.vocab_size), batch, "targets",
                        "tokens", batch * context, {"tiny": 5, "small": 25}.get(size, 20))
    if name == "gpt_char":
        # nanoGPT Shakespeare-char: 6 layers x 6 heads x 384, context 256, batch 64 (bf16 on accelerators).
        model, batch, context = gpt("full")
        if size == "gpu":
            model = model.clone(dtype=jnp.bfloat16)
        return Workload("gpt_char", model, _tokens(batch * 8, context, 65), batch, "targets", "tokens",
                        batch * context, 20, "bfloat16" if size == "gpu" else "float32")
    if name == "gpt2_124m":
        # GPT-2 small: 12 layers x 12 heads x 768, context 1024, vocab 50304 (padded), ~124M parameters.
        batch = 16 if size == "gpu" else 1
        context = 1024 if size == "gpu" else 64
        model = GPT(vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768, max_len=1024,
                    dtype=jnp.bfloat16 if size == "gpu" else jnp.float32)
        return Workload("gpt2_124m", model, _tokens(batch * 4, context, 50304), batch, "targets", "tokens",
                        batch * context, 10, "bfloat16" if size == "gpu" else "float32")
    raise ValueError(f"unknown workload {name!r}; valid: mlp, cnn, resnet18, resnet50, gpt, gpt_char, gpt2_124m")


def init_variables(work: Workload, rng: jax.Array) -> dict:
    """Unboxed Flax variables of the workload's model (params + mutable collections)."""
    example = jnp.asarray(work.arrays["inputs"][:1])
    return nn.meta.unbox(dict(work.model.init({"params": rng, "dropout": rng}, example, train=False)))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------------------------
def time_windows(step: Callable[[dict], Any], batches: Iterator[dict], log_every: int, windows: int,
                 fetch: Callable[[Any], Any] = jax.device_get) -> list[float]:
    """Runs `1 + windows` windows of `log_every` steps, fetching the last metrics at each window's end
    (what a loop that logs does); returns steps/s of each window but the first (compilation)."""
    rates = []
    last = time.perf_counter()
    for w in range(windows + 1):
        for _ in range(log_every):
            metrics = step(next(batches))
        fetch(metrics)
        now = time.perf_counter()
        if w:
            rates.append(log_every / (now - last))
        last = now
    return rates


class HandWrittenLoop:
    """The minimal JAX + Optax training loop a user would write by hand for `work`: params and Adam
    state as jitted-and-donated arguments, dropout keys folded from the step, numpy batches passed
    straight to the jitted step, metrics fetched every `log_every` steps."""

    def __init__(self, work: Workload, learning_rate: float = 1e-3, seed: int = 0):
        self.work = work
        model, compute_loss = work.model, loss_fn(work.label_key)
        tx = optax.adam(learning_rate)
        key = jax.random.key(seed)
        variables = init_variables(work, key)
        params = variables.pop("params")
        self.carry = (params, tx.init(params), variables, jnp.zeros((), jnp.int32))
        mutable = list(variables.keys())

        def train_step(carry, batch):
            params, opt_state, model_state, step = carry
            rngs = {"dropout": jax.random.fold_in(key, step)}

            def loss(p):
                if mutable:
                    logits, new_state = model.apply({"params": p, **model_state}, batch["inputs"], train=True,
                                                    rngs=rngs, mutable=mutable)
                else:
                    logits, new_state = model.apply({"params": p}, batch["inputs"], train=True, rngs=rngs), {}
                value, metrics = compute_loss(logits, batch)
                return value, (metrics, new_state)

            (value, (metrics, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, dict(new_state), step + 1), {"loss": value, **metrics}

        self.train_step = train_step
        self.jitted = jax.jit(train_step, donate_argnums=0)

    def step(self, batch: dict):
        self.carry, metrics = self.jitted(self.carry, batch)
        return metrics

    def run(self, windows: int) -> list[float]:
        return time_windows(self.step, self.work.batches(), self.work.log_every, windows)

    def flops_per_step(self) -> float | None:
        """FLOPs of one step from XLA's cost analysis (None where the backend gives none)."""
        batch = next(self.work.batches())
        try:
            cost = self.jitted.lower(self.carry, batch).compile().cost_analysis()
        except Exception:  # noqa: BLE001 - optional figure
            return None
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None if cost else None


def depthlab_parts(work: Workload, learning_rate: float = 1e-3, grad_norm: bool = False):
    """(tx, init(rng) -> TrainState, train_step) built from depthlab's engine for `work`."""
    from depthlab.research.experiment import init_state
    from depthlab.train import default_optim_config, make_optimizer, make_train_step
    optim = default_optim_config()
    optim.name, optim.learning_rate = "adam", learning_rate
    tx = make_optimizer(optim)
    init = lambda rng: init_state(work.model, work.arrays["inputs"], tx, rng)  # noqa: E731
    return tx, init, make_train_step(work.model, loss_fn(work.label_key), grad_norm=grad_norm)


class DepthlabStep:
    """depthlab's `make_train_step` + `TrainState`, jitted and donated, driven by the same loop as
    HandWrittenLoop: measures the step's own overhead, without `fit`'s loop."""

    def __init__(self, work: Workload, seed: int = 0, grad_norm: bool = False):
        self.work = work
        _, init, train_step = depthlab_parts(work, grad_norm=grad_norm)
        self.state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(seed))
        self.jitted = jax.jit(train_step, donate_argnums=0)

    def step(self, batch: dict):
        self.state, metrics = self.jitted(self.state, batch)
        return metrics

    def run(self, windows: int) -> list[float]:
        return time_windows(self.step, self.work.batches(), self.work.log_every, windows)


def fit_config(work: Workload, steps: int, prefetch: int = -1, seed: int = 0) -> ml_collections.ConfigDict:
    """A fit config that logs every work.log_every steps, evaluates never, checkpoints only at the end."""
    from depthlab.train import default_mesh_config, default_train_config
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.train = default_train_config()
    config.train.update({"steps": steps, "log_every": work.log_every, "eval_every": 0, "checkpoint_every": 0,
                         "prefetch": prefetch, "async_checkpoint": False})
    config.mesh = default_mesh_config()
    return config


def single_device_mesh():
    from depthlab.train import parallel
    return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])


def run_fit(work: Workload, windows: int, prefetch: int = -1, progress: bool = True, grad_norm: bool = False,
            **config_overrides) -> list[float]:
    """depthlab's `fit` on `work` for 1 + windows logging windows on one device, in a fresh run
    directory; returns fit's own `perf/steps_per_sec` of each window but the first (compilation).

    Progress bar, TensorBoard and metrics.jsonl stay on (the defaults): they are part of fit's cost.
    The bar goes to a buffer so it does not interleave with the tables.
    """
    from depthlab.train import Experiment, fit
    _, init, train_step = depthlab_parts(work, grad_norm=grad_norm)
    config = fit_config(work, (windows + 1) * work.log_every, prefetch)
    config.train.progress = progress
    config.train.update(config_overrides)
    experiment = Experiment(init=init, train_step=train_step, train_batches=work.batches)
    workdir = tempfile.mkdtemp(prefix=f"bench_{work.name}_")
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            fit(experiment, config, workdir, mesh=single_device_mesh())
        from depthlab.train import read_metrics
        records = [r for r in read_metrics(workdir) if "perf/steps_per_sec" in r]
        return [float(r["perf/steps_per_sec"]) for r in records[1:]]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
