"""Variational auto-encoders (Kingma & Welling 2014): MLP and convolutional.

    x [batch, H, W, C] --encoder--> q(z|x) = N(mean, exp(logvar))      mean, logvar: [batch, latent_dim]
    z = mean + exp(logvar / 2) * eps,  eps ~ N(0, I)  (reparameterisation, eps from an explicit key)
    z --decoder--> p(x|z): Bernoulli(logits) or Gaussian(loc, exp(log_scale))      [batch, H, W, C]

The model only computes the distributions' parameters; the ELBO and importance-weighted bounds
live with the experiments (depthlab.research.generative.losses), so a paper can reuse the networks
with its own objective. The Gaussian decoder learns one log standard deviation per pixel (shared
over the batch): cheaper and more stable than predicting a scale per sample.

Example:
    >>> model = ConvVAE(image_shape=(28, 28, 1), latent_dim=16)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), jax.random.key(1))
    >>> out = model.apply(variables, images, jax.random.key(2))   # out.logits: [batch, 28, 28, 1]
    >>> x = model.apply(variables, z, method=ConvVAE.decode)       # decoder output for z [batch, 16]
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.mlp import get_activation
from depthlab.models.registry import register_model

LIKELIHOODS = ("bernoulli", "gaussian")


@flax.struct.dataclass
class VAEOutput:
    """What a VAE forward pass returns.

    logits: decoder output [batch, H, W, C]: Bernoulli logits, or the Gaussian mean.
    log_scale: Gaussian log standard deviation broadcast to [batch, H, W, C]; None for Bernoulli.
    mean, logvar: parameters of q(z|x), [batch, latent_dim].
    z: the reparameterised sample, [batch, latent_dim].
    """

    logits: jax.Array
    log_scale: Optional[jax.Array]
    mean: jax.Array
    logvar: jax.Array
    z: jax.Array


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z = mean + sigma * eps with eps ~ N(0, I) drawn from `key`; gradients flow to mean and logvar."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


class _VAEBase(nn.Module):
    """Shared encode -> sample -> decode logic; subclasses define `make_encoder/make_decoder`."""

    image_shape: Sequence[int] = (28, 28, 1)
    latent_dim: int = 16
    likelihood: str = "bernoulli"
    activation: str = "relu"
    # Floor on the Gaussian log-scale: without it the density on near-constant pixels diverges.
    min_log_scale: float = -6.0
    # Compute dtype of the networks; params, mean/logvar and the decoder output stay float32.
    dtype: Any = jnp.float32

    def setup(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; valid: {', '.join(LIKELIHOODS)}")
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (height, width, channels), got {self.image_shape!r}")
        self.encoder = self.make_encoder()
        self.decoder = self.make_decoder()
        if self.likelihood == "gaussian":
            self.log_scale = self.param("log_scale", nn.initializers.zeros, tuple(self.image_shape))

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [batch, H, W, C] -> (mean, logvar), each [batch, latent_dim]."""
        chex.assert_rank(x, 4)
        chex.assert_shape(x, (None, *self.image_shape))
        stats = self.encoder(x.astype(jnp.float32)).astype(jnp.float32)
        mean, logvar = jnp.split(stats, 2, axis=-1)
        return mean, logvar

    def decode(self, z: jax.Array) -> jax.Array:
        """z [batch, latent_dim] -> logits (Bernoulli) or mean (Gaussian) [batch, H, W, C]."""
        chex.assert_shape(z, (None, self.latent_dim))
        out = self.decoder(z).astype(jnp.float32)
        chex.assert_shape(out, (z.shape[0], *self.image_shape))
        return out

    def decoder_log_scale(self, batch: int) -> Optional[jax.Array]:
        """Gaussian log standard deviation [batch, H, W, C] (None for a Bernoulli decoder)."""
        if self.likelihood != "gaussian":
            return None
        log_scale = jnp.maximum(self.log_scale, self.min_log_scale)
        return jnp.broadcast_to(log_scale, (batch, *self.image_shape))

    def mean_image(self, z: jax.Array) -> jax.Array:
        """The decoder's expected image E[x|z] in data space [batch, H, W, C]."""
        out = self.decode(z)
        return nn.sigmoid(out) if self.likelihood == "bernoulli" else out

    def __call__(self, x: jax.Array, key: jax.Array, train: bool = False) -> VAEOutput:
        """x [batch, H, W, C], key: PRNG key for the reparameterisation noise."""
        del train  # no dropout/BatchNorm: the forward pass is the same in training and evaluation
        mean, logvar = self.encode(x)
        z = reparameterize(key, mean, logvar)
        return VAEOutput(self.decode(z), self.decoder_log_scale(x.shape[0]), mean, logvar, z)


class _MLPEncoder(nn.Module):
    hidden: Sequence[int]
    latent_dim: int
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x)


class _MLPDecoder(nn.Module):
    hidden: Sequence[int]
    image_shape: Sequence[int]
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        act = get_activation(self.activation)
        for width in self.hidden:
            z = act(nn.Dense(width, dtype=self.dtype)(z))
        size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        return nn.Dense(size, dtype=self.dtype)(z).reshape((z.shape[0], *self.image_shape))


@register_model("mlp_vae")
class MLPVAE(_VAEBase):
    """VAE with fully connected encoder and decoder (decoder widths mirror the encoder's).

    Attributes:
      hidden: encoder hidden widths, e.g. (512, 256); the decoder uses them reversed.
      image_shape, latent_dim, likelihood ("bernoulli" | "gaussian"), activation: see module doc.
    """

    hidden: Sequence[int] = (512, 256)

    def make_encoder(self):
        return _MLPEncoder(tuple(self.hidden), self.latent_dim, self.activation, dtype=self.dtype)

    def make_decoder(self):
        return _MLPDecoder(tuple(reversed(self.hidden)), tuple(self.image_shape), self.activation, dtype=self.dtype)


class _ConvEncoder(nn.Module):
    channels: Sequence[int]
    dense: int
    latent_dim: int
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = get_activation(self.activation)
        for ch in self.channels:  # each stride-2 conv halves height and width
            x = act(nn.Conv(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x))
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(self.dense, dtype=self.dtype)(x))
        return nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x)


class _ConvDecoder(nn.Module):
    channels: Sequence[int]  # encoder order; the decoder walks them backwards
    dense: int
    image_shape: Sequence[int]
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        act = get_activation(self.activation)
        height, width, out_channels = self.image_shape
        base_h, base_w = height // 2 ** len(self.channels), width // 2 ** len(self.channels)
        x = act(nn.Dense(self.dense, dtype=self.dtype)(z))
        x = act(nn.Dense(base_h * base_w * self.channels[-1], dtype=self.dtype)(x))
        x = x.reshape((z.shape[0], base_h, base_w, self.channels[-1]))
        for ch in reversed(self.channels[:-1]):
            x = act(nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x))
        return nn.ConvTranspose(out_channels, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)


@register_model("conv_vae")
class ConvVAE(_VAEBase):
    """VAE with a strided-conv encoder and a transposed-conv decoder (DCGAN-like).

    Height and width must be divisible by 2 ** len(channels) (28x28 with two blocks: 28 -> 14 -> 7).

    Attributes:
      channels: encoder conv widths, e.g. (32, 64); each block halves the resolution.
      dense: width of the fully connected layer between the convs and the latent.
    """

    channels: Sequence[int] = (32, 64)
    dense: int = 256

    def make_encoder(self):
        factor = 2 ** len(self.channels)
        if self.image_shape[0] % factor or self.image_shape[1] % factor:
            raise ValueError(
                f"ConvVAE with {len(self.channels)} conv blocks needs height and width divisible by "
                f"{factor}, got image_shape={tuple(self.image_shape)}; use fewer channels or pad the images"
            )
        return _ConvEncoder(tuple(self.channels), self.dense, self.latent_dim, self.activation, dtype=self.dtype)

    def make_decoder(self):
        return _ConvDecoder(tuple(self.channels), self.dense, tuple(self.image_shape), self.activation,
                            dtype=self.dtype)
