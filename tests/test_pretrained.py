"""Weight import from PyTorch layouts: torchvision ResNets and Hugging Face GPT-2 against numpy
references of those libraries' forward passes (tests/torch_reference.py), through real safetensors files."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from depthlab.models import GPT, ResNet
from depthlab.models.pretrained import (gpt2_config, gpt_params_from_hf, load_gpt2, load_torchvision_resnet,
                                        resnet_variables_from_torch)

RESNETS = {"basic": dict(stage_sizes=(2, 1), block="basic"), "bottleneck": dict(stage_sizes=(1, 1), block="bottleneck")}


def _images(size, seed=0):
    return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)   # NCHW


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("block", sorted(RESNETS))
def test_resnet_torch_padding_matches_torchvision_reference(block):
    """Even input: padding="torch" equals the explicit symmetric-padding reference; "same" does not."""
    spec = RESNETS[block]
    state = ref.resnet_state(spec["stage_sizes"], block, width=4, num_classes=5)
    x = _images(16)
    want = ref.resnet_forward(state, x, spec["stage_sizes"], block)
    model = ResNet(num_filters=4, num_classes=5, padding="torch", **spec)
    variables = resnet_variables_from_torch(state, model)
    got = model.apply(variables, _nhwc(x), train=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    same = ResNet(num_filters=4, num_classes=5, **spec).apply(variables, _nhwc(x), train=False)   # the default
    assert np.max(np.abs(np.asarray(same) - want)) > 1e-2


def test_resnet_paddings_agree_on_odd_inputs():
    """When every strided layer sees an odd size (17 -> 9 -> 5 -> 3), "SAME" pads (1, 1) too."""
    spec = RESNETS["basic"]
    state = ref.resnet_state(spec["stage_sizes"], width=4, num_classes=5)
    torch_model = ResNet(num_filters=4, num_classes=5, padding="torch", **spec)
    variables = resnet_variables_from_torch(state, torch_model)
    x = _nhwc(_images(17))
    np.testing.assert_allclose(torch_model.apply(variables, x), ResNet(num_filters=4, num_classes=5, **spec).apply(
        variables, x), atol=1e-5)
    np.testing.assert_allclose(torch_model.apply(variables, x), ref.resnet_forward(state, _images(17), (2, 1)),
                               atol=1e-4, rtol=1e-4)


def test_resnet_rejects_unknown_padding():
    with pytest.raises(ValueError, match="unknown ResNet padding 'tf'; valid: same, torch"):
        ResNet(stage_sizes=(1,), num_filters=4, padding="tf").init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


def test_load_torchvision_resnet18_from_a_safetensors_file(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = ref.resnet_state((2, 2, 2, 2), width=64, num_classes=10)
    safetensors_numpy.save_file(state, tmp_path / "resnet18.safetensors")
    model, variables = load_torchvision_resnet(tmp_path / "resnet18.safetensors", depth=18, num_classes=10)
    assert model.padding == "torch"
    x = _images(32)
    np.testing.assert_allclose(model.apply(variables, _nhwc(x)), ref.resnet_forward(state, x, (2, 2, 2, 2)),
                               atol=1e-3, rtol=1e-3)


def test_resnet_import_errors_name_the_tensor():
    spec = RESNETS["basic"]
    model = ResNet(num_filters=4, num_classes=5, padding="torch", **spec)
    state = ref.resnet_state(spec["stage_sizes"], width=4, num_classes=5)
    missing = {k: v for k, v in state.items() if k != "layer1.1.bn2.running_var"}
    with pytest.raises(KeyError, match="tensor 'layer1.1.bn2.running_var' is missing"):
        resnet_variables_from_torch(missing, model)
    bad = dict(state, **{"layer2.0.conv1.weight": np.zeros((8, 4, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"'layer2.0.conv1.weight' has shape \(8, 4, 5, 5\), expected \(8, 4, 3, 3\)"):
        resnet_variables_from_torch(bad, model)
    deeper = ref.resnet_state((3, 1), width=4, num_classes=5)     # one block more in stage 1
    with pytest.raises(ValueError, match="first 'layer1.2.conv1.weight'"):
        resnet_variables_from_torch(deeper, model)


GPT_TINY = dict(vocab_size=23, num_layers=2, num_heads=2, embed_dim=16, max_len=16)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_mapping_matches_reference_forward(prefix):
    state = ref.gpt2_state(prefix=prefix)
    model = GPT(**GPT_TINY)
    params = gpt_params_from_hf(state, model)
    tokens = np.random.default_rng(1).integers(0, 23, (2, 9))
    want = ref.gpt2_forward({k.removeprefix(prefix): v for k, v in state.items()}, tokens, num_heads=2)
    got = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_gpt_exact_gelu_option_matches_erf_reference():
    state = ref.gpt2_state(buffers=False)
    tokens = np.random.default_rng(2).integers(0, 23, (1, 7))
    exact = GPT(**GPT_TINY, gelu_approximate=False)
    got = exact.apply({"params": gpt_params_from_hf(state, exact)}, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(got, ref.gpt2_forward(state, tokens, 2, gelu=ref.gelu_exact), atol=1e-4, rtol=1e-4)
    tanh = ref.gpt2_forward(state, tokens, 2, gelu=ref.gelu_new)
    assert np.max(np.abs(np.asarray(got) - tanh)) > 1e-5


def test_load_gpt2_from_a_safetensors_file(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = ref.gpt2_state()
    safetensors_numpy.save_file(state, tmp_path / "model.safetensors")
    model, params = load_gpt2(tmp_path / "model.safetensors", **GPT_TINY)
    tokens = np.arange(12)[None] % 23
    np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)),
                               ref.gpt2_forward(state, tokens, 2), atol=1e-4, rtol=1e-4)


def test_gpt2_import_errors_name_the_tensor():
    model = GPT(**GPT_TINY)
    state = ref.gpt2_state()
    with pytest.raises(KeyError, match="tensor 'h.1.mlp.c_fc.bias' is missing"):
        gpt_params_from_hf({k: v for k, v in state.items() if k != "h.1.mlp.c_fc.bias"}, model)
    with pytest.raises(ValueError, match=r"'wpe.weight' has shape \(16, 16\), expected \(32, 16\)"):
        gpt_params_from_hf(state, GPT(**{**GPT_TINY, "max_len": 32}))
    with pytest.raises(ValueError, match="first 'h.2.ln_1.weight'"):
        gpt_params_from_hf(ref.gpt2_state(layers=3), model)
    # nanoGPT-style bias=False has no place for GPT-2's biases
    with pytest.raises(ValueError, match="first 'h.0.ln_1.bias'"):
        gpt_params_from_hf(state, GPT(**GPT_TINY, bias=False))


def test_gpt2_small_config_has_124m_parameters():
    model = GPT(**gpt2_config("gpt2"))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.tree.map(lambda b: b.unbox(), shapes["params"],
                                                                             is_leaf=lambda b: hasattr(b, "unbox"))))
    assert count == 124_439_808     # Hugging Face's GPT-2 small (tied head), wpe included
    with pytest.raises(ValueError, match="unknown GPT-2 size 'gpt3'"):
        gpt2_config("gpt3")


# ----------------------------------------------------------------------------------------------
# Fine-tuning: a new head, partial loads with a report, DDP's "module." prefix
# ----------------------------------------------------------------------------------------------
def test_new_head_loads_all_but_fc_and_initialises_the_head_fresh():
    spec = RESNETS["basic"]
    state = ref.resnet_state(spec["stage_sizes"], width=4, num_classes=1000)
    model = ResNet(num_filters=4, num_classes=3, padding="torch", **spec)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 8\), expected \(3, 8\) \(num_classes=3\); "
                                         "to fine-tune with a new head pass new_head=True"):
        resnet_variables_from_torch(state, model)
    with pytest.raises(ValueError, match="pass rng=jax.random.key"):
        resnet_variables_from_torch(state, model, new_head=True)
    variables, report = resnet_variables_from_torch(state, model, new_head=True, rng=jax.random.key(5),
                                                    return_report=True)
    fresh = model.init(jax.random.key(5), jnp.zeros((1, 32, 32, 3)))["params"]["Dense_0"]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(variables["params"]["Dense_0"][name], fresh[name])
    full = resnet_variables_from_torch(state, ResNet(num_filters=4, num_classes=1000, padding="torch", **spec))
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"], full["params"]["stem_conv"]["kernel"])
    np.testing.assert_array_equal(variables["batch_stats"]["BasicBlock_2"]["BatchNorm_1"]["var"],
                                  full["batch_stats"]["BasicBlock_2"]["BatchNorm_1"]["var"])
    assert report.initialised == ("params/Dense_0/kernel", "params/Dense_0/bias")
    assert "params/stem_conv/kernel" in report.loaded and "batch_stats/stem_bn/mean" in report.loaded
    assert len(report.loaded) == len(jax.tree.leaves(variables)) - 2
    assert set(report.ignored) == {"fc.weight", "fc.bias"} | {n for n in state if n.endswith("num_batches_tracked")}
    assert str(report).startswith(f"loaded {len(report.loaded)} arrays from the file; initialised fresh: "
                                  "params/Dense_0/kernel, params/Dense_0/bias; not loaded from the file: fc.weight, "
                                  "fc.bias, ")
    x = _nhwc(_images(16))
    assert model.apply(variables, x).shape == (2, 3)


def test_a_ddp_prefix_is_stripped_and_reported():
    spec = RESNETS["basic"]
    state = ref.resnet_state(spec["stage_sizes"], width=4, num_classes=5)
    model = ResNet(num_filters=4, num_classes=5, padding="torch", **spec)
    plain = resnet_variables_from_torch(state, model)
    ddp, report = resnet_variables_from_torch({f"module.{k}": v for k, v in state.items()}, model, return_report=True)
    jax.tree.map(np.testing.assert_array_equal, ddp, plain)
    assert report.stripped_prefix == "module." and report.initialised == ()
    assert "(prefix 'module.' stripped)" in str(report)
    gpt = ref.gpt2_state(prefix="transformer.")
    params, report = gpt_params_from_hf({f"module.{k}": v for k, v in gpt.items()}, GPT(**GPT_TINY),
                                        return_report=True)
    jax.tree.map(np.testing.assert_array_equal, params, gpt_params_from_hf(gpt, GPT(**GPT_TINY)))
    assert report.stripped_prefix == "module." and "params/embed/token/embedding" in report.loaded


def test_a_partial_file_is_an_error_unless_missing_tensors_are_initialised():
    spec = RESNETS["basic"]
    state = ref.resnet_state(spec["stage_sizes"], width=4, num_classes=5)
    model = ResNet(num_filters=4, num_classes=5, padding="torch", **spec)
    partial = {k: v for k, v in state.items() if not k.startswith("layer1.1.")}
    with pytest.raises(KeyError, match="tensor 'layer1.1.conv1.weight' is missing"):
        resnet_variables_from_torch(partial, model)
    variables, report = resnet_variables_from_torch(partial, model, missing="init", rng=jax.random.key(1),
                                                    return_report=True)
    block = "BasicBlock_1"
    assert set(report.initialised) == {f"{tree}/{block}/{bn}/{leaf}" for tree, leaf in (
        ("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))
        for bn in ("BatchNorm_0", "BatchNorm_1")} | {f"params/{block}/Conv_{c}/kernel" for c in (0, 1)}
    fresh = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))
    np.testing.assert_array_equal(variables["params"][block]["Conv_1"]["kernel"], fresh["params"][block]["Conv_1"]["kernel"])
    np.testing.assert_array_equal(variables["batch_stats"][block]["BatchNorm_0"]["var"], 1.0)    # fresh statistics
    with pytest.raises(ValueError, match="missing='everything'; valid: 'error'"):
        resnet_variables_from_torch(partial, model, missing="everything")
    gpt = ref.gpt2_state()
    params, report = gpt_params_from_hf({k: v for k, v in gpt.items() if not k.startswith("h.1.attn.c_attn")},
                                        GPT(**GPT_TINY), missing="init", rng=jax.random.key(2), return_report=True)
    assert report.initialised == tuple(f"params/block_1/self_attention/{p}/{leaf}" for leaf in ("kernel", "bias")
                                       for p in ("query", "key", "value"))
    assert params["block_1"]["self_attention"]["query"]["kernel"].shape == (16, 2, 8)


def test_fine_tuning_a_torchvision_resnet18_file_on_digits_keeps_the_frozen_backbone_bit_identical(tmp_path):
    """docs/pytorch.md's worked example at width 8 (ResNet-18's names and layout, 1000-class fc): a new
    10-class head, the backbone frozen by optim.freeze, trained through fit on 8x8 digits upsampled to 32x32."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    datasets = pytest.importorskip("sklearn.datasets")
    import ml_collections

    from depthlab.train import (Experiment, TrainState, data, default_optim_config, default_train_config, fit,
                                losses, make_eval_step, make_optimizer, make_train_step)

    safetensors_numpy.save_file(ref.resnet_state((2, 2, 2, 2), width=8, num_classes=1000), tmp_path / "r18.safetensors")
    model, variables, report = load_torchvision_resnet(tmp_path / "r18.safetensors", depth=18, num_classes=10,
                                                       new_head=True, rng=jax.random.key(0), return_report=True,
                                                       num_filters=8)
    assert report.initialised == ("params/Dense_0/kernel", "params/Dense_0/bias")
    digits = datasets.load_digits()
    x = np.kron(np.repeat(digits.images[..., None] / 16, 3, axis=-1), np.ones((1, 4, 4, 1))).astype(np.float32)
    y = digits.target.astype(np.int32)
    train, test = {"inputs": x[:1500], "labels": y[:1500]}, {"inputs": x[1500:], "labels": y[1500:]}
    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config(), "optim": default_optim_config()})
    config.train.update(steps=200, log_every=100, eval_every=200, checkpoint_every=200, progress=False,
                        async_checkpoint=False, tensorboard=False)
    config.optim.update(learning_rate=1e-2, freeze="*,!Dense_0")
    tx = make_optimizer(config.optim)

    def loss_fn(logits, batch):
        mask = batch.get("mask")
        return (losses.softmax_cross_entropy(logits, batch["labels"], mask=mask),
                {"accuracy": losses.accuracy(logits, batch["labels"], mask=mask)})

    experiment = Experiment(
        init=lambda rng: TrainState.create(apply_fn=model.apply, variables=variables, tx=tx, rng=rng),
        train_step=make_train_step(model, loss_fn), eval_step=make_eval_step(model, loss_fn),
        train_batches=lambda start: data.epoch_batches(train, 64, seed=0, start_step=start),
        eval_batches=lambda: data.eval_batches(test, 96))
    result = fit(experiment, config, tmp_path / "run")
    params = result.state.params
    for name, block in variables["params"].items():
        same = jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params[name],
                                            block))
        assert all(same) == (name != "Dense_0"), name          # the backbone bit-identical, the head trained
    assert result.metrics["eval/accuracy"] > 0.3               # a linear probe on random features: 10% is chance
