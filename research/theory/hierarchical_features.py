"""Hierarchical features: what each layer of a digits CNN represents, probed linearly and visualised.

A CNN (conv 16 -> pool -> conv 32 -> pool -> dense 64 -> 10) is trained on the 8x8 digits. Then:
  (a) its first-layer 3x3 filters are drawn as an image grid (edge and stroke detectors);
  (b) a linear probe (scikit-learn logistic regression, standardised features) is fitted on each
      layer's activations of the training images and scored on the test images: accuracy vs depth,
      for the trained net and, as the control that separates learning from architecture, for the
      same net at its random initialisation;
  (c) each unit's preferred input is found by gradient ascent on the image (start: the mean digit, an
      L2 penalty, pixels clipped to [0, 1]; a conv unit is the channel at the centre of its map) and
      shown next to the mean of the 8 training images that excite it most: the receptive field grows
      with depth, from a local stroke (conv1) to the whole digit (dense, logits);
  (d) learnt vs hand-made features at equal training data: the CNN, logistic regression on raw
      pixels and on HOG descriptors (scikit-image's `hog` if installed, else the numpy version here:
      9 unsigned orientation bins per 2x2-pixel cell, normalised over the image), each trained on
      the same n labelled images.

Example:
    depthlab run theory/hierarchical_features --workdir runs/hf --config.steps=2000
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

LAYERS = ("pixels", "conv1", "conv2", "dense", "logits")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: one CNN per training size (100 and all 1,437 digits), 2 seeds, 800 Adam steps; probes on all layers."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 2
    config.channels = (16, 32)
    config.dense = 64
    config.steps = 800
    config.batch_size = 64
    config.optim = studies.optim_config("adam", 3e-3, schedule="cosine")
    config.train_sizes = (100, 1437)  # for the learnt vs hand-made comparison; probes use the largest
    config.probe_C = 1.0
    config.ascent_steps = 200
    config.ascent_lr = 0.1
    config.ascent_l2 = 0.01
    config.units_per_layer = 8
    return with_preset(config, preset, PRESETS)


PRESETS = {
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(num_seeds=1, steps=200, train_sizes=(300,), ascent_steps=30, units_per_layer=4),
}


class ProbedCNN(nn.Module):
    """conv(channels[0]) -> relu -> pool -> conv(channels[1]) -> relu -> pool -> dense -> relu -> logits.

    Call: x [batch, 8, 8, 1] -> logits [batch, 10], or with features=True a dict of every layer's
    activations {"conv1": [b, 4, 4, c0], "conv2": [b, 2, 2, c1], "dense": [b, dense], "logits": [b, 10]}.
    """

    channels: tuple = (16, 32)
    dense: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        out = {}
        for i, ch in enumerate(self.channels):
            x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", name=f"conv{i + 1}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            out[f"conv{i + 1}"] = x
        x = nn.relu(nn.Dense(self.dense, name="dense")(x.reshape((x.shape[0], -1))))
        out["dense"] = x
        out["logits"] = nn.Dense(10, name="logits")(x)
        return out if features else out["logits"]


# ---------------------------------------------------------------------------------------------- hand-made features
def hog_features(images: np.ndarray, cell: int = 2, bins: int = 9) -> np.ndarray:
    """HOG descriptors [n, d] of grey images [n, h, w(, 1)]: scikit-image's `hog` if installed, else numpy.

    The numpy version: central-difference gradients, magnitude-weighted histograms of unsigned
    orientation (0-180 degrees) in `bins` bins per cell x cell block, L2-Hys normalised over the image.
    """
    images = np.asarray(images, np.float32).reshape(len(images), images.shape[1], images.shape[2])
    try:
        from skimage.feature import hog
        return np.stack([hog(img, orientations=bins, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
                         for img in images]).astype(np.float32)
    except ImportError:
        pass
    gy, gx = np.gradient(images, axis=(1, 2))
    mag = np.hypot(gx, gy)
    ang = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    idx = np.minimum((ang / (180.0 / bins)).astype(int), bins - 1)
    n, h, w = images.shape
    hist = np.zeros((n, h // cell, w // cell, bins), np.float32)
    for i in range(h // cell):
        for j in range(w // cell):
            m = mag[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].reshape(n, -1)
            b = idx[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].reshape(n, -1)
            for k in range(bins):
                hist[:, i, j, k] = np.sum(m * (b == k), axis=1)
    flat = hist.reshape(n, -1)
    flat = flat / np.sqrt(np.sum(flat ** 2, 1, keepdims=True) + 1e-6)
    flat = np.minimum(flat, 0.2)  # L2-Hys: clip, renormalise
    return flat / np.sqrt(np.sum(flat ** 2, 1, keepdims=True) + 1e-6)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   C: float = 1.0) -> float:
    """Test accuracy of a standardised logistic-regression probe fitted on (train_x [n, ...], train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
    probe.fit(train_x.reshape(len(train_x), -1), train_y)
    return float(probe.score(test_x.reshape(len(test_x), -1), test_y))


# ---------------------------------------------------------------------------------------------- visualisation
def layer_features(model, params, x: np.ndarray) -> dict:
    feats = model.apply({"params": params}, jnp.asarray(x), features=True)
    return {"pixels": np.asarray(x).reshape(len(x), -1), **{k: np.asarray(v) for k, v in feats.items()}}


def unit_activation(feats: dict, layer: str, unit: int) -> jax.Array:
    """The unit's activation per image [b]; a conv unit is one channel at the centre of its map, so it sees only
    its receptive field (conv1: 4x4 pixels, conv2: 8x8 through the pools; dense units see everything)."""
    a = feats[layer]
    return a[:, a.shape[1] // 2, a.shape[2] // 2, unit] if a.ndim == 4 else a[:, unit]


def preferred_inputs(model, params, layer: str, units: np.ndarray, config: ml_collections.ConfigDict,
                     start: np.ndarray) -> np.ndarray:
    """Gradient ascent on the image for each unit from `start` [8, 8] (the mean digit, where ReLU units are
    alive): [units, 8, 8] maximising activation - l2 |x - start|^2, pixels in [0, 1]."""

    def objective(x, unit):
        feats = model.apply({"params": params}, x[None, :, :, None], features=True)
        return unit_activation(feats, layer, unit)[0] - config.ascent_l2 * jnp.sum((x - start) ** 2)

    def ascend(unit):
        def step(x, _):
            g = jax.grad(objective)(x, unit)
            g = g / (jnp.linalg.norm(g) + 1e-8)  # normalised steps: the same budget for every unit
            return jnp.clip(x + config.ascent_lr * g, 0.0, 1.0), None
        return jax.lax.scan(step, start, None, length=config.ascent_steps)[0]

    return np.asarray(jax.jit(jax.vmap(ascend))(jnp.asarray(units)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the CNN per training size; probes every layer; hand-made baselines; filter and preference plots."""
    data = studies.load_digits()
    n_all = len(data["y_train"])
    for n in studies.progress(config.train_sizes, "hierarchical_features"):
        if not 10 <= n <= n_all:
            raise ValueError(f"train size {n} outside 10..{n_all} (the digits training split); lower it")
    model = ProbedCNN(channels=tuple(config.channels), dense=config.dense)
    order = np.random.default_rng(config.seed).permutation(n_all)
    rngs = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    compare, trained = [], {}
    for n in config.train_sizes:
        idx = order[:n]
        x_n, y_n = data["x_train"][idx], data["y_train"][idx]
        train = studies.make_classifier_trainer(model, x_n, y_n, config.optim, config.steps, config.batch_size)
        states, _ = jax.jit(jax.vmap(train))(rngs)
        accs = np.asarray(jax.vmap(lambda s: studies.classifier_accuracy(model, s, data["x_test"], data["y_test"]))(states))
        trained[n] = (states, idx)
        compare.append({"train images": n, "CNN (learnt features)": float(accs.mean()),
                        "LR on raw pixels": probe_accuracy(x_n, y_n, data["x_test"], data["y_test"], config.probe_C),
                        "LR on HOG": probe_accuracy(hog_features(x_n), y_n, hog_features(data["x_test"]),
                                                    data["y_test"], config.probe_C)})
    n_probe = max(config.train_sizes)
    states, idx = trained[n_probe]
    params = jax.tree.map(lambda v: v[0], states.params)
    random_params = model.init(jax.random.key(config.seed + 1), data["x_train"][:2])["params"]
    x_tr, y_tr = data["x_train"][idx], data["y_train"][idx]
    probes = []
    f_tr, f_te = layer_features(model, params, x_tr), layer_features(model, params, data["x_test"])
    r_tr, r_te = layer_features(model, random_params, x_tr), layer_features(model, random_params, data["x_test"])
    for depth, layer in enumerate(LAYERS):
        probes.append({"depth": depth, "layer": layer, "dims": int(np.prod(f_tr[layer].shape[1:])),
                       "probe acc (trained net)": probe_accuracy(f_tr[layer], y_tr, f_te[layer], data["y_test"],
                                                                 config.probe_C),
                       "probe acc (random net)": probe_accuracy(r_tr[layer], y_tr, r_te[layer], data["y_test"],
                                                                config.probe_C)})
    k = config.units_per_layer
    prefs, tops = {}, {}
    start = jnp.asarray(x_tr[..., 0].mean(0))
    for layer in LAYERS[1:]:
        width = f_tr[layer].shape[-1]
        acts = np.stack([np.asarray(unit_activation(f_tr, layer, u)) for u in range(width)])  # [width, n]
        # the classes in order; otherwise the k units whose activation varies most over the data (not dead)
        units = np.arange(min(k, width)) if layer == "logits" else np.sort(np.argsort(-acts.std(1))[:k])
        prefs[layer] = (units, preferred_inputs(model, params, layer, units, config, start))
        acts = acts[units]
        tops[layer] = np.stack([x_tr[np.argsort(-a)[:8], :, :, 0].mean(0) for a in acts])
    summary = {"probes": probes, "learnt_vs_hand": compare,
               "probe_acc_by_layer": {p["layer"]: p["probe acc (trained net)"] for p in probes},
               "probe_acc_random_by_layer": {p["layer"]: p["probe acc (random net)"] for p in probes},
               # headline scalars (the CLI's result line)
               "pixels_probe_acc": probes[0]["probe acc (trained net)"],
               "best_probe_layer": max(probes, key=lambda p: p["probe acc (trained net)"])["layer"],
               "best_probe_acc": max(p["probe acc (trained net)"] for p in probes),
               "cnn_acc": compare[-1]["CNN (learnt features)"], "hog_acc": compare[-1]["LR on HOG"]}
    studies.write_results(workdir, summary, {
        f"linear probes (logistic regression) on each layer, {n_probe} training digits, test accuracy": probes,
        f"learnt vs hand-made features at equal training data (CNN: mean of {config.num_seeds} seeds)": compare,
    }, config)
    plot_filters(params, workdir)
    plot_preferences(prefs, tops, probes, workdir)
    return summary


def plot_filters(params: dict, workdir: str) -> None:
    kernels = np.asarray(params["conv1"]["kernel"])[:, :, 0, :]  # [3, 3, channels]
    c = kernels.shape[-1]
    cols = min(8, c)
    rows = -(-c // cols)
    fig, axes = studies.new_figure(rows, cols, (1.0, 1.0))
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < c:
            lim = np.abs(kernels[..., i]).max()
            ax.imshow(kernels[..., i], cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(str(i), fontsize=6)
    fig.suptitle("first-layer 3x3 filters (red +, blue -)", fontsize=8)
    studies.save_figure(fig, workdir, "filters.png")


def plot_preferences(prefs: dict, tops: dict, probes: list[dict], workdir: str) -> None:
    layers = list(prefs)
    k = max(len(u) for u, _ in prefs.values())
    fig, axes = studies.new_figure(2 * len(layers), k, (0.9, 0.9))
    for r, layer in enumerate(layers):
        units, images = prefs[layer]
        for c in range(k):
            for row, source in ((2 * r, images), (2 * r + 1, tops[layer])):
                ax = axes[row, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(units):
                    ax.imshow(source[c], cmap="gray", vmin=0, vmax=1 if row == 2 * r else None)
                else:
                    ax.axis("off")
            if c < len(units):
                axes[2 * r, c].set_title(f"{layer}[{units[c]}]", fontsize=5)
        axes[2 * r, 0].set_ylabel("ascent", fontsize=5)
        axes[2 * r + 1, 0].set_ylabel("top-8 mean", fontsize=5)
    studies.save_figure(fig, workdir, "preferred_inputs.png")
    fig, axes = studies.new_figure(1, 1, (4.2, 3.2))
    ax = axes[0, 0]
    depth = [p["depth"] for p in probes]
    ax.plot(depth, [p["probe acc (trained net)"] for p in probes], "o-", label="trained CNN")
    ax.plot(depth, [p["probe acc (random net)"] for p in probes], "s--", label="random init")
    ax.set_xticks(depth)
    ax.set_xticklabels([p["layer"] for p in probes])
    ax.set_ylabel("linear probe test accuracy")
    ax.set_title("linear separability vs depth", fontsize=9)
    ax.legend(fontsize=7)
    studies.save_figure(fig, workdir, "probes.png")
