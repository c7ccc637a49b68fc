"""PyTorch-layout reference networks in pure numpy (float64), for the weight-import and convention tests.

Random state dicts with torchvision's / Hugging Face's names and shapes, and forward passes written
from those libraries' definitions (NCHW images, explicit symmetric padding, Conv1D GPT-2 layers),
independent of depthlab's models.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


# ----------------------------------------------------------------------------------------------
# torchvision ResNet
# ----------------------------------------------------------------------------------------------
def resnet_state(stage_sizes, block="basic", width=8, num_classes=5, in_channels=3, seed=0) -> dict:
    """Random torchvision-style ResNet state dict (names of torchvision.models.resnet.ResNet)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = (rng.normal(size=(out, inp, k, k)) * math.sqrt(2.0 / (inp * k * k))).astype(np.float32)

    def bn(name, c):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    expansion = 1 if block == "basic" else 4
    conv("conv1", width, in_channels, 7)
    bn("bn1", width)
    inplanes = width
    for i, n in enumerate(stage_sizes):
        planes = width * 2 ** i
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    state["fc.weight"] = rng.normal(0, 0.1, (num_classes, inplanes)).astype(np.float32)
    state["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return state


def conv2d(x, w, stride=1, padding=0):
    """x [N, C, H, W], w [O, C, kh, kw] -> [N, O, H', W'] (torch.nn.functional.conv2d)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, w)


def max_pool(x, k=3, stride=2, padding=1):
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(-2, -1))


def batch_norm_eval(x, state, name, eps=1e-5):
    g = lambda key: state[f"{name}.{key}"].astype(np.float64)[None, :, None, None]  # noqa: E731
    return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def resnet_forward(state, x_nchw, stage_sizes, block="basic"):
    """torchvision ResNet.forward in eval mode."""
    s = {k: v.astype(np.float64) if v.dtype != np.int64 else v for k, v in state.items()}
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    x = relu(batch_norm_eval(conv2d(x_nchw.astype(np.float64), s["conv1.weight"], 2, 3), s, "bn1"))
    x = max_pool(x)
    for i, n in enumerate(stage_sizes):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                y = relu(batch_norm_eval(conv2d(x, s[f"{p}.conv1.weight"], stride, 1), s, f"{p}.bn1"))
                y = batch_norm_eval(conv2d(y, s[f"{p}.conv2.weight"], 1, 1), s, f"{p}.bn2")
            else:
                y = relu(batch_norm_eval(conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
                y = relu(batch_norm_eval(conv2d(y, s[f"{p}.conv2.weight"], stride, 1), s, f"{p}.bn2"))
                y = batch_norm_eval(conv2d(y, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in s:
                x = batch_norm_eval(conv2d(x, s[f"{p}.downsample.0.weight"], stride), s, f"{p}.downsample.1")
            x = relu(x + y)
    x = x.mean(axis=(2, 3))
    return x @ s["fc.weight"].T + s["fc.bias"]


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2
# ----------------------------------------------------------------------------------------------
def gpt2_state(vocab=23, positions=16, embed=16, layers=2, seed=0, prefix="", buffers=True) -> dict:
    """Random GPT-2 state dict with Hugging Face's names; Conv1D weights are [in, out]."""
    rng = np.random.default_rng(seed)
    w = lambda *shape, s=0.2: (rng.normal(size=shape) * s).astype(np.float32)  # noqa: E731
    state = {"wte.weight": w(vocab, embed, s=0.5), "wpe.weight": w(positions, embed, s=0.5)}
    for i in range(layers):
        p = f"h.{i}"
        state.update({
            f"{p}.ln_1.weight": 1 + w(embed, s=0.1), f"{p}.ln_1.bias": w(embed, s=0.1),
            f"{p}.attn.c_attn.weight": w(embed, 3 * embed), f"{p}.attn.c_attn.bias": w(3 * embed, s=0.1),
            f"{p}.attn.c_proj.weight": w(embed, embed), f"{p}.attn.c_proj.bias": w(embed, s=0.1),
            f"{p}.ln_2.weight": 1 + w(embed, s=0.1), f"{p}.ln_2.bias": w(embed, s=0.1),
            f"{p}.mlp.c_fc.weight": w(embed, 4 * embed), f"{p}.mlp.c_fc.bias": w(4 * embed, s=0.1),
            f"{p}.mlp.c_proj.weight": w(4 * embed, embed), f"{p}.mlp.c_proj.bias": w(embed, s=0.1),
        })
        if buffers:   # what older checkpoints carry: the causal mask and the masked fill value
            state[f"{p}.attn.bias"] = np.tril(np.ones((positions, positions), np.float32))[None, None]
            state[f"{p}.attn.masked_bias"] = np.array(-1e4, np.float32)
    state["ln_f.weight"], state["ln_f.bias"] = 1 + w(embed, s=0.1), w(embed, s=0.1)
    return {prefix + k: v for k, v in state.items()}


def gelu_new(x):
    """GPT-2's GELU (tanh approximation)."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def gpt2_forward(state, tokens, num_heads, gelu=gelu_new):
    """GPT2LMHeadModel.forward (eval, tied head): tokens [B, T] -> logits [B, T, vocab]."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    _, t = tokens.shape
    x = s["wte.weight"][tokens] + s["wpe.weight"][:t][None]
    e = x.shape[-1]
    d = e // num_heads
    i = 0
    while f"h.{i}.ln_1.weight" in s:
        p = f"h.{i}"
        a = layer_norm(x, s[f"{p}.ln_1.weight"], s[f"{p}.ln_1.bias"])
        qkv = a @ s[f"{p}.attn.c_attn.weight"] + s[f"{p}.attn.c_attn.bias"]
        q, k, v = (z.reshape(*z.shape[:2], num_heads, d).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=-1))
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + y @ s[f"{p}.attn.c_proj.weight"] + s[f"{p}.attn.c_proj.bias"]
        m = layer_norm(x, s[f"{p}.ln_2.weight"], s[f"{p}.ln_2.bias"])
        h = gelu(m @ s[f"{p}.mlp.c_fc.weight"] + s[f"{p}.mlp.c_fc.bias"])
        x = x + h @ s[f"{p}.mlp.c_proj.weight"] + s[f"{p}.mlp.c_proj.bias"]
        i += 1
    x = layer_norm(x, s["ln_f.weight"], s["ln_f.bias"])
    return x @ s["wte.weight"].T
