"""Multi-layer perceptron with a selectable activation.

    x [batch, ...] -> flatten -> (Dense -> [BatchNorm] -> act -> [Dropout]) * (depth) -> Dense -> logits

Example:
    >>> model = MLP(features=(128, 128, 10), activation="relu")
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)), train=False)
"""
from __future__ import annotations

from typing import Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.norm import BatchNorm
from depthlab.models.registry import register_model

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "swish": nn.swish,
    "elu": nn.elu,
    "selu": nn.selu,
    "leaky_relu": nn.leaky_relu,
    "softplus": nn.softplus,
    "identity": lambda x: x,
    "linear": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` (relu, sigmoid, tanh, gelu, ...)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


@register_model("mlp")
class MLP(nn.Module):
    """Fully connected network.

    Attributes:
      features: widths of every layer; the last one is the output size (e.g. 10 classes).
      activation: hidden activation by name (see ACTIVATIONS).
      dropout: dropout rate after each hidden activation (0 disables).
      batch_norm: BatchNorm before each hidden activation.
      bn_momentum: its momentum in Flax's sense, the weight of the old running statistics (default
        0.99, Flax's; PyTorch's momentum=0.1 is bn_momentum=0.9).
      bn_convention: "flax" (biased running variance) or "torch" (unbiased, as torch.nn.BatchNorm1d);
        see `depthlab.models.norm` and docs/pytorch.md.
      residual: add a skip connection around hidden layers of equal width.
      output: "logits" (default), "softmax" (probabilities) or "log_softmax".
    """

    features: Sequence[int] = (128, 128, 10)
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False
    residual: bool = False
    output: str = "logits"
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float = 0.99
    bn_convention: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [batch, ...] (flattened) -> [batch, features[-1]]."""
        chex.assert_rank(x, {2, 3, 4})
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for width in self.features[:-1]:
            # No bias before BatchNorm: BN subtracts the mean, so such a bias only adds noise.
            y = nn.Dense(width, kernel_init=self.kernel_init, use_bias=not self.batch_norm, dtype=self.dtype)(x)
            if self.batch_norm:
                y = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                              convention=self.bn_convention, dtype=self.dtype)(y)
            y = act(y)
            if self.dropout > 0:
                y = nn.Dropout(self.dropout, deterministic=not train)(y)
            x = x + y if self.residual and x.shape == y.shape else y
        x = nn.Dense(self.features[-1], kernel_init=self.kernel_init, dtype=self.dtype)(x)
        x = x.astype(jnp.float32)
        if self.output == "softmax":
            return nn.softmax(x)
        if self.output == "log_softmax":
            return nn.log_softmax(x)
        if self.output != "logits":
            raise ValueError(f"unknown output {self.output!r}; valid: logits, softmax, log_softmax")
        return x
