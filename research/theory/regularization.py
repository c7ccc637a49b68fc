"""Regularisation against over-fitting: none, L1, L2, dropout, BatchNorm, augmentation, early stopping on 100 digits.

A 256-256 MLP has ~85k parameters; trained on 100 digit images it memorises them (train accuracy
100%) and the train-test gap measures over-fitting. Each regulariser attacks it differently:
L2 (weight decay) shrinks all weights, L1 drives many exactly towards zero (sparsity, see the
histograms), dropout trains an ensemble of thinned nets, BatchNorm adds batch noise and eases
optimisation, augmentation (random 1-pixel shifts) enlarges the data, and early stopping keeps the
parameters of the step with the best validation loss (300 held-out images, never the test set).

L1 and L2 are the engine's `optim.l1` / `optim.l2` gradient penalties (biases exempt) on SGD with
momentum, the textbook setting. Every variant trains all seeds at once (`jax.vmap` over a
`lax.scan` of the whole run, with an evaluation every `eval_every` steps inside the scan).

Example:
    depthlab run theory/regularization --workdir runs/reg --config.num_train=300
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import MLP
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

VARIANTS = ("none", "l1", "l2", "dropout", "batchnorm", "augmentation", "early_stopping")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 100 training digits, 7 variants, 3 seeds, 2000 steps of SGD-momentum (about a minute)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 3
    config.variants = VARIANTS
    config.num_train = 100
    config.num_val = 300
    config.hidden = (256, 256)
    config.steps = 2000
    config.eval_every = 50
    config.batch_size = 50
    config.optim = studies.optim_config("momentum", 0.05)
    config.l1 = 1e-3
    config.l2 = 1e-2
    config.dropout = 0.5
    config.max_shift = 1  # augmentation: random shifts of up to this many pixels
    config.zero_threshold = 1e-3  # |w| below this counts as zero in the sparsity column
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 10
    c.steps = 10000


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(variants=("l1",), hidden=(32, 32), num_seeds=1, steps=100, eval_every=50),
}


def split(data: dict, config: ml_collections.ConfigDict) -> dict:
    """A small training set and a validation set drawn from the digits training split (fixed by config.seed)."""
    order = np.random.default_rng(config.seed).permutation(len(data["y_train"]))
    need = config.num_train + config.num_val
    if need > len(order):
        raise ValueError(f"num_train + num_val = {need} exceeds the {len(order)} digits training images; lower them")
    tr, va = order[: config.num_train], order[config.num_train: need]
    return {"x_train": data["x_train"][tr], "y_train": data["y_train"][tr], "x_val": data["x_train"][va],
            "y_val": data["y_train"][va], "x_test": data["x_test"], "y_test": data["y_test"]}


def make_train(variant: str, config: ml_collections.ConfigDict, data: dict):
    """Returns jitted train(rngs [S]) -> (metrics {name: [S, evals]}, first-layer kernels [S, evals, 64, h])."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    model = MLP(features=(*config.hidden, 10), dropout=config.dropout if variant == "dropout" else 0.0,
                batch_norm=variant == "batchnorm")
    optim = config.optim.copy_and_resolve_references()
    optim.l1 = config.l1 if variant == "l1" else 0.0
    optim.l2 = config.l2 if variant == "l2" else 0.0
    tx = studies.make_tx(optim, config.steps)
    arrays = {k: jnp.asarray(v) for k, v in data.items()}
    n = config.num_train

    def loss_fn(params, model_state, x, y, rng):
        logits, new_state = model.apply({"params": params, **model_state}, x, train=True,
                                        rngs={"dropout": rng}, mutable=list(model_state))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    def loss_and_accuracy(params, model_state, x, y):
        logits = model.apply({"params": params, **model_state}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def train(rng):
        variables = model.init(jax.random.fold_in(rng, 0), arrays["x_train"][:2], train=False)
        params = variables.pop("params")
        carry = (params, dict(variables), tx.init(params))

        def step(carry, t):
            params, model_state, opt_state = carry
            k_batch, k_aug, k_drop = jax.random.split(jax.random.fold_in(rng, t + 1), 3)
            idx = jax.random.randint(k_batch, (config.batch_size,), 0, n)
            x, y = arrays["x_train"][idx], arrays["y_train"][idx]
            if variant == "augmentation":
                x = studies.random_shift_images(k_aug, x, config.max_shift)
            (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y, k_drop)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), dict(new_state), opt_state), None

        def block(carry, start):
            carry, _ = jax.lax.scan(step, carry, start + jnp.arange(config.eval_every))
            params, model_state, _ = carry
            metrics = {}
            for split_name in ("train", "val", "test"):
                loss, acc = loss_and_accuracy(params, model_state, arrays[f"x_{split_name}"], arrays[f"y_{split_name}"])
                metrics[f"{split_name}_loss"], metrics[f"{split_name}_acc"] = loss, acc
            return carry, (metrics, params["Dense_0"]["kernel"])

        starts = jnp.arange(config.steps // config.eval_every) * config.eval_every
        _, (metrics, kernels) = jax.lax.scan(block, carry, starts)
        return metrics, kernels

    return jax.jit(jax.vmap(train))


def row_for(variant: str, metrics: dict, kernels: np.ndarray, config: ml_collections.ConfigDict) -> dict:
    """Mean over seeds at the final evaluation, or (early stopping) at each seed's best validation loss."""
    evals = metrics["val_loss"].shape[1]
    pick = np.argmin(metrics["val_loss"], axis=1) if variant == "early_stopping" else np.full(len(kernels), evals - 1)
    at = {k: np.asarray(v)[np.arange(len(pick)), pick] for k, v in metrics.items()}
    w = kernels[np.arange(len(pick)), pick]  # first-layer kernels at the chosen step [S, 64, h]
    return {"variant": variant, "train_acc": float(at["train_acc"].mean()), "test_acc": float(at["test_acc"].mean()),
            "gap (train-test acc)": float((at["train_acc"] - at["test_acc"]).mean()),
            "train_loss": float(at["train_loss"].mean()), "test_loss": float(at["test_loss"].mean()),
            "loss gap": float((at["test_loss"] - at["train_loss"]).mean()),
            "stop step": int((pick.mean() + 1) * config.eval_every),
            "near-zero weights": float(np.mean(np.abs(w) < config.zero_threshold)),
            "L1 norm / weight": float(np.mean(np.abs(w)))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every variant; writes the train-test gap table, weight histograms and test-accuracy curves."""
    if config.steps % config.eval_every:
        raise ValueError(f"steps={config.steps} must be a multiple of eval_every={config.eval_every}")
    data = split(studies.load_digits(), config)
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    rows, curves, weights = [], {}, {}
    for variant in studies.progress(config.variants, "regularization"):
        metrics, kernels = make_train(variant, config, data)(rngs)
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        kernels = np.asarray(kernels)
        rows.append(row_for(variant, metrics, kernels, config))
        curves[variant] = metrics
        weights[variant] = kernels[0, -1].ravel()
    summary = {"rows": rows}
    summary.update({f"{r['variant']}_test_acc": r["test_acc"] for r in rows})
    title = (f"{config.num_train} training digits, {config.steps} steps, mean of {config.num_seeds} seeds "
             f"(near-zero: |w| < {config.zero_threshold:g} in the first layer)")
    studies.write_results(workdir, summary, {title: rows}, config)
    plot(curves, weights, config, workdir)
    return summary


def plot(curves: dict, weights: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    fig, axes = studies.new_figure(1, 2, (4.8, 3.6))
    ax = axes[0, 0]
    steps = (np.arange(config.steps // config.eval_every) + 1) * config.eval_every
    for variant, m in curves.items():
        line, = ax.plot(steps, m["test_acc"].mean(0), lw=1, label=f"{variant} test")
        ax.plot(steps, m["train_acc"].mean(0), "--", lw=0.8, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (dashed: train)")
    ax.legend(fontsize=6)
    ax = axes[0, 1]
    bins = np.linspace(-0.3, 0.3, 121)
    for variant in ("none", "l2", "l1"):
        if variant in weights:
            ax.hist(np.clip(weights[variant], bins[0], bins[-1]), bins=bins, histtype="step", label=variant, log=True)
    ax.set_xlabel("first-layer weight")
    ax.set_title("weights: L1 -> sparse spike at 0, L2 -> shrunk Gaussian", fontsize=8)
    ax.legend(fontsize=7)
    studies.save_figure(fig, workdir, "regularization.png")
