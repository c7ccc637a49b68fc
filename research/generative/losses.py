"""Objectives and likelihood estimates for the generative experiments (all per example, in nats).

VAE (Kingma & Welling 2014):
    -ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I))                  >= -log p(x)
IWAE bound (Burda et al. 2016), with k samples z_i ~ q(z|x):
    log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)              (tighter as k grows)
GAN (Goodfellow et al. 2014), non-saturating form, D outputs logits:
    L_D = softplus(-D(x)) + softplus(D(G(z)))      L_G = softplus(-D(G(z)))
    R1 = gamma / 2 * ||grad_x D(x)||^2 on real data (Mescheder et al. 2018)

Example:
    >>> out = model.apply(variables, images, key)
    >>> nelbo, recon, kl = negative_elbo(out, images, "bernoulli")     # each [batch]
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from depthlab.models.vae import VAEOutput, reparameterize
from depthlab.train import losses

LOG_2PI = math.log(2 * math.pi)


def _sum_pixels(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0], -1)).sum(axis=-1)


def log_likelihood(logits: jax.Array, log_scale: jax.Array | None, x: jax.Array, likelihood: str) -> jax.Array:
    """log p(x|z) summed over pixels, [batch]. `logits`: Bernoulli logits or Gaussian mean, like x."""
    if likelihood == "bernoulli":
        return losses.bernoulli_log_likelihood(logits, x)
    if likelihood == "gaussian":
        return losses.gaussian_log_likelihood(logits, 2.0 * log_scale, x)
    raise ValueError(f"unknown likelihood {likelihood!r}; valid: bernoulli, gaussian")


def negative_elbo(out: VAEOutput, x: jax.Array, likelihood: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(-ELBO, -log p(x|z), KL), each [batch], with a one-sample estimate of the reconstruction term."""
    recon = -log_likelihood(out.logits, out.log_scale, x, likelihood)
    kl = losses.gaussian_kl(out.mean, out.logvar)
    return recon + kl, recon, kl


def _log_normal(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    return jnp.sum(-0.5 * ((z - mean) ** 2 * jnp.exp(-logvar) + logvar + LOG_2PI), axis=-1)


def importance_weighted_log_likelihood(
    encode: Callable, decode: Callable, log_scale: jax.Array | None, x: jax.Array, key: jax.Array,
    num_samples: int, likelihood: str,
) -> jax.Array:
    """IWAE estimate of log p(x) with `num_samples` importance samples, [batch].

    encode(x) -> (mean, logvar); decode(z) -> logits; log_scale: [batch, H, W, C] or None.
    The samples are drawn one at a time with `lax.map`, so memory stays that of one batch.
    """
    mean, logvar = encode(x)

    def log_weight(sample_key):
        z = reparameterize(sample_key, mean, logvar)
        log_px_z = log_likelihood(decode(z), log_scale, x, likelihood)
        log_pz = _log_normal(z, jnp.zeros_like(z), jnp.zeros_like(z))
        return log_px_z + log_pz - _log_normal(z, mean, logvar)

    log_w = jax.lax.map(log_weight, jax.random.split(key, num_samples))  # [k, batch]
    return jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)


def factorized_bernoulli_nll(train_images: jax.Array, test_images: jax.Array, eps: float = 1e-3) -> float:
    """Baseline: -log p(x) per test image under independent Bernoulli pixels with the training mean."""
    p = jnp.clip(jnp.mean(train_images, axis=0), eps, 1 - eps)
    logits = jnp.broadcast_to(jnp.log(p) - jnp.log1p(-p), test_images.shape)
    return float(-jnp.mean(log_likelihood(logits, None, test_images, "bernoulli")))


def factorized_gaussian_nll(train_images: jax.Array, test_images: jax.Array, min_std: float = 1e-3) -> float:
    """Baseline: -log p(x) per test image under independent Gaussian pixels fit to the training set."""
    mean = jnp.mean(train_images, axis=0)
    log_scale = jnp.log(jnp.maximum(jnp.std(train_images, axis=0), min_std))
    shape = test_images.shape
    ll = log_likelihood(jnp.broadcast_to(mean, shape), jnp.broadcast_to(log_scale, shape), test_images, "gaussian")
    return float(-jnp.mean(ll))


# The GAN losses themselves are the engine's: losses.gan_discriminator_loss / gan_generator_loss.


def r1_penalty(discriminate: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """mean over the batch of ||grad_x D(x)||^2 at real x (multiply by gamma / 2 in the loss)."""
    grads = jax.grad(lambda x: jnp.sum(discriminate(x)))(real)
    return jnp.mean(_sum_pixels(grads**2))
