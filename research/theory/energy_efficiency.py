"""Energy efficiency: accuracy vs cost for quantisation, pruning and knowledge distillation on the digits.

One task (the 8x8 digits), one CNN (`depthlab.models.quantized.QuantCNN`: conv 16, conv 32, dense 64),
three ways to make it cheaper:
  (a) quantisation-aware training (QAT) with straight-through rounding: int8 weights and activations,
      int4 weights (8-bit activations), int4 weights and activations; and, for contrast, post-training
      quantisation (PTQ) of the float net's weights without retraining;
  (b) magnitude pruning: after float training, each layer's smallest |w| are zeroed to 50 / 90 / 95%
      sparsity (biases kept), then the survivors are retrained with the mask held fixed;
  (c) knowledge distillation (Hinton et al. 2015): a small CNN (conv 4, conv 8, dense 16) trained on a
      big CNN's softened outputs (temperature T, loss alpha T^2 KL + (1 - alpha) CE) vs the same small
      net trained on the labels alone.
Cost columns: parameters (non-zero ones for pruning); model size in kbit (weights x their bit width,
biases 32 bits; pruned nets add a 1-bit-per-weight bitmap of where the survivors are); forward FLOPs
from XLA's cost analysis (the compiled dense program: XLA knows nothing of zeros or integer
grids, and skips the taps of a convolution that fall on its SAME padding); MACs (per-layer
multiply-accumulates counting every kernel tap, times the density for a sparse kernel); and
bit-operations BOPs = MACs x weight bits x activation bits (the usual cost proxy for integer
arithmetic). Every setting trains `num_seeds` seeds at once (`jax.vmap` over a `lax.scan`).

Example:
    depthlab run theory/energy_efficiency --workdir runs/energy --config.num_seeds=5
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models.quantized import QuantCNN
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 2 seeds; float/int8/int4 QAT, 50/90/95% pruning, distillation; 600 Adam steps each."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 2
    config.channels = (16, 32)
    config.dense = (64,)
    config.steps = 600
    config.batch_size = 64
    config.optim = studies.optim_config("adam", 3e-3, schedule="cosine")
    # (weight bits, activation bits); 0 = float32
    config.qat = ((0, 0), (8, 8), (4, 8), (4, 4))
    config.ptq_bits = (8, 4)
    config.sparsities = (0.5, 0.9, 0.95)
    config.retrain_steps = 200
    config.teacher = {"channels": (32, 64), "dense": (128,)}
    config.student = {"channels": (4, 8), "dense": (16,)}
    config.temperature = 4.0
    config.alpha = 0.9
    config.cost_batch = 32
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 10
    c.steps = 4000
    c.retrain_steps = 2000


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(num_seeds=1, steps=150, retrain_steps=60, channels=(8, 16), dense=(32,),
                          qat=((0, 0), (8, 8)), ptq_bits=(4,), sparsities=(0.9,),
                          teacher={"channels": (16, 32), "dense": (64,)}),
}


def _bits(b: int) -> int | None:
    return None if not b else int(b)


def make_model(channels, dense, weight_bits: int = 0, act_bits: int = 0) -> QuantCNN:
    return QuantCNN(channels=tuple(channels), dense=tuple(dense), weight_bits=_bits(weight_bits),
                    act_bits=_bits(act_bits))


def make_train(model, config: ml_collections.ConfigDict, data: dict, steps: int, teacher_logits=None):
    """Jitted, seed-vmapped train(rngs [S], params [S, ...] or None, masks [S, ...] or None) -> params [S, ...].

    Given params, training starts from them (retraining); given masks (1 = keep), the parameters are
    multiplied by them in every forward pass and after every update, so pruned weights stay zero.
    With teacher_logits [n_train, classes], the loss is distillation's instead of the labels' alone.
    """
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    tx = studies.make_tx(config.optim, steps)
    t, alpha = float(config.temperature), float(config.alpha)

    def loss_fn(params, idx):
        logits = model.apply({"params": params}, x[idx])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
        if teacher_logits is None:
            return ce
        soft = jax.nn.softmax(teacher_logits[idx] / t)
        kl = optax.softmax_cross_entropy(logits / t, soft).mean() + jnp.sum(soft * jnp.log(soft + 1e-12), -1).mean()
        return alpha * t * t * kl + (1 - alpha) * ce  # T^2 keeps the soft gradients' scale independent of T

    def train(rng, params, masks):
        init_rng, data_rng = jax.random.split(rng)
        if params is None:
            params = model.init(init_rng, x[:2])["params"]
        apply_mask = (lambda p: p) if masks is None else (lambda p: jax.tree.map(jnp.multiply, p, masks))
        params = apply_mask(params)

        def step(carry, i):
            params, opt_state = carry
            idx = jax.random.randint(jax.random.fold_in(data_rng, i), (config.batch_size,), 0, len(y))
            grads = jax.grad(lambda p: loss_fn(apply_mask(p), idx))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (apply_mask(optax.apply_updates(params, updates)), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return params

    return _vmapped(train)


def _vmapped(train):
    """vmap over seeds of train(rng, params, masks), with params/masks optional (None is not vmapped)."""
    @jax.jit
    def call(rngs, params=None, masks=None):
        return jax.vmap(lambda r, p, m: train(r, p, m), in_axes=(0, None if params is None else 0,
                                                                  None if masks is None else 0))(rngs, params, masks)
    return call


def accuracy(model, params, data: dict) -> np.ndarray:
    """Test accuracy per seed of seed-stacked params [S, ...]."""
    x, y = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    return np.asarray(jax.vmap(lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, x), -1) == y))(params))


def magnitude_masks(params: dict, sparsity: float) -> dict:
    """1/0 masks zeroing the `sparsity` fraction of smallest-|w| entries of each kernel (biases kept). One seed."""
    def mask(path, w):
        if path[-1].key != "kernel":
            return jnp.ones_like(w)
        k = int(round(sparsity * w.size))
        if k == 0:
            return jnp.ones_like(w)
        cut = jnp.sort(jnp.abs(w).ravel())[k - 1]
        return (jnp.abs(w) > cut).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(mask, params)


def layer_macs(params: dict, channels, image_size: int = 8) -> dict:
    """Multiply-accumulates per example of each kernel of a QuantCNN (SAME convs, 2x2 pools): {layer: macs}."""
    macs, size = {}, image_size
    for i in range(len(channels)):
        macs[f"QuantConv_{i}"] = size * size * int(np.prod(params[f"QuantConv_{i}"]["kernel"].shape))
        size = math.ceil(size / 2)
    for name in params:
        if name.startswith("QuantDense"):
            macs[name] = int(np.prod(params[name]["kernel"].shape))
    return macs


def cost(model, params: dict, channels, weight_bits: int = 0, act_bits: int = 0, batch: int = 32,
         masks: dict | None = None) -> dict:
    """Cost of one parameter set (one seed): params, kbit, XLA MFLOPs, MACs and BOPs per example."""
    wb, ab = weight_bits or 32, act_bits or 32
    x = jnp.ones((batch, 8, 8, 1))
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = float(dict(analysis or {}).get("flops", float("nan"))) / batch
    macs_dense = layer_macs(params, channels)
    density = {name: 1.0 if masks is None else float(jnp.mean(masks[name]["kernel"])) for name in macs_dense}
    kernels = sum(int(params[n]["kernel"].size) for n in macs_dense)
    biases = sum(int(params[n]["bias"].size) for n in macs_dense)
    nonzero = sum(density[n] * params[n]["kernel"].size for n in macs_dense)
    kbit = (nonzero * wb + biases * 32 + (kernels if masks is not None else 0)) / 1e3
    macs = sum(macs_dense[n] * density[n] for n in macs_dense)
    return {"params (non-zero)": int(round(nonzero)) + biases, "size (kbit)": kbit, "XLA MFLOPs": flops / 1e6,
            "kMACs": macs / 1e3, "GBOPs": macs * wb * ab / 1e9}


def _row(method: str, accs: np.ndarray, costs: dict) -> dict:
    return {"method": method, "test_acc": float(np.mean(accs)), "acc (min)": float(np.min(accs)), **costs}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every variant for all seeds; prints the accuracy-vs-cost table; plots accuracy vs size and BOPs."""
    data = studies.load_digits()
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    first = lambda tree: jax.tree.map(lambda v: v[0], tree)
    rows, float_params, float_acc = [], None, None
    for wb, ab in studies.progress(config.qat, "energy_efficiency (QAT)"):
        model = make_model(config.channels, config.dense, wb, ab)
        params = make_train(model, config, data, config.steps)(rngs)
        accs = accuracy(model, params, data)
        name = "float32" if not wb else f"QAT int{wb} weights" + (f", int{ab} activations" if ab else "")
        rows.append(_row(name, accs, cost(model, first(params), config.channels, wb, ab, config.cost_batch)))
        if not wb:
            float_params, float_acc = params, accs
    if float_params is None:
        raise ValueError("config.qat must include (0, 0), the float32 baseline the other methods start from")
    for wb in config.ptq_bits:  # the float weights rounded after training, no retraining
        model = make_model(config.channels, config.dense, wb, 0)
        rows.append(_row(f"PTQ int{wb} weights (no retraining)", accuracy(model, float_params, data),
                         cost(model, first(float_params), config.channels, wb, 0, config.cost_batch)))
    float_model = make_model(config.channels, config.dense)
    retrain = make_train(float_model, config, data, config.retrain_steps)  # compiled once for every sparsity
    for s in config.sparsities:
        masks = jax.vmap(lambda p: magnitude_masks(p, s))(float_params)
        pruned = jax.tree.map(jnp.multiply, float_params, masks)
        before = accuracy(float_model, pruned, data)
        retrained = retrain(rngs, float_params, masks)
        row = _row(f"pruned {s:.0%} + retrain", accuracy(float_model, retrained, data),
                   cost(float_model, first(retrained), config.channels, 0, 0, config.cost_batch, first(masks)))
        rows.append({**row, "acc before retrain": float(np.mean(before))})
    teacher = make_model(config.teacher.channels, config.teacher.dense)
    teacher_params = make_train(teacher, config, data, config.steps)(rngs)
    teacher_acc = accuracy(teacher, teacher_params, data)
    rows.append(_row("teacher (big CNN)", teacher_acc, cost(teacher, first(teacher_params), config.teacher.channels,
                                                            batch=config.cost_batch)))
    teacher_logits = teacher.apply({"params": first(teacher_params)}, jnp.asarray(data["x_train"]))
    student = make_model(config.student.channels, config.student.dense)
    alone = make_train(student, config, data, config.steps)(rngs)
    distilled = make_train(student, config, data, config.steps, teacher_logits)(rngs)
    student_cost = cost(student, first(alone), config.student.channels, batch=config.cost_batch)
    alone_acc, distilled_acc = accuracy(student, alone, data), accuracy(student, distilled, data)
    rows.append(_row("small CNN alone", alone_acc, student_cost))
    rows.append(_row(f"small CNN distilled (T={config.temperature:g}, alpha={config.alpha:g})", distilled_acc,
                     student_cost))
    rows = [{**r, "acc before retrain": r.get("acc before retrain", float("nan"))} for r in rows]
    by_name = {r["method"]: r for r in rows}
    summary = {"rows": rows, "float_acc": float(np.mean(float_acc)),
               "int8_acc": by_name.get("QAT int8 weights, int8 activations", {}).get("test_acc", float("nan")),
               "int4_acc": by_name.get("QAT int4 weights, int8 activations", {}).get("test_acc", float("nan")),
               "student_alone_acc": float(np.mean(alone_acc)), "student_distilled_acc": float(np.mean(distilled_acc)),
               "distillation_gain_per_seed": (distilled_acc - alone_acc).tolist(),
               "teacher_acc": float(np.mean(teacher_acc))}
    studies.write_results(workdir, summary, {
        f"digits: accuracy vs cost (mean and min over {config.num_seeds} seeds); size: weights x bits + 32-bit biases "
        f"(+1-bit mask when pruned); XLA FLOPs count the dense program; MACs scale with density; BOPs = MACs x "
        f"w bits x a bits": rows}, config)
    plot(rows, workdir)
    return summary


def plot(rows: list[dict], workdir: str) -> None:
    fig, axes = studies.new_figure(1, 2, (4.6, 3.8))
    markers = "osD^v<>ph*XP+x"
    for ax, key in ((axes[0, 0], "size (kbit)"), (axes[0, 1], "GBOPs")):
        for i, r in enumerate(rows):
            ax.scatter(r[key], r["test_acc"], s=22, marker=markers[i % len(markers)], color=f"C{i % 10}",
                       label=r["method"].replace(" (no retraining)", ""))
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits: accuracy vs {key}", fontsize=8)
    axes[0, 0].legend(fontsize=5, loc="lower right")
    studies.save_figure(fig, workdir, "accuracy_vs_cost.png")
