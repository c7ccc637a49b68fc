"""Depth separation: deep narrow vs shallow wide ReLU nets at equal parameter count on Telgarsky's sawtooth.

Telgarsky (2016): the tent map t(x) = 2x for x < 1/2, 2(1 - x) otherwise, composed k times, is a
sawtooth with 2^(k-1) teeth (2^k linear pieces). A ReLU net of width 2 and depth k computes it
exactly with 6k + 1 parameters (each layer is one tent: t(x) = 2 relu(x) - 4 relu(x - 1/2)). A
one-hidden-layer ReLU net with m units is piecewise linear with at most m + 1 pieces, so it needs
m >= 2^k - 1 units, exponentially many, to follow the sawtooth at all.

Representation is not learning: gradient descent often fails to find the deep solution. So the
study trains both architectures from many random seeds at once (`jax.vmap`) and reports, at each
parameter budget, the best seed (by training loss: what the architecture can reach when training
succeeds) and the median seed (how often it does). Shallow nets of every budget share one compiled
program (a 0/1 mask switches unused units off); each deep shape is one more.

Example:
    depthlab run theory/depth_separation --workdir runs/ds --config.k=5
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: k = 4 (16 pieces), deep shapes of 145..505 parameters, 16 seeds, 3000 Adam steps."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.k = 4  # compositions of the tent map
    config.deep_shapes = ((6, 4), (8, 3), (8, 4), (12, 4))  # (width, hidden layers)
    config.num_seeds = 16
    config.num_train = 257
    config.num_test = 4001
    config.steps = 3000
    config.optim = studies.optim_config("adam", 1e-2, schedule="cosine")  # decay_steps 0 = config.steps
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.k = 5
    c.deep_shapes = ((6, 5), (8, 5), (12, 5), (16, 5), (16, 7))
    c.num_seeds = 32
    c.steps = 20000
    c.optim.learning_rate = 3e-3


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(deep_shapes=((6, 4),), num_seeds=4, steps=100, num_test=501),
}


def sawtooth(x: jax.Array, k: int) -> jax.Array:
    """The tent map composed k times, x in [0, 1] -> [0, 1] (2^k linear pieces)."""
    for _ in range(k):
        x = jnp.where(x < 0.5, 2 * x, 2 * (1 - x))
    return x


def constructed_sawtooth_params(k: int) -> list[tuple[jax.Array, jax.Array]]:
    """Exact width-2, depth-k ReLU net for the sawtooth (6k + 1 parameters): relu(x), relu(x - 1/2) per layer."""
    first = (jnp.array([[1.0, 1.0]]), jnp.array([0.0, -0.5]))
    # each later layer reads the previous tent t = 2 h1 - 4 h2 and again forms relu(t), relu(t - 1/2)
    middle = (jnp.array([[2.0, 2.0], [-4.0, -4.0]]), jnp.array([0.0, -0.5]))
    last = (jnp.array([[2.0], [-4.0]]), jnp.array([0.0]))
    return [first] + [middle] * (k - 1) + [last]


def apply(params: list, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ReLU net: x [n, 1] -> [n]; `mask` [width] switches hidden units of a one-hidden-layer net off."""
    for i, (w, b) in enumerate(params[:-1]):
        x = jax.nn.relu(x @ w + b)
        if mask is not None and i == 0:
            x = x * mask
    w, b = params[-1]
    return (x @ w + b)[:, 0]


def num_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def init(rng: jax.Array, sizes: list[int]) -> list:
    """He-normal weights; first-layer biases uniform on [-1, 1] so kinks start spread over the input."""
    params = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        rng, kw, kb = jax.random.split(rng, 3)
        w = jax.random.normal(kw, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        b = jax.random.uniform(kb, (fan_out,), minval=-1, maxval=1) if i == 0 else jnp.zeros(fan_out)
        params.append((w, b))
    return params


def make_train(config: ml_collections.ConfigDict, sizes: list[int]):
    """Returns jitted train(rngs [S], widths [B]) -> (train MSE, test NMSE [B, S], test predictions [B, S, n])."""
    tx = studies.make_tx(config.optim, config.steps)
    x = jnp.linspace(0, 1, config.num_train)[:, None]
    y = sawtooth(x[:, 0], config.k)
    x_test = jnp.linspace(0, 1, config.num_test)[:, None]
    y_test = sawtooth(x_test[:, 0], config.k)
    shallow = len(sizes) == 3

    def train(rng, width):
        mask = (jnp.arange(sizes[1]) < width).astype(jnp.float32) if shallow else None
        params = init(rng, sizes)

        def loss_fn(p):
            return jnp.mean((apply(p, x, mask) - y) ** 2)

        def step(carry, _):
            p, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=config.steps)
        test_nmse = jnp.mean((apply(params, x_test, mask) - y_test) ** 2) / jnp.var(y_test)
        return loss_fn(params), test_nmse, apply(params, x_test, mask)

    return jax.jit(jax.vmap(jax.vmap(train, (0, None)), (None, 0)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every deep shape and the matching shallow widths; writes the table and error_vs_params.png."""
    if config.k < 1:
        raise ValueError(f"k={config.k}: the sawtooth needs at least one tent composition (k >= 1)")
    rng = jax.random.key(config.seed)
    seeds = jax.random.split(rng, config.num_seeds)
    budgets = [num_params([1] + [w] * d + [1]) for w, d in config.deep_shapes]
    # a shallow net with m units has 3m + 1 parameters: the nearest m matches the deep budget
    shallow_widths = [max(1, round((p - 1) / 3)) for p in budgets]
    shallow = make_train(config, [1, max(shallow_widths), 1])(seeds, jnp.asarray(shallow_widths))
    rows, best_fits = [], {}
    for i, (w, d) in studies.progress(enumerate(config.deep_shapes), "depth_separation"):
        deep = make_train(config, [1] + [w] * d + [1])(seeds, jnp.asarray([0]))
        for arch, shape, params, (tr, te, pred) in (
            ("deep", f"{w}x{d}", budgets[i], [np.asarray(a[0]) for a in deep]),
            ("shallow", f"{shallow_widths[i]}x1", 3 * shallow_widths[i] + 1, [np.asarray(a[i]) for a in shallow]),
        ):
            best = int(np.nanargmin(tr))
            best_fits[arch] = (shape, pred[best])  # ends holding the largest budget's best fit
            rows.append({"arch": arch, "shape (width x depth)": shape, "params": params,
                         "best-seed test NMSE": float(te[best]), "median test NMSE": float(np.nanmedian(te)),
                         "seeds < 0.5": int(np.sum(te < 0.5))})
    exact = constructed_sawtooth_params(config.k)
    x_test = jnp.linspace(0, 1, config.num_test)[:, None]
    exact_err = float(jnp.mean((apply(exact, x_test) - sawtooth(x_test[:, 0], config.k)) ** 2))
    rows.append({"arch": "deep (constructed)", "shape (width x depth)": f"2x{config.k}",
                 "params": num_params([1] + [2] * config.k + [1]), "best-seed test NMSE": exact_err,
                 "median test NMSE": exact_err, "seeds < 0.5": 1})
    summary = {
        "k": config.k, "pieces": 2**config.k, "rows": rows,
        "deep_best": [r["best-seed test NMSE"] for r in rows if r["arch"] == "deep"],
        "shallow_best": [r["best-seed test NMSE"] for r in rows if r["arch"] == "shallow"],
        "params": budgets, "constructed_error": exact_err,
    }
    summary["deep_wins"] = sum(d < s for d, s in zip(summary["deep_best"], summary["shallow_best"]))
    summary["budgets"] = len(budgets)
    title = (f"sawtooth k={config.k} ({2**config.k} linear pieces): test MSE / Var, "
             f"best of {config.num_seeds} seeds (chosen by train loss) and median")
    studies.write_results(workdir, summary, {title: rows}, config)
    plot(summary, config, workdir, best_fits)
    return summary


def plot(summary: dict, config: ml_collections.ConfigDict, workdir: str, best_fits: dict) -> None:
    fig, axes = studies.new_figure(1, 2, (4.6, 3.6))
    ax = axes[0, 0]
    ax.semilogy(summary["params"], summary["deep_best"], "o-", label="deep narrow (best seed)")
    ax.semilogy(summary["params"], summary["shallow_best"], "s-", label="shallow wide (best seed)")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test MSE / Var(target)")
    ax.set_title(f"sawtooth, k={config.k}")
    ax.legend(fontsize=7)
    ax = axes[0, 1]  # the best fits at the largest budget
    x = jnp.linspace(0, 1, config.num_test)
    ax.plot(x, sawtooth(x, config.k), "k-", lw=2, label="target")
    for arch, (shape, pred) in best_fits.items():
        ax.plot(x, pred, lw=1, label=f"{arch} {shape}")
    ax.set_title(f"best fits at {summary['params'][-1]} parameters", fontsize=9)
    ax.legend(fontsize=7)
    studies.save_figure(fig, workdir, "error_vs_params.png")
