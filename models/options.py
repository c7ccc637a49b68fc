"""Options that large models need: activation rematerialisation, fused attention, scanned layers.

Every option is a field of the model it applies to, and its default keeps the model exactly as it
was (same parameter tree, same numbers), so checkpoints and weight loaders do not notice it.

  * remat ("none" | "full" | "dots"): wrap each block in `nn.remat`, so the backward pass recomputes
    the block's activations instead of keeping them. "full" keeps nothing inside a block (least
    memory, one extra forward pass); "dots" keeps the results of matmuls without batch dimensions
    (the Dense projections) and recomputes the rest (attention scores, norms, activations): most of
    the memory saving for a fraction of the recompute.
  * attention_impl (None | "xla" | "cudnn" | "auto"): None is the explicit einsum attention, which
    records its weights in the 'intermediates' collection (for plots); the others call
    `jax.nn.dot_product_attention` with implementation "xla" (XLA's fused softmax-attention),
    "cudnn" (cuDNN flash attention on NVIDIA GPUs, bfloat16/float16 only) or "auto" (jax picks;
    today that is "xla"). `jax.nn.dot_product_attention` has no dropout, so a training call with
    attention dropout > 0 keeps the einsum path.
  * scan_layers (GPT, BERT): `nn.scan` over identical blocks, so the compiler sees one block instead
    of num_layers copies (compile time no longer grows with depth). Parameters are stacked on a leading
    axis (logical axis name "layers") under the key "layers"; `stack_layer_params` and
    `unstack_layer_params` convert parameter trees (and any tree of the same layout, such as Adam's
    moments) between the two layouts.

Example:
    >>> model = GPT(vocab_size=65, num_layers=12, remat="dots", scan_layers=True, dtype=jnp.bfloat16)
    >>> scanned = stack_layer_params(unscanned_params)             # block_0..block_11 -> layers
    >>> unscanned = unstack_layer_params(scanned)                 # and back
"""
from __future__ import annotations

import functools

import re
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = (None, "xla", "cudnn", "auto")
LAYER_AXIS = "layers"          # logical axis name of the stacked layer dimension
SCANNED_KEY = "layers"         # parameter key of the stacked blocks
CONV_AXES = (None, None, "conv_in", "conv_out")   # logical names of a 2-D conv kernel [kh, kw, in, out]


def check_remat(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; valid: {', '.join(REMAT_POLICIES)} "
                         "(none: keep activations, full: recompute each block, dots: keep only matmul outputs)")


class RankSafePartitioned(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` whose sharding constraint is skipped for a value of another rank than its
    names. Flax's `DenseGeneral` creates its kernel flat ([embed, heads*kv]) and reshapes it to the named
    rank; under bound logical rules and a mesh (`train.parallel.with_activation_sharding`) the stock box
    constrains the flat value with three names and fails, also in `apply`, where Flax re-derives the
    kernel's shape with `eval_shape(init)` to check the stored one."""

    def unbox(self, apply_constraint=True):
        if apply_constraint and len(getattr(self.value, "shape", ())) != len(self.names):
            return self.value
        return super().unbox(apply_constraint)


def logical_init(init: Callable, names: tuple) -> Callable:
    """`init` whose values carry logical axis `names` for sharding (`nn.with_logical_partitioning`, rank-safe:
    see `RankSafePartitioned`); the values are those of `init` unchanged."""

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        return RankSafePartitioned(init(*args, **kwargs), names)

    return wrapper


def conv_kernel_init(init: Callable = nn.linear.default_kernel_init) -> Callable:
    """A 2-D conv kernel initialiser (Flax's default, lecun normal) that records CONV_AXES for sharding;
    the values are those of `init` unchanged."""
    return logical_init(init, CONV_AXES)


def check_attention_impl(impl: str | None) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; valid: None (einsum, records weights), "
                         "'xla', 'cudnn', 'auto' (jax.nn.dot_product_attention)")


def remat_module(module_class: type, policy: str, static_argnums: tuple[int, ...] = (),
                 prevent_cse: bool = True) -> type:
    """`module_class` wrapped in `nn.remat` with the named policy ("none" returns it unchanged).

    static_argnums count `self` as 0 (Flax's convention): Python flags such as `train` must be static
    and passed positionally. `nn.remat` renames auto-named modules (`CheckpointBlock_0`), so callers
    name each block explicitly to keep the parameter tree unchanged. Inside `nn.scan` pass
    prevent_cse=False (the scan already prevents the common-subexpression elimination it guards against).
    """
    check_remat(policy)
    if policy == "none":
        return module_class
    return nn.remat(module_class, policy=REMAT_POLICIES[policy], static_argnums=static_argnums,
                    prevent_cse=prevent_cse)


# ----------------------------------------------------------------------------------------------
# Converting between per-layer and stacked (scanned) parameter trees
# ----------------------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"^(block_|blocks_)(\d+)$")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _stack(leaves: list) -> Any:
    if _is_box(leaves[0]):
        box = leaves[0]
        values = jnp.stack([leaf.unbox() for leaf in leaves])
        return box.replace(value=values, names=(LAYER_AXIS,) + tuple(box.names))
    return jnp.stack([jnp.asarray(leaf) for leaf in leaves])


def _unstack(leaf: Any, i: int) -> Any:
    if _is_box(leaf):
        names = tuple(leaf.names)
        return leaf.replace(value=leaf.unbox()[i], names=names[1:] if names[:1] == (LAYER_AXIS,) else names)
    return leaf[i]


def stack_layer_params(tree: Any) -> Any:
    """Per-layer blocks (GPT's block_0.., BERT's blocks_0..) -> one 'layers' subtree stacked on axis 0.

    Works at any depth of nested dicts (so on {"params": ...}, on BERT's params["encoder"], and on
    optimizer states that mirror the parameters), on plain arrays and on logically boxed leaves (the
    stacked ones gain the leading "layers" axis name).
    """
    if isinstance(tree, Mapping):
        groups: dict[str, dict[int, Any]] = {}
        out: dict[str, Any] = {}
        for key, value in tree.items():
            match = _LAYER_KEY.match(str(key))
            if match:
                groups.setdefault(match.group(1), {})[int(match.group(2))] = value
            else:
                out[key] = stack_layer_params(value)
        if len(groups) > 1:
            raise ValueError(f"both {' and '.join(groups)} layers at one level; cannot tell which to stack")
        for prefix, layers in groups.items():
            if sorted(layers) != list(range(len(layers))):
                raise ValueError(f"layers {prefix}N must be numbered 0..{len(layers) - 1}, got {sorted(layers)}")
            if SCANNED_KEY in out:
                raise ValueError(f"{SCANNED_KEY!r} already present beside {prefix}0..; is this tree already stacked?")
            ordered = [layers[i] for i in range(len(layers))]
            out[SCANNED_KEY] = jax.tree.map(lambda *xs: _stack(list(xs)), *ordered, is_leaf=_is_box)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):        # optax states are namedtuples
        return type(tree)(*(stack_layer_params(v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(stack_layer_params(v) for v in tree)
    return tree


def unstack_layer_params(tree: Any, prefix: str = "block_") -> Any:
    """The inverse of `stack_layer_params`: 'layers' [num_layers, ...] -> prefix0, prefix1, ...

    prefix: "block_" for GPT (the default), "blocks_" for BERT's encoder.
    """
    if prefix not in ("block_", "blocks_"):
        raise ValueError(f"unknown layer prefix {prefix!r}; valid: 'block_' (GPT), 'blocks_' (BERT encoder)")
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if key == SCANNED_KEY and isinstance(value, Mapping):
                leaves = jax.tree.leaves(value, is_leaf=_is_box)
                num_layers = int(jnp.shape(leaves[0].unbox() if _is_box(leaves[0]) else leaves[0])[0])
                for i in range(num_layers):
                    out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: _unstack(x, i), value, is_leaf=_is_box)
            else:
                out[key] = unstack_layer_params(value, prefix)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(unstack_layer_params(v, prefix) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(unstack_layer_params(v, prefix) for v in tree)
    return tree
