"""Recurrent sequence models (LSTM, GRU) on Flax's `nn.RNN` and its cells.

    tokens [batch, time] -> Embed -> (RNN layer -> dropout) * num_layers -> ...
      language model:  Dense(vocab) at every step       -> logits [batch, time, vocab]
      classifier:      final hidden state of each sequence (its last real token) -> Dense(classes)

`nn.RNN` scans a cell over time (`lax.scan` inside), so a layer compiles to one loop whatever the
length. The LSTM uses `OptimizedLSTMCell` (the four gate matmuls fused into one).

Example:
    >>> model = RNNLanguageModel(vocab_size=65, hidden_size=256, num_layers=2, cell="lstm")
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    >>> logits = model.apply(variables, tokens)          # [batch, time, 65]
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from depthlab.models.registry import register_model

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


def make_cell(name: str, features: int, dtype: Any) -> nn.RNNCellBase:
    """The recurrent cell called `name` ("lstm" or "gru") with `features` hidden units."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; valid cells: {', '.join(sorted(CELLS))}")
    return CELLS[name](features, dtype=dtype)


class RNNStack(nn.Module):
    """num_layers recurrent layers with dropout between them (optionally bidirectional).

    Call: x [batch, time, features], seq_lengths [batch] or None ->
      (outputs [batch, time, hidden * directions], final hidden [batch, hidden * directions]).
    The final hidden state is taken at each sequence's last real step (seq_lengths), so right
    padding does not leak into it.
    """

    hidden_size: int
    num_layers: int = 1
    cell: str = "lstm"
    bidirectional: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, seq_lengths: jax.Array | None = None, train: bool = False):
        final = None
        for i in range(self.num_layers):
            forward = nn.RNN(make_cell(self.cell, self.hidden_size, self.dtype), return_carry=True, name=f"rnn_{i}")
            carry, out = forward(x, seq_lengths=seq_lengths)
            final = _hidden(carry)
            if self.bidirectional:
                backward = nn.RNN(make_cell(self.cell, self.hidden_size, self.dtype), return_carry=True,
                                  reverse=True, keep_order=True, name=f"rnn_{i}_backward")
                carry_b, out_b = backward(x, seq_lengths=seq_lengths)
                out = jnp.concatenate([out, out_b], axis=-1)
                final = jnp.concatenate([final, _hidden(carry_b)], axis=-1)
            x = nn.Dropout(self.dropout, deterministic=not train)(out)
        return x, final


def _hidden(carry):
    """The hidden state h of a cell's carry: LSTM carries (c, h), GRU carries h."""
    return carry[1] if isinstance(carry, tuple) else carry


@register_model("rnn_lm")
class RNNLanguageModel(nn.Module):
    """Next-token language model with stacked LSTM/GRU layers.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: units per recurrent layer.
      num_layers: stacked recurrent layers.
      cell: "lstm" or "gru".
      embed_dim: embedding width (default hidden_size).
      dropout: on the embeddings and between layers.
      dtype: compute dtype.

    Call: tokens [batch, time] int -> logits [batch, time, vocab_size] float32 (logits[:, t]
    predicts tokens[:, t + 1]).
    """

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    embed_dim: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(tokens, 2)
        x = nn.Embed(self.vocab_size, self.embed_dim or self.hidden_size, dtype=self.dtype)(tokens)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x, _ = RNNStack(self.hidden_size, self.num_layers, self.cell, dropout=self.dropout, dtype=self.dtype)(
            x, train=train)
        return nn.Dense(self.vocab_size, dtype=self.dtype)(x).astype(jnp.float32)


@register_model("rnn_classifier")
class RNNClassifier(nn.Module):
    """Sequence classifier: embed, LSTM/GRU stack, final hidden state -> Dense(num_classes).

    Attributes: as `RNNLanguageModel`, plus num_classes, bidirectional, and pad_id (sequences are
    right-padded with it; their lengths are counted from it).

    Call: tokens [batch, time] int -> logits [batch, num_classes] float32.
    """

    vocab_size: int
    num_classes: int = 2
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"
    bidirectional: bool = True
    embed_dim: int | None = None
    dropout: float = 0.0
    pad_id: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(tokens, 2)
        lengths = jnp.maximum(jnp.sum(tokens != self.pad_id, axis=1), 1)
        x = nn.Embed(self.vocab_size, self.embed_dim or self.hidden_size, dtype=self.dtype)(tokens)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        _, final = RNNStack(self.hidden_size, self.num_layers, self.cell, self.bidirectional, self.dropout,
                            self.dtype)(x, seq_lengths=lengths, train=train)
        final = nn.Dropout(self.dropout, deterministic=not train)(final)
        return nn.Dense(self.num_classes, dtype=self.dtype)(final).astype(jnp.float32)
