"""Vanishing and exploding gradients: per-layer gradient norms of deep MLPs by activation, init, residual, BatchNorm.

Back-propagation multiplies the output gradient by one Jacobian per layer,
dL/dh_l = W_{l+1}^T diag(act'(z_{l+1})) dL/dh_{l+1}, so its size changes geometrically with depth:
sigmoid' <= 1/4 shrinks it at every layer (vanishing), a too-large initial scale grows it
(exploding). The cures studied here: a variance-preserving init (He for ReLU, Glorot/LeCun for
tanh), residual connections (the identity path carries the gradient unchanged), BatchNorm
(re-normalises each layer), and gradient clipping (bounds the step when gradients explode).

Each setting "activation/init/arch" is a depthlab.models.MLP on the 8x8 digits; the whole training
run is one `lax.scan`, `jax.vmap`-ed over seeds, recording the gradient norm of every Dense kernel at
every step. Output: gradient-norm heat maps (layer x step), and a table of the first/last-layer ratio.

Example:
    depthlab run theory/vanishing_gradients --workdir runs/vg --config.depth=30
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import MLP
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

INITS = {
    "lecun": nn.initializers.lecun_normal(),  # Var(w) = 1/fan_in: preserves variance for tanh near 0
    "glorot": nn.initializers.glorot_normal(),  # Var(w) = 2/(fan_in+fan_out) (Xavier)
    "he": nn.initializers.he_normal(),  # Var(w) = 2/fan_in: preserves variance through ReLU
    "small": nn.initializers.normal(0.01),  # far too small: signals and gradients die
    "large": nn.initializers.variance_scaling(6.0, "fan_in", "truncated_normal"),  # 3x He: explodes
}
ARCHS = ("plain", "residual", "batchnorm", "residual_bn")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 20 hidden layers of width 64, 10 settings, 3 seeds, 300 SGD-momentum steps (a minute on CPU)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 3
    config.depth = 20  # hidden layers; the net has depth + 1 Dense kernels
    config.width = 64
    config.settings = (
        "sigmoid/lecun/plain", "sigmoid/glorot/plain", "tanh/lecun/plain", "relu/small/plain",
        "relu/lecun/plain", "relu/he/plain", "sigmoid/lecun/batchnorm", "relu/he/batchnorm",
        "sigmoid/lecun/residual", "relu/lecun/residual", "relu/he/residual_bn",
    )
    config.exploding_setting = "relu/large/plain"  # "" skips the exploding/clipping comparison
    config.steps = 300
    config.batch_size = 128
    config.optim = studies.optim_config("momentum", 0.01)
    config.clip_norm = 1.0  # used only for the "with clipping" run of the exploding setting
    return with_preset(config, preset, PRESETS)


def _deep(c: ml_collections.ConfigDict) -> None:
    c.depth = 50
    c.steps = 2000
    c.num_seeds = 5


PRESETS = {
    "deep": _deep,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(depth=6, width=32, num_seeds=1, steps=3, settings=("sigmoid/lecun/plain",),
                          exploding_setting=""),
}


def parse_setting(setting: str) -> tuple[str, str, str]:
    """'relu/he/residual' -> ('relu', 'he', 'residual'), checking each part."""
    parts = setting.split("/")
    if len(parts) != 3 or parts[1] not in INITS or parts[2] not in ARCHS:
        raise ValueError(f"bad setting {setting!r}: expected 'activation/init/arch' with init in "
                         f"{sorted(INITS)} and arch in {ARCHS}, e.g. 'relu/he/residual'")
    return parts[0], parts[1], parts[2]


def make_model(setting: str, config: ml_collections.ConfigDict) -> MLP:
    activation, init, arch = parse_setting(setting)
    return MLP(features=(config.width,) * config.depth + (10,), activation=activation,
               residual=arch in ("residual", "residual_bn"), batch_norm=arch in ("batchnorm", "residual_bn"),
               kernel_init=INITS[init])


def layer_grad_norms(grads: dict, depth: int) -> jax.Array:
    """Frobenius norm of each Dense kernel's gradient, input layer first -> [depth + 1]."""
    return jnp.stack([jnp.linalg.norm(grads[f"Dense_{i}"]["kernel"]) for i in range(depth + 1)])


def make_train(model: MLP, config: ml_collections.ConfigDict, data: dict, tx: optax.GradientTransformation):
    """Returns train(rng) -> dict(init_norms [L], norms [steps, L], loss [steps])."""
    x_train = jnp.asarray(data["x_train"].reshape(len(data["x_train"]), -1))
    y_train = jnp.asarray(data["y_train"])

    def loss_fn(params, model_state, x, y):
        logits, updates = model.apply({"params": params, **model_state}, x, train=True, mutable=list(model_state))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train(rng):
        init_rng, data_rng = jax.random.split(rng)
        variables = model.init(init_rng, x_train[:2], train=False)
        params = variables.pop("params")
        model_state = dict(variables)
        # At initialisation: the full-training-set gradient, free of minibatch noise.
        _, init_grads = grad_fn(params, model_state, x_train, y_train)

        def step(carry, t):
            params, model_state, opt_state = carry
            idx = jax.random.randint(jax.random.fold_in(data_rng, t), (config.batch_size,), 0, len(y_train))
            (loss, new_state), grads = grad_fn(params, model_state, x_train[idx], y_train[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, dict(new_state), opt_state), (layer_grad_norms(grads, config.depth), loss)

        carry = (params, model_state, tx.init(params))
        _, (norms, losses) = jax.lax.scan(step, carry, jnp.arange(config.steps))
        # (No test accuracy: this study is about gradients, and BatchNorm's running averages after a
        # few hundred steps would make the test numbers of the BN settings misleading.)
        return {"init_norms": layer_grad_norms(init_grads, config.depth), "norms": norms, "loss": losses}

    return train


def run_setting(setting: str, config: ml_collections.ConfigDict, data: dict, optim: ml_collections.ConfigDict) -> dict:
    """Trains one setting for every seed at once (vmap); returns numpy arrays with a leading seed axis."""
    train = make_train(make_model(setting, config), config, data, studies.make_tx(optim))
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(train))(rngs))


def ratio_row(name: str, out: dict) -> dict:
    """Table row (medians over seeds): gradient norm at init of the first, last hidden and output kernels,
    their ratios, max/min over all layers at init, and the training loss over the last 10 steps."""
    init = out["init_norms"]  # [seeds, L]
    first, last_hidden, output = (float(np.median(init[:, i])) for i in (0, -2, -1))
    spread = np.median(init.max(1) / np.maximum(init.min(1), 1e-30))
    final_loss = np.median(out["loss"][:, -10:].mean(1))
    return {"setting": name, "first_layer": first, "last_hidden": last_hidden, "output_layer": output,
            "first/last_hidden": first / max(last_hidden, 1e-30), "first/output": first / max(output, 1e-30),
            "max/min": float(spread), "final_train_loss": float(final_loss)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every setting and the exploding case with/without clipping; writes table + heat maps."""
    settings = (*config.settings, *([config.exploding_setting] if config.exploding_setting else []))
    for setting in studies.progress(settings, "vanishing_gradients"):
        parse_setting(setting)
    data = studies.load_digits()
    outputs = {s: run_setting(s, config, data, config.optim) for s in config.settings}
    exploding = {}
    if config.exploding_setting:
        clipped = config.optim.copy_and_resolve_references()
        clipped.clip_norm = config.clip_norm
        exploding = {
            f"{config.exploding_setting} (no clip)": run_setting(config.exploding_setting, config, data, config.optim),
            f"{config.exploding_setting} (clip {config.clip_norm:g})":
                run_setting(config.exploding_setting, config, data, clipped),
        }
    rows = [ratio_row(name, out) for name, out in outputs.items()]
    explode_rows = [ratio_row(name, out) for name, out in exploding.items()]
    summary = {row["setting"]: {k: v for k, v in row.items() if k != "setting"} for row in rows + explode_rows}
    for setting, key in (("sigmoid/lecun/plain", "sigmoid"), ("relu/lecun/residual", "relu_residual")):
        if setting in summary:  # headline scalars for `depthlab report`
            summary[f"{key}_first_over_last_hidden"] = summary[setting]["first/last_hidden"]
    tables = {f"gradient norm per layer at init (depth {config.depth}, median of {config.num_seeds} seeds)": rows}
    if explode_rows:
        tables["exploding gradients: training with and without clipping"] = explode_rows
    studies.write_results(workdir, summary, tables, config)
    plot_heatmaps({**outputs, **exploding}, workdir)
    plot_profiles(outputs, workdir)
    return summary


def plot_heatmaps(outputs: dict, workdir: str) -> None:
    cols = min(4, len(outputs))   # wraps into rows of 4 panels
    rows = -(-len(outputs) // cols)
    fig, axes = studies.new_figure(rows, cols, (3.4, 2.8))
    logs = {n: np.log10(np.maximum(o["norms"][0].T, 1e-30)) for n, o in outputs.items()}  # seed 0: [L, steps]
    finite = np.concatenate([v[np.isfinite(v)] for v in logs.values()])
    vmin, vmax = np.percentile(finite, 1), np.percentile(finite, 99)
    for ax, (name, img) in zip(axes.flat, logs.items()):
        im = ax.imshow(img, aspect="auto", origin="lower", cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("layer (0 = input)", fontsize=7)
    for ax in list(axes.flat)[len(outputs):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="log10 ||dL/dW_l||")
    fig.savefig(f"{workdir}/gradient_heatmaps.png", dpi=100, bbox_inches="tight")   # keeps the axis labels


def plot_profiles(outputs: dict, workdir: str) -> None:
    fig, axes = studies.new_figure(1, 1, (6.0, 4.2))
    ax = axes[0, 0]
    for name, out in outputs.items():
        ax.semilogy(np.median(out["init_norms"], 0), "o-", ms=3, label=name)
    ax.set_xlabel("layer (0 = input, last = output)")
    ax.set_ylabel("||dL/dW_l|| at init")
    ax.legend(fontsize=6)
    studies.save_figure(fig, workdir, "gradient_profile_init.png")
