"""Data requirements: learning curves (test error vs labelled examples) and two ways to need fewer labels.

On the 8x8 digits, training-set sizes from 10 to all 1,437 images (over two orders of magnitude),
several seeds each (a different random subset per seed):
  - an MLP (64-128-128-10) and a CNN (conv 16, conv 32, dense 64), trained for the same number of
    Adam steps at every size; every (size, seed) pair is one member of a single compiled program
    (the size is a traced bound on the minibatch indices; `jax.vmap` for the MLP, `lax.map` for the CNN);
  - a classical baseline: an RBF support-vector machine (scikit-learn);
  - the CNN with augmentation (random shifts of up to 1 pixel): the same labels, more variety;
  - self-supervised pre-training: SimCLR's contrastive loss (NT-Xent; two augmented views of each
    image must pick each other out of the batch) trains the CNN's body on all training images with
    their labels hidden; a logistic-regression probe on its features is then fitted on the n
    labelled ones.
The log-log slope of error vs n (least squares over the sizes) summarises each curve: the power-law
exponent of the learning curve (Hestness et al. 2017). Plot: learning_curves.png.

Example:
    depthlab run theory/data_requirements --workdir runs/data --config.num_seeds=5
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.models import CNN, MLP
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

METHODS = ("mlp", "cnn", "svm", "cnn_augmented", "simclr_probe")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: 6 sizes 10..1437, 2 seeds, 5 methods; 300 Adam steps per net, 500 SimCLR steps."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_seeds = 2
    config.sizes = (10, 30, 100, 300, 1000, 1437)
    config.methods = METHODS
    config.steps = 300
    config.cnn_channels = (16, 32)  # the CNN, and SimCLR's encoder body
    config.cnn_dense = 64
    config.batch_size = 64
    config.optim = studies.optim_config("adam", 2e-3, schedule="cosine")
    config.max_shift = 1
    config.ssl_steps = 500
    config.ssl_batch = 128
    config.ssl_temperature = 0.2
    config.ssl_noise = 0.1  # Gaussian pixel noise of the views (digits are in [0, 1])
    config.ssl_erase = 3  # side of the square zeroed at a random place in each view
    config.probe_C = 1.0
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.num_seeds = 10
    c.steps = 2000
    c.ssl_steps = 5000


def _converged(c: ml_collections.ConfigDict) -> None:
    """1,500 steps per net and of SimCLR: the nets train to convergence (7.4 min on 2 shared cores)."""
    c.steps = 1500
    c.ssl_steps = 1500


PRESETS = {
    "long": _long,
    "converged": _converged,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(num_seeds=1, sizes=(20, 200), steps=100, ssl_steps=60, ssl_batch=64,
                          methods=("mlp", "svm", "simclr_probe")),
}


def make_net(method: str, config: ml_collections.ConfigDict):
    if method == "mlp":
        return MLP(features=(128, 128, 10))
    return CNN(channels=tuple(config.cnn_channels), dense=(config.cnn_dense,), num_classes=10)


def make_curve_trainer(model, config: ml_collections.ConfigDict, data: dict, augment: bool, vectorise: bool = True):
    """Jitted train(sizes [K], seeds [S]) -> test error [K, S]: each member sees only its first n of a
    seed-specific permutation of the training set.

    vectorise=True runs all K x S members at once (`jax.vmap`); False runs them one after another
    (`lax.map`) in the same compiled program: vmapping a convolution over parameter sets turns it into
    a grouped convolution, which XLA:CPU ran ~20% slower here than the members one by one.
    """
    x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    tx = studies.make_tx(config.optim, config.steps)

    def train(n, seed):
        rng = jax.random.key(seed)
        perm_rng, init_rng, data_rng = jax.random.split(rng, 3)
        perm = jax.random.permutation(perm_rng, len(y))  # the labelled subset is perm[:n]
        params = model.init(init_rng, x[:2], train=False)["params"]

        def step(carry, t):
            params, opt_state = carry
            k_idx, k_aug = jax.random.split(jax.random.fold_in(data_rng, t))
            idx = perm[jax.random.randint(k_idx, (config.batch_size,), 0, n)]
            xb = studies.random_shift_images(k_aug, x[idx], config.max_shift) if augment else x[idx]
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, xb, train=True), y[idx]).mean())(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(config.steps))
        return 1.0 - jnp.mean(jnp.argmax(model.apply({"params": params}, x_test, train=False), -1) == y_test)

    if vectorise:
        return jax.jit(jax.vmap(jax.vmap(train, (None, 0)), (0, None)))

    @jax.jit
    def sequential(sizes, seeds):
        n, s = jnp.meshgrid(sizes, seeds, indexing="ij")
        return jax.lax.map(lambda pair: train(*pair), (n.ravel(), s.ravel())).reshape(n.shape)

    return sequential


def subset(n: int, seed: int, num_train: int) -> np.ndarray:
    """The same labelled subset perm[:n] the jitted trainer uses for (n, seed)."""
    return np.asarray(jax.random.permutation(jax.random.split(jax.random.key(seed), 3)[0], num_train))[:n]


# ---------------------------------------------------------------------------------------------- self-supervised
class Encoder(nn.Module):
    """The CNN's body (convs `channels`, dense `dense`) plus SimCLR's projection head (dense -> dense -> 64).

    Call: x [b, 8, 8, 1] -> (features [b, dense], projections [b, 64]).
    """

    channels: tuple = (16, 32)
    dense: int = 64

    @nn.compact
    def __call__(self, x):
        for ch in self.channels:
            x = nn.max_pool(nn.relu(nn.Conv(ch, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2), padding="SAME")
        h = nn.relu(nn.Dense(self.dense)(x.reshape((x.shape[0], -1))))
        return h, nn.Dense(64)(nn.relu(nn.Dense(self.dense)(h)))


def augment_view(rng: jax.Array, x: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """A random view of images [b, 8, 8, 1]: shift, random erasing of a square, contrast jitter, pixel noise."""
    k_shift, k_pos, k_scale, k_noise = jax.random.split(rng, 4)
    x = studies.random_shift_images(k_shift, x, config.max_shift)
    b, h, w, _ = x.shape
    e = config.ssl_erase
    corner = jax.random.randint(k_pos, (b, 2), 0, h - e + 1)
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((rows >= corner[:, 0, None, None]) & (rows < corner[:, 0, None, None] + e) &
              (cols >= corner[:, 1, None, None]) & (cols < corner[:, 1, None, None] + e))
    x = jnp.where(inside[..., None], 0.0, x)
    x = x * jax.random.uniform(k_scale, (b, 1, 1, 1), minval=0.6, maxval=1.0)
    return x + config.ssl_noise * jax.random.normal(k_noise, x.shape)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
    """SimCLR's loss: for each of the 2b views, cross-entropy of finding its partner among the other 2b - 1."""
    z = jnp.concatenate([z1, z2])
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ z.T / temperature
    b = z1.shape[0]
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -1e9, logits)
    partner = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
    return optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()


def pretrain_simclr(config: ml_collections.ConfigDict, images: np.ndarray, rng: jax.Array):
    """Contrastive pre-training on `images` (no labels); returns (encoder, params, loss curve [ssl_steps])."""
    encoder = Encoder(channels=tuple(config.cnn_channels), dense=config.cnn_dense)
    x = jnp.asarray(images)
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, config.ssl_steps))

    @jax.jit
    def train(rng):
        init_rng, data_rng = jax.random.split(rng)
        params = encoder.init(init_rng, x[:2])["params"]

        def step(carry, t):
            params, opt_state = carry
            k_idx, k1, k2 = jax.random.split(jax.random.fold_in(data_rng, t), 3)
            xb = x[jax.random.choice(k_idx, len(x), (config.ssl_batch,), replace=False)]

            def loss(p):
                _, z1 = encoder.apply({"params": p}, augment_view(k1, xb, config))
                _, z2 = encoder.apply({"params": p}, augment_view(k2, xb, config))
                return nt_xent(z1, z2, config.ssl_temperature)

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(config.ssl_steps))
        return params, curve

    params, curve = train(rng)
    return encoder, params, np.asarray(curve)


def _probe(train_x, train_y, test_x, test_y, C: float) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:  # a tiny subset may hold one class: predict it
        return float(np.mean(test_y == train_y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
    return float(probe.fit(train_x, train_y).score(test_x, test_y))


def _svm(train_x, train_y, test_x, test_y) -> float:
    from sklearn.svm import SVC

    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    return float(SVC(C=10.0, gamma="scale").fit(train_x, train_y).score(test_x, test_y))


def loglog_slope(sizes: np.ndarray, errors: np.ndarray) -> float:
    """Least-squares slope of log(error) vs log(n) (errors floored at 1e-3, one test mistake in ~360)."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(errors, 1e-3)), 1)[0])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Learning curves of every method; slopes; labels needed to reach the supervised CNN's accuracy; plot."""
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)}")
    data = studies.load_digits()
    n_all = len(data["y_train"])
    for n in studies.progress(config.sizes, "data_requirements"):
        if not 2 <= n <= n_all:
            raise ValueError(f"size {n} outside 2..{n_all} (the digits training split); lower it")
    sizes = np.asarray(config.sizes)
    seeds = np.arange(config.num_seeds) + 1000 * config.seed
    flat = lambda a: a.reshape(len(a), -1)
    errors, ssl_curve = {}, None
    for method in config.methods:
        if method in ("mlp", "cnn", "cnn_augmented"):
            trainer = make_curve_trainer(make_net(method, config), config, data, augment=method == "cnn_augmented",
                                         vectorise=method == "mlp")
            errors[method] = np.asarray(trainer(jnp.asarray(sizes), jnp.asarray(seeds)))
        elif method == "svm":
            errors[method] = np.asarray([[1 - _svm(flat(data["x_train"][subset(n, s, n_all)]),
                                                   data["y_train"][subset(n, s, n_all)], flat(data["x_test"]),
                                                   data["y_test"]) for s in seeds] for n in sizes])
        else:  # simclr_probe: pre-train once on all training images (labels unused), probe with n labels
            encoder, params, ssl_curve = pretrain_simclr(config, data["x_train"], jax.random.key(config.seed))
            feats = jax.jit(lambda x: encoder.apply({"params": params}, x)[0])
            f_train, f_test = np.asarray(feats(jnp.asarray(data["x_train"]))), np.asarray(feats(jnp.asarray(data["x_test"])))
            errors[method] = np.asarray([[1 - _probe(f_train[subset(n, s, n_all)], data["y_train"][subset(n, s, n_all)],
                                                     f_test, data["y_test"], config.probe_C) for s in seeds]
                                         for n in sizes])
    rows = []
    for method, err in errors.items():
        rows.append({"method": method, **{f"n={n}": float(e) for n, e in zip(sizes, err.mean(1))},
                     "slope": loglog_slope(sizes, err.mean(1))})
    summary = {"rows": rows, "sizes": sizes.tolist(),
               "errors": {m: e.mean(1).tolist() for m, e in errors.items()},
               "errors_std": {m: e.std(1).tolist() for m, e in errors.items()},
               "slopes": {r["method"]: r["slope"] for r in rows},
               # headline scalars (the CLI's result line): each method's slope and error at the smallest size
               **{f"{r['method']}_slope": r["slope"] for r in rows},
               **{f"{m}_error_at_{sizes[0]}": float(e.mean(1)[0]) for m, e in errors.items()}}
    studies.write_results(workdir, summary, {
        f"test error (mean of {config.num_seeds} seeds) vs labelled training images; slope of log error vs log n": rows,
    }, config)
    plot(sizes, errors, ssl_curve, workdir)
    return summary


def plot(sizes: np.ndarray, errors: dict, ssl_curve, workdir: str) -> None:
    fig, axes = studies.new_figure(1, 2 if ssl_curve is not None else 1, (4.6, 3.6))
    ax = axes[0, 0]
    for method, err in errors.items():
        mean, std = err.mean(1), err.std(1)
        line, = ax.loglog(sizes, np.maximum(mean, 1e-3), "o-", ms=3, label=method)
        ax.fill_between(sizes, np.maximum(mean - std, 1e-3), mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test error")
    ax.set_title("digits learning curves (mean +- std over seeds)", fontsize=8)
    ax.legend(fontsize=6)
    if ssl_curve is not None:
        axes[0, 1].plot(ssl_curve, lw=0.8)
        axes[0, 1].set(xlabel="step", ylabel="NT-Xent loss", title="SimCLR pre-training (no labels)")
        axes[0, 1].title.set_fontsize(8)
    studies.save_figure(fig, workdir, "learning_curves.png")
