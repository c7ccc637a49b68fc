"""Shape, gradient and registry tests for MLP, CNN and ResNet."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.models import CNN, MLP, ResNet, get_model, model_names
from depthlab.models.mlp import ACTIVATIONS


def _grads_ok(model, x, train=True):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        out = model.apply({"params": p, **rest}, x, train=train, rngs={"dropout": jax.random.key(2)},
                          mutable=list(rest) or False)
        out = out[0] if rest else out
        return jnp.sum(out ** 2)

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"zero gradient at {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_shapes_every_activation(activation):
    model = MLP(features=(16, 16, 3), activation=activation)
    x = jnp.ones((4, 8, 8, 1))
    out = model.apply(model.init(jax.random.key(0), x), x)
    chex.assert_shape(out, (4, 3))
    chex.assert_tree_all_finite(out)


def test_mlp_softmax_output_and_gradients():
    model = MLP(features=(16, 5), output="softmax", dropout=0.1, batch_norm=True)
    x = jax.random.normal(jax.random.key(0), (6, 10, 1))
    variables = model.init(jax.random.key(0), x)
    probs = model.apply(variables, x)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)
    _grads_ok(MLP(features=(16, 16, 5), batch_norm=True), x)


def test_unknown_activation_names_valid_ones():
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*gelu"):
        MLP(activation="relu6").init(jax.random.key(0), jnp.ones((1, 4, 1)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 40, 1), (2, 40)])
def test_cnn_2d_and_1d(shape):
    model = CNN(channels=(4, 8), dense=(16,), num_classes=7, batch_norm=True)
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(0), x)
    chex.assert_shape(model.apply(variables, x), (2, 7))
    _grads_ok(model, x)


@pytest.mark.parametrize("depth,preact", [(18, False), (50, True)])
def test_resnet_depths(depth, preact):
    model = ResNet.from_depth(depth, num_classes=10, num_filters=4, cifar_stem=True, preact=preact)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    assert "batch_stats" in variables
    chex.assert_shape(model.apply(variables, x), (2, 10))


def test_resnet18_parameter_count_matches_reference():
    # torchvision's resnet18 has 11,689,512 parameters (ImageNet head).
    model = ResNet.from_depth(18, num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 224, 224, 3)))
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == 11_689_512


def test_resnet_gradients():
    # Pre-activation blocks: every parameter gets a gradient at init. (The post-activation blocks
    # zero-initialise their last BatchNorm scale, so their inner convs start with zero gradient.)
    model = ResNet(stage_sizes=(1, 1), num_filters=4, cifar_stem=True, preact=True)
    _grads_ok(model, jax.random.normal(jax.random.key(0), (2, 8, 8, 1)))


def test_registry():
    assert {"mlp", "cnn", "resnet"} <= set(model_names())
    assert isinstance(get_model("cnn", num_classes=3), CNN)
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid models: .*cnn"):
        get_model("vgg")
