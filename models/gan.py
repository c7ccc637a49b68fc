"""GAN networks: DCGAN generator/discriminator for images and an MLP pair for 2-D toy data.

    generator:      z [batch, latent_dim] -> Dense -> [batch, H/2^n, W/2^n, channels[0]]
                    -> n stride-2 transposed convs (BatchNorm + ReLU between) -> image [batch, H, W, C]
    discriminator:  image -> n stride-2 convs (LeakyReLU 0.2) -> flatten -> Dense(1) -> logit [batch]

Following Radford et al. (2016) but with the discriminator's BatchNorm dropped: batch statistics
mix real and fake samples and interact badly with gradient penalties. The discriminator can be
regularised instead with spectral normalisation (`spectral_norm=True`, Miyato et al. 2018) or an
R1 penalty in the loss (Mescheder et al. 2018). Spectral normalisation keeps its power-iteration
vectors in the 'batch_stats' collection: call with `update_stats=True, mutable=['batch_stats']`
in training.

Example:
    >>> gen = DCGANGenerator(image_shape=(28, 28, 1), channels=(128, 64))
    >>> disc = DCGANDiscriminator(channels=(64, 128))
    >>> g_vars = gen.init(key, jnp.zeros((2, 64)), train=False)
    >>> images = gen.apply(g_vars, z, train=False)              # [batch, 28, 28, 1] in [-1, 1]
    >>> logits = disc.init_with_output(key, images)[0]           # [batch]
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.mlp import get_activation
from depthlab.models.registry import register_model

OUTPUT_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,  # data scaled to [-1, 1], as in DCGAN
    "sigmoid": nn.sigmoid,  # data in [0, 1]
    "identity": lambda x: x,  # unbounded data (2-D toy distributions)
}


def _output_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"unknown output activation {name!r}; valid: {', '.join(OUTPUT_ACTIVATIONS)}")
    return OUTPUT_ACTIVATIONS[name]


def _apply_layer(layer: nn.Module, x: jax.Array, spectral_norm: bool, train: bool) -> jax.Array:
    """Calls `layer`, spectrally normalised if asked (power-iteration stats update only in training)."""
    if spectral_norm:
        return nn.SpectralNorm(layer)(x, update_stats=train)
    return layer(x)


@register_model("dcgan_generator")
class DCGANGenerator(nn.Module):
    """z [batch, latent_dim] -> images [batch, H, W, C].

    Attributes:
      image_shape: (H, W, C); H and W divisible by 2 ** len(channels).
      channels: widths from the coarsest feature map upwards, e.g. (128, 64) for 7x7x128 -> 14x14x64
        -> 28x28xC. Each entry is followed by one stride-2 transposed conv.
      batch_norm: BatchNorm after the projection and every hidden transposed conv (DCGAN default).
      output: "tanh" (data in [-1, 1]), "sigmoid" ([0, 1]) or "identity".
      dtype: compute dtype (params and BatchNorm statistics stay float32; images come back float32).
    """

    image_shape: Sequence[int] = (28, 28, 1)
    channels: Sequence[int] = (128, 64)
    batch_norm: bool = True
    output: str = "tanh"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(z, 2)
        height, width, out_channels = self.image_shape
        factor = 2 ** len(self.channels)
        if height % factor or width % factor:
            raise ValueError(
                f"DCGANGenerator with {len(self.channels)} upsampling blocks needs height and width "
                f"divisible by {factor}, got image_shape={tuple(self.image_shape)}; change channels"
            )

        def norm_relu(x):
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            return nn.relu(x)

        x = nn.Dense(height // factor * width // factor * self.channels[0], dtype=self.dtype)(z)
        x = norm_relu(x.reshape((z.shape[0], height // factor, width // factor, self.channels[0])))
        for ch in self.channels[1:]:
            x = norm_relu(nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x))
        x = nn.ConvTranspose(out_channels, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
        x = _output_activation(self.output)(x.astype(jnp.float32))
        chex.assert_shape(x, (z.shape[0], height, width, out_channels))
        return x


@register_model("dcgan_discriminator")
class DCGANDiscriminator(nn.Module):
    """images [batch, H, W, C] -> real/fake logits [batch].

    Attributes:
      channels: widths of the stride-2 4x4 convs, e.g. (64, 128).
      spectral_norm: spectrally normalise every layer (stats in the 'batch_stats' collection).
      dtype: compute dtype (params stay float32; logits come back float32).
    """

    channels: Sequence[int] = (64, 128)
    spectral_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 4)
        for ch in self.channels:
            conv = nn.Conv(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)
            x = nn.leaky_relu(_apply_layer(conv, x, self.spectral_norm, train), 0.2)
        x = x.reshape((x.shape[0], -1))
        return _apply_layer(nn.Dense(1, dtype=self.dtype), x, self.spectral_norm, train)[:, 0].astype(jnp.float32)


@register_model("mlp_generator")
class MLPGenerator(nn.Module):
    """z [batch, latent_dim] -> points [batch, output_dim] (e.g. 2-D toy data).

    Example:
        >>> gen = MLPGenerator(hidden=(128, 128), output_dim=2)
    """

    hidden: Sequence[int] = (128, 128, 128)
    output_dim: int = 2
    activation: str = "relu"
    dtype: Any = jnp.float32     # compute dtype; params and the output stay float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(z, 2)
        act = get_activation(self.activation)
        for width in self.hidden:
            z = act(nn.Dense(width, dtype=self.dtype)(z))
        return nn.Dense(self.output_dim, dtype=self.dtype)(z).astype(jnp.float32)


@register_model("mlp_discriminator")
class MLPDiscriminator(nn.Module):
    """points [batch, features] -> real/fake logits [batch]; optional spectral normalisation."""

    hidden: Sequence[int] = (128, 128, 128)
    activation: str = "leaky_relu"
    spectral_norm: bool = False
    dtype: Any = jnp.float32     # compute dtype; params and the logits stay float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 2)
        act = get_activation(self.activation)
        for width in self.hidden:
            x = act(_apply_layer(nn.Dense(width, dtype=self.dtype), x, self.spectral_norm, train))
        return _apply_layer(nn.Dense(1, dtype=self.dtype), x, self.spectral_norm, train)[:, 0].astype(jnp.float32)
