"""Spiking neurons: a leaky integrate-and-fire (LIF) cell with a surrogate gradient, and a spiking MLP.

One time step of a LIF layer with membrane potential v [batch, features]:

    v <- beta * v + W x_t (+ b)          leak, then integrate the input current
    s  = H(v - threshold)                 spike where the potential crosses the threshold (0/1)
    v <- v - s * threshold                reset by subtraction ("zero": v <- v * (1 - s))

The Heaviside step H has zero derivative almost everywhere, so training by backpropagation through
time uses a surrogate: the forward pass emits exact spikes, the backward pass uses the derivative of
a fast sigmoid, dH/dx ~ 1 / (1 + slope * |x|)^2 (SuperSpike, Zenke & Ganguli 2018), via
`jax.custom_vjp` (`spike`).

`LIFCell` is an `nn.RNNCellBase`, so `nn.RNN(LIFCell(128))` unrolls it over [batch, time, features]
with `nn.scan` (a `lax.scan`). `SpikingMLP` stacks LIF layers and reads out with a non-spiking leaky
integrator whose mean membrane potential over time gives the logits.

Example:
    >>> model = SpikingMLP(hidden=(128,), num_classes=10)
    >>> spikes = jnp.zeros((2, 25, 64))                       # [batch, time, features] 0/1 trains
    >>> variables = model.init(jax.random.key(0), spikes)
    >>> logits, aux = model.apply(variables, spikes)          # [2, 10]; aux["spikes"]: per layer [2, 25, 128]
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.registry import register_model


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def spike(x: jax.Array, slope: float = 25.0) -> jax.Array:
    """Heaviside step H(x) = 1[x > 0] forward; gradient 1 / (1 + slope |x|)^2 backward (fast-sigmoid surrogate)."""
    return (x > 0).astype(x.dtype)


def _spike_fwd(x, slope):
    return spike(x, slope), x


def _spike_bwd(slope, x, g):
    return (g / (1.0 + slope * jnp.abs(x)) ** 2,)


spike.defvjp(_spike_fwd, _spike_bwd)


def surrogate_gradient(x: jax.Array, slope: float = 25.0) -> jax.Array:
    """The surrogate derivative dspike/dx that `spike`'s backward pass uses (for tests and plots)."""
    return 1.0 / (1.0 + slope * jnp.abs(x)) ** 2


class LIFCell(nn.RNNCellBase):
    """A layer of leaky integrate-and-fire neurons fed through a Dense projection; carry = membrane potential.

    Attributes:
      features: number of neurons.
      beta: membrane decay per step (exp(-dt / tau)); 0.9 ~ tau = 10 steps.
      threshold: firing threshold.
      slope: steepness of the surrogate gradient.
      reset: "subtract" (v - threshold, keeps the excess) or "zero".
      detach_reset: stop gradients through the reset term (common practice; it often trains better).
      use_bias: bias of the input projection.
    Call: (v [batch, features], x [batch, in]) -> (v', spikes [batch, features]).
    """

    features: int
    beta: float = 0.9
    threshold: float = 1.0
    slope: float = 25.0
    reset: str = "subtract"
    detach_reset: bool = True
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, v: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        current = nn.Dense(self.features, use_bias=self.use_bias, kernel_init=self.kernel_init, name="input")(x)
        v = self.beta * v + current
        s = spike(v - self.threshold, self.slope)
        r = jax.lax.stop_gradient(s) if self.detach_reset else s
        if self.reset == "subtract":
            v = v - r * self.threshold
        elif self.reset == "zero":
            v = v * (1.0 - r)
        else:
            raise ValueError(f"unknown reset {self.reset!r}; valid: subtract, zero")
        return v, s

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        """Resting potential 0: [*batch, features] for inputs of shape [*batch, in]."""
        return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LeakyReadout(nn.RNNCellBase):
    """Non-spiking leaky integrator: v <- beta v + W x_t; outputs v (its mean over time serves as logits)."""

    features: int
    beta: float = 0.9

    @nn.compact
    def __call__(self, v: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        v = self.beta * v + nn.Dense(self.features, name="input")(x)
        return v, v

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


@register_model("spiking_mlp")
class SpikingMLP(nn.Module):
    """LIF layers unrolled in time (nn.RNN = nn.scan), then a leaky readout; logits = mean readout potential.

    Attributes:
      hidden: neurons per LIF layer.
      num_classes: readout size.
      beta, threshold, slope: LIF parameters (shared by all layers).
    Call: spikes [batch, time, in] -> (logits [batch, num_classes],
          {"spikes": tuple of [batch, time, hidden_l], "readout": [batch, time, num_classes]}).
    """

    hidden: Sequence[int] = (128,)
    num_classes: int = 10
    beta: float = 0.9
    threshold: float = 1.0
    slope: float = 25.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        chex.assert_rank(x, 3)
        spikes = []
        for width in self.hidden:
            x = nn.RNN(LIFCell(width, beta=self.beta, threshold=self.threshold, slope=self.slope))(x)
            spikes.append(x)
        readout = nn.RNN(LeakyReadout(self.num_classes, beta=self.beta))(x)
        return readout.mean(axis=1), {"spikes": tuple(spikes), "readout": readout}
