"""VAE training pieces shared by vae_mnist and vae_digits: init, train/eval steps, likelihood estimate.

The step draws its reparameterisation noise from a key folded from (state.rng, state.step), so a
run is reproducible and resumes exactly. With `dynamic_binarize`, each step also re-samples binary
pixels ~ Bernoulli(intensity): a fresh binarisation per step regularises a small training set.

Example:
    >>> state = create_vae_state(key, model, tx)
    >>> state, metrics = jax.jit(make_vae_train_step(model))(state, {"inputs": images})
    >>> metrics["nelbo"]    # negative ELBO in nats per image
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from depthlab.research.generative.losses import importance_weighted_log_likelihood, negative_elbo
from depthlab.train import losses
from depthlab.train.state import TrainState

EVAL_KEY_SEED = 1_234_567  # fixed noise for evaluation: eval metrics are a function of params only


def create_vae_state(rng: jax.Array, model, tx: optax.GradientTransformation, ema_decay: float = 0.0) -> TrainState:
    """A TrainState for `model` (an MLPVAE/ConvVAE) initialised on a dummy batch."""
    init_key, noise_key, state_key = jax.random.split(rng, 3)
    variables = model.init(init_key, jnp.zeros((1, *model.image_shape)), noise_key)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, rng=state_key,
                             ema_decay=ema_decay)


def make_vae_train_step(model, dynamic_binarize: bool = False, dequantize_levels: int = 0) -> Callable:
    """Pure `train_step(state, batch) -> (state, metrics)` minimising the mean negative ELBO.

    dynamic_binarize: pixels ~ Bernoulli(intensity), fresh every step.
    dequantize_levels: for grey levels v/(L-1), trains on (v + u) / L with fresh u ~ U[0, 1) (L = levels).
    """

    def train_step(state: TrainState, batch: dict):
        x = batch["inputs"]
        bin_key, noise_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        if dynamic_binarize:
            x = jax.random.bernoulli(bin_key, x).astype(jnp.float32)
        if dequantize_levels:
            v = jnp.round(x * (dequantize_levels - 1))
            x = (v + jax.random.uniform(bin_key, x.shape)) / dequantize_levels

        def loss_fn(params):
            out = model.apply({"params": params}, x, noise_key, train=True)
            nelbo, recon, kl = negative_elbo(out, x, model.likelihood)
            return jnp.mean(nelbo), {"nelbo": jnp.mean(nelbo), "recon": jnp.mean(recon), "kl": jnp.mean(kl)}

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return train_step


def make_vae_eval_step(model) -> Callable:
    """Pure `eval_step(state, batch) -> metrics`: masked means of nelbo, recon, kl (fixed noise)."""

    def eval_step(state: TrainState, batch: dict) -> dict:
        x = batch["inputs"]
        out = model.apply({"params": state.eval_params()}, x, jax.random.key(EVAL_KEY_SEED))
        nelbo, recon, kl = negative_elbo(out, x, model.likelihood)
        mask = batch.get("mask")
        return {"loss": losses.masked_mean(nelbo, mask), "nelbo": losses.masked_mean(nelbo, mask),
                "recon": losses.masked_mean(recon, mask), "kl": losses.masked_mean(kl, mask)}

    return eval_step


def per_image_nelbo(model, params, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Negative ELBO of every image [N] (nats), with the evaluation's fixed noise."""
    fn = jax.jit(lambda x: negative_elbo(model.apply({"params": params}, x, jax.random.key(EVAL_KEY_SEED)), x,
                                         model.likelihood)[0])
    return np.concatenate([np.asarray(fn(jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def iwae_log_likelihood(model, params, images: np.ndarray, key: jax.Array, num_samples: int,
                        batch_size: int = 250) -> np.ndarray:
    """Importance-weighted estimate of log p(x) for every image, [N] (nats), in batches."""
    variables = {"params": params}

    @jax.jit
    def estimate(x, key):
        encode = lambda v: model.apply(variables, v, method=model.encode)
        decode = lambda z: model.apply(variables, z, method=model.decode)
        log_scale = model.apply(variables, x.shape[0], method=model.decoder_log_scale)
        return importance_weighted_log_likelihood(encode, decode, log_scale, x, key, num_samples,
                                                  model.likelihood)

    out = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        x = jnp.asarray(images[start:start + batch_size])
        out.append(np.asarray(estimate(x, jax.random.fold_in(key, i))))
    return np.concatenate(out)


# --- The Experiment shared by vae_mnist and vae_digits ------------------------------------------

def prepare_images(config) -> dict:
    """Train/test images as the config's likelihood needs them (see the vae_* experiment docs).

    data.binarize: "dynamic" (train: grey levels, re-binarised every step; test: one fixed stochastic
    binarisation), "static" (both fixed stochastic binarisations), "threshold" (> 0.5) or "none".
    data.dequantize_levels > 0: test images are uniformly dequantised once with a fixed seed (train
    images are re-dequantised every step).
    """
    from depthlab.research.datasets.images import load_dataset
    from depthlab.research.generative.data import binarize, dequantize

    dataset = load_dataset(config.data.name, seed=int(config.seed))
    train, test = dataset["train"]["inputs"], dataset["test"]["inputs"]
    mode, levels = config.data.binarize, int(config.data.dequantize_levels)
    if mode not in ("dynamic", "static", "threshold", "none"):
        raise ValueError(f"unknown data.binarize {mode!r}; valid: dynamic, static, threshold, none")
    if mode == "static":
        train, test = binarize(train, seed=1), binarize(test, seed=0)
    elif mode == "dynamic":
        test = binarize(test, seed=0)
    elif mode == "threshold":
        train, test = (train > 0.5).astype(np.float32), (test > 0.5).astype(np.float32)
    if levels:
        if mode != "none":
            raise ValueError("data.dequantize_levels needs data.binarize='none' (a Gaussian decoder on grey levels)")
        test = dequantize(test, levels, np.random.default_rng(0))
    return {"train": train, "test": test, "labels_test": dataset["test"]["labels"]}


def vae_experiment(config):
    """depthlab.train.Experiment for a VAE config (model, data, optim, eval sections)."""
    from depthlab.research.experiment import build_model, resolved_optim
    from depthlab.train import Experiment, data, make_optimizer

    images = prepare_images(config)
    model_config = config.model.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.image_shape = tuple(images["train"].shape[1:])
    model = build_model(model_config)
    tx = make_optimizer(resolved_optim(config))
    levels = int(config.data.dequantize_levels)
    train_step = make_vae_train_step(model, dynamic_binarize=config.data.binarize == "dynamic",
                                     dequantize_levels=levels)
    batch_size, eval_batch_size = int(config.data.batch_size), int(config.data.eval_batch_size)
    return Experiment(
        init=lambda rng: create_vae_state(rng, model, tx, float(config.optim.ema_decay)),
        train_step=train_step,
        train_batches=lambda start: data.epoch_batches({"inputs": images["train"]}, batch_size,
                                                       int(config.seed), start),
        eval_step=make_vae_eval_step(model),
        eval_batches=lambda: data.eval_batches({"inputs": images["test"]}, eval_batch_size),
        finish=lambda state, workdir: finish_vae(config, model, images, state, workdir),
    )


def finish_vae(config, model, images: dict, state, workdir: str) -> dict:
    """Likelihood figures (test -ELBO, IWAE, factorised baseline) and the PNG grids, as a summary dict."""
    import json
    import os

    from depthlab.research.generative import losses as gen_losses
    from depthlab.research.generative.plots import save_image_grid

    params = state.eval_params()
    variables = {"params": params}
    test, train = images["test"], images["train"]
    key = jax.random.key(int(config.seed) + 1)
    nelbo = float(np.mean(per_image_nelbo(model, params, test)))
    k = int(config.eval.iwae_samples)
    iwae_nll = float(-np.mean(iwae_log_likelihood(model, params, test, key, k)))
    levels = int(config.data.dequantize_levels)
    if model.likelihood == "bernoulli":
        # The per-pixel training mean is P(pixel on) for binary and for dynamically binarised images alike.
        baseline = gen_losses.factorized_bernoulli_nll(train, test)
    else:
        from depthlab.research.generative.data import dequantize
        baseline = gen_losses.factorized_gaussian_nll(dequantize(train, levels, np.random.default_rng(2))
                                                  if levels else train, test)
    summary = {"test_nelbo": nelbo, f"test_iwae_nll_k{k}": iwae_nll, "baseline_factorized_nll": baseline,
               "num_test_images": int(len(test))}
    if levels:  # the continuous density's bound on the discrete grey-level likelihood, in bits per pixel
        d = int(np.prod(test.shape[1:]))
        summary["test_iwae_bits_per_pixel_discrete"] = (iwae_nll + d * np.log(levels)) / (d * np.log(2))
        summary["baseline_bits_per_pixel_discrete"] = (baseline + d * np.log(levels)) / (d * np.log(2))

    n = int(config.eval.num_images)
    sample_key, recon_key = jax.random.split(jax.random.fold_in(key, 1))
    z = jax.random.normal(sample_key, (n, model.latent_dim))
    samples = np.asarray(model.apply(variables, z, method=model.mean_image))
    save_image_grid(samples, os.path.join(workdir, "samples.png"), title="VAE samples: E[x|z], z ~ N(0, I)")
    originals = test[:n // 2]
    out = model.apply(variables, jnp.asarray(originals), recon_key)
    recon = np.asarray(model.apply(variables, out.mean, method=model.mean_image))
    pairs = np.stack([originals, recon], 1).reshape(-1, *originals.shape[1:])
    save_image_grid(pairs, os.path.join(workdir, "reconstructions.png"),
                    title="test image | reconstruction (posterior mean)")
    # Latent interpolation between the posterior means of pairs of test images of different classes.
    labels = images["labels_test"]
    starts = [int(np.flatnonzero(labels == c)[0]) for c in range(4)]
    ends = [int(np.flatnonzero(labels == c)[1]) for c in (7, 5, 9, 3)]
    mean, _ = model.apply(variables, jnp.asarray(test[starts + ends]), method=model.encode)
    t = jnp.linspace(0, 1, 10)[None, :, None]
    path = mean[:4, None] * (1 - t) + mean[4:, None] * t  # [4, 10, latent]
    frames = np.asarray(model.apply(variables, path.reshape(-1, model.latent_dim), method=model.mean_image))
    save_image_grid(frames, os.path.join(workdir, "interpolation.png"), columns=10,
                    title="latent interpolation (posterior means)")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("VAE test figures (nats per image): " + ", ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    return summary
