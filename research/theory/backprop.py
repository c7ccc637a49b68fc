"""Backpropagation is the chain rule: an MLP whose forward and backward passes are written by hand.

Forward, layer l:  z_l = a_{l-1} W_l + b_l,  a_l = act(z_l);  the last layer's z_L are the logits and the
loss is the mean softmax cross-entropy. Backward is one vector-Jacobian product per layer, from the
loss down (no `jax.grad` anywhere in the hand-written path):
  - softmax + cross-entropy:  dL/dz_L = (softmax(z_L) - onehot(y)) / batch
  - activation:               dL/dz_l = dL/da_l * act'(z_l)   (relu' = 1[z>0], sigmoid' = s(1-s), tanh' = 1-t^2)
  - affine layer:             dL/dW_l = a_{l-1}^T dL/dz_l,  dL/db_l = sum_batch dL/dz_l,  dL/da_{l-1} = dL/dz_l W_l^T
The study checks that these gradients equal `jax.grad`'s to float32 precision, that SGD with them
traces the same loss curve as SGD with autodiff (every seed trained at once, `jax.vmap` over a
`lax.scan`), and measures the "cheap gradient" principle with XLA's cost analysis: the FLOPs of
forward + backward are a small constant (~3x) times the forward's, whatever the width or depth
(each affine layer costs one matmul forward and two backward).

Example:
    depthlab run theory/backprop --workdir runs/bp --config.steps=1000
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

ACTIVATIONS = ("relu", "sigmoid", "tanh")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 64-64-64-10 MLPs with 3 activations, 3 seeds, 600 SGD steps on the digits; cost of 6 shapes."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 3
    config.activations = ACTIVATIONS
    config.hidden = (64, 64)
    config.steps = 600
    config.batch_size = 64
    config.learning_rate = 0.1
    config.cost_batch = 256
    # (hidden widths) of the nets whose forward/backward FLOPs are counted on 64-dim inputs, 10 classes
    config.cost_shapes = ((64,), (256,), (1024,), (64, 64, 64), (256, 256, 256), (256,) * 8)
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 10
    c.steps = 3000


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(activations=("tanh",), num_seeds=2, steps=40, hidden=(16,), cost_shapes=((16,), (64, 64))),
}


# ---------------------------------------------------------------------------------------------- the network
def init_mlp(rng: jax.Array, sizes: tuple[int, ...]) -> list[dict]:
    """[{"w": [n_in, n_out], "b": [n_out]}] per layer for layer sizes (n_0, ..., n_L); LeCun-normal weights."""
    keys = jax.random.split(rng, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def activation(name: str, z: jax.Array) -> jax.Array:
    if name == "relu":
        return jnp.maximum(z, 0.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + jnp.exp(-z))
    if name == "tanh":
        return jnp.tanh(z)
    raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(ACTIVATIONS)}")


def activation_vjp(name: str, z: jax.Array, a: jax.Array, grad_a: jax.Array) -> jax.Array:
    """dL/dz from dL/da for a = act(z), elementwise (the Jacobian is diagonal); reuses the forward's a."""
    if name == "relu":
        return grad_a * (z > 0)
    if name == "sigmoid":
        return grad_a * a * (1.0 - a)
    if name == "tanh":
        return grad_a * (1.0 - a * a)
    raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(ACTIVATIONS)}")


def log_softmax(z: jax.Array) -> jax.Array:
    z = z - jnp.max(z, axis=-1, keepdims=True)  # stable: exp never overflows
    return z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))


def forward(params: list[dict], x: jax.Array, act: str) -> tuple[jax.Array, list]:
    """x [batch, n_0] -> (logits [batch, n_L], cache of (input a_{l-1}, pre-activation z_l, output a_l) per layer)."""
    cache, a = [], x
    for i, layer in enumerate(params):
        z = a @ layer["w"] + layer["b"]
        out = z if i == len(params) - 1 else activation(act, z)
        cache.append((a, z, out))
        a = out
    return a, cache


def loss_fn(params: list[dict], x: jax.Array, y: jax.Array, act: str) -> jax.Array:
    """Mean softmax cross-entropy of the MLP on (x [batch, n_0], y [batch] int)."""
    logits, _ = forward(params, x, act)
    return -jnp.mean(jnp.take_along_axis(log_softmax(logits), y[:, None], axis=1))


def hand_value_and_grad(params: list[dict], x: jax.Array, y: jax.Array, act: str) -> tuple[jax.Array, list[dict]]:
    """(loss, dloss/dparams) by the chain rule, one vector-Jacobian product per layer from the top down."""
    logits, cache = forward(params, x, act)
    logp = log_softmax(logits)
    onehot = jax.nn.one_hot(y, logits.shape[-1])
    loss = -jnp.mean(jnp.sum(onehot * logp, axis=-1))
    grad_z = (jnp.exp(logp) - onehot) / x.shape[0]  # softmax + cross-entropy together
    grads, grad_a = [None] * len(params), None
    for i in reversed(range(len(params))):
        a_in, z, _ = cache[i]
        if i < len(params) - 1:
            grad_z = activation_vjp(act, z, cache[i][2], grad_a)  # grad_a: from the layer above
        grads[i] = {"w": a_in.T @ grad_z, "b": jnp.sum(grad_z, axis=0)}
        grad_a = grad_z @ params[i]["w"].T  # cotangent of this layer's input, for the layer below
    return loss, grads


def autodiff_value_and_grad(params, x, y, act):
    return jax.value_and_grad(loss_fn)(params, x, y, act)


# ---------------------------------------------------------------------------------------------- training
def make_train(act: str, config: ml_collections.ConfigDict, data: dict, gradient: str):
    """Jitted train(rngs [S]) -> (loss curve [S, steps], test accuracy [S]); gradient is "hand" or "autodiff"."""
    value_and_grad = {"hand": hand_value_and_grad, "autodiff": autodiff_value_and_grad}[gradient]
    x = jnp.asarray(data["x_train"].reshape(len(data["x_train"]), -1))
    y = jnp.asarray(data["y_train"])
    x_test = jnp.asarray(data["x_test"].reshape(len(data["x_test"]), -1))
    y_test = jnp.asarray(data["y_test"])
    sizes = (x.shape[1], *config.hidden, 10)

    def train(rng):
        init_rng, data_rng = jax.random.split(rng)
        params = init_mlp(init_rng, sizes)

        def step(params, t):
            idx = jax.random.randint(jax.random.fold_in(data_rng, t), (config.batch_size,), 0, len(y))
            loss, grads = value_and_grad(params, x[idx], y[idx], act)
            return jax.tree.map(lambda p, g: p - config.learning_rate * g, params, grads), loss

        params, curve = jax.lax.scan(step, params, jnp.arange(config.steps))
        logits, _ = forward(params, x_test, act)
        return curve, jnp.mean(jnp.argmax(logits, -1) == y_test)

    return jax.jit(jax.vmap(train))


# ---------------------------------------------------------------------------------------------- cost
def flops(fn, *args) -> float:
    """FLOPs of the compiled `fn(*args)` from XLA's cost analysis."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(dict(cost or {}).get("flops", float("nan")))


def cost_row(hidden: tuple[int, ...], batch: int, act: str = "relu") -> dict:
    """Forward, hand-written forward+backward and autodiff forward+backward FLOPs of one MLP (64 -> hidden -> 10)."""
    params = init_mlp(jax.random.key(0), (64, *hidden, 10))
    x = jnp.ones((batch, 64))
    y = jnp.zeros((batch,), jnp.int32)
    fwd = flops(lambda p, x, y: loss_fn(p, x, y, act), params, x, y)
    hand = flops(lambda p, x, y: hand_value_and_grad(p, x, y, act), params, x, y)
    auto = flops(lambda p, x, y: autodiff_value_and_grad(p, x, y, act), params, x, y)
    return {"hidden": "-".join(map(str, hidden)),
            "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params))),
            "forward MFLOPs": fwd / 1e6, "fwd+bwd (hand) MFLOPs": hand / 1e6, "fwd+bwd (autodiff) MFLOPs": auto / 1e6,
            "backward/forward (hand)": (hand - fwd) / fwd, "backward/forward (autodiff)": (auto - fwd) / fwd,
            "gradient/forward (autodiff)": auto / fwd}


def gradient_error(act: str, sizes: tuple[int, ...], rng: jax.Array, batch: int = 32) -> float:
    """Max relative difference between the hand-written and `jax.grad` gradients on a random net and batch."""
    k_init, k_x, k_y = jax.random.split(rng, 3)
    params = init_mlp(k_init, sizes)
    x = jax.random.normal(k_x, (batch, sizes[0]))
    y = jax.random.randint(k_y, (batch,), 0, sizes[-1])
    _, hand = jax.jit(hand_value_and_grad, static_argnums=3)(params, x, y, act)
    _, auto = jax.jit(autodiff_value_and_grad, static_argnums=3)(params, x, y, act)
    errors = jax.tree.map(lambda h, a: jnp.max(jnp.abs(h - a)) / (jnp.max(jnp.abs(a)) + 1e-12), hand, auto)
    return float(max(jax.tree.leaves(errors)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Gradient check, hand vs autodiff training per activation, FLOPs of backward vs forward; table and plots."""
    for act in studies.progress(config.activations, "backprop"):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; valid activations: {', '.join(ACTIVATIONS)}")
    data = studies.load_digits()
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    rows, curves = [], {}
    for act in config.activations:
        sizes = (64, *config.hidden, 10)
        err = max(gradient_error(act, sizes, jax.random.fold_in(jax.random.key(config.seed), s)) for s in range(3))
        hand_curve, hand_acc = map(np.asarray, make_train(act, config, data, "hand")(rngs))
        auto_curve, auto_acc = map(np.asarray, make_train(act, config, data, "autodiff")(rngs))
        curves[act] = (hand_curve, auto_curve)
        rows.append({"activation": act, "max rel. grad error": err,
                     "max |loss_hand - loss_autodiff|": float(np.max(np.abs(hand_curve - auto_curve))),
                     "final loss (hand)": float(hand_curve[:, -10:].mean()),
                     "test acc (hand)": float(hand_acc.mean()), "test acc (autodiff)": float(auto_acc.mean())})
    cost = [cost_row(tuple(h), config.cost_batch) for h in config.cost_shapes]
    summary = {"rows": rows, "cost": cost,
               "max_grad_error": max(r["max rel. grad error"] for r in rows),
               "max_curve_difference": max(r["max |loss_hand - loss_autodiff|"] for r in rows),
               "backward_over_forward_autodiff": [r["backward/forward (autodiff)"] for r in cost],
               "backward_over_forward_hand": [r["backward/forward (hand)"] for r in cost]}
    studies.write_results(workdir, summary, {
        f"hand-written backprop vs jax.grad: MLP 64-{'-'.join(map(str, config.hidden))}-10, SGD lr "
        f"{config.learning_rate}, {config.steps} steps, {config.num_seeds} seeds": rows,
        f"cost of the gradient (XLA cost analysis, batch {config.cost_batch}, ReLU): backward = (fwd+bwd) - forward": cost,
    }, config)
    plot(curves, cost, workdir)
    return summary


def plot(curves: dict, cost: list[dict], workdir: str) -> None:
    fig, axes = studies.new_figure(1, 2, (4.4, 3.3))
    ax = axes[0, 0]
    for act, (hand, auto) in curves.items():
        line, = ax.plot(hand.mean(0), lw=2, alpha=0.6, label=f"{act}: hand-written")
        ax.plot(auto.mean(0), "--", lw=1, color=line.get_color(), label=f"{act}: jax.grad")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("the same curve: hand-written backprop vs autodiff", fontsize=8)
    ax.legend(fontsize=6)
    ax = axes[0, 1]
    pos = np.arange(len(cost))
    ax.bar(pos - 0.2, [r["backward/forward (hand)"] for r in cost], 0.4, label="hand-written")
    ax.bar(pos + 0.2, [r["backward/forward (autodiff)"] for r in cost], 0.4, label="jax.grad")
    ax.axhline(2.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(pos)
    ax.set_xticklabels([r["hidden"] for r in cost], rotation=30, fontsize=6)
    ax.set_xlabel("hidden widths")
    ax.set_ylabel("backward FLOPs / forward FLOPs")
    ax.set_title("cheap gradient: backward ~ 2x forward (XLA)", fontsize=8)
    ax.legend(fontsize=6)
    studies.save_figure(fig, workdir, "backprop.png")
