"""Options for large models (depthlab.models.options): remat, mixed precision in every family, fused
attention, scanned layers and their checkpoint conversion."""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.models import (BERT, CNN, GPT, MLP, MLPVAE, ActorCritic, ConvVAE, DCGANDiscriminator, DCGANGenerator,
                             Detector, EncoderDecoder, MLPDiscriminator, MLPGenerator, PolicyValueNet, ResNet,
                             RNNClassifier, RNNLanguageModel, UNet)
from depthlab.models.transformer import generate, stack_layer_params, unstack_layer_params

VOCAB = 20
TINY = dict(vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16, max_len=16)


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 1, VOCAB)


def _padded_tokens():
    return _tokens((2, 10)).at[1, 6:].set(0)      # the second row is right-padded (pad_id 0)


# Each case: (name, module factory taking **options, inputs).
def _transformer_cases():
    tokens = _padded_tokens()
    return [
        ("gpt", lambda **o: GPT(**TINY, **o), (tokens,)),
        ("bert", lambda **o: BERT(**TINY, dropout=0.0, **o), (tokens,)),
        ("encoder_decoder", lambda **o: EncoderDecoder(**TINY, dropout=0.0, **o), (tokens, tokens)),
    ]


def _init(model, *inputs):
    return model.init(jax.random.key(0), *inputs)


def _loss_and_grads(model, variables, inputs):
    """Sum of squares of the output (mutable batch stats updated in training mode), and its gradient."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        out = model.apply({"params": p, **rest}, *inputs, train=True, mutable=list(rest) or False)
        out = out[0] if rest else out
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss))(params)


# ----------------------------------------------------------------------------------------------
# Remat
# ----------------------------------------------------------------------------------------------
def test_unknown_option_names_list_the_valid_ones():
    tokens = _tokens((1, 4))
    with pytest.raises(ValueError, match="unknown remat policy 'some'; valid: none, full, dots"):
        GPT(**TINY, remat="some").init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'.*'xla', 'cudnn'"):
        GPT(**TINY, attention_impl="flash").init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="unknown remat policy 'all'"):
        ResNet(stage_sizes=(1,), num_filters=4, cifar_stem=True, remat="all").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def _remat_cases():
    image = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    cases = {name: (make, inputs) for name, make, inputs in _transformer_cases()}
    cases["resnet"] = (lambda **o: ResNet(stage_sizes=(1, 1), num_filters=4, cifar_stem=True, preact=True, **o),
                       (image,))
    cases["unet"] = (lambda **o: UNet(num_classes=3, features=4, depth=1, **o), (image,))
    return cases


@pytest.mark.parametrize("name,policy", [("gpt", "full"), ("bert", "dots"), ("resnet", "full"), ("unet", "dots"),
                                         pytest.param("encoder_decoder", "full", marks=pytest.mark.slow)])
def test_remat_keeps_parameters_losses_and_gradients(name, policy):
    make, inputs = _remat_cases()[name]
    plain, rematted = make(), make(remat=policy)
    variables = nn.meta.unbox(_init(plain, *inputs))
    # The same parameter tree (names and shapes): checkpoints load either way.
    assert (jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(rematted.init, jax.random.key(0), *inputs)))
            == jax.tree.map(jnp.shape, variables))
    loss, grads = _loss_and_grads(plain, variables, inputs)
    loss_r, grads_r = _loss_and_grads(rematted, variables, inputs)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-6, atol=1e-9)
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_remat_lowers_the_activations_kept_for_the_backward_pass():
    """What a policy changes is the set of residuals the forward pass keeps for the backward pass: measured
    here as the bytes `jax.vjp` holds (no compile, same on every backend). XLA:CPU's compiled
    `memory_analysis().temp_size_in_bytes` does not show the saving (its schedule keeps recomputed values
    as long; even a plain `jax.checkpoint` MLP reports more temporaries there), so it is printed, not asserted.
    The TPU compiler does show it: for a 4-layer, 256-wide GPT on 32 x 512 tokens (v5e, libtpu AOT on this
    CPU) temporaries were 1,108 MiB with none, 840 MiB with dots and 386 MiB with full (compiler's figures).
    """
    tokens = _tokens((4, 64))
    config = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, embed_dim=32, max_len=64)
    params = nn.meta.unbox(jax.eval_shape(GPT(**config).init, jax.random.key(0), tokens)["params"])

    def loss_fn(policy):
        model = GPT(**config, remat=policy)
        return lambda p: -jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 0])

    def residual_bytes(policy):
        residuals = jax.eval_shape(lambda p: jax.vjp(loss_fn(policy), p)[1], params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    kept = {policy: residual_bytes(policy) for policy in ("none", "dots", "full")}
    temps = {policy: jax.jit(jax.grad(loss_fn(policy))).lower(params).compile().memory_analysis().temp_size_in_bytes
             for policy in ("none", "full")}
    print("GPT bytes kept for the backward pass:", kept, "| XLA:CPU temporaries:", temps)
    assert kept["full"] < kept["dots"] < kept["none"]
    assert kept["full"] < 0.25 * kept["none"]


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------
def _family_cases():
    image = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    gray = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
    z = jax.random.normal(jax.random.key(3), (2, 4))
    tokens = _padded_tokens()
    return {
        "mlp": (lambda d: MLP(features=(8, 8, 3), batch_norm=True, dtype=d), (image,)),
        "cnn": (lambda d: CNN(channels=(4,), dense=(8,), num_classes=3, batch_norm=True, dtype=d), (image,)),
        "resnet": (lambda d: ResNet(stage_sizes=(1, 1), num_filters=4, cifar_stem=True, dtype=d), (image,)),
        "unet": (lambda d: UNet(num_classes=3, features=4, depth=1, dtype=d), (image,)),
        "detector": (lambda d: Detector(num_classes=2, stem_width=4, widths=(4,), head_width=4, dtype=d), (image,)),
        "rnn_lm": (lambda d: RNNLanguageModel(VOCAB, hidden_size=8, num_layers=1, cell="lstm", dtype=d), (tokens,)),
        "rnn_classifier": (lambda d: RNNClassifier(VOCAB, hidden_size=8, cell="gru", dtype=d), (tokens,)),
        "gpt": (lambda d: GPT(**TINY, dtype=d), (tokens,)),
        "bert": (lambda d: BERT(**TINY, dtype=d), (tokens,)),
        "encoder_decoder": (lambda d: EncoderDecoder(**TINY, dtype=d), (tokens, tokens)),
        "dcgan_generator": (lambda d: DCGANGenerator(image_shape=(8, 8, 1), channels=(8, 4), dtype=d), (z,)),
        "dcgan_discriminator": (lambda d: DCGANDiscriminator(channels=(4, 8), spectral_norm=True, dtype=d), (gray,)),
        "mlp_generator": (lambda d: MLPGenerator(hidden=(8,), dtype=d), (z,)),
        "mlp_discriminator": (lambda d: MLPDiscriminator(hidden=(8,), dtype=d), (z,)),
        "mlp_vae": (lambda d: MLPVAE(image_shape=(8, 8, 1), latent_dim=2, hidden=(8,), likelihood="gaussian",
                                     dtype=d), (gray, jax.random.key(4))),
        "conv_vae": (lambda d: ConvVAE(image_shape=(8, 8, 1), latent_dim=2, channels=(4,), dense=8, dtype=d),
                     (gray, jax.random.key(4))),
        "actor_critic": (lambda d: ActorCritic(action_dim=2, discrete=False, hidden=(8,), dtype=d), (z,)),
        "alphazero": (lambda d: PolicyValueNet(num_actions=9, channels=4, num_blocks=1, value_hidden=4, dtype=d),
                      (jnp.ones((2, 3, 3, 2)),)),
    }


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


# Four families in the fast suite (a dense, a conv, a residual and an attention model); the rest run with the
# slow tests (each case compiles a forward and a training step: 3-10 s on 2 busy cores).
FAST_FAMILIES = ("cnn", "gpt", "resnet", "unet")


@pytest.mark.parametrize("family", [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(_family_cases())])
def test_every_family_computes_in_bfloat16_with_float32_params_and_outputs(family):
    make, inputs = _family_cases()[family]
    model = make(jnp.bfloat16)
    variables = nn.meta.unbox(model.init(jax.random.key(0), *inputs))
    # Parameters and BatchNorm statistics (also after a training step) stay float32.
    assert {str(x.dtype) for x in _float_leaves(variables)} == {"float32"}
    rest = [k for k in variables if k != "params"]
    train = {} if family == "actor_critic" else {"train": True}       # the only model without a train flag
    out, updates = model.apply(variables, *inputs, **train, mutable=rest, rngs={"dropout": jax.random.key(5)})
    assert {str(x.dtype) for x in _float_leaves(updates)} <= {"float32"}
    outputs = _float_leaves(out)
    assert outputs and {str(x.dtype) for x in outputs} == {"float32"}, family
    assert all(np.all(np.isfinite(x)) for x in outputs)
    # ... and the compute really is bfloat16: some matmul or convolution takes bf16 operands.
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, *inputs))(variables))
    assert any(("dot_general" in line or "conv_general_dilated" in line) and "bf16[" in line
               for line in jaxpr.splitlines()), f"{family}: no bfloat16 matmul/conv in the forward pass"


# ----------------------------------------------------------------------------------------------
# Fused attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,impl", [("gpt", "xla"), ("bert", "auto"), ("encoder_decoder", "xla")])
def test_fused_attention_equals_einsum_attention(name, impl):
    make, inputs = {n: (m, i) for n, m, i in _transformer_cases()}[name]
    model = make()
    params = nn.meta.unbox(_init(model, *inputs)["params"])
    expected = model.apply({"params": params}, *inputs)
    fused = make(attention_impl=impl).apply({"params": params}, *inputs)
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # 19 s loaded; fused == einsum attention stays fast
def test_fused_attention_decodes_like_einsum_and_keeps_dropout_on_the_einsum_path():
    model, fused = GPT(**TINY, dropout=0.5), GPT(**TINY, dropout=0.5, attention_impl="xla")
    prompt = _tokens((2, 3))
    params = nn.meta.unbox(_init(model, prompt)["params"])
    # Cached decoding: the cache's mask goes through dot_product_attention.
    np.testing.assert_array_equal(generate(fused, params, prompt, 6, jax.random.key(1)),
                                  generate(model, params, prompt, 6, jax.random.key(1)))
    # Training with attention dropout cannot use dot_product_attention: the same dropout masks as the einsum.
    rngs = {"dropout": jax.random.key(2)}
    np.testing.assert_array_equal(fused.apply({"params": params}, prompt, train=True, rngs=rngs),
                                  model.apply({"params": params}, prompt, train=True, rngs=rngs))


def test_fused_attention_in_bfloat16_is_close():
    tokens = _padded_tokens()
    model = BERT(**TINY, dtype=jnp.bfloat16)
    params = nn.meta.unbox(_init(model, tokens)["params"])
    expected = model.apply({"params": params}, tokens)
    fused = BERT(**TINY, dtype=jnp.bfloat16, attention_impl="xla").apply({"params": params}, tokens)
    assert fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, expected, atol=0.05)


# ----------------------------------------------------------------------------------------------
# Scanned layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,prefix", [("gpt", "block_"), ("bert", "blocks_")])
def test_scanned_and_unscanned_agree_on_converted_params(name, prefix):
    make, inputs = {n: (m, i) for n, m, i in _transformer_cases()}[name]
    plain, scanned = make(), make(scan_layers=True, remat="dots")
    boxed = _init(plain, *inputs)["params"]
    stacked = stack_layer_params(boxed)
    # The converted tree is the scanned model's, logical names included ("layers" first).
    scanned_boxed = jax.eval_shape(scanned.init, jax.random.key(0), *inputs)["params"]
    assert jax.tree.structure(nn.meta.unbox(stacked)) == jax.tree.structure(nn.meta.unbox(scanned_boxed))
    assert nn.get_partition_spec(stacked) == nn.get_partition_spec(scanned_boxed)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(stacked)) == jax.tree.map(jnp.shape, nn.meta.unbox(scanned_boxed))
    params = nn.meta.unbox(boxed)
    np.testing.assert_allclose(scanned.apply({"params": nn.meta.unbox(stacked)}, *inputs),
                               plain.apply({"params": params}, *inputs), rtol=1e-5, atol=1e-6)
    # And back: unstacking restores the per-layer tree exactly, boxed or plain.
    back = unstack_layer_params(stacked, prefix)
    assert nn.get_partition_spec(back) == nn.get_partition_spec(boxed)
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(back)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    plain_back = unstack_layer_params(stack_layer_params(params), prefix)
    assert jax.tree.structure(plain_back) == jax.tree.structure(params)


def test_scanned_gpt_generates_like_unscanned():
    plain, scanned = GPT(**TINY), GPT(**TINY, scan_layers=True)
    prompt = _tokens((2, 3))
    params = nn.meta.unbox(_init(plain, prompt)["params"])
    np.testing.assert_array_equal(generate(scanned, stack_layer_params(params), prompt, 5, jax.random.key(1)),
                                  generate(plain, params, prompt, 5, jax.random.key(1)))


def test_layer_conversion_checks_its_input():
    with pytest.raises(ValueError, match=r"numbered 0..1, got \[0, 2\]"):
        stack_layer_params({"block_0": {"w": jnp.ones(2)}, "block_2": {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="unknown layer prefix 'layer_'"):
        unstack_layer_params({}, "layer_")


@pytest.mark.slow   # about 25 s: two compiles of a 12-layer gradient
def test_scanned_gpt_compiles_faster():
    """Prints the compile time of a 12-layer GPT's gradient, unscanned and scanned (not asserted)."""
    tokens = _tokens((2, 16))
    config = dict(TINY, num_layers=12)
    times = {}
    for scan in (False, True):
        model = GPT(**config, scan_layers=scan, remat="full")
        params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
        grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens))))
        start = time.perf_counter()
        grad.lower(params).compile()
        times[scan] = time.perf_counter() - start
    print(f"12-layer GPT gradient compile: unscanned {times[False]:.2f} s, scanned {times[True]:.2f} s, "
          f"ratio scanned/unscanned {times[True] / times[False]:.2f}")


# ----------------------------------------------------------------------------------------------
# Logical axis names (sharding)
# ----------------------------------------------------------------------------------------------
def _names_by_path(boxed):
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    return {jax.tree_util.keystr(path): (tuple(spec), jnp.shape(leaf)) for (path, spec), leaf in
            zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                jax.tree.leaves(shapes))}


@pytest.mark.parametrize("name", ["resnet", "unet", "gpt", "gpt_scanned"])
def test_every_large_matrix_carries_logical_axis_names(name):
    image = jnp.zeros((1, 8, 8, 3))
    model, inputs = {
        "resnet": (ResNet(stage_sizes=(1, 1), block="bottleneck", num_filters=4), (image,)),
        "unet": (UNet(num_classes=3, features=4, depth=1), (image,)),
        "gpt": (GPT(**TINY), (_tokens((1, 4)),)),
        "gpt_scanned": (GPT(**TINY, scan_layers=True), (_tokens((1, 4)),)),
    }[name]
    leaves = _names_by_path(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    # Every matrix but ResNet's small classifier head (plain, as the weight loaders expect).
    matrices = {path: v for path, v in leaves.items() if len(v[1]) >= 2 and "Dense_0" not in path}
    assert matrices
    for path, (names, shape) in matrices.items():
        assert len(names) == len(shape) and any(n is not None for n in names), (path, names, shape)
        if "kernel" in path and name in ("resnet", "unet") and len(shape) == 4:
            assert names == (None, None, "conv_in", "conv_out"), path
        if name == "gpt_scanned" and "layers" in path:
            assert names[0] == "layers" and shape[0] == TINY["num_layers"], path
