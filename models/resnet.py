"""ResNet (He et al. 2015) with basic and bottleneck blocks, BatchNorm, optional pre-activation.

    stem (7x7/2 conv + 3x3/2 max-pool, or a 3x3 conv for small "CIFAR-style" images)
    -> stages of residual blocks (stride 2 at the start of each stage after the first)
    -> global average pool -> Dense(num_classes)

ResNet-18/34 use `BasicBlock` (two 3x3 convs); ResNet-50 uses `BottleneckBlock` (1x1, 3x3, 1x1
with 4x expansion). `preact=True` gives the pre-activation variant (He et al. 2016): BN and ReLU
come before each conv, so the skip path is a clean identity.

Conventions that differ from PyTorch/torchvision (docs/pytorch.md):
  * Padding. `padding="same"` (default) uses Flax/TF "SAME" for the stem max-pool and every 3x3
    conv: a stride-2 window on an even input pads 0 before and 1 after (the extra row/column goes
    bottom/right). `padding="torch"` pads 1 on every side, as torchvision's
    `Conv2d(..., padding=1)` and `MaxPool2d(3, 2, padding=1)`; output sizes are the same, the sampled
    grid is shifted by one pixel. Stride-1 3x3 convs and odd inputs pad (1, 1) either way.
  * BatchNorm. `bn_momentum` is Flax's (weight of the old statistics; torch's momentum=0.1 is 0.9,
    the default here); `bn_convention="torch"` keeps the unbiased batch variance in the running
    average like torch.nn.BatchNorm2d (see `depthlab.models.norm.BatchNorm`).
  With `padding="torch"` and torchvision's weights (`depthlab.models.pretrained`) the logits match
  torchvision's ResNet in eval mode.

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

from depthlab.models.norm import BatchNorm, check_bn_convention
from depthlab.models.options import conv_kernel_init, remat_module
from depthlab.models.registry import register_model

PADDINGS = ("same", "torch")


def conv3x3_padding(padding: str):
    """Padding of a 3x3 conv/pool: Flax "SAME" or torchvision's symmetric 1 on every side."""
    if padding not in PADDINGS:
        raise ValueError(f"unknown ResNet padding {padding!r}; valid: {', '.join(PADDINGS)} "
                         "(same: Flax/TF rule, torch: 1 on every side as torchvision)")
    return "SAME" if padding == "same" else ((1, 1), (1, 1))

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
    padding: str = "same"
    bn_momentum: float = 0.9
    bn_convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 convention=self.bn_convention, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init())
        pad3 = conv3x3_padding(self.padding)
        residual = x
        if self.preact:
            # Pre-activation: the identity path stays raw; a projection sees the normalised input.
            x = nn.relu(norm()(x))
            if self.strides != 1 or x.shape[-1] != self.filters:
                residual = x
        y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=pad3)(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding=pad3)(y)
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
    padding: str = "same"
    bn_momentum: float = 0.9
    bn_convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 convention=self.bn_convention, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init())
        pad3 = conv3x3_padding(self.padding)
        residual = x
        if self.preact:
            x = nn.relu(norm()(x))
            if self.strides != 1 or x.shape[-1] != self.filters * 4:
                residual = x
        y = conv(self.filters, (1, 1))(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=pad3)(y)
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
      padding: "same" (Flax/TF SAME, the default) or "torch" (1 on every side of the stem max-pool
        and every 3x3 conv, as torchvision); see the module docstring.
      bn_momentum: BatchNorm momentum in Flax's sense (torch momentum = 1 - bn_momentum).
      bn_convention: "flax" (biased running variance) or "torch" (unbiased, as torch.nn.BatchNorm2d).
      dtype: compute dtype (params and BatchNorm statistics stay float32; logits come back float32).
      remat: "none" (default), "full" or "dots": rematerialise each residual block in the backward
        pass (see `depthlab.models.options`); the parameter tree is the same.

    Conv kernels carry the logical axis names (None, None, "conv_in", "conv_out") for sharding;
    `nn.meta.unbox` the params of `model.init` to get plain arrays. The small head stays plain.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    num_filters: int = 64
    num_classes: int = 10
    cifar_stem: bool = False
    preact: bool = False
    depth: int | None = None
    dtype: jnp.dtype = jnp.float32
    padding: str = "same"
    bn_momentum: float = 0.9
    bn_convention: str = "flax"
    remat: str = "none"

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
        # Explicit names: nn.remat would otherwise rename the blocks (CheckpointBasicBlock_0).
        remat_block = remat_module(block_cls, self.remat, static_argnums=(2,))   # train is static
        pad3 = conv3x3_padding(self.padding)
        check_bn_convention(self.bn_convention)
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 convention=self.bn_convention, dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.cifar_stem:
            x = nn.Conv(self.num_filters, (3, 3), padding=pad3, use_bias=False, dtype=self.dtype,
                        kernel_init=conv_kernel_init(), name="stem_conv")(x)
        else:
            x = nn.Conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                        dtype=self.dtype, kernel_init=conv_kernel_init(), name="stem_conv")(x)
        if not self.preact:
            x = nn.relu(norm(name="stem_bn")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad3)
        index = 0
        for i, num_blocks in enumerate(stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = remat_block(self.num_filters * 2**i, strides=strides, preact=self.preact, dtype=self.dtype,
                                padding=self.padding, bn_momentum=self.bn_momentum,
                                bn_convention=self.bn_convention, name=f"{block_cls.__name__}_{index}")(x, train)
                index += 1
        if self.preact:
            x = nn.relu(norm(name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
