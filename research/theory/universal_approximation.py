"""Universal approximation: one-hidden-layer nets of growing width fitted to 1-D and 2-D functions; error vs width.

The universal approximation theorem (Cybenko 1989, Hornik 1991) says a single hidden layer can
approximate any continuous function on a compact set to any accuracy, given enough units. Here we
watch that happen: f(x) = sum_j a_j act(w_j . x + b_j) + c with width m = 2 .. 256, trained by Adam
on 256 points, error measured on a dense grid. For ReLU in 1-D the net is piecewise linear with at
most m kinks, so a smooth target's error should fall like m^-2 once training places the kinks well.

Every (target, width, seed) is trained at once: widths share one array of size max(widths) and a
0/1 mask switches the unused units off (they get zero gradient, so Adam never moves them), which
makes all widths the same shape and lets `jax.vmap` run the whole sweep as one compiled program.

Example:
    depthlab run theory/universal_approximation --workdir runs/ua
    depthlab run theory/universal_approximation --config.activation=tanh --config.steps=5000
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models.mlp import get_activation
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

# Targets on [-1, 1]^d. Each returns f(x) for x [n, d] -> [n].
TARGETS_1D = {
    "sine": lambda x: jnp.sin(3 * jnp.pi * x[:, 0]),
    "abs": lambda x: jnp.abs(x[:, 0]),
    "step": lambda x: jnp.tanh(20 * x[:, 0]),  # a near-discontinuity: hardest for smooth-ish fits
    "poly": lambda x: x[:, 0] ** 3 - 0.5 * x[:, 0],
}
TARGETS_2D = {
    "bump2d": lambda x: jnp.exp(-4 * jnp.sum(x**2, axis=1)),
    "saddle2d": lambda x: x[:, 0] * x[:, 1],
    "ripple2d": lambda x: jnp.sin(jnp.pi * jnp.sum(x**2, axis=1) * 2),
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 4 1-D + 3 2-D targets, widths 2..256, 3 seeds, 3000 Adam steps (about a minute on CPU)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 3
    config.widths = (2, 4, 8, 16, 32, 64, 128, 256)
    config.targets = tuple(TARGETS_1D) + tuple(TARGETS_2D)
    config.activation = "relu"
    config.num_train = 256  # 1-D: 256 grid points; 2-D: a 16 x 16 grid
    config.num_test = 1024  # 1-D: 1024 points; 2-D: a 32 x 32 grid
    config.steps = 3000
    config.optim = studies.optim_config("adam", 3e-3, schedule="cosine")  # decay_steps 0 = config.steps
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.steps = 20000
    c.num_seeds = 5
    c.widths = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(widths=(2, 32), targets=("poly",), steps=100, num_seeds=1, num_train=64, num_test=256),
}


def grid(n: int, dim: int) -> jax.Array:
    """n points (1-D) or round(sqrt(n))^2 points (2-D) evenly spaced on [-1, 1]^dim -> [n, dim]."""
    if dim == 1:
        return jnp.linspace(-1, 1, n)[:, None]
    side = int(round(np.sqrt(n)))
    g = jnp.linspace(-1, 1, side)
    return jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


def make_train(config: ml_collections.ConfigDict, dim: int):
    """Returns train(y_train, width, rng) -> (params) for a masked one-hidden-layer net on `dim` inputs."""
    max_width = max(config.widths)
    act = get_activation(config.activation)
    tx = studies.make_tx(config.optim, config.steps)
    x_train = grid(config.num_train, dim)

    def apply(params, x, mask):
        # x [n, dim] -> [n]; mask [max_width] switches hidden units off.
        hidden = act(x @ params["w1"] + params["b1"]) * mask
        return hidden @ params["w2"] + params["b2"]

    def init(rng, width):
        k1, k2, k3 = jax.random.split(rng, 3)
        # Biases uniform on [-1, 1] put the ReLU kinks inside the domain; output scale 1/sqrt(width).
        return {
            "w1": jax.random.normal(k1, (dim, max_width)) / jnp.sqrt(dim),
            "b1": jax.random.uniform(k2, (max_width,), minval=-1.0, maxval=1.0),
            "w2": jax.random.normal(k3, (max_width,)) / jnp.sqrt(width),
            "b2": jnp.zeros(()),
        }

    def train(y_train, width, rng):
        mask = (jnp.arange(max_width) < width).astype(jnp.float32)
        params = init(rng, width)

        def loss_fn(p):
            return jnp.mean((apply(p, x_train, mask) - y_train) ** 2)

        def step(carry, _):
            p, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=config.steps)
        return params, mask, losses

    return jax.jit(jax.vmap(jax.vmap(jax.vmap(train, (None, None, 0)), (None, 0, None)), (0, None, None))), apply


def sweep(config: ml_collections.ConfigDict, names: list[str], dim: int, rng: jax.Array) -> dict:
    """Trains every (target, width, seed) for `dim`-D targets; returns NMSE [T, W, S] and test predictions."""
    table = TARGETS_1D if dim == 1 else TARGETS_2D
    train_fn, apply = make_train(config, dim)
    x_train, x_test = grid(config.num_train, dim), grid(config.num_test, dim)
    y_train = jnp.stack([table[n](x_train) for n in names])
    y_test = jnp.stack([table[n](x_test) for n in names])
    widths = jnp.asarray(config.widths)
    params, masks, losses = train_fn(y_train, widths, jax.random.split(rng, config.num_seeds))
    # predictions [T, W, S, n_test]
    pred = jax.vmap(jax.vmap(jax.vmap(apply, (0, None, 0)), (0, None, 0)), (0, None, 0))(params, x_test, masks)
    # Normalised MSE: error / variance of the target, so 1.0 = "predict the mean", 0 = perfect.
    nmse = jnp.mean((pred - y_test[:, None, None]) ** 2, -1) / jnp.var(y_test, -1)[:, None, None]
    return {"nmse": np.asarray(nmse), "pred": np.asarray(pred), "x_test": np.asarray(x_test),
            "y_test": np.asarray(y_test), "final_train_loss": np.asarray(losses[..., -1])}


def loglog_slope(widths, errors) -> float:
    """Least-squares slope of log(error) against log(width)."""
    return float(np.polyfit(np.log(np.asarray(widths, float)), np.log(np.asarray(errors)), 1)[0])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the sweep, writes results.json, error_vs_width.png, fits_1d.png, fits_2d.png."""
    unknown = [t for t in config.targets if t not in TARGETS_1D and t not in TARGETS_2D]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; valid: {', '.join([*TARGETS_1D, *TARGETS_2D])}")
    rng = jax.random.key(config.seed)
    results = {}
    for dim, table in ((1, TARGETS_1D), (2, TARGETS_2D)):
        names = [t for t in config.targets if t in table]
        if names:
            out = sweep(config, names, dim, jax.random.fold_in(rng, dim))
            for i, name in enumerate(names):
                results[name] = {k: (v[i] if k not in ("x_test",) else v) for k, v in out.items()}
                results[name]["dim"] = dim

    widths = list(config.widths)
    rows, summary = [], {"widths": widths, "slope": {}, "nmse_mean": {}}
    for name, res in results.items():
        mean = res["nmse"].mean(-1)
        summary["nmse_mean"][name] = mean
        summary["slope"][name] = loglog_slope(widths, mean)
        row = {"target": name}
        row.update({f"w={w}": float(m) for w, m in zip(widths, mean)})
        row["slope"] = summary["slope"][name]
        rows.append(row)
    summary["mean_slope"] = float(np.mean(list(summary["slope"].values())))  # headline scalar for `depthlab report`
    studies.write_results(workdir, summary, {"normalised test MSE (mean over seeds) vs width": rows}, config)
    plot(results, widths, workdir)
    return summary


def plot(results: dict, widths: list[int], workdir: str) -> None:
    fig, axes = studies.new_figure(1, 1, (5.5, 4.2))
    ax = axes[0, 0]
    for name, res in results.items():
        mean = res["nmse"].mean(-1)
        line, = ax.loglog(widths, mean, "o-", label=name)
        ax.fill_between(widths, res["nmse"].min(-1), res["nmse"].max(-1), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("hidden width m")
    ax.set_ylabel("test MSE / Var(target)")
    ax.set_title("one hidden layer: error vs width")
    ax.legend(fontsize=7)
    studies.save_figure(fig, workdir, "error_vs_width.png")

    shown = sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    one_d = [n for n, r in results.items() if r["dim"] == 1]
    if one_d:
        fig, axes = studies.new_figure(1, len(one_d), (3.5, 3.0))
        for ax, name in zip(axes[0], one_d):
            res = results[name]
            x = res["x_test"][:, 0]
            ax.plot(x, res["y_test"], "k-", lw=2, label="target")
            for w in shown:
                ax.plot(x, res["pred"][widths.index(w), 0], lw=1, label=f"m={w}")
            ax.set_title(name)
        axes[0, 0].legend(fontsize=7)
        studies.save_figure(fig, workdir, "fits_1d.png")
    two_d = [n for n, r in results.items() if r["dim"] == 2]
    if two_d:
        fig, axes = studies.new_figure(len(two_d), 1 + len(shown), (2.6, 2.4))
        for row, name in zip(axes, two_d):
            res = results[name]
            side = int(round(np.sqrt(len(res["y_test"]))))
            row[0].imshow(res["y_test"].reshape(side, side), cmap="viridis")
            row[0].set_title(f"{name}: target", fontsize=8)
            for ax, w in zip(row[1:], shown):
                ax.imshow(res["pred"][widths.index(w), 0].reshape(side, side), cmap="viridis")
                ax.set_title(f"m={w}", fontsize=8)
            for ax in row:
                ax.axis("off")
        studies.save_figure(fig, workdir, "fits_2d.png")
