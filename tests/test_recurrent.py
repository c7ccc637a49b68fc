"""LSTM/GRU language model and classifier: shapes, gradients, padding, learning."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models.recurrent import RNNClassifier, RNNLanguageModel

VOCAB = 10


def _assert_all_grads_nonzero(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(np.abs(g) > 0), f"zero gradient for {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_language_model_shape_gradients_and_causality(cell):
    model = RNNLanguageModel(vocab_size=VOCAB, hidden_size=8, num_layers=2, cell=cell, dropout=0.1)
    tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, VOCAB)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits = apply(params, tokens)
    chex.assert_shape(logits, (3, 9, VOCAB))
    # A recurrent LM reads left to right: a later token cannot change earlier predictions.
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)
    np.testing.assert_allclose(apply(params, changed)[:, :6], logits[:, :6], atol=1e-6)

    def loss(p):
        out = model.apply({"params": p}, tokens[:, :-1], train=True, rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_unknown_cell_is_named_in_the_error():
    with pytest.raises(ValueError, match="rnn_tanh"):
        RNNLanguageModel(vocab_size=VOCAB, cell="rnn_tanh").init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))


@pytest.mark.parametrize("cell,bidirectional", [("lstm", True), ("gru", False)])
def test_classifier_shape_gradients_and_padding(cell, bidirectional):
    model = RNNClassifier(vocab_size=VOCAB, num_classes=3, hidden_size=8, num_layers=2, cell=cell,
                          bidirectional=bidirectional)
    tokens = jax.random.randint(jax.random.key(0), (4, 6), 1, VOCAB)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    logits = model.apply({"params": params}, tokens)
    chex.assert_shape(logits, (4, 3))
    # Right padding with pad id 0 changes nothing: the final state is read at each sequence's end.
    padded = jnp.concatenate([tokens, jnp.zeros((4, 5), tokens.dtype)], axis=1)
    np.testing.assert_allclose(model.apply({"params": params}, padded), logits, atol=1e-5)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, tokens),
                                                               jnp.array([0, 1, 2, 0])).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_classifier_learns_order_dependent_labels():
    """Label = whether token 1 comes before token 2: a bag of words cannot tell, an LSTM can."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, size=(256, 8))
    i, j = rng.integers(0, 8, size=(2, 256))
    j = np.where(i == j, (j + 1) % 8, j)
    tokens[np.arange(256), i], tokens[np.arange(256), j] = 1, 2
    labels = (i < j).astype(np.int32)
    model = RNNClassifier(vocab_size=VOCAB, num_classes=2, hidden_size=32, bidirectional=False)
    params = model.init(jax.random.key(0), tokens[:2])["params"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits = model.apply({"params": p}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, jnp.mean(jnp.argmax(logits, -1) == labels)

    for _ in range(150):
        params, opt, acc = step(params, opt)
    assert float(acc) > 0.95
