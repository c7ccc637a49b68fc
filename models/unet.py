"""U-Net (Ronneberger et al. 2015) for semantic segmentation, with BatchNorm.

    encoder: depth x [two 3x3 conv-BN-ReLU at width f * 2**level, then 2x2 max-pool]
    bottleneck: two 3x3 conv-BN-ReLU at width f * 2**depth
    decoder: depth x [2x2 transposed conv up, concatenate the encoder's skip, two 3x3 conv-BN-ReLU]
    head: 1x1 conv -> per-pixel logits

The skips carry full-resolution detail past the bottleneck, which is why U-Nets draw sharp
boundaries from little data. Convs use SAME padding, so the output has the input's size (the
2015 paper used VALID padding and cropped the skips).

Example:
    >>> model = UNet(num_classes=5, features=16, depth=3)
    >>> variables = model.init(key, jnp.zeros((1, 64, 64, 3)), train=False)   # params + batch_stats
    >>> logits = model.apply(variables, images, train=False)                   # [B, 64, 64, 5]
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.options import conv_kernel_init, remat_module
from depthlab.models.registry import register_model


class DoubleConv(nn.Module):
    """Two (3x3 conv -> BatchNorm -> ReLU) layers."""

    features: int
    batch_norm: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype,
                        kernel_init=conv_kernel_init())(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(x)
        return x


@register_model("unet")
class UNet(nn.Module):
    """U-Net.

    Attributes:
      num_classes: logits per pixel (include background as class 0).
      features: width of the first level; level l has features * 2**l channels.
      depth: number of 2x downsamplings; H and W must be divisible by 2**depth.
      batch_norm: BatchNorm after each conv (needs mutable=["batch_stats"] when training).
      dtype: compute dtype (params and BatchNorm statistics stay float32; logits come back float32).
      remat: "none" (default), "full" or "dots": rematerialise each DoubleConv in the backward pass
        (see `depthlab.models.options`); the parameter tree is the same.

    Conv kernels carry the logical axis names (None, None, "conv_in", "conv_out") for sharding
    (`nn.meta.unbox` the params of `model.init` to get plain arrays).
    """

    num_classes: int
    features: int = 16
    depth: int = 3
    batch_norm: bool = True
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, C] (a [B, H, W] image gets one channel) -> logits [B, H, W, num_classes]."""
        remat_conv = remat_module(DoubleConv, self.remat, static_argnums=(2,))   # train is static
        names = (f"DoubleConv_{i}" for i in range(2 * self.depth + 1))   # nn.remat would rename them
        if x.ndim == 3:
            x = x[..., None]
        chex.assert_rank(x, 4)
        factor = 2**self.depth
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by 2**depth = {factor}; "
                             f"pad the images or lower depth={self.depth}")
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x = remat_conv(self.features * 2**level, self.batch_norm, self.dtype, name=next(names))(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = remat_conv(self.features * 2**self.depth, self.batch_norm, self.dtype, name=next(names))(x, train)
        for level in reversed(range(self.depth)):
            width = self.features * 2**level
            x = nn.ConvTranspose(width, (2, 2), strides=(2, 2), dtype=self.dtype, kernel_init=conv_kernel_init())(x)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = remat_conv(width, self.batch_norm, self.dtype, name=next(names))(x, train)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=conv_kernel_init(),
                       name="head")(x).astype(jnp.float32)
