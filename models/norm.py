"""BatchNorm with a choice of running-variance convention (Flax's or PyTorch's).

Both frameworks normalise a training batch by its *biased* variance (divide by n). They differ in
what they keep for evaluation and in how they write the momentum:

    Flax  (convention="flax"):  var_run = m * var_run + (1 - m) * var_batch            (biased, /n)
    PyTorch (convention="torch"): var_run = m * var_run + (1 - m) * var_batch * n/(n-1)  (unbiased)

where n is the number of values averaged per feature (batch x height x width for images). The
momentum is mirrored: Flax's `momentum=m` is PyTorch's `momentum=1 - m` (torch's default 0.1 is
Flax's 0.9). Parameter and statistic names are Flax's (`scale`, `bias`; `mean`, `var` in
`batch_stats`) under either convention, so checkpoints and weight import do not depend on it.

Example:
    >>> norm = BatchNorm(use_running_average=False, momentum=0.9, convention="torch")
    >>> y, updates = norm.apply(variables, x, mutable=["batch_stats"])   # x [batch, ..., features]
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_CONVENTIONS = ("flax", "torch")


def check_bn_convention(convention: str) -> None:
    if convention not in BN_CONVENTIONS:
        raise ValueError(f"unknown BatchNorm convention {convention!r}; valid: {', '.join(BN_CONVENTIONS)} "
                         "(flax: biased running variance, torch: unbiased)")


class BatchNorm(nn.BatchNorm):
    """`flax.linen.BatchNorm` plus `convention`: "flax" (the default, exactly nn.BatchNorm) or "torch"
    (the running variance averages the unbiased batch variance, as torch.nn.BatchNorm does).

    `momentum` keeps Flax's meaning (weight of the old statistics) under both conventions.
    """

    convention: str = "flax"

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        check_bn_convention(self.convention)
        training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.convention == "flax" or not training or self.is_initializing():
            return super().__call__(x, use_running_average, mask=mask)
        old_var = self.get_variable("batch_stats", "var")
        y = super().__call__(x, use_running_average, mask=mask)
        flax_var = self.get_variable("batch_stats", "var")
        # flax_var = m * old + (1 - m) * biased, so (flax_var - m * old) / (n - 1) is the extra
        # (1 - m) * biased / (n - 1) that turns biased into unbiased (n / (n - 1) * biased).
        n = self._count(x, mask)
        correction = (flax_var - self.momentum * old_var) / jnp.maximum(n - 1, 1)
        self.put_variable("batch_stats", "var", flax_var + correction)
        return y

    def _count(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Values per feature that the batch statistics averaged over (across devices with axis_name)."""
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        feature_axes = {a % x.ndim for a in axes}
        reduction = tuple(i for i in range(x.ndim) if i not in feature_axes)
        if mask is None:
            n = jnp.asarray(float(math.prod(x.shape[i] for i in reduction)))
        else:
            n = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduction).astype(jnp.float32)
            n = n.reshape(self.get_variable("batch_stats", "var").shape)
        if self.axis_name is not None:
            n = jax.lax.psum(n, self.axis_name, axis_index_groups=self.axis_index_groups)
        return n
