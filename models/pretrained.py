"""PyTorch weights (safetensors files, PyTorch's names and layouts) -> depthlab variables.

    torchvision ResNet-18/34/50/101  ->  ResNet(depth=..., padding="torch")   {"params", "batch_stats"}
    Hugging Face GPT-2 (gpt2 ... xl) ->  GPT(**gpt2_config(name))              params

Layouts: a torch `Conv2d` weight is [out, in, kh, kw], Flax's kernel [kh, kw, in, out]; a torch
`Linear` weight is [out, in], Flax's [in, out]. GPT-2 uses `Conv1D`, already [in, out]; its fused
`c_attn` [embed, 3 * embed] holds q | k | v, each split into heads of head_dim columns, which become
the `query`/`key`/`value` kernels [embed, heads, head_dim]. A missing or mis-shaped tensor is an
error naming it (the first one, in model order), and so is a tensor the model has no place for.

Fine-tuning: `new_head=True, rng=key` loads all but the head and initialises a fresh one (any num_classes);
`missing="init"` initialises what a partial file lacks; `return_report=True` adds a `LoadReport` of what was
loaded, initialised and left out; DistributedDataParallel's "module." prefix is stripped.

The returned params are plain arrays (what `flax.linen.meta.unbox` gives for `model.init`).
Parity with the PyTorch models, measured once, and a fine-tuning example are in docs/pytorch.md.

Example:
    >>> model, variables = load_torchvision_resnet("resnet18.safetensors", depth=18)
    >>> logits = model.apply(variables, images, train=False)        # images [batch, 224, 224, 3]
    >>> model, variables = load_torchvision_resnet("resnet18.safetensors", num_classes=10, new_head=True,
    ...                                            rng=jax.random.key(0))   # then optim.freeze="*,!Dense_0"
    >>> model, params = load_gpt2("gpt2/model.safetensors")
    >>> logits = model.apply({"params": params}, tokens)             # [batch, time, 50257]

Only numpy, jax, flax and `safetensors.numpy` (imported when a file is read) are used here.
"""
from __future__ import annotations

import dataclasses
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
def _conv(w: np.ndarray | None) -> np.ndarray | None:     # torch [out, in, kh, kw] -> Flax [kh, kw, in, out]
    return None if w is None else np.transpose(w, (2, 3, 1, 0))


def _linear(w: np.ndarray | None) -> np.ndarray | None:   # torch [out, in] -> Flax [in, out]
    return None if w is None else w.T


def _torch_shape_of(kind: Callable, shape: tuple) -> tuple:
    if kind is _conv:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind is _linear:
        return tuple(reversed(shape))
    return tuple(shape)


DDP_PREFIX = "module."   # torch.nn.parallel.DistributedDataParallel's state_dict() prefixes every name with it
INIT_EXAMPLE = {"resnet": ((1, 32, 32, 3), jnp.float32), "gpt": ((1, 1), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load took from the file and what it initialised.

    loaded: depthlab paths filled from the file ("params/stem_conv/kernel", "batch_stats/stem_bn/mean").
    initialised: depthlab paths initialised fresh from the `rng` given (a new head, tensors a partial file lacks).
    ignored: file tensors not loaded (a replaced head's, BatchNorm's `num_batches_tracked`, GPT-2's mask buffers).
    stripped_prefix: "module." when the names came from a DistributedDataParallel model, else "".
    """

    loaded: tuple[str, ...]
    initialised: tuple[str, ...]
    ignored: tuple[str, ...]
    stripped_prefix: str = ""

    def __str__(self) -> str:
        counters = [n for n in self.ignored if n.endswith("num_batches_tracked")]
        ignored = [n for n in self.ignored if n not in counters] + (
            [f"{len(counters)} num_batches_tracked"] if counters else [])
        prefix = f" (prefix {self.stripped_prefix!r} stripped)" if self.stripped_prefix else ""
        return (f"loaded {len(self.loaded)} arrays from the file{prefix}; initialised fresh: "
                f"{', '.join(self.initialised) or 'nothing'}; not loaded from the file: {', '.join(ignored) or 'nothing'}")


def strip_ddp_prefix(tensors: Tensors) -> tuple[dict, str]:
    """(tensors, prefix): names without DistributedDataParallel's "module." prefix, and the prefix stripped."""
    if not any(name.startswith(DDP_PREFIX) for name in tensors):
        return dict(tensors), ""
    return {name.removeprefix(DDP_PREFIX): value for name, value in tensors.items()}, DDP_PREFIX


class _Loader:
    """Takes tensors by name for a plan of depthlab paths, recording what it loaded, skipped and left to initialise.

    `skip`: name prefixes not loaded (a head to replace); `missing`: "error" (a missing tensor is a KeyError) or
    "init" (its depthlab place is initialised fresh).
    """

    def __init__(self, tensors: Tensors, what: str, skip: tuple[str, ...] = (), missing: str = "error"):
        if missing not in ("error", "init"):
            raise ValueError(f"missing={missing!r}; valid: 'error' (a tensor absent from the file is an error), "
                             "'init' (its place is initialised fresh from rng)")
        self.tensors, self.stripped = strip_ddp_prefix(tensors)
        self.what, self.skip, self.missing = what, skip, missing
        self.used: set = set()
        self.skipped: list[str] = []
        self.loaded: list[str] = []
        self.to_init: list[tuple] = []

    def take(self, name: str, shape: tuple) -> np.ndarray | None:
        """The tensor `name` as float32, checked against its torch `shape`; None when it is skipped or missing
        (with missing="init"): the caller then leaves its place to `finish`."""
        if name.startswith(self.skip):
            if name in self.tensors:
                self.skipped.append(name)
                self.used.add(name)
            return None
        if name not in self.tensors:
            if self.missing == "init":
                return None
            raise KeyError(f"{self.what}: tensor {name!r} is missing from the weights (expected shape {shape}); "
                           f"the file holds {len(self.tensors)} tensors, e.g. {', '.join(sorted(self.tensors)[:5])}")
        value = np.asarray(self.tensors[name])
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.what}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}; "
                             "do the weights belong to a different model size?")
        self.used.add(name)
        return value.astype(np.float32)

    def put(self, tree: dict, path: tuple, value: np.ndarray | None) -> None:
        """Sets `tree[path]` to `value`, or records `path` for fresh initialisation when `value` is None."""
        if value is None:
            self.to_init.append(path)
            return
        self.loaded.append("/".join(path))
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = jnp.asarray(value)

    def check_unused(self, ignore: Callable[[str], bool]) -> None:
        unused = [n for n in self.tensors if n not in self.used and not ignore(n)]
        if unused:
            raise ValueError(f"{self.what}: {len(unused)} tensors have no place in the model, first {unused[0]!r} "
                             f"({', '.join(unused[:5])}); do the weights belong to a deeper or different model?")

    def finish(self, out: dict, model: nn.Module, example: tuple, rng: jax.Array | None,
               return_report: bool) -> Any:
        """Fills the recorded paths from a fresh `model.init(rng, ...)` (only those leaves are computed) and
        returns `out`, or `(out, LoadReport)` when `return_report`."""
        if self.to_init:
            if rng is None:
                raise ValueError(f"{self.what}: {len(self.to_init)} arrays are initialised fresh (first "
                                 f"{'/'.join(self.to_init[0])}); pass rng=jax.random.key(...) to initialise them")
            shape, dtype = example
            fresh = jax.jit(lambda r: [_node(nn.meta.unbox(model.init(r, jnp.zeros(shape, dtype))), p)
                                       for p in self.to_init])(rng)
            for path, value in zip(self.to_init, fresh):
                node = out
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = value
        if not return_report:
            return out
        ignored = [n for n in self.tensors if n not in self.used or n in self.skipped]
        return out, LoadReport(tuple(self.loaded), tuple("/".join(p) for p in self.to_init), tuple(ignored),
                               self.stripped)


def _node(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _shapes(variables) -> dict:
    return jax.tree.map(lambda s: tuple(s.shape), nn.meta.unbox(variables))


# ----------------------------------------------------------------------------------------------
# torchvision ResNet
# ----------------------------------------------------------------------------------------------
def resnet_variables_from_torch(tensors: Tensors, model: ResNet, *, strict: bool = True, new_head: bool = False,
                                missing: str = "error", rng: jax.Array | None = None,
                                return_report: bool = False) -> dict | tuple[dict, LoadReport]:
    """torchvision ResNet state dict (names as `torchvision.models.resnet18().state_dict()`) ->
    {"params", "batch_stats"} for `model` (a ResNet with the same stage sizes, block and widths).

    Use `padding="torch"` on the model to reproduce torchvision's outputs. `strict`: tensors with no
    place in the model (other than BatchNorm's `num_batches_tracked`) are an error. A DDP "module." prefix
    is stripped. Fine-tuning: `new_head=True` loads everything but the head (`fc.*`) and initialises the
    model's head (`Dense_0`, any `num_classes`) fresh from `rng`; `missing="init"` initialises whatever the file
    lacks instead of failing (a partial file). `return_report=True` also returns a `LoadReport` of what was
    loaded, initialised and left out.
    """
    if model.preact:
        raise ValueError("torchvision ResNets are post-activation; build the model with preact=False")
    stage_sizes, block = (model.stage_sizes, model.block) if model.depth is None else STAGE_SIZES[model.depth]
    shapes = _shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(INIT_EXAMPLE["resnet"][0]))))
    params, stats = shapes["params"], shapes["batch_stats"]
    what = f"torchvision ResNet -> depthlab ResNet({list(stage_sizes)}, {block!r})"
    load = _Loader(tensors, what, skip=("fc.",) if new_head else (), missing=missing)
    out: dict = {"params": {}, "batch_stats": {}}

    def conv(flax: tuple, torch: str):
        shape = _torch_shape_of(_conv, _node(params, flax)["kernel"])
        load.put(out, ("params",) + flax + ("kernel",), _conv(load.take(f"{torch}.weight", shape)))

    def norm(flax: tuple, torch: str):
        node_p, node_s = _node(params, flax), _node(stats, flax)
        for ours, theirs, tree, shape in (("scale", "weight", "params", node_p["scale"]),
                                          ("bias", "bias", "params", node_p["bias"]),
                                          ("mean", "running_mean", "batch_stats", node_s["mean"]),
                                          ("var", "running_var", "batch_stats", node_s["var"])):
            load.put(out, (tree,) + flax + (ours,), load.take(f"{torch}.{theirs}", shape))

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
    fc = load.tensors.get("fc.weight")
    if not new_head and fc is not None and tuple(np.shape(fc)) != _torch_shape_of(_linear, head["kernel"]):
        raise ValueError(f"{what}: tensor 'fc.weight' has shape {tuple(np.shape(fc))}, expected "
                         f"{_torch_shape_of(_linear, head['kernel'])} (num_classes={head['kernel'][1]}); to fine-tune "
                         f"with a new head pass new_head=True and rng=jax.random.key(...)")
    load.put(out, ("params", "Dense_0", "kernel"),
             _linear(load.take("fc.weight", _torch_shape_of(_linear, head["kernel"]))))
    load.put(out, ("params", "Dense_0", "bias"), load.take("fc.bias", head["bias"]))
    if strict:
        load.check_unused(lambda n: n.endswith("num_batches_tracked"))
    return load.finish(out, model, INIT_EXAMPLE["resnet"], rng, return_report)


def load_torchvision_resnet(path: str | os.PathLike, depth: int = 18, num_classes: int = 1000, *,
                            new_head: bool = False, missing: str = "error", rng: jax.Array | None = None,
                            return_report: bool = False, **model_kwargs):
    """(ResNet.from_depth(depth, padding="torch", ...), variables) from a torchvision safetensors file, and the
    `LoadReport` when `return_report`.

    The file is e.g. `safetensors.torch.save_file(torchvision.models.resnet18(weights=...).state_dict(), path)`.
    Inputs follow torchvision's preprocessing, transposed to [batch, H, W, 3]. To fine-tune on another number
    of classes: `new_head=True, rng=key` (see `resnet_variables_from_torch`).

    Example:
        >>> model, variables, report = load_torchvision_resnet("resnet18.safetensors", num_classes=10,
        ...                                                    new_head=True, rng=jax.random.key(0), return_report=True)
        >>> print(report)   # loaded 100 arrays from the file; initialised fresh: params/Dense_0/kernel, ...
    """
    model = ResNet.from_depth(depth, num_classes=num_classes, **{"padding": "torch", **model_kwargs})
    loaded = resnet_variables_from_torch(load_safetensors(path), model, new_head=new_head, missing=missing, rng=rng,
                                         return_report=return_report)
    return (model, *loaded) if return_report else (model, loaded)


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2
# ----------------------------------------------------------------------------------------------
def _is_gpt2_buffer(name: str) -> bool:
    # Older files store the causal mask ("attn.bias" [1, 1, T, T]) and "attn.masked_bias" as buffers.
    return name.endswith(("attn.bias", "attn.masked_bias"))


def gpt_params_from_hf(tensors: Tensors, model: GPT, *, strict: bool = True, missing: str = "error",
                       rng: jax.Array | None = None, return_report: bool = False) -> dict | tuple[dict, LoadReport]:
    """Hugging Face GPT-2 state dict (`wte.weight`, `h.0.attn.c_attn.weight`, ...; a `transformer.`
    prefix, as GPT2LMHeadModel writes it, and a DDP `module.` prefix are accepted) -> params for `model`
    (e.g. GPT(**gpt2_config())).

    `lm_head.weight` is ignored when the model ties its embeddings (it is the token table), and
    becomes the `head` kernel otherwise. `strict`: tensors with no place in the model are an error.
    `missing="init"` initialises what the file lacks from `rng`; `return_report=True` also returns a `LoadReport`.
    """
    if model.position_embedding != "learned":
        raise ValueError("GPT-2 has learned positions; build the model with position_embedding='learned'")
    example = INIT_EXAMPLE["gpt"]
    shapes = _shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(*example))))["params"]
    what = f"Hugging Face GPT-2 -> depthlab GPT(num_layers={model.num_layers}, embed_dim={model.embed_dim})"
    load = _Loader(tensors, what, missing=missing)
    load.tensors = {k.removeprefix("transformer."): v for k, v in load.tensors.items()}
    embed, heads = model.embed_dim, model.num_heads
    head_dim = embed // heads
    out: dict = {"params": {}}
    take = load.take

    def put(path: tuple, value: np.ndarray | None):
        load.put(out, ("params",) + path, value)

    def piece(value: np.ndarray | None, k: int, shape: tuple) -> np.ndarray | None:   # q, k or v of a fused c_attn
        return None if value is None else value[..., k * embed:(k + 1) * embed].reshape(shape)

    def layer_norm(ours: tuple, theirs: str, node: dict):
        put(ours + ("scale",), take(f"{theirs}.weight", node["scale"]))
        if "bias" in node:
            put(ours + ("bias",), take(f"{theirs}.bias", node["bias"]))

    put(("embed", "token", "embedding"), take("wte.weight", shapes["embed"]["token"]["embedding"]))
    put(("embed", "position"), take("wpe.weight", shapes["embed"]["position"]))
    for i in range(model.num_layers):
        ours, theirs, node = f"block_{i}", f"h.{i}", shapes[f"block_{i}"]
        layer_norm((ours, "ln_self"), f"{theirs}.ln_1", node["ln_self"])
        attn = node["self_attention"]
        qkv = take(f"{theirs}.attn.c_attn.weight", (embed, 3 * embed))          # Conv1D: [in, out]
        for k, part in enumerate(("query", "key", "value")):
            put((ours, "self_attention", part, "kernel"), piece(qkv, k, (embed, heads, head_dim)))
        if "bias" in attn["query"]:
            qkv_b = take(f"{theirs}.attn.c_attn.bias", (3 * embed,))
            for k, part in enumerate(("query", "key", "value")):
                put((ours, "self_attention", part, "bias"), piece(qkv_b, k, (heads, head_dim)))
        proj = take(f"{theirs}.attn.c_proj.weight", (embed, embed))             # rows: heads x head_dim
        put((ours, "self_attention", "out", "kernel"), None if proj is None else proj.reshape(heads, head_dim, embed))
        if "bias" in attn["out"]:
            put((ours, "self_attention", "out", "bias"), take(f"{theirs}.attn.c_proj.bias", (embed,)))
        layer_norm((ours, "ln_mlp"), f"{theirs}.ln_2", node["ln_mlp"])
        for ours_fc, theirs_fc in (("fc_in", "c_fc"), ("fc_out", "c_proj")):
            fc = node["mlp"][ours_fc]
            put((ours, "mlp", ours_fc, "kernel"), take(f"{theirs}.mlp.{theirs_fc}.weight", fc["kernel"]))
            if "bias" in fc:
                put((ours, "mlp", ours_fc, "bias"), take(f"{theirs}.mlp.{theirs_fc}.bias", fc["bias"]))
    layer_norm(("ln_final",), "ln_f", shapes["ln_final"])
    if not model.tie_embeddings:
        kernel = shapes["head"]["kernel"]
        put(("head", "kernel"), _linear(take("lm_head.weight", _torch_shape_of(_linear, kernel))))
    if strict:
        tied = lambda n: model.tie_embeddings and n == "lm_head.weight"  # noqa: E731
        load.check_unused(lambda n: _is_gpt2_buffer(n) or tied(n))
    loaded = load.finish(out, model, example, rng, return_report)
    return (loaded[0]["params"], loaded[1]) if return_report else loaded["params"]


def load_gpt2(path: str | os.PathLike, name: str = "gpt2", *, missing: str = "error", rng: jax.Array | None = None,
              return_report: bool = False, **model_kwargs):
    """(GPT(**gpt2_config(name), **model_kwargs), params) from a Hugging Face GPT-2 safetensors file
    (e.g. the hub's `model.safetensors`, or `GPT2LMHeadModel.save_pretrained(dir)`'s), and the `LoadReport`
    when `return_report` (see `gpt_params_from_hf`)."""
    model = GPT(**{**gpt2_config(name), **model_kwargs})
    loaded = gpt_params_from_hf(load_safetensors(path), model, missing=missing, rng=rng, return_report=return_report)
    return (model, *loaded) if return_report else (model, loaded)
