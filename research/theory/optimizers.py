"""Optimizers compared: SGD, momentum, Nesterov, RMSProp, Adam, AdamW on a quadratic, Rosenbrock and a small net.

Three problems with known difficulties:
- an ill-conditioned convex quadratic f(x) = 1/2 x^T A x (condition number 100, rotated so the
  axes are not the eigenvectors): plain gradient descent crawls along the flat directions; momentum
  cuts the iterations from ~kappa to ~sqrt(kappa).
- Rosenbrock's banana valley (1 - x)^2 + 100 (y - x^2)^2: a curved, narrow valley.
- a small MLP (64-64-10) on the 8x8 digits with minibatches of 128: a real, noisy loss.

Every optimizer is an Optax chain from `depthlab.train.make_optimizer`. To sweep learning rates in
one compiled program, each chain is built with learning_rate = 1 and its update multiplied by the
swept rate: every chain here ends in a multiplication by the learning rate (decoupled weight decay
included), so this is the same optimizer, and `jax.vmap` runs all (rate, seed) pairs at once.

Example:
    depthlab run theory/optimizers --workdir runs/opt --config.steps=1000
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

OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw")
PROBLEMS = ("quadratic", "rosenbrock", "mlp_digits")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 6 optimizers x 3 problems x 10 learning rates x 5 seeds, a few hundred steps each."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 5
    config.optimizers = OPTIMIZERS
    config.problems = PROBLEMS
    config.learning_rates = tuple(float(x) for x in np.logspace(-4, 0.5, 10))
    config.steps = {"quadratic": 300, "rosenbrock": 2000, "mlp_digits": 300}
    config.quadratic_dim = 20
    config.condition_number = 100.0
    config.batch_size = 128
    config.success_fraction = 0.01  # an lr "works" when the final loss is below this fraction of the initial one
    config.optim = studies.optim_config("adam", 1.0, weight_decay=1e-2)  # name/lr are set per run
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 10
    c.learning_rates = tuple(float(x) for x in np.logspace(-5, 0.5, 12))
    c.steps = {"quadratic": 2000, "rosenbrock": 10000, "mlp_digits": 2000}


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(problems=("quadratic",), optimizers=("momentum",), learning_rates=(0.1, 1.0), num_seeds=2,
                          steps={"quadratic": 100}),
}


def make_problem(name: str, config: ml_collections.ConfigDict, data: dict | None):
    """Returns (init(rng) -> params, loss(params, rng) -> scalar minibatch loss, full_loss(params))."""
    if name == "quadratic":
        # A = Q diag(eigs) Q^T with log-spaced eigenvalues 1/kappa .. 1 and a fixed random rotation Q.
        eigs = jnp.logspace(-jnp.log10(config.condition_number), 0, config.quadratic_dim)
        q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1234), (config.quadratic_dim,) * 2))
        a = (q * eigs) @ q.T

        def loss(x, rng=None):
            return 0.5 * jnp.sum(x * (a @ x))

        # x is a [d, 1] matrix, not a vector: the engine's weight-decay mask skips 1-D (bias-like)
        # parameters, and AdamW should decay these.
        return (lambda rng: jax.random.normal(rng, (config.quadratic_dim, 1))), loss, loss
    if name == "rosenbrock":
        def loss(p, rng=None):  # p [2, 1], a matrix for the same reason as above
            return ((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2)[0]

        return (lambda rng: jnp.array([[-1.5], [2.0]]) + 0.1 * jax.random.normal(rng, (2, 1))), loss, loss
    if name == "mlp_digits":
        model = MLP(features=(64, 64, 10))
        x = jnp.asarray(data["x_train"].reshape(len(data["x_train"]), -1))
        y = jnp.asarray(data["y_train"])

        def full_loss(params, rng=None, idx=None):
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            logits = model.apply({"params": params}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def loss(params, rng):
            return full_loss(params, idx=jax.random.randint(rng, (config.batch_size,), 0, len(y)))

        return (lambda rng: model.init(rng, x[:1])["params"]), loss, full_loss
    raise ValueError(f"unknown problem {name!r}; valid problems: {', '.join(PROBLEMS)}")


def make_train(problem: str, optimizer: str, config: ml_collections.ConfigDict, data: dict | None):
    """Returns jitted train(lrs [R], rngs [S]) -> (loss curves [R, S, steps], final full loss [R, S])."""
    init, loss, full_loss = make_problem(problem, config, data)
    optim = config.optim.copy_and_resolve_references()
    optim.name, optim.learning_rate = optimizer, 1.0
    if optimizer != "adamw":
        optim.weight_decay = 0.0  # decoupled weight decay is what makes AdamW differ from Adam
    tx = studies.make_tx(optim)
    steps = config.steps[problem]

    def train(lr, rng):
        init_rng, data_rng = jax.random.split(rng)
        params = init(init_rng)

        def step(carry, t):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss)(params, jax.random.fold_in(data_rng, t))
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: lr * u, updates)  # the swept learning rate (see docstring)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return curve, full_loss(params)

    return jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))


def summarise(curves: np.ndarray, final: np.ndarray, lrs: np.ndarray, success_fraction: float) -> dict:
    """Best rate (lowest median final loss; diverged runs count as +inf) and how many rates work."""
    final = np.where(np.isfinite(final), final, np.inf)
    median = np.median(final, axis=1)
    best = int(np.argmin(median))
    initial = np.median(curves[:, :, 0])
    works = int(np.sum(median < success_fraction * initial))
    return {"best_lr": float(lrs[best]), "final_loss_median": float(median[best]),
            "final_loss_min": float(final[best].min()), "final_loss_max": float(final[best].max()),
            "lrs_that_work": f"{works}/{len(lrs)}", "best_index": best}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every (problem, optimizer) lr x seed grid; writes the table, loss curves and lr sensitivity."""
    for name in config.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} for this study; valid: {', '.join(OPTIMIZERS)}")
    data = studies.load_digits() if "mlp_digits" in config.problems else None
    lrs = np.asarray(config.learning_rates, np.float32)
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    results, rows = {}, []
    for problem in studies.progress(config.problems, "optimizers"):
        for optimizer in config.optimizers:
            curves, final = make_train(problem, optimizer, config, data)(jnp.asarray(lrs), rngs)
            curves, final = np.asarray(curves), np.asarray(final)
            stats = summarise(curves, final, lrs, config.success_fraction)
            results[(problem, optimizer)] = (curves, final, stats)
            rows.append({"problem": problem, "optimizer": optimizer,
                         **{k: v for k, v in stats.items() if k != "best_index"}})
    summary = {"rows": rows}
    for problem in config.problems:  # headline scalars: the best optimizer per problem
        best = min((r for r in rows if r["problem"] == problem), key=lambda r: r["final_loss_median"])
        summary[f"{problem}_best_optimizer"] = best["optimizer"]
        summary[f"{problem}_best_loss"] = best["final_loss_median"]
    title = (f"final loss at each optimizer's best learning rate (median, min, max over {config.num_seeds} seeds); "
             f"lrs_that_work: rates whose median final loss < {config.success_fraction:g} x initial")
    studies.write_results(workdir, summary, {title: rows}, config)
    plot(results, config, lrs, workdir)
    return summary


def plot(results: dict, config: ml_collections.ConfigDict, lrs: np.ndarray, workdir: str) -> None:
    problems = list(config.problems)
    fig, axes = studies.new_figure(2, len(problems), (4.2, 3.3))
    for col, problem in enumerate(problems):
        curve_ax, lr_ax = axes[0, col], axes[1, col]
        for optimizer in config.optimizers:
            curves, final, stats = results[(problem, optimizer)]
            c = curves[stats["best_index"]]  # [seeds, steps] at the best rate
            c = np.where(np.isfinite(c), c, np.nan)
            steps = np.arange(c.shape[1])
            line, = curve_ax.semilogy(steps, np.nanmedian(c, 0), lw=1, label=f"{optimizer} (lr {stats['best_lr']:.1e})")
            curve_ax.fill_between(steps, np.nanmin(c, 0), np.nanmax(c, 0), color=line.get_color(), alpha=0.2)
            med = np.median(np.where(np.isfinite(final), final, np.inf), 1)
            lr_ax.loglog(lrs, np.where(np.isfinite(med), med, np.nan), "o-", ms=3, color=line.get_color(), label=optimizer)
        curve_ax.set_title(f"{problem}: loss at best lr (median, min-max)", fontsize=8)
        curve_ax.set_xlabel("step")
        curve_ax.legend(fontsize=6)
        lr_ax.set_title(f"{problem}: final loss vs learning rate", fontsize=8)
        lr_ax.set_xlabel("learning rate")
        lr_ax.legend(fontsize=6)
    studies.save_figure(fig, workdir, "optimizers.png")
