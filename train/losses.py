"""Losses and metrics as pure functions of model outputs. Each returns a scalar mean unless noted.

Example:
    >>> loss = softmax_cross_entropy(logits, labels, label_smoothing=0.1)   # logits [B, C], labels [B]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `values` over positions where `mask` is 1 (all positions when mask is None)."""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                          mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy. logits [..., C], integer labels [...]; `mask` [...] weights positions (1 keep)."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    values = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return masked_mean(values, mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Share of positions whose arg-max equals the label."""
    return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean binary cross-entropy of logits against {0,1} (or soft) labels of the same shape."""
    return masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def mse(predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error over all elements."""
    return masked_mean(jnp.square(predictions - targets), mask)


# --- ELBO pieces (per example, summed over the event dimensions) -------------------------------

def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example: [B, D] -> [B]."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def bernoulli_log_likelihood(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log p(x | logits) for binary x, summed over all but the batch axis: [B, ...] -> [B]."""
    ll = -optax.sigmoid_binary_cross_entropy(logits, x)
    return jnp.sum(ll.reshape(ll.shape[0], -1), axis=-1)


def gaussian_log_likelihood(mean: jax.Array, logvar: jax.Array, x: jax.Array) -> jax.Array:
    """log N(x; mean, exp(logvar)) summed over all but the batch axis: [B, ...] -> [B]."""
    ll = -0.5 * (jnp.log(2 * jnp.pi) + logvar + jnp.square(x - mean) / jnp.exp(logvar))
    return jnp.sum(ll.reshape(ll.shape[0], -1), axis=-1)


# --- GAN losses (non-saturating) ---------------------------------------------------------------

def gan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """-log D(x) - log(1 - D(G(z))), averaged."""
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def gan_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss: -log D(G(z)), averaged."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


# --- Policy-gradient losses --------------------------------------------------------------------

def ppo_policy_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                    clip_eps: float) -> jax.Array:
    """Clipped surrogate objective of PPO, as a loss to minimise."""
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -jnp.mean(jnp.minimum(unclipped, clipped))


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                       clip_eps: float | None) -> jax.Array:
    """PPO's clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), with v_clipped within clip_eps
    of the rollout's value; `clip_eps=None` gives the plain 0.5 * (v - R)^2."""
    loss = jnp.square(values - returns)
    if clip_eps is not None:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        loss = jnp.maximum(loss, jnp.square(clipped - returns))
    return 0.5 * jnp.mean(loss)
