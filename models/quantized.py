"""Quantisation-aware layers: Dense and Conv whose weights (and optionally inputs) are rounded to b-bit integers.

Fake quantisation, as in quantisation-aware training (Jacob et al. 2018): the forward pass uses
q(w) = scale * clip(round(w / scale), -Q, Q) with Q = 2^(bits-1) - 1 and a per-output-channel scale
max|w| / Q (symmetric, so integer zero is real zero), so the network computes what an integer
kernel would; the backward pass treats rounding as the identity (the straight-through estimator,
Bengio et al. 2013), so the float "shadow" weights keep learning from gradients a step function
would zero. Activations after a ReLU are non-negative and use an unsigned grid: 2^bits - 1 levels
over [0, max of the batch]. `bits=None` disables a quantiser (float32).

Biases stay float (they are added once per output, and int32 on integer hardware).

Example:
    >>> layer = QuantDense(10, bits=4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 64)))
    >>> q = quantize(variables["params"]["kernel"], 4, axis=-1)   # at most 15 distinct values per column
    >>> model = QuantCNN(channels=(16, 32), weight_bits=8, act_bits=8)
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.registry import register_model


def ste_round(x: jax.Array) -> jax.Array:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(x: jax.Array, bits: int | None, axis: int | Sequence[int] | None = None, signed: bool = True) -> jax.Array:
    """Symmetric fake quantisation of x to `bits` bits, straight-through in the backward pass.

    Args:
      x: any array (weights or activations).
      bits: integer bit width (2..16), or None for no quantisation.
      axis: axes that keep their own scale (e.g. -1: one scale per output channel of a kernel); None: one scale.
      signed: levels -Q..Q with Q = 2^(bits-1) - 1 (weights); unsigned: 0..2^bits - 1 (non-negative inputs).
    Returns:
      an array of x's shape and dtype with at most 2Q + 1 (signed) or 2^bits (unsigned) distinct values per scale.
    """
    if bits is None:
        return x
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"bits={bits} outside 2..16; use None for float")
    levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    keep = () if axis is None else tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    reduce = tuple(a for a in range(x.ndim) if a not in keep)
    peak = jnp.max(jnp.abs(x), axis=reduce, keepdims=True) if signed else jnp.max(x, axis=reduce, keepdims=True)
    scale = jax.lax.stop_gradient(jnp.maximum(peak, 1e-8) / levels)
    low = -levels if signed else 0
    # Rounding and clipping together are straight-through (the gradient is the identity everywhere): the
    # grid is set by the array's own peak, so clipping only ever removes rounding overshoot.
    scaled = x / scale
    return (scaled + jax.lax.stop_gradient(jnp.clip(jnp.round(scaled), low, levels) - scaled)) * scale


class QuantDense(nn.Module):
    """nn.Dense with a `bits`-bit weight grid (per output unit) and optionally `input_bits`-bit unsigned inputs.

    x [..., in] -> [..., features]. Parameters are named as nn.Dense's ("kernel", "bias"), so float
    weights load unchanged (post-training quantisation is this layer applied to trained float weights).
    """

    features: int
    bits: int | None = 8
    input_bits: int | None = None
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        x = quantize(x, self.input_bits, signed=False)
        y = x @ quantize(kernel, self.bits, axis=-1)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class QuantConv(nn.Module):
    """nn.Conv ("SAME" padding) with a `bits`-bit weight grid per output channel and optional quantised inputs.

    x [batch, *spatial, in] -> [batch, *spatial, features].
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    bits: int | None = 8
    input_bits: int | None = None
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
        x = quantize(x, self.input_bits, signed=False)
        spatial = len(self.kernel_size)
        dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                              ("NHWC", "HWIO", "NHWC") if spatial == 2 else ("NWC", "WIO", "NWC"))
        y = jax.lax.conv_general_dilated(x, quantize(kernel, self.bits, axis=-1), (1,) * spatial, "SAME",
                                         dimension_numbers=dims)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


@register_model("quant_cnn")
class QuantCNN(nn.Module):
    """The LeNet-style CNN of `depthlab.models.CNN` (conv -> relu -> 2x2 max-pool blocks, dense head) built from
    quantised layers.

    Attributes:
      channels, dense, num_classes, kernel_size: as CNN.
      weight_bits: bit width of every kernel (None: float).
      act_bits: bit width of every layer's input after the first (post-ReLU activations; None: float).
        The image itself enters at `input_bits` (None: float; 8 for 8-bit pixels).
    Call: x [batch, H, W, C] -> logits [batch, num_classes].
    """

    channels: Sequence[int] = (16, 32)
    dense: Sequence[int] = (64,)
    num_classes: int = 10
    kernel_size: int = 3
    weight_bits: int | None = 8
    act_bits: int | None = None
    input_bits: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(x, 4)
        in_bits = self.input_bits
        for ch in self.channels:
            x = QuantConv(ch, (self.kernel_size,) * 2, bits=self.weight_bits, input_bits=in_bits)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
            in_bits = self.act_bits
        x = x.reshape((x.shape[0], -1))
        for width in self.dense:
            x = nn.relu(QuantDense(width, bits=self.weight_bits, input_bits=in_bits)(x))
            in_bits = self.act_bits
        return QuantDense(self.num_classes, bits=self.weight_bits, input_bits=in_bits)(x)
