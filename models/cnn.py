"""LeNet-style convolutional network: (conv -> act -> pool) blocks, then dense layers.

Works for images [batch, height, width, channels] and for 1-D signals [batch, length, channels]
(e.g. MNIST-1D): the kernel rank follows the input.

Example:
    >>> model = CNN(channels=(32, 64), dense=(128,), num_classes=10)
    >>> logits = model.apply(variables, images, train=False)   # [batch, 10]
"""
from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.mlp import get_activation
from depthlab.models.norm import BatchNorm
from depthlab.models.registry import register_model


@register_model("cnn")
class CNN(nn.Module):
    """Conv blocks then an MLP head.

    Attributes:
      channels: output channels of each conv block.
      kernel_size: spatial size of every kernel (per dimension).
      dense: hidden widths of the head.
      num_classes: logits size.
      pool: pooling after each block: "max", "avg" or "none" (strided stacks). 2x2 windows, stride
        2, "SAME" padding: an odd size keeps its last row/column (PyTorch's ceil_mode=True).
      avg_pool_count_pad: for pool="avg" on an odd size, whether the padded zero counts in the mean
        of the last window. True (default) is Flax's `avg_pool(count_include_pad=True)`: that window
        is averaged over 4 values, one or two of them padding. False divides by the real elements
        only, as TF's SAME avg-pool and PyTorch's AvgPool2d(2, ceil_mode=True) do. Even sizes: no
        padding, no difference.
      batch_norm, dropout: regularisers (BatchNorm after each conv, dropout in the head).
      bn_momentum: BatchNorm momentum in Flax's sense (default 0.99; PyTorch's 0.1 is 0.9).
      bn_convention: "flax" (biased running variance) or "torch" (unbiased); see docs/pytorch.md.
    """

    channels: Sequence[int] = (32, 64)
    kernel_size: int = 3
    dense: Sequence[int] = (128,)
    num_classes: int = 10
    activation: str = "relu"
    pool: str = "max"
    batch_norm: bool = False
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    avg_pool_count_pad: bool = True
    bn_momentum: float = 0.99
    bn_convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [batch, H, W, C] or [batch, L, C] (a [batch, L] signal gets one channel) -> [batch, num_classes]."""
        if x.ndim == 2:
            x = x[..., None]
        chex.assert_rank(x, {3, 4})
        spatial = x.ndim - 2
        act = get_activation(self.activation)
        x = x.astype(self.dtype)
        for ch in self.channels:
            # No bias before BatchNorm: BN subtracts the mean, so such a bias only adds noise.
            x = nn.Conv(ch, (self.kernel_size,) * spatial, padding="SAME", use_bias=not self.batch_norm,
                        dtype=self.dtype)(x)
            if self.batch_norm:
                x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                              convention=self.bn_convention, dtype=self.dtype)(x)
            x = act(x)
            if self.pool == "max":
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial, padding="SAME")
            elif self.pool == "avg":
                x = nn.avg_pool(x, (2,) * spatial, strides=(2,) * spatial, padding="SAME",
                                count_include_pad=self.avg_pool_count_pad)
            elif self.pool != "none":
                raise ValueError(f"unknown pool {self.pool!r}; valid: max, avg, none")
        x = x.reshape((x.shape[0], -1))
        for width in self.dense:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
