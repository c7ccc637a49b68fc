"""Efficiency: FLOPs per example from XLA's cost analysis, parameter counts, measured throughput, accuracy vs FLOPs.

`model_cost(model, example_input)` compiles the model's forward pass and reads XLA's own count of
floating-point operations (`jax.jit(f).lower(...).compile().cost_analysis()`), so it counts what the
compiled program does (convolutions, matmuls, activations, pooling), with no hand-written formula
per layer. It is reusable for any Flax module (e.g. by `depthlab report`). The study applies it to
the project's models, times them, and sweeps the width of the digits CNN to plot accuracy vs FLOPs.

Example:
    >>> from depthlab.research.theory.efficiency import model_cost
    >>> model_cost(CNN(), jnp.ones((1, 8, 8, 1)))["flops_per_example"]
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.models import get_model
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

# name, model kwargs, input shape (without batch)
MODELS = (
    ("mlp", {"features": (128, 128, 10)}, (8, 8, 1)),
    ("cnn", {"channels": (32, 64), "dense": (128,)}, (8, 8, 1)),
    ("cnn", {"channels": (32, 64), "dense": (128,)}, (28, 28, 1)),
    ("resnet", {"stage_sizes": (2, 2, 2, 2), "num_classes": 10, "cifar_stem": True}, (32, 32, 3)),
)


def _cost_dict(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def model_cost(model, example_input: jax.Array, variables: dict | None = None, **apply_kwargs: Any) -> dict:
    """FLOPs and parameters of one forward pass of a Flax module, read from the compiled program.

    Args:
      model: a Flax module called as `model.apply(variables, x, train=False)`.
      example_input: a batch [batch, ...]; FLOPs are divided by its leading size.
      variables: the module's variables; initialised with key 0 when None.
      apply_kwargs: extra keyword arguments for `apply` (default `train=False`).
    Returns:
      {"params": number of parameters, "flops_per_example", "transcendentals_per_example",
       "bytes_accessed_per_example", "batch"}.
    """
    apply_kwargs = {"train": False, **apply_kwargs}
    if variables is None:
        variables = model.init(jax.random.key(0), example_input, **apply_kwargs)
    params = variables.get("params", variables)
    num_params = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
    compiled = jax.jit(lambda v, x: model.apply(v, x, **apply_kwargs)).lower(variables, example_input).compile()
    cost = _cost_dict(compiled)
    batch = int(example_input.shape[0])
    return {"params": num_params, "batch": batch,
            "flops_per_example": float(cost.get("flops", float("nan"))) / batch,
            "transcendentals_per_example": float(cost.get("transcendentals", 0.0)) / batch,
            "bytes_accessed_per_example": float(cost.get("bytes accessed", float("nan"))) / batch}


def throughput(model, example_input: jax.Array, variables: dict, repeats: int) -> float:
    """Measured examples per second of the jitted forward pass (after one warm-up call)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    jax.block_until_ready(fn(variables, example_input))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(variables, example_input)
    jax.block_until_ready(out)
    return repeats * example_input.shape[0] / (time.perf_counter() - start)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: cost + throughput of MLP, CNN, ResNet-18 (CIFAR stem); CNN width sweep on digits."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 32  # for the cost and throughput table (the ResNet-18 dominates the time)
    config.repeats = 5
    config.models = MODELS
    config.widths = (2, 4, 8, 16, 32, 64)  # CNN channels (w, 2w), dense 4w
    config.num_seeds = 2
    config.steps = 400
    config.optim = studies.optim_config("adam", 3e-3, schedule="cosine")
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.widths = (1, 2, 4, 8, 16, 32, 64, 128)
    c.num_seeds = 5
    c.steps = 3000


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(models=MODELS[:1], widths=(4,), num_seeds=1, steps=50, repeats=2),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Cost table of the project's models; accuracy vs FLOPs of the digits CNN width sweep; plots."""
    rows = []
    for name, kwargs, shape in studies.progress(config.models, "efficiency"):
        model = get_model(name, **dict(kwargs))
        x = jnp.ones((config.batch_size, *shape), jnp.float32)
        variables = model.init(jax.random.key(config.seed), x, train=False)
        cost = model_cost(model, x, variables)
        rows.append({"model": name, "input": "x".join(map(str, shape)), "params": cost["params"],
                     "MFLOPs/example": cost["flops_per_example"] / 1e6,
                     "examples/s (CPU)": throughput(model, x, variables, config.repeats)})

    data = studies.load_digits()
    sweep = []
    for w in config.widths:
        model = get_model("cnn", channels=(w, 2 * w), dense=(4 * w,), num_classes=10)
        cost = model_cost(model, jnp.ones((config.batch_size, 8, 8, 1)))
        train = studies.make_classifier_trainer(model, data["x_train"], data["y_train"], config.optim,
                                                config.steps, 64)
        states, _ = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(config.seed), config.num_seeds))
        accs = jax.vmap(lambda s: studies.classifier_accuracy(model, s, data["x_test"], data["y_test"]))(states)
        sweep.append({"width": w, "params": cost["params"], "kFLOPs/example": cost["flops_per_example"] / 1e3,
                      "test_acc (mean)": float(np.mean(accs)), "test_acc (min)": float(np.min(accs))})
    summary = {"models": rows, "width_sweep": sweep,
               "best_test_acc": max(r["test_acc (mean)"] for r in sweep),
               "cnn_digits_flops": rows[1]["MFLOPs/example"] * 1e6 if len(rows) > 1 else float("nan")}
    studies.write_results(workdir, summary, {
        f"cost of the project's models (XLA cost analysis, batch {config.batch_size})": rows,
        f"digits CNN width sweep: channels (w, 2w), dense 4w, {config.steps} steps, {config.num_seeds} seeds": sweep,
    }, config)
    fig, axes = studies.new_figure(1, 1, (4.6, 3.5))
    ax = axes[0, 0]
    ax.semilogx([r["kFLOPs/example"] * 1e3 for r in sweep], [r["test_acc (mean)"] for r in sweep], "o-")
    for r in sweep:
        ax.annotate(f"w={r['width']}", (r["kFLOPs/example"] * 1e3, r["test_acc (mean)"]), fontsize=7)
    ax.set_xlabel("FLOPs per example (XLA)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits CNN: accuracy vs compute", fontsize=9)
    studies.save_figure(fig, workdir, "accuracy_vs_flops.png")
    return summary
