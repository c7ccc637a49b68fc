"""Training steps/s of the same models in PyTorch (eager and torch.compile) and in depthlab, on CPU.

Models: the digits_cnn experiment's CNN (conv32-pool-conv64-pool-dense128-dropout0.2, 8x8 digits,
batch 64) and the small GPT of overhead.py (2 layers, 4 heads, 64 wide, context 64, batch 8, vocab 65,
GPT-2 layout, tied embeddings). Same batches (depthlab's epoch iterator, numpy), Adam 1e-3, one
process; the contenders run interleaved in a rotating order `--repeats` times; a run's figure is the
median of `--windows` windows of `log_every` steps after a warm-up window, each window ending with a
metric fetch (`loss.item()` / `device_get`), as a training loop that logs does.

  torch eager      nn.Module + torch.optim.Adam (foreach), F.scaled_dot_product_attention
  torch.compile    the same module through torch.compile (inductor; needs a C++ compiler)
  depthlab step    make_train_step + TrainState, jitted and donated, same loop as torch
  depthlab fit     fit itself (prefetch, checks, logging, progress bar)

PyTorch is a benchmark-only dependency, kept out of the project's environment (tensorboardX, which
fit's TensorBoard writer uses, imports torch when it can: +seconds per process start). Install it
in a separate virtual environment that sees the system packages:
    python -m venv --system-site-packages /opt/depthlab-bench-torch
    /opt/depthlab-bench-torch/bin/pip install torch==2.13.0          # the CPU wheel
    /opt/depthlab-bench-torch/bin/python benchmarks/vs_pytorch.py
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# OpenMP threads that spin while waiting collapse PyTorch's CPU speed ~10x when the cores are shared
# (measured here: 18 -> 250 steps/s on the CNN). Passive waiting is the fair setting on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as common  # noqa: E402


def torch_cnn(work: common.Workload):
    """The depthlab CNN (channels, dense, dropout, max-pool, SAME 3x3 convs) in PyTorch, NCHW."""
    import torch
    from torch import nn
    m = work.model
    layers, ch, side = [], work.arrays["inputs"].shape[-1], work.arrays["inputs"].shape[1]
    for out in m.channels:
        layers += [nn.Conv2d(ch, out, m.kernel_size, padding="same"), nn.ReLU(),
                   nn.MaxPool2d(2, ceil_mode=True)]
        ch, side = out, math.ceil(side / 2)
    layers.append(nn.Flatten())
    width = ch * side * side
    for hidden in m.dense:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(m.dropout)]
        width = hidden
    layers.append(nn.Linear(width, m.num_classes))
    model = nn.Sequential(*layers)

    def prepare(batch):  # NHWC numpy -> NCHW tensor
        return torch.from_numpy(batch["inputs"]).permute(0, 3, 1, 2), torch.from_numpy(batch["labels"]).long()

    return model, prepare


def torch_gpt(work: common.Workload):
    """nanoGPT-style decoder with the depthlab GPT's shapes (pre-LN, GELU-tanh MLP x4, tied head)."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    g = work.model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d = g.embed_dim
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            heads = lambda y: y.view(b, t, g.num_heads, d // g.num_heads).transpose(1, 2)  # noqa: E731
            y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Embedding(g.vocab_size, g.embed_dim)
            self.position = nn.Parameter(torch.randn(g.max_len, g.embed_dim) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(g.num_layers))
            self.ln = nn.LayerNorm(g.embed_dim)

        def forward(self, tokens):
            x = self.token(tokens) + self.position[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.ln(x) @ self.token.weight.T

    def prepare(batch):
        return torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long()

    return GPT(), prepare


class TorchLoop:
    """model(x) -> cross-entropy -> backward -> Adam, on the same numpy batches as depthlab."""

    def __init__(self, work: common.Workload, compiled: bool):
        import torch
        from torch.nn import functional as F
        torch.manual_seed(0)
        model, self.prepare = (torch_gpt if work.label_key == "targets" else torch_cnn)(work)
        model.train()
        self.num_params = sum(p.numel() for p in model.parameters())
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.forward = torch.compile(model) if compiled else model
        self.work, self.F = work, F

    def step(self, batch):
        x, y = self.prepare(batch)
        logits = self.forward(x)
        loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, windows: int) -> list[float]:
        return common.time_windows(self.step, self.work.batches(), self.work.log_every, windows,
                                   fetch=lambda loss: loss.item())


def measure(work: common.Workload, repeats: int, windows: int, with_compile: bool) -> list[dict]:
    import torch
    runners, notes = {}, {}
    eager = TorchLoop(work, compiled=False)
    runners["torch eager"] = eager.run
    if with_compile:
        try:
            compiled = TorchLoop(work, compiled=True)
            compiled.run(1)  # compile here, so a failure is reported instead of breaking the table
            runners["torch.compile"] = compiled.run
        except Exception as e:  # noqa: BLE001 - inductor needs a working C++ toolchain
            notes["torch.compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            traceback.print_exc(limit=2)
    step = common.DepthlabStep(work)
    runners["depthlab step"] = step.run
    runners["depthlab fit"] = lambda w: common.run_fit(work, w)
    order = list(runners)
    results = {name: [] for name in order}
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            results[name].append(common.median(runners[name](windows)))
    base = results["torch eager"]
    params = {"torch": eager.num_params, "depthlab": common.count_params(step.state.params)}
    rows = []
    for name in order:
        rate = common.median(results[name])
        rows.append({"model": work.name, "contender": name, "params": params[name.split()[0].split(".")[0]],
                     "steps/s": rate, "vs torch eager": common.median([a / b for a, b in zip(results[name], base)]),
                     "items/s": rate * work.items_per_step, "item": work.item})
    rows += [{"model": work.name, "contender": name, "item": note} for name, note in notes.items()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--workloads", default="cnn,gpt")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--windows", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("vs_pytorch.py needs PyTorch (benchmark-only): see this file's docstring for the install")
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    repeats = args.repeats or {"tiny": 1}.get(args.size, 3)
    windows = args.windows or {"tiny": 1}.get(args.size, 4)
    common.enable_compilation_cache(tempfile.mkdtemp(prefix="depthlab_bench_cache_"))
    common.print_header(f"PyTorch vs depthlab, CPU training steps/s (size={args.size}, {repeats} repeats x {windows} windows)")
    rows = []
    for name in args.workloads.split(","):
        rows += measure(common.workload(name, args.size), repeats, windows, not args.no_compile)
        common.print_table(rows, ["model", "contender", "params", "steps/s", "vs torch eager", "items/s", "item"])
    return rows


if __name__ == "__main__":
    main()
