"""Attribution methods on the digits CNN: saliency, SmoothGrad, integrated gradients, completeness and deletion curves.

For a class score f_c(x) (the logit of the predicted class):
- saliency (Simonyan et al. 2013): |df_c/dx|, the local sensitivity of the score to each pixel;
- SmoothGrad (Smilkov et al. 2017): |E_eps[df_c/dx (x + eps)]|, eps ~ N(0, sigma^2): averages away
  the gradient's pixel-to-pixel noise;
- integrated gradients (Sundararajan et al. 2017): IG_i = (x_i - x'_i) * int_0^1 df_c/dx_i(x' + a(x - x')) da
  with a black baseline x' = 0, computed with the trapezoid rule on `ig_steps` points. IG satisfies
  completeness: sum_i IG_i = f_c(x) - f_c(x'); we check it holds within `ig_tolerance` (relative).
- deletion curve (Petsiuk et al. 2018): remove pixels (set to the baseline 0) in order of decreasing
  attribution and track the probability of the original class; a faithful attribution makes it
  fall fast (low area under the curve). A random order is the reference.

The CNN (depthlab.models.CNN) is trained with the engine's `make_train_step` inside one `lax.scan`.

Example:
    depthlab run theory/interpretability --workdir runs/attr --config.ig_steps=256
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.models import CNN
from depthlab.research.experiment import smoke_preset, with_preset
from depthlab.research.theory import studies

METHODS = ("saliency", "smoothgrad", "integrated_gradients", "random")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Default: CNN trained 600 steps on digits, attributions for 100 test digits."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.channels = (16, 32)
    config.dense = (64,)
    config.steps = 600
    config.batch_size = 128
    config.optim = studies.optim_config("adam", 3e-3, schedule="cosine")
    config.num_explain = 100  # test images to attribute
    config.ig_steps = 128
    config.ig_tolerance = 0.01  # completeness: |sum IG - (f(x) - f(x'))| <= tol * |f(x) - f(x')|
    config.smoothgrad_samples = 32
    config.smoothgrad_sigma = 0.15  # inputs lie in [0, 1]
    config.deletion_points = 17  # fractions 0, 1/16, ..., 1 of the 64 pixels removed
    return with_preset(config, preset, PRESETS)


def _long(c: ml_collections.ConfigDict) -> None:
    c.steps = 3000
    c.num_explain = 360
    c.ig_steps = 512


PRESETS = {
    "long": _long,
    # the tests' and the notebook's CPU setting
    "smoke": smoke_preset(steps=100, num_explain=4, ig_steps=32, smoothgrad_samples=4, deletion_points=5,
                          ig_tolerance=0.05),
}


def make_score(model: CNN, variables: dict):
    """score(x [8, 8, 1], c) -> logit of class c for one image."""
    return lambda x, c: model.apply(variables, x[None], train=False)[0, c]


def saliency(score, x: jax.Array, c: jax.Array) -> jax.Array:
    """|d score / dx| -> [8, 8, 1]."""
    return jnp.abs(jax.grad(score)(x, c))


def smoothgrad(score, x: jax.Array, c: jax.Array, rng: jax.Array, samples: int, sigma: float) -> jax.Array:
    """|mean of gradients at noisy copies of x| -> [8, 8, 1]."""
    noise = sigma * jax.random.normal(rng, (samples, *x.shape))
    grads = jax.vmap(lambda n: jax.grad(score)(x + n, c))(noise)
    return jnp.abs(grads.mean(0))


def integrated_gradients(score, x: jax.Array, c: jax.Array, baseline: jax.Array, steps: int) -> jax.Array:
    """(x - x') * trapezoid-rule average of the gradient on the straight path x' -> x -> [8, 8, 1]."""
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    grads = jax.vmap(lambda a: jax.grad(score)(baseline + a * (x - baseline), c))(alphas)
    weights = jnp.full(steps + 1, 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)
    return (x - baseline) * jnp.tensordot(weights, grads, 1)


def deletion_curve(model: CNN, variables: dict, x: jax.Array, c: jax.Array, attribution: jax.Array,
                          points: int) -> jax.Array:
    """Probability of class c after deleting the top-k attributed pixels, k on `points` fractions -> [points]."""
    order = jnp.argsort(-attribution.ravel())  # most important first
    ranks = jnp.zeros(x.size, jnp.int32).at[order].set(jnp.arange(x.size))
    ks = jnp.round(jnp.linspace(0, x.size, points)).astype(jnp.int32)
    masked = jax.vmap(lambda k: jnp.where((ranks < k).reshape(x.shape), 0.0, x))(ks)
    probs = jax.nn.softmax(model.apply(variables, masked, train=False), -1)
    return probs[:, c]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the CNN, attributes `num_explain` test digits by every method, writes table and plots."""
    data = studies.load_digits()
    model = CNN(channels=tuple(config.channels), dense=tuple(config.dense), num_classes=10)
    train = studies.make_classifier_trainer(model, data["x_train"], data["y_train"], config.optim,
                                            config.steps, config.batch_size)
    state, _ = jax.jit(train)(jax.random.key(config.seed))
    test_acc = float(studies.classifier_accuracy(model, state, data["x_test"], data["y_test"]))
    variables = {"params": state.params, **state.model_state}
    score = make_score(model, variables)

    x = jnp.asarray(data["x_test"][: config.num_explain])
    classes = jnp.argmax(model.apply(variables, x, train=False), -1)  # explain the predicted class
    baseline = jnp.zeros_like(x[0])
    rng = jax.random.key(config.seed + 1)
    keys = jax.random.split(rng, len(x))

    @jax.jit
    def attribute(x, c, key):
        k_sg, k_rand = jax.random.split(key)
        maps = {
            "saliency": saliency(score, x, c),
            "smoothgrad": smoothgrad(score, x, c, k_sg, config.smoothgrad_samples, config.smoothgrad_sigma),
            "integrated_gradients": integrated_gradients(score, x, c, baseline, config.ig_steps),
            "random": jax.random.uniform(k_rand, x.shape),
        }
        curves = {m: deletion_curve(model, variables, x, c, a, config.deletion_points) for m, a in maps.items()}
        gap = score(x, c) - score(baseline, c)
        return maps, curves, gap

    maps, curves, gap = jax.vmap(attribute)(x, classes, keys)
    ig_sum = maps["integrated_gradients"].reshape(len(x), -1).sum(-1)
    rel_error = np.asarray(jnp.abs(ig_sum - gap) / jnp.maximum(jnp.abs(gap), 1e-6))
    rows = []
    for method in studies.progress(METHODS, "interpretability"):
        curve = np.asarray(curves[method]).mean(0)
        rows.append({"method": method, "deletion AUC (lower = better)": float(curve.mean()),
                     "p(class) after 10% deleted": float(np.interp(0.1, np.linspace(0, 1, len(curve)), curve)),
                     "p(class) after 25% deleted": float(np.interp(0.25, np.linspace(0, 1, len(curve)), curve))})
    completeness = [{"images": len(x), "ig_steps": config.ig_steps, "median abs(f(x) - f(x'))": float(np.median(np.abs(gap))),
                     "max relative error": float(rel_error.max()), "median relative error": float(np.median(rel_error)),
                     "tolerance": config.ig_tolerance, "holds": bool(rel_error.max() <= config.ig_tolerance)}]
    summary = {"test_accuracy": test_acc, "ig_max_relative_error": float(rel_error.max()),
               "ig_completeness_holds": bool(rel_error.max() <= config.ig_tolerance),
               **{f"deletion_auc_{r['method']}": r["deletion AUC (lower = better)"] for r in rows}}
    studies.write_results(workdir, summary, {
        f"deletion curves on {len(x)} test digits (CNN test accuracy {test_acc:.3f})": rows,
        "integrated gradients completeness: sum IG vs f(x) - f(baseline)": completeness,
    }, config)
    plot(np.asarray(x), {m: np.asarray(v) for m, v in maps.items()},
         {m: np.asarray(v).mean(0) for m, v in curves.items()}, np.asarray(classes), workdir)
    return summary


def plot(x: np.ndarray, maps: dict, curves: dict, classes: np.ndarray, workdir: str) -> None:
    shown = min(6, len(x))
    methods = ["saliency", "smoothgrad", "integrated_gradients"]
    fig, axes = studies.new_figure(shown, 1 + len(methods), (1.9, 1.9))
    for i in range(shown):
        axes[i, 0].imshow(x[i, ..., 0], cmap="gray")
        axes[i, 0].set_title(f"input (pred {classes[i]})", fontsize=7)
        for j, m in enumerate(methods):
            a = maps[m][i, ..., 0]
            lim = np.abs(a).max() + 1e-12
            axes[i, j + 1].imshow(a, cmap="bwr", vmin=-lim, vmax=lim)
            axes[i, j + 1].set_title(m.replace("integrated_gradients", "IG"), fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    studies.save_figure(fig, workdir, "attributions.png")
    fig, axes = studies.new_figure(1, 1, (4.5, 3.4))
    for m, curve in curves.items():
        axes[0, 0].plot(np.linspace(0, 1, len(curve)), curve, "o-", ms=3, label=m)
    axes[0, 0].set_xlabel("fraction of pixels deleted (most attributed first)")
    axes[0, 0].set_ylabel("p(original class)")
    axes[0, 0].legend(fontsize=7)
    studies.save_figure(fig, workdir, "deletion_curves.png")
