"""GPT, BERT and the encoder-decoder: shapes, gradients, masks, KV cache, decoding, sharding."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.models.transformer import (BERT, GPT, EncoderDecoder, beam_search, generate, generate_without_cache,
                                         greedy_decode, transfer_encoder)

VOCAB = 12
TINY = dict(num_layers=1, num_heads=2, embed_dim=16, max_len=32)


@functools.lru_cache(maxsize=None)
def _init_cached(model, shapes):
    inputs = [jnp.ones(shape, jnp.int32) for shape in shapes]
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"])


def _init(model, *inputs):
    """Parameters of `model` (initialised once per model and input shapes: init compiles slowly)."""
    return _init_cached(model, tuple(x.shape for x in inputs))


def _apply(model, params, *inputs, **kwargs):
    return jax.jit(lambda p, *x: model.apply({"params": p}, *x, **kwargs))(params, *inputs)


def _tokens(shape, seed=0, low=1):
    return jax.random.randint(jax.random.key(seed), shape, low, VOCAB)


def _assert_all_grads_nonzero(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.any(np.abs(g) > 0), f"zero gradient for {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("position_embedding,tie", [("learned", True), ("rotary", False)])
def test_gpt_shape_and_logical_axes(position_embedding, tie):
    model = GPT(vocab_size=VOCAB, position_embedding=position_embedding, tie_embeddings=tie, **TINY)
    tokens = _tokens((3, 10))
    boxed = model.init(jax.random.key(0), tokens)["params"]
    # Every parameter carries logical axis names, so the engine can shard it.
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    logits = _apply(model, nn.meta.unbox(boxed), tokens)
    chex.assert_shape(logits, (3, 10, VOCAB))
    assert ("head" in boxed) != tie


def test_gpt_rejects_too_long_input():
    model = GPT(vocab_size=VOCAB, **TINY)
    with pytest.raises(ValueError, match="max_len"):
        model.init(jax.random.key(0), _tokens((1, 40)))


def test_gpt_gradients_finite_and_nonzero():
    # Learned positions and an untied head: the variant with the most parameter kinds.
    model = GPT(vocab_size=VOCAB, position_embedding="learned", tie_embeddings=False, dropout=0.1, **TINY)
    tokens = _tokens((2, 12))
    params = _init(model, tokens)

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1], train=True, rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("position_embedding", ["learned", "rotary"])
def test_causal_mask_future_token_does_not_change_past_logits(position_embedding):
    model = GPT(vocab_size=VOCAB, position_embedding=position_embedding, **TINY)
    tokens = _tokens((2, 12))
    params = _init(model, tokens)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % VOCAB)
    a, b = _apply(model, params, tokens), _apply(model, params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert np.max(np.abs(a[:, 7:] - b[:, 7:])) > 1e-4   # the change is visible from position 7 on


@pytest.mark.parametrize("position_embedding", ["learned", "rotary"])
def test_kv_cache_generation_equals_full_recompute(position_embedding):
    model = GPT(vocab_size=VOCAB, position_embedding=position_embedding, **TINY)
    prompt = _tokens((3, 4))
    params = _init(model, prompt)
    rng = jax.random.key(5)
    cached = generate(model, params, prompt, 12, rng, temperature=0.0)
    full = generate_without_cache(model, params, prompt, 12, rng, temperature=0.0)
    chex.assert_shape(cached, (3, 16))
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(cached[:, :4], prompt)
    # Sampling with temperature and top-k draws the same tokens from the same keys.
    sampled = generate(model, params, prompt, 12, rng, temperature=1.5, top_k=4)
    np.testing.assert_array_equal(sampled, generate_without_cache(model, params, prompt, 12, rng, 1.5, 4))
    assert not np.array_equal(sampled, cached)


def test_generate_checks_length():
    model = GPT(vocab_size=VOCAB, **TINY)
    prompt = _tokens((1, 4))
    with pytest.raises(ValueError, match="max_len"):
        generate(model, _init(model, prompt), prompt, 40, jax.random.key(0))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = GPT(vocab_size=VOCAB, dtype=jnp.bfloat16, **TINY)
    tokens = _tokens((2, 8))
    params = _init(model, tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = _apply(model, params, tokens)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_gpt_learns_a_repeating_pattern():
    model = GPT(vocab_size=VOCAB, **TINY)
    pattern = jnp.tile(jnp.array([1, 5, 3, 7, 2, 9]), 4)[None].repeat(8, axis=0)     # [8, 24]
    params = _init(model, pattern)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits = model.apply({"params": p}, pattern[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, pattern[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for _ in range(60):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert losses[-1] < 0.1 * losses[0]


def test_bert_heads_shapes_gradients_and_transfer():
    tokens = _tokens((3, 10)).at[:, 7:].set(0)          # last three positions are padding
    mlm = BERT(vocab_size=VOCAB, head="mlm", **TINY)
    mlm_params = _init(mlm, tokens)
    chex.assert_shape(_apply(mlm, mlm_params, tokens), (3, 10, VOCAB))
    cls = BERT(vocab_size=VOCAB, head="classify", num_classes=3, **TINY)
    cls_params = transfer_encoder(mlm_params, _init(cls, tokens))
    logits = _apply(cls, cls_params, tokens)
    chex.assert_shape(logits, (3, 3))

    def loss(p):
        out = cls.apply({"params": p}, tokens, train=True, rngs={"dropout": jax.random.key(2)})
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.array([0, 1, 2])).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(cls_params))
    with pytest.raises(ValueError, match="head"):
        BERT(vocab_size=VOCAB, head="pool", **TINY).init(jax.random.key(0), tokens)
    # Appending pad tokens (id 0) does not change what the real tokens see.
    real = tokens[:, :7]
    np.testing.assert_allclose(_apply(mlm, mlm_params, tokens)[:, :7], _apply(mlm, mlm_params, real), atol=1e-5)


def test_transfer_encoder_keeps_logical_axes_and_checks_shapes():
    tokens = _tokens((2, 8))
    mlm_params = _init(BERT(vocab_size=VOCAB, head="mlm", **TINY), tokens)
    cls = BERT(vocab_size=VOCAB, head="classify", **TINY)
    boxed = jax.eval_shape(cls.init, jax.random.key(0), tokens)["params"]
    boxed = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), boxed)     # boxed zeros, no compile
    moved = transfer_encoder(mlm_params, boxed)
    # The logical axis names survive (tensor-parallel sharding needs them) ...
    assert nn.get_partition_spec(moved) == nn.get_partition_spec(boxed)
    q_spec = nn.get_partition_spec(moved)["encoder"]["blocks_0"]["self_attention"]["query"]["kernel"]
    assert "heads" in tuple(q_spec), q_spec
    # ... and the values are the pre-trained ones, while the head keeps its own.
    chex.assert_trees_all_equal(nn.meta.unbox(moved)["encoder"], mlm_params["encoder"])
    chex.assert_trees_all_equal(nn.meta.unbox(moved)["classifier"], nn.meta.unbox(boxed)["classifier"])
    wider = _init(BERT(vocab_size=VOCAB, head="mlm", **{**TINY, "embed_dim": 32}), tokens)
    with pytest.raises(ValueError, match="shapes differ"):
        transfer_encoder(wider, boxed)
    with pytest.raises(ValueError, match="does not match"):
        transfer_encoder(_init(BERT(vocab_size=VOCAB, head="mlm", **{**TINY, "num_layers": 2}), tokens), boxed)


@pytest.mark.slow
def test_bert_mlm_head_gradients():
    model = BERT(vocab_size=VOCAB, dropout=0.0, **TINY)
    tokens = _tokens((2, 8))
    params = _init(model, tokens)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, tokens), tokens).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_encoder_decoder_shape_and_causality():
    model = EncoderDecoder(vocab_size=VOCAB, **TINY)
    source, target = _tokens((2, 9)), _tokens((2, 6), seed=1)
    params = _init(model, source, target)
    logits = _apply(model, params, source, target)
    chex.assert_shape(logits, (2, 6, VOCAB))
    changed = target.at[:, 4].set((target[:, 4] + 1) % VOCAB)
    np.testing.assert_allclose(_apply(model, params, source, changed)[:, :4], logits[:, :4], atol=1e-6)


@pytest.mark.slow
def test_encoder_decoder_gradients():
    model = EncoderDecoder(vocab_size=VOCAB, **TINY)
    source, target = _tokens((2, 9)), _tokens((2, 6), seed=1)
    params = _init(model, source, target)

    def loss(p):
        out = model.apply({"params": p}, source, target, train=True, rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], target[:, 1:]).mean()

    _assert_all_grads_nonzero(jax.jit(jax.grad(loss))(params))


def test_greedy_and_beam_search_decoding():
    model = EncoderDecoder(vocab_size=VOCAB, **TINY)
    source = _tokens((3, 7))
    params = _init(model, source, source)
    greedy = jax.jit(lambda p, s: greedy_decode(model, p, s, max_len=10, bos_id=1, eos_id=2))(params, source)
    chex.assert_shape(greedy, (3, 10))
    # Beam search with one beam and no length penalty is greedy decoding.
    one_beam = jax.jit(lambda p, s: beam_search(model, p, s, max_len=10, bos_id=1, eos_id=2, beam_size=1,
                                                length_penalty=0.0))(params, source)
    np.testing.assert_array_equal(one_beam, greedy)
    beams = jax.jit(lambda p, s: beam_search(model, p, s, max_len=10, bos_id=1, eos_id=2, beam_size=4))(params, source)
    chex.assert_shape(beams, (3, 10))
    # After an EOS every later position holds the pad id.
    for row in np.asarray(beams):
        eos = np.where(row == 2)[0]
        if len(eos):
            assert np.all(row[eos[0] + 1:] == 0)


def test_gpt_train_step_on_data2_x_tensor2_mesh_matches_one_device():
    from depthlab.train import TrainState, make_train_step, parallel
    from depthlab.train.losses import softmax_cross_entropy

    assert len(jax.devices()) == 4, "tests/conftest.py should give 4 fake CPU devices"
    model = GPT(vocab_size=16, num_layers=2, num_heads=4, embed_dim=32, max_len=16, dropout=0.0)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (8, 13), 0, 16))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    tx = optax.adamw(1e-2)

    def init(rng):
        params = model.init(rng, jnp.asarray(batch["inputs"]))["params"]
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng)

    def loss_fn(logits, b):
        return softmax_cross_entropy(logits, b["targets"]), {}

    step = make_train_step(model, loss_fn)

    def run(mesh):
        abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = parallel.state_shardings(abstract, mesh)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(0))
        jitted = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)))
        losses = []
        for _ in range(3):
            state, metrics = jitted(state, batch)
            losses.append(float(metrics["loss"]))
        return losses, shardings

    single, _ = run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    sharded, shardings = run(parallel.make_mesh({"data": 2, "tensor": 2}))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    # The MLP and attention weights really are split over the tensor axis.
    spec = shardings.params["block_0"]["mlp"]["fc_in"]["kernel"].spec
    assert "tensor" in tuple(spec), spec
    assert "tensor" in tuple(shardings.params["block_0"]["self_attention"]["query"]["kernel"].spec)
