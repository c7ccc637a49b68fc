"""ResNet (He et al. 2015) with basic and bottleneck blocks, BatchNorm, optional pre-activation.

    stem (7x7/2 conv + 3x3/2 max-pool, or a 3x3 conv for small "CIFAR-style" images)
    -> stages of residual blocks (stride 2 at the start of each stage after the first)
    -> global average pool -> Dense(num_classes)

ResNet-18/34 use `BasicBlock` (two 3x3 convs); ResNet-50 uses `BottleneckBlock` (1x1, 3x3, 1x1
with 4x expansion). `preact=True` gives the pre-activation variant (He et al. 2016): BN and ReLU
come before each conv, so the skip path is a clean identity.

Example:
    >>> model = ResNet.from_depth(18, num_classes=10, cifar_stem=True)
    >>> variables = model.init(key, jnp.ones((1, 32, 32, 3)), train=False)   # params + batch_stats
"""
from __future__ import annotations

import functools
from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.registry import register_model

STAGE_SIZES = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
}


class BasicBlock(nn.Module):
    filters: int
    strides: int = 1
    preact: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        residual = x
        if self.preact:
            # Pre-activation: the identity path stays raw; a projection sees the normalised input.
            x = nn.relu(norm()(x))
            if self.strides != 1 or x.shape[-1] != self.filters:
                residual = x
        y = conv(self.filters, (3, 3), (self.strides, self.strides))(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3))(y)
        if not self.preact:
            # Zero-init the last BN scale so each block starts as the identity (Goyal et al. 2017).
            y = norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = conv(self.filters, (1, 1), (self.strides, self.strides))(residual)
            if not self.preact:
                residual = norm()(residual)
        out = residual + y
        return out if self.preact else nn.relu(out)


class BottleneckBlock(nn.Module):
    filters: int
    strides: int = 1
    preact: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        residual = x
        if self.preact:
            x = nn.relu(norm()(x))
            if self.strides != 1 or x.shape[-1] != self.filters * 4:
                residual = x
        y = conv(self.filters, (1, 1))(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), (self.strides, self.strides))(y)
        y = nn.relu(norm()(y))
        y = conv(self.filters * 4, (1, 1))(y)
        if not self.preact:
            y = norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = conv(self.filters * 4, (1, 1), (self.strides, self.strides))(residual)
            if not self.preact:
                residual = norm()(residual)
        out = residual + y
        return out if self.preact else nn.relu(out)


@register_model("resnet")
class ResNet(nn.Module):
    """Residual network.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: "basic" or "bottleneck".
      num_filters: channels of the first stage (doubles each stage).
      num_classes: logits size.
      cifar_stem: 3x3 stride-1 stem without max-pool, for 28x28/32x32 inputs.
      preact: pre-activation blocks.
      depth: if set (18, 34, 50, 101), overrides stage_sizes and block.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    num_filters: int = 64
    num_classes: int = 10
    cifar_stem: bool = False
    preact: bool = False
    depth: int | None = None
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_depth(cls, depth: int, **kwargs) -> "ResNet":
        if depth not in STAGE_SIZES:
            raise ValueError(f"unknown ResNet depth {depth}; valid depths: {sorted(STAGE_SIZES)}")
        return cls(depth=depth, **kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [batch, H, W, C] (a [batch, H, W] image gets one channel) -> [batch, num_classes]."""
        if x.ndim == 3:
            x = x[..., None]
        chex.assert_rank(x, 4)
        stage_sizes, block = self.stage_sizes, self.block
        if self.depth is not None:
            if self.depth not in STAGE_SIZES:
                raise ValueError(f"unknown ResNet depth {self.depth}; valid depths: {sorted(STAGE_SIZES)}")
            stage_sizes, block = STAGE_SIZES[self.depth]
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown block {block!r}; valid: basic, bottleneck")
        block_cls = BasicBlock if block == "basic" else BottleneckBlock
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.cifar_stem:
            x = nn.Conv(self.num_filters, (3, 3), use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        else:
            x = nn.Conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                        dtype=self.dtype, name="stem_conv")(x)
        if not self.preact:
            x = nn.relu(norm(name="stem_bn")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, num_blocks in enumerate(stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(self.num_filters * 2**i, strides=strides, preact=self.preact, dtype=self.dtype)(x, train)
        if self.preact:
            x = nn.relu(norm(name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
