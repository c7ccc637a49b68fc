"""PyTorch weights (safetensors files, PyTorch's names and layouts) -> depthlab variables.

    torchvision ResNet-18/34/50/101  ->  ResNet(depth=..., padding="torch")   {"params", "batch_stats"}
    Hugging Face GPT-2 (gpt2 ... xl) ->  GPT(**gpt2_config(name))              params

Layouts: a torch `Conv2d` weight is [out, in, kh, kw], Flax's kernel [kh, kw, in, out]; a torch
`Linear` weight is [out, in], Flax's [in, out]. GPT-2 uses `Conv1D`, already [in, out]; its fused
`c_attn` [embed, 3 * embed] holds q | k | v, each split into heads of head_dim columns, which become
the `query`/`key`/`value` kernels [embed, heads, head_dim]. A missing or mis-shaped tensor is an
error naming it (the first one, in model order), and so is a tensor the model has no place for.

The returned params are plain arrays (what `flax.linen.meta.unbox` gives for `model.init`).
Parity with the PyTorch models, measured once, is in docs/pytorch.md.

Example:
    >>> model, variables = load_torchvision_resnet("resnet18.safetensors", depth=18)
    >>> logits = model.apply(variables, images, train=False)        # images [batch, 224, 224, 3]
    >>> model, params = load_gpt2("gpt2/model.safetensors")
    >>> logits = model.apply({"params": params}, tokens)             # [batch, time, 50257]

Only numpy, jax, flax and `safetensors.numpy` (imported when a file is read) are used here.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthlab.models.resnet import STAGE_SIZES, ResNet
from depthlab.models.transformer import GPT

Tensors = Mapping[str, np.ndarray]

# Hugging Face GPT-2 sizes: (num_layers, num_heads, embed_dim); vocabulary 50257, context 1024.
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}


def gpt2_config(name: str = "gpt2") -> dict[str, Any]:
    """GPT keyword arguments for a Hugging Face GPT-2 ("gpt2" is GPT-2 small, 124M parameters).

    GPT-2's layout is depthlab's GPT default: pre-LayerNorm (eps 1e-5), biases, learned positions,
    tied embeddings, tanh-approximate GELU ("gelu_new"). Example: `GPT(**gpt2_config())`.
    """
    if name not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {name!r}; valid: {', '.join(GPT2_SIZES)}")
    layers, heads, embed = GPT2_SIZES[name]
    return {"vocab_size": 50257, "num_layers": layers, "num_heads": heads, "embed_dim": embed, "max_len": 1024,
            "dropout": 0.0, "position_embedding": "learned", "tie_embeddings": True, "bias": True,
            "gelu_approximate": True}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading PyTorch weights needs the safetensors package: pip install safetensors") from e
    return load_file(os.fspath(path))


# ----------------------------------------------------------------------------------------------
# The mapping machinery: a plan of (depthlab path, torch name, expected torch shape, converter).
# ----------------------------------------------------------------------------------------------
def _conv(w: np.ndarray) -> np.ndarray:     # torch [out, in, kh, kw] -> Flax [kh, kw, in, out]
    return np.transpose(w, (2, 3, 1, 0))


def _linear(w: np.ndarray) -> np.ndarray:   # torch [out, in] -> Flax [in, out]
    return w.T


def _torch_shape_of(kind: Callable, shape: tuple) -> tuple:
    if kind is _conv:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind is _linear:
        return tuple(reversed(shape))
    return tuple(shape)


def _take(tensors: Tensors, name: str, shape: tuple, used: set, what: str) -> np.ndarray:
    if name not in tensors:
        raise KeyError(f"{what}: tensor {name!r} is missing from the weights (expected shape {shape}); "
                       f"the file holds {len(tensors)} tensors, e.g. {', '.join(sorted(tensors)[:5])}")
    value = np.asarray(tensors[name])
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{what}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}; "
                         "do the weights belong to a different model size?")
    used.add(name)
    return value.astype(np.float32)


def _check_unused(tensors: Tensors, used: set, ignore: Callable[[str], bool], what: str) -> None:
    unused = [n for n in tensors if n not in used and not ignore(n)]
    if unused:
        raise ValueError(f"{what}: {len(unused)} tensors have no place in the model, first {unused[0]!r} "
                         f"({', '.join(unused[:5])}); do the weights belong to a deeper or different model?")


def _set(tree: dict, path: tuple, value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = jnp.asarray(value)


def _node(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _shapes(variables) -> dict:
    return jax.tree.map(lambda s: tuple(s.shape), nn.meta.unbox(variables))


# ----------------------------------------------------------------------------------------------
# torchvision ResNet
# ----------------------------------------------------------------------------------------------
def resnet_variables_from_torch(tensors: Tensors, model: ResNet, *, strict: bool = True) -> dict:
    """torchvision ResNet state dict (names as `torchvision.models.resnet18().state_dict()`) ->
    {"params", "batch_stats"} for `model` (a ResNet with the same stage sizes, block and widths).

    Use `padding="torch"` on the model to reproduce torchvision's outputs. `strict`: tensors with no
    place in the model (other than BatchNorm's `num_batches_tracked`) are an error.
    """
    if model.preact:
        raise ValueError("torchvision ResNets are post-activation; build the model with preact=False")
    stage_sizes, block = (model.stage_sizes, model.block) if model.depth is None else STAGE_SIZES[model.depth]
    shapes = _shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
    params, stats = shapes["params"], shapes["batch_stats"]
    what = f"torchvision ResNet -> depthlab ResNet({list(stage_sizes)}, {block!r})"
    out: dict = {"params": {}, "batch_stats": {}}
    used: set = set()

    def conv(flax: tuple, torch: str):
        shape = _torch_shape_of(_conv, _node(params, flax)["kernel"])
        _set(out["params"], flax + ("kernel",), _conv(_take(tensors, f"{torch}.weight", shape, used, what)))

    def norm(flax: tuple, torch: str):
        node_p, node_s = _node(params, flax), _node(stats, flax)
        for ours, theirs, tree, shape in (("scale", "weight", "params", node_p["scale"]),
                                          ("bias", "bias", "params", node_p["bias"]),
                                          ("mean", "running_mean", "batch_stats", node_s["mean"]),
                                          ("var", "running_var", "batch_stats", node_s["var"])):
            _set(out[tree], flax + (ours,), _take(tensors, f"{torch}.{theirs}", shape, used, what))

    conv(("stem_conv",), "conv1")
    norm(("stem_bn",), "bn1")
    convs = 2 if block == "basic" else 3
    index = 0
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            ours, theirs = f"{'BasicBlock' if block == 'basic' else 'BottleneckBlock'}_{index}", f"layer{i + 1}.{j}"
            for c in range(convs):
                conv((ours, f"Conv_{c}"), f"{theirs}.conv{c + 1}")
                norm((ours, f"BatchNorm_{c}"), f"{theirs}.bn{c + 1}")
            if f"Conv_{convs}" in params[ours]:      # projection shortcut
                conv((ours, f"Conv_{convs}"), f"{theirs}.downsample.0")
                norm((ours, f"BatchNorm_{convs}"), f"{theirs}.downsample.1")
            index += 1
    head = params["Dense_0"]
    _set(out["params"], ("Dense_0", "kernel"),
         _linear(_take(tensors, "fc.weight", _torch_shape_of(_linear, head["kernel"]), used, what)))
    _set(out["params"], ("Dense_0", "bias"), _take(tensors, "fc.bias", head["bias"], used, what))
    if strict:
        _check_unused(tensors, used, lambda n: n.endswith("num_batches_tracked"), what)
    return out


def load_torchvision_resnet(path: str | os.PathLike, depth: int = 18, num_classes: int = 1000,
                            **model_kwargs) -> tuple[ResNet, dict]:
    """(ResNet.from_depth(depth, padding="torch", ...), variables) from a torchvision safetensors file.

    The file is e.g. `safetensors.torch.save_file(torchvision.models.resnet18(weights=...).state_dict(), path)`.
    Inputs follow torchvision's preprocessing, transposed to [batch, H, W, 3].
    """
    model = ResNet.from_depth(depth, num_classes=num_classes, **{"padding": "torch", **model_kwargs})
    return model, resnet_variables_from_torch(load_safetensors(path), model)


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2
# ----------------------------------------------------------------------------------------------
def _is_gpt2_buffer(name: str) -> bool:
    # Older files store the causal mask ("attn.bias" [1, 1, T, T]) and "attn.masked_bias" as buffers.
    return name.endswith(("attn.bias", "attn.masked_bias"))


def gpt_params_from_hf(tensors: Tensors, model: GPT, *, strict: bool = True) -> dict:
    """Hugging Face GPT-2 state dict (`wte.weight`, `h.0.attn.c_attn.weight`, ...; a `transformer.`
    prefix, as GPT2LMHeadModel writes it, is accepted) -> params for `model` (e.g. GPT(**gpt2_config())).

    `lm_head.weight` is ignored when the model ties its embeddings (it is the token table), and
    becomes the `head` kernel otherwise. `strict`: tensors with no place in the model are an error.
    """
    if model.position_embedding != "learned":
        raise ValueError("GPT-2 has learned positions; build the model with position_embedding='learned'")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    shapes = _shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))["params"]
    what = f"Hugging Face GPT-2 -> depthlab GPT(num_layers={model.num_layers}, embed_dim={model.embed_dim})"
    embed, heads = model.embed_dim, model.num_heads
    head_dim = embed // heads
    out: dict = {}
    used: set = set()

    def take(name: str, shape: tuple) -> np.ndarray:
        return _take(tensors, name, shape, used, what)

    def layer_norm(ours: tuple, theirs: str, node: dict):
        _set(out, ours + ("scale",), take(f"{theirs}.weight", node["scale"]))
        if "bias" in node:
            _set(out, ours + ("bias",), take(f"{theirs}.bias", node["bias"]))

    _set(out, ("embed", "token", "embedding"), take("wte.weight", shapes["embed"]["token"]["embedding"]))
    _set(out, ("embed", "position"), take("wpe.weight", shapes["embed"]["position"]))
    for i in range(model.num_layers):
        ours, theirs, node = f"block_{i}", f"h.{i}", shapes[f"block_{i}"]
        layer_norm((ours, "ln_self"), f"{theirs}.ln_1", node["ln_self"])
        attn = node["self_attention"]
        qkv = take(f"{theirs}.attn.c_attn.weight", (embed, 3 * embed))          # Conv1D: [in, out]
        for k, part in enumerate(("query", "key", "value")):
            _set(out, (ours, "self_attention", part, "kernel"),
                 qkv[:, k * embed:(k + 1) * embed].reshape(embed, heads, head_dim))
        if "bias" in attn["query"]:
            qkv_b = take(f"{theirs}.attn.c_attn.bias", (3 * embed,))
            for k, part in enumerate(("query", "key", "value")):
                _set(out, (ours, "self_attention", part, "bias"), qkv_b[k * embed:(k + 1) * embed].reshape(heads, head_dim))
        proj = take(f"{theirs}.attn.c_proj.weight", (embed, embed))             # rows: heads x head_dim
        _set(out, (ours, "self_attention", "out", "kernel"), proj.reshape(heads, head_dim, embed))
        if "bias" in attn["out"]:
            _set(out, (ours, "self_attention", "out", "bias"), take(f"{theirs}.attn.c_proj.bias", (embed,)))
        layer_norm((ours, "ln_mlp"), f"{theirs}.ln_2", node["ln_mlp"])
        for ours_fc, theirs_fc in (("fc_in", "c_fc"), ("fc_out", "c_proj")):
            fc = node["mlp"][ours_fc]
            _set(out, (ours, "mlp", ours_fc, "kernel"), take(f"{theirs}.mlp.{theirs_fc}.weight", fc["kernel"]))
            if "bias" in fc:
                _set(out, (ours, "mlp", ours_fc, "bias"), take(f"{theirs}.mlp.{theirs_fc}.bias", fc["bias"]))
    layer_norm(("ln_final",), "ln_f", shapes["ln_final"])
    if not model.tie_embeddings:
        kernel = shapes["head"]["kernel"]
        _set(out, ("head", "kernel"), _linear(take("lm_head.weight", _torch_shape_of(_linear, kernel))))
    if strict:
        tied = lambda n: model.tie_embeddings and n == "lm_head.weight"  # noqa: E731
        _check_unused(tensors, used, lambda n: _is_gpt2_buffer(n) or tied(n), what)
    return out


def load_gpt2(path: str | os.PathLike, name: str = "gpt2", **model_kwargs) -> tuple[GPT, dict]:
    """(GPT(**gpt2_config(name), **model_kwargs), params) from a Hugging Face GPT-2 safetensors file
    (e.g. the hub's `model.safetensors`, or `GPT2LMHeadModel.save_pretrained(dir)`'s)."""
    model = GPT(**{**gpt2_config(name), **model_kwargs})
    return model, gpt_params_from_hf(load_safetensors(path), model)
