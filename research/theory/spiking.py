"""Spiking neural networks: leaky integrate-and-fire neurons trained by BPTT with a surrogate gradient.

The 8x8 digits become spike trains over `time_steps` steps: rate coding fires pixel i at each step
with probability intensity_i (Bernoulli), latency coding fires each pixel brighter than
`latency_min` once, at step round((1 - intensity) * (T - 1)) (bright = early). A
`depthlab.models.SpikingMLP` (LIF layers unrolled with `nn.RNN`, i.e. `lax.scan`; leaky,
non-spiking readout whose mean potential gives the logits) is trained by backpropagation through
time; the Heaviside spike's derivative is replaced by a fast-sigmoid surrogate (`jax.custom_vjp`).

Energy proxy: spikes per inference, and the synaptic operations they cause. In an event-driven
chip, a spike costs one accumulate (AC) per outgoing synapse; an ANN costs one multiply-accumulate
(MAC) per synapse per inference. The "rate-matched" ANN is the same 64-128-10 MLP fed the rates
the spike trains encode (the pixel intensities). The pJ column uses Horowitz's 45 nm figures
(32-bit float MAC 4.6 pJ, add 0.9 pJ) and also charges the SNN its per-step membrane leak (one
multiply per neuron per step): an estimate, not a measurement of any hardware.

Example:
    depthlab run theory/spiking --workdir runs/snn --config.time_steps=50
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import MLP
from depthlab.models.spiking import SpikingMLP, surrogate_gradient
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

ENCODINGS = ("rate", "latency")
MAC_PJ, ADD_PJ, MUL_PJ = 4.6, 0.9, 3.7  # 45 nm, 32-bit float (Horowitz, ISSCC 2014)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: rate and latency coding, 25 time steps, 64-128-10 LIF net, 2 seeds, 1200 Adam steps."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 2
    config.encodings = ENCODINGS
    config.time_steps = 25
    config.hidden = (128,)
    config.beta = 0.9
    config.threshold = 1.0
    config.slope = 25.0
    config.latency_min = 0.05  # pixels dimmer than this never fire under latency coding
    config.steps = 1200
    config.batch_size = 128
    config.optim = studies.optim_config("adam", 2e-3, schedule="cosine")
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 5
    c.steps = 5000
    c.time_steps = 50


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(encodings=("rate",), num_seeds=1, steps=120, time_steps=8, hidden=(64,)),
}


def encode(rng: jax.Array, images: jax.Array, time_steps: int, encoding: str, latency_min: float = 0.05) -> jax.Array:
    """Images [batch, ...] in [0, 1] -> 0/1 spike trains [batch, time_steps, pixels]."""
    x = images.reshape(images.shape[0], 1, -1)
    if encoding == "rate":
        return jax.random.bernoulli(rng, x, (x.shape[0], time_steps, x.shape[-1])).astype(jnp.float32)
    if encoding == "latency":
        fire_at = jnp.round((1.0 - x) * (time_steps - 1))
        t = jnp.arange(time_steps)[None, :, None]
        return ((t == fire_at) & (x > latency_min)).astype(jnp.float32)
    raise ValueError(f"unknown encoding {encoding!r}; valid encodings: {', '.join(ENCODINGS)}")


def make_train(model, config: ml_collections.ConfigDict, data: dict, encoding: str | None):
    """Jitted train(rngs [S]) -> params [S, ...]; encoding None trains the ANN on the intensities."""
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    tx = studies.make_tx(config.optim, config.steps)

    def inputs(rng, images):
        if encoding is None:
            return images.reshape(images.shape[0], -1)
        return encode(rng, images, config.time_steps, encoding, config.latency_min)

    def logits_of(params, batch):
        out = model.apply({"params": params}, batch)
        return out[0] if isinstance(out, tuple) else out

    def train(rng):
        init_rng, data_rng = jax.random.split(rng)
        params = model.init(init_rng, inputs(init_rng, x[:2]))["params"]

        def step(carry, t):
            params, opt_state = carry
            k_idx, k_enc = jax.random.split(jax.random.fold_in(data_rng, t))
            idx = jax.random.randint(k_idx, (config.batch_size,), 0, len(y))
            batch = inputs(k_enc, x[idx])

            def loss(p):
                return optax.softmax_cross_entropy_with_integer_labels(logits_of(p, batch), y[idx]).mean()

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(config.steps))
        return params, curve

    return jax.jit(jax.vmap(train))


def evaluate_snn(model, params, spikes: jax.Array, labels: jax.Array) -> dict:
    """Accuracy and mean spike counts per example (input, each hidden layer) of one parameter set."""
    logits, aux = model.apply({"params": params}, spikes)
    return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "input_spikes": spikes.sum((1, 2)).mean(),
            "hidden_spikes": jnp.stack([s.sum((1, 2)).mean() for s in aux["spikes"]])}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the SNN per encoding and the rate-matched ANN; accuracy, spikes, synaptic ops; raster plot."""
    for enc in studies.progress(config.encodings, "spiking"):
        if enc not in ENCODINGS:
            raise ValueError(f"unknown encoding {enc!r}; valid encodings: {', '.join(ENCODINGS)}")
    data = studies.load_digits()
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    widths = (64, *config.hidden, 10)
    synapses = [a * b for a, b in zip(widths[:-1], widths[1:])]
    neurons = sum(widths[1:])
    snn = SpikingMLP(hidden=tuple(config.hidden), num_classes=10, beta=config.beta, threshold=config.threshold,
                     slope=config.slope)
    rows, curves, raster = [], {}, None
    for enc in config.encodings:
        params, curve = make_train(snn, config, data, enc)(rngs)
        curves[enc] = np.asarray(curve)
        spikes = encode(jax.random.key(config.seed + 1), x_test, config.time_steps, enc, config.latency_min)
        stats = jax.vmap(lambda p: evaluate_snn(snn, p, spikes, y_test))(params)
        stats = jax.tree.map(lambda v: np.asarray(v).mean(0), stats)
        # every spike of layer l is one accumulate per outgoing synapse (fan-out = next layer's width)
        layer_spikes = [float(stats["input_spikes"]), *map(float, stats["hidden_spikes"])]
        acs = sum(s * fan_out for s, fan_out in zip(layer_spikes, widths[1:]))
        leak = neurons * config.time_steps
        rows.append({"model": f"SNN ({enc} coding, T={config.time_steps})", "test_acc": float(stats["accuracy"]),
                     "input spikes/inference": layer_spikes[0], "hidden spikes/inference": sum(layer_spikes[1:]),
                     "synaptic ops": acs, "op kind": "AC",
                     "energy est. (nJ)": (acs * ADD_PJ + leak * MUL_PJ) / 1e3})
        if raster is None:
            first = jax.tree.map(lambda v: v[0], params)
            _, aux = snn.apply({"params": first}, spikes[:1])
            raster = (enc, np.asarray(spikes[0]), np.asarray(aux["spikes"][0][0]), np.asarray(aux["readout"][0]),
                      int(y_test[0]))
    ann = MLP(features=(*config.hidden, 10))
    ann_params, curve = make_train(ann, config, data, None)(rngs)
    curves["ANN (rates)"] = np.asarray(curve)
    ann_acc = jax.vmap(lambda p: jnp.mean(jnp.argmax(ann.apply({"params": p}, x_test.reshape(len(x_test), -1)), -1)
                                          == y_test))(ann_params)
    macs = float(sum(synapses))
    rows.append({"model": "rate-matched ANN (same MLP on intensities)", "test_acc": float(np.mean(ann_acc)),
                 "input spikes/inference": float("nan"), "hidden spikes/inference": float("nan"),
                 "synaptic ops": macs, "op kind": "MAC", "energy est. (nJ)": macs * MAC_PJ / 1e3})
    summary = {"rows": rows, "ann_accuracy": float(np.mean(ann_acc)),
               **{f"{enc}_accuracy": r["test_acc"] for enc, r in zip(config.encodings, rows)},
               **{f"{enc}_spikes_per_inference": r["input spikes/inference"] + r["hidden spikes/inference"]
                  for enc, r in zip(config.encodings, rows)}}
    studies.write_results(workdir, summary, {
        f"LIF network 64-{'-'.join(map(str, config.hidden))}-10 (beta {config.beta}) by BPTT with a surrogate "
        f"gradient vs the same MLP; {config.steps} steps, {config.num_seeds} seeds; energy: 45 nm estimates": rows,
    }, config)
    plot(raster, curves, config, workdir)
    return summary


def plot(raster, curves: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    enc, inputs, hidden, readout, label = raster
    fig, axes = studies.new_figure(1, 4, (3.4, 3.0))
    t_in, i_in = np.nonzero(inputs)
    axes[0, 0].scatter(t_in, i_in, s=2, marker="|", color="k")
    axes[0, 0].set(title=f"input spikes ({enc} coding, digit {label})", xlabel="time step", ylabel="pixel")
    t_h, i_h = np.nonzero(hidden)
    axes[0, 1].scatter(t_h, i_h, s=2, marker="|", color="C3")
    axes[0, 1].set(title=f"hidden LIF spikes ({len(t_h)} in all)", xlabel="time step", ylabel="neuron")
    for c in range(readout.shape[1]):
        axes[0, 2].plot(readout[:, c], lw=2.0 if c == label else 0.7, label=str(c) if c == label else None)
    axes[0, 2].set(title="readout potentials (thick: true class)", xlabel="time step")
    for name, curve in curves.items():
        axes[0, 3].plot(curve.mean(0), lw=0.8, label=name)
    axes[0, 3].set(title="training loss", xlabel="step", yscale="log")
    axes[0, 3].legend(fontsize=6, loc="lower left")
    inset = axes[0, 3].inset_axes([0.55, 0.55, 0.4, 0.35])
    v = np.linspace(-1, 1, 201)
    inset.plot(v, (v > 0).astype(float), "k", lw=0.8)
    inset.plot(v, np.asarray(surrogate_gradient(jnp.asarray(v), config.slope)), "C1", lw=0.8)
    inset.set_title("H(v) and surrogate dH/dv", fontsize=5)
    inset.tick_params(labelsize=4)
    for ax in axes[0]:
        ax.title.set_fontsize(7)
    studies.save_figure(fig, workdir, "raster.png")
