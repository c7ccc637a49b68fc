"""Transformers in one readable file: attention, GPT, BERT and an encoder-decoder.

A transformer turns a sequence of token ids into a sequence of vectors, then into predictions.

    tokens [batch, time] --embed--> x [batch, time, embed]
    x = x + Attention(LayerNorm(x))     # tokens exchange information ("communication")
    x = x + MLP(LayerNorm(x))           # each token thinks on its own ("computation")
    ... repeated num_layers times (pre-LayerNorm blocks: the residual path stays a clean sum) ...
    LayerNorm -> Dense to vocab -> logits [batch, time, vocab]

Attention. Every token emits a query q, a key k and a value v (per head, head_dim wide). Token t
attends to token s with weight softmax_s(q_t . k_s / sqrt(head_dim)); its output is the weighted
sum of the values. Masks decide who may look at whom:
  * causal (GPT, decoders): t sees only s <= t, so predicting token t+1 never peeks ahead;
  * padding (BERT, encoders): nobody looks at pad tokens.
Several heads run side by side on slices of the embedding and are mixed by an output projection.

Positions. Attention alone is order-blind, so we add either a learned vector per position
("learned") or rotate q and k by position-dependent angles ("rotary", Su et al. 2021), which
makes q.k depend on the relative offset only.

Three models are built from these blocks:
  * `GPT` — decoder only, trained to predict the next token; `generate` samples from it with a
    key/value cache (each new token reuses the keys/values of all earlier ones, O(T) per step).
  * `BERT` — encoder only, pre-trained by masked-LM (predict hidden tokens from both sides) and
    fine-tuned with a pooled classification head.
  * `EncoderDecoder` — the original "Attention is all you need" layout for translation: the decoder
    also attends to the encoder's output (cross-attention); `greedy_decode` and `beam_search`.

Parallelism. Every parameter carries Flax logical axis names ('embed', 'mlp', 'heads', 'kv',
'vocab') via `nn.with_logical_partitioning`; an engine maps them to mesh axes (e.g. 'mlp', 'heads'
and 'vocab' -> 'tensor') for Megatron-style tensor parallelism. Parameters are float32; `dtype`
is the compute dtype (bfloat16 on accelerators); logits come back in float32.

Large models. `remat` ("none" | "full" | "dots") recomputes each block's activations in the backward
pass, `attention_impl` ("xla" | "cudnn" | "auto") routes attention through the fused
`jax.nn.dot_product_attention`, and `scan_layers` (GPT, BERT) compiles one block scanned num_layers
times; see `depthlab.models.options`. The defaults keep the parameter tree and the numbers unchanged.

Example:
    >>> model = GPT(vocab_size=65, num_layers=2, num_heads=2, embed_dim=64, max_len=128)
    >>> params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    >>> logits = model.apply({"params": params}, tokens)                 # [batch, time, 65]
    >>> out = generate(model, params, prompt, 100, jax.random.key(1), temperature=0.8, top_k=10)
"""
from __future__ import annotations

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.options import (LAYER_AXIS, check_attention_impl, check_remat, logical_init, remat_module,
                                     stack_layer_params, unstack_layer_params)
from depthlab.models.registry import register_model

__all__ = ["stack_layer_params", "unstack_layer_params"]   # re-exported: checkpoints convert from here too

Dtype = Any
POSITION_EMBEDDINGS = ("learned", "rotary")


def _init(names: tuple, stddev: float = 0.02):
    """GPT-2 style N(0, 0.02) init that also records logical axis names for sharding."""
    return logical_init(nn.initializers.normal(stddev), names)


def _zeros(names: tuple):
    return logical_init(nn.initializers.zeros_init(), names)


def _layer_norm(dtype: Dtype, name: str | None = None, use_bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name, use_bias=use_bias,
                        scale_init=logical_init(nn.initializers.ones_init(), ("embed",)),
                        bias_init=_zeros(("embed",)))


# ----------------------------------------------------------------------------------------------
# Masks and positions
# ----------------------------------------------------------------------------------------------
def causal_mask(length: int) -> jax.Array:
    """[1, 1, length, length] bool; True where query t may attend to key s (s <= t)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """[batch, 1, 1, time] bool; True for real (non-pad) keys."""
    return (tokens != pad_id)[:, None, None, :]


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates pairs of features of x [batch, time, heads, head_dim] by angle position * freq.

    Feature i and i + head_dim/2 form a 2-D point rotated by positions * base^(-2i/head_dim)
    (GPT-NeoX layout); then q.k depends only on the distance between the two positions.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}; change embed_dim/num_heads")
    freqs = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)     # [head_dim/2]
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]                # [time, head_dim/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with optional rotary positions and a decoding cache.

    Attributes:
      num_heads: number of heads; head_dim = embed // num_heads.
      dropout: dropout on the attention weights and on the output.
      rotary: rotate queries and keys by their positions (self-attention only).
      out_init_scale: std of the output projection (GPT-2 scales it by 1/sqrt(2 * num_layers)).
      dtype: compute dtype.
      use_bias: biases in the q/k/v and output projections.
      attention_impl: None (default) the einsum below, which records the weights in 'intermediates';
        "xla", "cudnn" or "auto" call `jax.nn.dot_product_attention` (fused; no recorded weights).
        It cannot drop out attention weights, so a training call with dropout > 0 stays on the einsum.
    """

    num_heads: int
    dropout: float = 0.0
    rotary: bool = False
    out_init_scale: float = 0.02
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None,
                 positions: jax.Array | None = None, train: bool = False, decode: bool = False,
                 causal: bool = False) -> jax.Array:
        """x [batch, time, embed]; context [batch, source, embed] for cross-attention (None: self).

        mask: bool, broadcastable to [batch, heads, time, source]; True = may attend.
        positions: [time] absolute positions of x (needed for rotary and for decode).
        decode: append this call's keys/values to the 'cache' collection and attend to all cached
          ones at positions <= the query's (the causal mask is then built here from `positions`).
        causal: self-attention where token t sees only s <= t (combined with `mask`); a fused
          implementation gets it as `is_causal`, so cuDNN can skip the masked half.
        """
        check_attention_impl(self.attention_impl)
        embed = x.shape[-1]
        if embed % self.num_heads:
            raise ValueError(f"embed size {embed} is not divisible by num_heads={self.num_heads}; "
                             "choose embed_dim a multiple of num_heads")
        head_dim = embed // self.num_heads
        is_self = context is None
        context = x if is_self else context
        project = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
                                    use_bias=self.use_bias, kernel_init=_init(("embed", "heads", "kv")),
                                    bias_init=_zeros(("heads", "kv")))
        q = project(name="query")(x)            # [batch, time, heads, head_dim]
        k = project(name="key")(context)        # [batch, source, heads, head_dim]
        v = project(name="value")(context)
        if self.rotary and is_self:
            positions = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)

        if decode:
            if not is_self:
                raise ValueError("decode=True is only for self-attention; pass context=None")
            k, v, mask = self._update_cache(k, v, positions)   # the cache's mask is already causal
        causal = causal and not decode
        if causal and not is_self:
            raise ValueError("causal=True is for self-attention; pass context=None or causal=False")

        if self.attention_impl is not None and not (train and self.dropout > 0):
            implementation = None if self.attention_impl == "auto" else self.attention_impl
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
            return self._project_out(out, embed, train)
        if causal:
            full = causal_mask(x.shape[1])
            mask = full if mask is None else jnp.logical_and(mask, full)
        # Scores in float32 so that bfloat16 compute keeps a stable softmax.
        logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention_weights", weights)      # for plots: [batch, heads, time, source]
        weights = nn.Dropout(self.dropout, deterministic=not train)(weights).astype(self.dtype)
        out = jnp.einsum("bhts,bshd->bthd", weights, v)
        return self._project_out(out, embed, train)

    def _project_out(self, out: jax.Array, embed: int, train: bool) -> jax.Array:
        """Heads [batch, time, heads, head_dim] -> [batch, time, embed], then dropout."""
        out = nn.DenseGeneral(embed, axis=(-2, -1), dtype=self.dtype, name="out", use_bias=self.use_bias,
                              kernel_init=_init(("heads", "kv", "embed"), self.out_init_scale),
                              bias_init=_zeros(("embed",)))(out)
        return nn.Dropout(self.dropout, deterministic=not train)(out)

    def _update_cache(self, k: jax.Array, v: jax.Array, positions: jax.Array | None):
        """Writes k, v [batch, new, heads, head_dim] at `positions` into the cache; returns all of it.

        The cache is created (zeros) by `model.init(..., decode=True)` with the full length, which
        fixes its size; later calls write into it with `dynamic_update_slice`.
        """
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        length = k.shape[1]
        positions = jnp.arange(length) if positions is None else positions
        if not initialised:       # the init pass only allocates; attend causally over this chunk
            return k, v, positions[None, None, :, None] >= jnp.arange(length)[None, None, None, :]
        start = positions[0]
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                                        (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                                          (0, start, 0, 0))
        max_len = cached_key.value.shape[1]
        # Query at absolute position p sees cached keys 0..p; later slots are empty or stale.
        mask = positions[None, None, :, None] >= jnp.arange(max_len)[None, None, None, :]
        return cached_key.value, cached_value.value, mask


class MLP(nn.Module):
    """Position-wise feed-forward: Dense(mlp_dim) -> GELU -> Dense(embed) -> dropout.

    gelu_approximate: True (default) is the tanh approximation, `nn.gelu`'s default and GPT-2's
    "gelu_new"; False is the exact erf GELU, PyTorch's `nn.GELU()` default (nanoGPT, BERT in HF).
    """

    mlp_dim: int
    dropout: float = 0.0
    out_init_scale: float = 0.02
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        embed = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_init(("embed", "mlp")), use_bias=self.use_bias,
                     bias_init=_zeros(("mlp",)), name="fc_in")(x)
        h = nn.gelu(h, approximate=self.gelu_approximate)
        h = nn.Dense(embed, dtype=self.dtype, kernel_init=_init(("mlp", "embed"), self.out_init_scale),
                     use_bias=self.use_bias, bias_init=_zeros(("embed",)), name="fc_out")(h)
        return nn.Dropout(self.dropout, deterministic=not train)(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, MLP.

    x = x + SelfAttn(LN(x)); [x = x + CrossAttn(LN(x), memory)]; x = x + MLP(LN(x)).
    use_bias: biases in every Dense and LayerNorm of the block; gelu_approximate: see `MLP`;
    attention_impl: see `MultiHeadAttention`.

    Under `nn.remat` (`remat_module(Block, policy, static_argnums=BLOCK_STATIC_ARGNUMS)`) call it
    with every argument positional: train, decode and causal are Python flags, static under remat.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    rotary: bool = False
    cross_attention: bool = False
    out_init_scale: float = 0.02
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    gelu_approximate: bool = True
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, memory: jax.Array | None = None,
                 memory_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 train: bool = False, decode: bool = False, causal: bool = False) -> jax.Array:
        attention = functools.partial(MultiHeadAttention, num_heads=self.num_heads, dropout=self.dropout,
                                      out_init_scale=self.out_init_scale, dtype=self.dtype, use_bias=self.use_bias,
                                      attention_impl=self.attention_impl)
        norm = functools.partial(_layer_norm, self.dtype, use_bias=self.use_bias)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = x + attention(rotary=self.rotary, name="self_attention")(
            norm("ln_self")(x), mask=mask, positions=positions, train=train, decode=decode, causal=causal)
        if self.cross_attention:
            x = x + attention(name="cross_attention")(
                norm("ln_cross")(x), context=memory, mask=memory_mask, train=train)
        x = x + MLP(self.mlp_dim, self.dropout, self.out_init_scale, self.dtype, use_bias=self.use_bias,
                    gelu_approximate=self.gelu_approximate, name="mlp")(norm("ln_mlp")(x), train=train)
        return x


BLOCK_STATIC_ARGNUMS = (6, 7, 8)   # train, decode, causal (self counts as 0, Flax's convention)


class _ScannedBlock(Block):
    """A `Block` in the (carry, per-layer output) form `nn.scan` wants; the flags become attributes."""

    train: bool = False
    decode: bool = False
    causal: bool = False

    def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array | None):
        return Block.__call__(self, x, mask, None, None, positions, self.train, self.decode, self.causal), None


def scanned_blocks(num_layers: int, remat: str = "none", **block_kwargs) -> nn.Module:
    """num_layers identical `Block`s as one `nn.scan` (optionally rematerialised inside), called as
    `(x, mask, positions) -> (x, None)`; parameters, the decoding cache and recorded intermediates
    are stacked on a leading axis of length num_layers (logical axis name "layers").

    block_kwargs: Block's fields plus train, decode and causal; pass name= as well.
    """
    layer = remat_module(_ScannedBlock, remat, prevent_cse=False)
    scan = nn.scan(layer, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
                   length=num_layers, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
    return scan(**block_kwargs)


class Embedding(nn.Module):
    """Token embedding (+ learned positions); `attend` reuses the table as the output layer."""

    vocab_size: int
    embed_dim: int
    max_len: int
    position_embedding: str = "learned"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown position_embedding {self.position_embedding!r}; valid: {POSITION_EMBEDDINGS}")
        self.token = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                              embedding_init=_init(("vocab", "embed")))
        if self.position_embedding == "learned":
            self.position = self.param("position", _init((None, "embed")), (self.max_len, self.embed_dim))
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, tokens: jax.Array, positions: jax.Array, train: bool = False) -> jax.Array:
        """tokens [batch, time] int, positions [time] -> [batch, time, embed_dim]."""
        x = self.token(tokens)
        if self.position_embedding == "learned":
            x = x + jnp.take(self.position, positions, axis=0).astype(self.dtype)[None]
        return self.drop(x, deterministic=not train)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [..., embed] -> logits [..., vocab] with the (tied) token table."""
        return self.token.attend(x)


def _check_tokens(tokens: jax.Array, max_len: int, name: str = "tokens") -> None:
    chex.assert_rank(tokens, 2)
    if tokens.shape[1] > max_len:
        raise ValueError(f"{name} has length {tokens.shape[1]} > max_len={max_len}; raise model max_len "
                         "or feed shorter sequences")


# ----------------------------------------------------------------------------------------------
# GPT: decoder-only language model
# ----------------------------------------------------------------------------------------------
@register_model("gpt")
class GPT(nn.Module):
    """Decoder-only transformer LM (GPT-2 layout, pre-LayerNorm).

    Attributes:
      vocab_size: number of token ids.
      num_layers, num_heads, embed_dim: depth, heads per layer, model width.
      mlp_dim: hidden width of the MLP (default 4 * embed_dim).
      max_len: longest sequence (context) the model accepts.
      dropout: dropout on embeddings, attention weights and residual branches.
      position_embedding: "learned" or "rotary".
      tie_embeddings: use the token table as the output layer (saves vocab * embed parameters).
      dtype: compute dtype (params stay float32).
      bias: biases in every Dense and LayerNorm (True, the default, is GPT-2's layout; nanoGPT's
        default `bias=False` drops them all, which is slightly better and faster).
      gelu_approximate: True (default) the tanh-approximate GELU (`nn.gelu`'s default, GPT-2's
        "gelu_new"); False the exact erf GELU (PyTorch `nn.GELU()`, nanoGPT).
      remat: "none" (default), "full" or "dots": rematerialise each block in the backward pass
        (see `depthlab.models.options`).
      scan_layers: one `nn.scan` over the blocks (compile time independent of depth); parameters
        live under 'layers' stacked on a leading [num_layers] axis instead of block_0..block_N-1
        (`stack_layer_params` / `unstack_layer_params` convert).
      attention_impl: None (einsum, records attention weights), "xla", "cudnn" or "auto"
        (`jax.nn.dot_product_attention`); see `MultiHeadAttention`.

    Call: tokens [batch, time] int32 -> logits [batch, time, vocab_size] float32, where logits[:, t]
    predicts tokens[:, t + 1]. With decode=True the call appends to the 'cache' collection (see
    `generate`, exported as `depthlab.models.generate`).

    Parameters come back from `model.init` boxed: each leaf is an `nn.LogicallyPartitioned` that
    carries its logical axis names ('embed', 'heads', 'mlp', 'vocab', ...) for sharding. The engine
    maps those to mesh axes; to use the params directly, unbox them with `flax.linen.meta.unbox`
    (also `nn.meta.unbox`), which returns the same tree with plain arrays:

        >>> params = flax.linen.meta.unbox(model.init(key, tokens)["params"])
        >>> logits = model.apply({"params": params}, tokens)

    `depthlab.models.pretrained.load_gpt2` loads Hugging Face GPT-2 weights (plain arrays).
    """

    vocab_size: int
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    mlp_dim: int | None = None
    max_len: int = 256
    dropout: float = 0.0
    position_embedding: str = "learned"
    tie_embeddings: bool = True
    dtype: Dtype = jnp.float32
    bias: bool = True
    gelu_approximate: bool = True
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False, decode: bool = False) -> jax.Array:
        _check_tokens(tokens, self.max_len)
        check_remat(self.remat)
        check_attention_impl(self.attention_impl)
        length = tokens.shape[1]
        positions = jnp.arange(length)
        if decode:
            # The cache remembers how many tokens it holds: new tokens continue from there.
            initialised = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            if initialised:
                positions = index.value + positions
                index.value = index.value + length
        embed = Embedding(self.vocab_size, self.embed_dim, self.max_len, self.position_embedding,
                          self.dropout, self.dtype, name="embed")
        x = embed(tokens, positions, train=train)
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.embed_dim,
                            dropout=self.dropout, rotary=self.position_embedding == "rotary",
                            out_init_scale=0.02 / math.sqrt(2 * self.num_layers), dtype=self.dtype,
                            use_bias=self.bias, gelu_approximate=self.gelu_approximate,
                            attention_impl=self.attention_impl)
        # Causal self-attention (the decode cache builds its own causal mask from the positions).
        if self.scan_layers:
            x, _ = scanned_blocks(self.num_layers, self.remat, train=train, decode=decode, causal=True,
                                  name="layers", **block_kwargs)(x, None, positions)
        else:
            block = remat_module(Block, self.remat, static_argnums=BLOCK_STATIC_ARGNUMS)
            for i in range(self.num_layers):
                x = block(**block_kwargs, name=f"block_{i}")(x, None, None, None, positions, train, decode, True)
        x = _layer_norm(self.dtype, "ln_final", use_bias=self.bias)(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(self.vocab_size, dtype=self.dtype, use_bias=False, name="head",
                              kernel_init=_init(("embed", "vocab")))(x)
        return logits.astype(jnp.float32)


def init_cache(model: GPT, batch_size: int, length: int) -> dict:
    """Zeroed key/value cache for `length` positions, as the 'cache' collection of `model`."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, length), jnp.int32),
                                               decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Draws ids from logits [batch, vocab]; temperature 0 = greedy; top_k keeps the k most likely."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: GPT, params, prompt: jax.Array, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Autoregressive sampling with a key/value cache.

    prompt [batch, prompt_len] int -> [batch, prompt_len + max_new_tokens]. The prompt is fed in
    one call (filling the cache), then one token per step inside `lax.scan`; each step costs
    O(context) instead of recomputing the whole sequence.

    Example:
        >>> out = generate(model, params, jnp.array([[0]]), 200, jax.random.key(0), temperature=0.8, top_k=20)
    """
    chex.assert_rank(prompt, 2)
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if total > model.max_len:
        raise ValueError(f"prompt_len + max_new_tokens = {total} exceeds the model's max_len={model.max_len}; "
                         "shorten the prompt or generate fewer tokens")
    cache = init_cache(model, batch, total)
    logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"])
    rng, key = jax.random.split(rng)
    first = sample_logits(logits[:, -1], key, temperature, top_k)

    def step(carry, key):
        token, cache = carry
        logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                        mutable=["cache"])
        nxt = sample_logits(logits[:, -1], key, temperature, top_k)
        return (nxt, variables["cache"]), token

    keys = jax.random.split(rng, max_new_tokens)
    (last, _), tokens = jax.lax.scan(step, (first, variables["cache"]), keys[:-1])
    return jnp.concatenate([prompt.astype(jnp.int32), tokens.T, last[:, None]], axis=1)


def generate_without_cache(model: GPT, params, prompt: jax.Array, max_new_tokens: int, rng: jax.Array,
                           temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
    """Reference sampler: recomputes the full sequence each step (slow; used to test `generate`)."""
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    # The same keys as `generate`: the first split draws token 0, the rest draw tokens 1, 2, ...
    rng, first_key = jax.random.split(rng)
    keys = jnp.concatenate([first_key[None], jax.random.split(rng, max_new_tokens)[:-1]])

    def body(i, tokens):
        logits = model.apply({"params": params}, tokens)   # causal: padding after i does not matter
        nxt = sample_logits(logits[:, prompt_len + i - 1], keys[i], temperature, top_k)
        return tokens.at[:, prompt_len + i].set(nxt)

    return jax.lax.fori_loop(0, max_new_tokens, body, tokens)


def train_flops_per_token(num_params: int, num_layers: int, embed_dim: int, context: int) -> float:
    """Training FLOPs per token: 6 * params (forward + backward matmuls) + 12 * layers * embed * context
    (attention scores and weighted sums), as in the PaLM paper's MFU accounting."""
    return 6.0 * num_params + 12.0 * num_layers * embed_dim * context


# ----------------------------------------------------------------------------------------------
# BERT: bidirectional encoder
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Token ids -> contextual vectors with bidirectional (padding-masked) self-attention.

    remat, scan_layers, attention_impl: as in `GPT` (scanned blocks live under 'layers' instead of
    blocks_0..blocks_N-1; convert with `stack_layer_params` / `unstack_layer_params(p, "blocks_")`).
    """

    vocab_size: int
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    mlp_dim: int | None = None
    max_len: int = 256
    dropout: float = 0.0
    position_embedding: str = "learned"
    pad_id: int = 0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str | None = None

    def _block_kwargs(self) -> dict:
        return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.embed_dim, dropout=self.dropout,
                    rotary=self.position_embedding == "rotary",
                    out_init_scale=0.02 / math.sqrt(2 * self.num_layers), dtype=self.dtype,
                    attention_impl=self.attention_impl)

    def setup(self):
        check_remat(self.remat)
        check_attention_impl(self.attention_impl)
        self.embed = Embedding(self.vocab_size, self.embed_dim, self.max_len, self.position_embedding,
                               self.dropout, self.dtype)
        if not self.scan_layers:   # the scanned stack needs `train`, so it is built in __call__
            block = remat_module(Block, self.remat, static_argnums=BLOCK_STATIC_ARGNUMS)
            self.blocks = [block(**self._block_kwargs()) for _ in range(self.num_layers)]
        self.ln_final = _layer_norm(self.dtype)

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """tokens [batch, time] -> [batch, time, embed_dim]."""
        _check_tokens(tokens, self.max_len)
        positions = jnp.arange(tokens.shape[1])
        x = self.embed(tokens, positions, train=train)
        mask = padding_mask(tokens, self.pad_id)
        if self.scan_layers:
            x, _ = scanned_blocks(self.num_layers, self.remat, train=train, name="layers",
                                  **self._block_kwargs())(x, mask, positions)
        else:
            for block in self.blocks:
                x = block(x, mask, None, None, positions, train, False, False)
        return self.ln_final(x)


@register_model("bert")
class BERT(nn.Module):
    """Encoder with a masked-LM head or a pooled classification head (Devlin et al. 2019).

    Attributes: those of `Encoder`, plus
      head: "mlm" -> logits [batch, time, vocab_size] for every position (pre-training), or
              [batch, num_predictions, vocab_size] at `mlm_positions` when those are given;
            "classify" -> logits [batch, num_classes] from a pooled vector.
      num_classes: classes of the classification head.
      pooling: "cls" (the first position, as in BERT) or "mean" (average of the non-pad positions,
        often better when fine-tuning data are few).
      remat, scan_layers, attention_impl: see `Encoder` and `GPT`.

    The encoder's parameters live under 'encoder', so a pre-trained MLM model transfers to the
    classifier by copying params['encoder'] (see `transfer_encoder`).
    """

    vocab_size: int
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    mlp_dim: int | None = None
    max_len: int = 256
    dropout: float = 0.1
    position_embedding: str = "learned"
    pad_id: int = 0
    head: str = "mlm"
    num_classes: int = 2
    pooling: str = "cls"
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, mlm_positions: jax.Array | None = None, train: bool = False
                 ) -> jax.Array:
        """tokens [batch, time] -> logits (see `head`).

        mlm_positions: optional int [batch, num_predictions], the masked positions whose tokens the MLM
        head predicts. Only those rows go through the vocabulary projection (BERT's
        `max_predictions_per_seq`): with 15% masking that skips about 85% of the costliest matmul.
        """
        encoder = Encoder(self.vocab_size, self.num_layers, self.num_heads, self.embed_dim, self.mlp_dim,
                          self.max_len, self.dropout, self.position_embedding, self.pad_id, self.dtype,
                          remat=self.remat, scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                          name="encoder")
        x = encoder(tokens, train=train)
        if self.head == "mlm":
            if mlm_positions is not None:
                chex.assert_rank(mlm_positions, 2)
                x = jnp.take_along_axis(x, mlm_positions[..., None].astype(jnp.int32), axis=1)
            # Transform + tied decoder, as in BERT: Dense -> GELU -> LayerNorm -> token table.
            h = nn.gelu(nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_init(("embed", "mlp")),
                                 bias_init=_zeros(("mlp",)), name="mlm_dense")(x))
            h = _layer_norm(self.dtype, "mlm_ln")(h)
            logits = encoder.embed.attend(h) + self.param("mlm_bias", _zeros(("vocab",)), (self.vocab_size,))
            return logits.astype(jnp.float32)
        if self.head == "classify":
            if self.pooling == "cls":
                summary = x[:, 0]
            elif self.pooling == "mean":
                real = (tokens != self.pad_id)[..., None].astype(x.dtype)
                summary = jnp.sum(x * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)
            else:
                raise ValueError(f"unknown pooling {self.pooling!r}; valid: 'cls', 'mean'")
            pooled = jnp.tanh(nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_init(("embed", "mlp")),
                                       bias_init=_zeros(("mlp",)), name="pooler")(summary))
            pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
            logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_init(("mlp", None)),
                              name="classifier")(pooled)
            return logits.astype(jnp.float32)
        raise ValueError(f"unknown head {self.head!r}; valid: 'mlm', 'classify'")


def transfer_encoder(pretrained_params: dict, params: dict) -> dict:
    """params with their 'encoder' subtree replaced by the pre-trained one (heads keep their init).

    `params` may carry Flax logical-axis boxes (`model.init(...)["params"]` as it comes): the boxes are
    kept and only their values replaced, so the fine-tuned model still shards tensor-parallel.
    `pretrained_params` may be boxed or plain arrays.
    """
    if "encoder" not in pretrained_params:
        raise ValueError(f"pre-trained params have no 'encoder' entry (keys: {list(pretrained_params)}); "
                         "pass the params of a BERT model")
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    source, target = nn.meta.unbox(pretrained_params["encoder"]), params["encoder"]
    plain_target = nn.meta.unbox(target)
    if jax.tree.structure(source) != jax.tree.structure(plain_target):
        raise ValueError("the pre-trained encoder does not match this model's encoder (different num_layers, "
                         "embed_dim, vocab_size, max_len or position_embedding?): "
                         f"{jax.tree.structure(source)} vs {jax.tree.structure(plain_target)}")
    mismatched = [(jnp.shape(a), jnp.shape(b)) for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(plain_target))
                  if jnp.shape(a) != jnp.shape(b)]
    if mismatched:
        raise ValueError(f"pre-trained encoder shapes differ from this model's (pre-trained, model): {mismatched[:3]}; "
                         "build the classifier with the pre-training model's hyper-parameters")
    encoder = jax.tree.map(lambda box, value: box.replace_boxed(value) if is_box(box) else value,
                           target, source, is_leaf=is_box)
    return {**params, "encoder": encoder}


# ----------------------------------------------------------------------------------------------
# Encoder-decoder (translation)
# ----------------------------------------------------------------------------------------------
@register_model("encoder_decoder")
class EncoderDecoder(nn.Module):
    """Encoder-decoder transformer with one shared vocabulary and tied embeddings (Vaswani et al. 2017).

    Call: (source [batch, S], target_in [batch, T]) -> logits [batch, T, vocab_size], where
    target_in is the target shifted right (starting with BOS) and logits[:, t] predicts target[t].
    Use `model.apply(v, source, method=model.encode)` and `method=model.decode` for decoding.
    remat, attention_impl: as in `GPT`, for the encoder and decoder blocks (no scan_layers here).
    """

    vocab_size: int
    num_layers: int = 3
    num_heads: int = 4
    embed_dim: int = 128
    mlp_dim: int | None = None
    max_len: int = 128
    dropout: float = 0.1
    position_embedding: str = "learned"
    pad_id: int = 0
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None

    def setup(self):
        self.encoder = Encoder(self.vocab_size, self.num_layers, self.num_heads, self.embed_dim, self.mlp_dim,
                               self.max_len, self.dropout, self.position_embedding, self.pad_id, self.dtype,
                               remat=self.remat, attention_impl=self.attention_impl)
        # The decoder has its own position table but shares the token table with the encoder.
        block = remat_module(Block, self.remat, static_argnums=BLOCK_STATIC_ARGNUMS)
        self.decoder_blocks = [block(self.num_heads, self.mlp_dim or 4 * self.embed_dim, self.dropout,
                                     rotary=self.position_embedding == "rotary", cross_attention=True,
                                     out_init_scale=0.02 / math.sqrt(2 * self.num_layers), dtype=self.dtype,
                                     attention_impl=self.attention_impl)
                               for _ in range(self.num_layers)]
        if self.position_embedding == "learned":
            self.decoder_position = self.param("decoder_position", _init((None, "embed")),
                                               (self.max_len, self.embed_dim))
        self.decoder_ln = _layer_norm(self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def encode(self, source: jax.Array, train: bool = False) -> jax.Array:
        """source [batch, S] -> memory [batch, S, embed_dim]."""
        return self.encoder(source, train=train)

    def decode(self, target_in: jax.Array, memory: jax.Array, source: jax.Array, train: bool = False) -> jax.Array:
        """target_in [batch, T], memory [batch, S, embed], source [batch, S] -> logits [batch, T, vocab]."""
        _check_tokens(target_in, self.max_len, "target_in")
        length = target_in.shape[1]
        positions = jnp.arange(length)
        x = self.encoder.embed.token(target_in)
        if self.position_embedding == "learned":
            x = x + self.decoder_position[:length].astype(self.dtype)[None]
        x = self.drop(x, deterministic=not train)
        memory_mask = padding_mask(source, self.pad_id)
        for block in self.decoder_blocks:   # causal self-attention, then cross-attention to the memory
            x = block(x, None, memory, memory_mask, positions, train, False, True)
        return self.encoder.embed.attend(self.decoder_ln(x)).astype(jnp.float32)

    def __call__(self, source: jax.Array, target_in: jax.Array, train: bool = False) -> jax.Array:
        return self.decode(target_in, self.encode(source, train=train), source, train=train)


def greedy_decode(model: EncoderDecoder, params, source: jax.Array, max_len: int, bos_id: int,
                  eos_id: int) -> jax.Array:
    """Most likely token at each step. source [batch, S] -> [batch, max_len] (after EOS: pad_id).

    The decoder reruns on a fixed-size buffer each step (shapes never change, so it compiles once;
    the causal mask makes the unfilled tail irrelevant). Fine for short outputs; GPT's `generate`
    shows the cached variant.
    """
    variables = {"params": params}
    memory = model.apply(variables, source, method=model.encode)
    batch = source.shape[0]
    buffer = jnp.full((batch, max_len + 1), model.pad_id, jnp.int32).at[:, 0].set(bos_id)

    def body(i, carry):
        buffer, done = carry
        logits = model.apply(variables, buffer[:, :-1], memory, source, method=model.decode)
        token = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
        token = jnp.where(done, model.pad_id, token)
        return buffer.at[:, i + 1].set(token), done | (token == eos_id)

    buffer, _ = jax.lax.fori_loop(0, max_len, body, (buffer, jnp.zeros((batch,), bool)))
    return buffer[:, 1:]


def beam_search(model: EncoderDecoder, params, source: jax.Array, max_len: int, bos_id: int, eos_id: int,
                beam_size: int = 4, length_penalty: float = 0.6) -> jax.Array:
    """Beam search: keep the `beam_size` best partial outputs by total log-probability.

    Each step extends every live beam by every token, keeps the best beam_size of the
    beam_size * vocab candidates, and freezes beams that emitted EOS (they extend only with pad at
    no cost). The winner maximises log p / ((5 + len) / 6) ** length_penalty (GNMT), so short
    outputs are not unduly favoured. source [batch, S] -> [batch, max_len].
    """
    variables = {"params": params}
    batch = source.shape[0]
    vocab = model.vocab_size
    # Every beam of an example shares the example's encoder output: tile it beam_size times.
    source_tiled = jnp.repeat(source, beam_size, axis=0)                                # [batch*beam, S]
    memory = model.apply(variables, source_tiled, method=model.encode)
    buffer = jnp.full((batch, beam_size, max_len + 1), model.pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    # Only beam 0 is live at the start, so the first step does not pick the same token K times.
    scores = jnp.tile(jnp.array([0.0] + [-1e9] * (beam_size - 1)), (batch, 1))          # [batch, beam]
    done = jnp.zeros((batch, beam_size), bool)
    lengths = jnp.zeros((batch, beam_size), jnp.int32)

    def body(i, carry):
        buffer, scores, done, lengths = carry
        logits = model.apply(variables, buffer.reshape(batch * beam_size, -1)[:, :-1], memory, source_tiled,
                             method=model.decode)
        log_probs = jax.nn.log_softmax(logits[:, i]).reshape(batch, beam_size, vocab)
        # A finished beam continues only with pad, at log-prob 0.
        frozen = jnp.full((vocab,), -1e9).at[model.pad_id].set(0.0)
        log_probs = jnp.where(done[..., None], frozen, log_probs)
        candidates = (scores[..., None] + log_probs).reshape(batch, beam_size * vocab)
        scores, flat = jax.lax.top_k(candidates, beam_size)                            # [batch, beam]
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        take = functools.partial(jnp.take_along_axis, axis=1)
        buffer = take(buffer, parent[..., None]).at[:, :, i + 1].set(token)
        was_done = take(done, parent)
        lengths = take(lengths, parent) + (~was_done).astype(jnp.int32)
        done = was_done | (token == eos_id)
        return buffer, scores, done, lengths

    buffer, scores, done, lengths = jax.lax.fori_loop(0, max_len, body, (buffer, scores, done, lengths))
    normalised = scores / ((5.0 + lengths) / 6.0) ** length_penalty
    best = jnp.argmax(normalised, axis=1)
    return jnp.take_along_axis(buffer, best[:, None, None], axis=1)[:, 0, 1:]
