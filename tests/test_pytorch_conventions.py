"""BatchNorm's running variance and momentum, and average pooling on odd sizes: the Flax defaults
and the PyTorch options (docs/pytorch.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.models import CNN, MLP, BatchNorm, ResNet


def _x(shape, seed=0):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape) + 1.0


@pytest.mark.parametrize("convention,ddof", [("flax", 0), ("torch", 1)])
def test_batch_norm_running_variance(convention, ddof):
    x = _x((4, 3, 3, 5))
    norm = BatchNorm(use_running_average=False, momentum=0.8, convention=convention)
    variables = norm.init(jax.random.key(1), x)
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    flat = np.asarray(x, np.float64).reshape(-1, 5)                       # n = 4 * 3 * 3 per feature
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.8 + 0.2 * flat.var(0, ddof=ddof), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.2 * flat.mean(0), rtol=1e-5, atol=1e-6)
    # Both conventions normalise the batch by its biased variance.
    want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), want, atol=1e-4)


def test_batch_norm_torch_convention_with_mask_counts_real_values():
    x = _x((6, 5))
    mask = jnp.array([True] * 4 + [False] * 2)[:, None] * jnp.ones((1, 5), bool)
    norm = BatchNorm(use_running_average=False, momentum=0.0, convention="torch")
    variables = norm.init(jax.random.key(1), x)
    _, updates = norm.apply(variables, x, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], np.asarray(x)[:4].var(0, ddof=1), rtol=1e-4)


def test_batch_norm_rejects_unknown_convention():
    with pytest.raises(ValueError, match="unknown BatchNorm convention 'pytorch'; valid: flax, torch"):
        BatchNorm(use_running_average=False, convention="pytorch").init(jax.random.key(0), jnp.ones((2, 3)))


def _first_bn_var(model, x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    node = stats["stem_bn"] if "stem_bn" in stats else stats["BatchNorm_0"]
    return np.asarray(node["var"], np.float64)


MODELS = {
    "mlp": (lambda **kw: MLP(features=(6, 3), batch_norm=True, **kw), (8, 4, 1), 8, 0.99),
    "cnn": (lambda **kw: CNN(channels=(4,), dense=(), num_classes=3, batch_norm=True, **kw), (4, 6, 6, 1), 4 * 36, 0.99),
    "resnet": (lambda **kw: ResNet(stage_sizes=(1,), num_filters=4, num_classes=3, **kw), (2, 8, 8, 3), 2 * 16, 0.9),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_pass_bn_momentum_and_convention(name):
    build, shape, n, default_momentum = MODELS[name]
    x = _x(shape)
    # Running variance starts at 1: after one step it is m + (1 - m) * batch variance.
    biased = (_first_bn_var(build(bn_momentum=0.0), x))
    default = _first_bn_var(build(), x)
    np.testing.assert_allclose(default, default_momentum + (1 - default_momentum) * biased, rtol=1e-5)
    np.testing.assert_allclose(_first_bn_var(build(bn_momentum=0.5), x), 0.5 + 0.5 * biased, rtol=1e-5)
    torch = _first_bn_var(build(bn_momentum=0.5, bn_convention="torch"), x)
    np.testing.assert_allclose(torch, 0.5 + 0.5 * biased * n / (n - 1), rtol=1e-5)


def _pooled_map(count_pad, size):
    """CNN whose conv and head are identities: the logits are the average-pooled input."""
    out = (size + 1) // 2
    model = CNN(channels=(1,), kernel_size=1, dense=(), num_classes=out * out, activation="identity", pool="avg",
                avg_pool_count_pad=count_pad)
    x = jnp.ones((1, size, size, 1))
    params = model.init(jax.random.key(0), x)["params"]
    params = {"Conv_0": {"kernel": jnp.ones((1, 1, 1, 1)), "bias": jnp.zeros((1,))},
              "Dense_0": {"kernel": jnp.eye(out * out), "bias": jnp.zeros((out * out,))}}
    return np.asarray(model.apply({"params": params}, x)).reshape(out, out)


def test_avg_pool_padding_convention_on_odd_sizes():
    # Default (Flax count_include_pad=True): the last row/column's windows average in padded zeros.
    np.testing.assert_allclose(_pooled_map(True, 3), [[1.0, 0.5], [0.5, 0.25]])
    # PyTorch AvgPool2d(2, ceil_mode=True) / TF SAME: divide by the real elements only.
    np.testing.assert_allclose(_pooled_map(False, 3), np.ones((2, 2)))
    np.testing.assert_allclose(_pooled_map(True, 4), _pooled_map(False, 4))    # even sizes: no padding


def _gpt_param_names(**kw):
    import flax.linen as nn
    from depthlab.models import GPT
    model = GPT(vocab_size=11, num_layers=1, num_heads=2, embed_dim=8, max_len=8, **kw)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]]


def test_gpt_bias_option():
    with_bias, without = _gpt_param_names(), _gpt_param_names(bias=False)
    assert sum("bias" in n for n in with_bias) == 9     # 2 LayerNorms + q, k, v, out + fc_in, fc_out + final LN
    assert not any("bias" in n for n in without)
    assert sorted(without) == sorted(n for n in with_bias if "bias" not in n)


def test_gpt_docstring_says_how_to_unbox_and_generate_is_exported():
    from depthlab.models import GPT, generate
    from depthlab.models.transformer import generate as transformer_generate
    assert "flax.linen.meta.unbox" in GPT.__doc__
    assert generate is transformer_generate
