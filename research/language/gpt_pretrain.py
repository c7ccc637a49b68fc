"""GPT pre-training at GPT-2 and 7B scale, on a synthetic token stream or token files (the scaling table's models).

The presets are the shapes `benchmarks/scaling_table.py` compiles for TPU slices: GPT-2 small / medium /
large / XL (`gpt2_config`: 124M / 355M / 774M / 1.5B parameters, context 1024) and a 7B-class decoder
(32 layers, width 4096, 32 heads, context 2048, vocabulary 32,000, rotary positions), all with bf16
compute over fp32 parameters, scanned layers, fused attention, remat per block and FSDP over every
chip. The default is a small GPT that trains on a laptop CPU.

Data: by default a synthetic stream whose windows follow t' = (a*t + c) mod V from a random start
(batch s is a pure function of (seed, s)), so the next token is learnable and the loss falls; or token
files (`data.source=tokens:DIR`, made by `depthlab data convert FILE.txt --out DIR`), whose tokenizer
sets the vocabulary.

Example:
    depthlab run language/gpt_pretrain --preset smoke --workdir runs/gpt
    depthlab compile language/gpt_pretrain --preset gpt2-xl --topology v5p:4x4x4
"""
from __future__ import annotations

import numpy as np

from depthlab.models.pretrained import gpt2_config
from depthlab.research.experiment import base_config, build_model, smoke_preset, supervised_experiment, with_preset
from depthlab.train import losses

# The recurrence of the synthetic stream: t' = (A * t + C) mod vocab_size.
A, C = 5, 3


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "gpt", "num_layers": 4, "num_heads": 4, "embed_dim": 128, "mlp_dim": None, "dropout": 0.0,
               "position_embedding": "learned", "tie_embeddings": True, "bias": True, "gelu_approximate": True,
               "dtype": "float32", "remat": "none", "scan_layers": False, "attention_impl": None},
        # vocab_size: of the synthetic stream (token files bring their own)
        data={"source": "", "vocab_size": 512, "context": 128, "batch_size": 16, "eval_batch_size": 16,
              "eval_batches": 4, "num_workers": 0},
        optim={"name": "adamw", "learning_rate": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 50,
               "weight_decay": 0.1, "b2": 0.95, "clip_norm": 1.0, "end_learning_rate": 1e-4},
        train={"steps": 500, "log_every": 50, "eval_every": 250, "checkpoint_every": 250,
               "best_metric": "eval/loss", "best_mode": "min"})
    return with_preset(config, preset, PRESETS)


def _large(c, model: dict, context: int, batch_size: int, vocab_size: int) -> None:
    """A pre-training shape for an accelerator: bf16 compute, scanned blocks, fused attention, remat
    of each block ("full"), parameters and Adam moments sharded over every chip (FSDP)."""
    c.model.update({**model, "dtype": "bfloat16", "scan_layers": True, "attention_impl": "xla", "remat": "full"})
    c.data.update({"vocab_size": vocab_size, "context": context, "batch_size": batch_size,
                   "eval_batch_size": batch_size, "eval_batches": 1})
    c.optim.update({"learning_rate": 6e-4, "warmup_steps": 2000, "end_learning_rate": 6e-5})
    c.train.update({"steps": 100_000, "log_every": 100, "eval_every": 2000, "checkpoint_every": 2000})
    c.mesh.update({"strategy": "fsdp", "fsdp": -1, "data": 1})


def _gpt2_preset(name: str):
    def apply(c) -> None:
        shape = gpt2_config(name)
        vocab, context = shape.pop("vocab_size"), shape.pop("max_len")
        _large(c, shape, context, 64, vocab)
    apply.__name__ = f"_{name.replace('-', '_')}"
    apply.__doc__ = f"Hugging Face {name} (gpt2_config) at context 1024, batch 64 (set it per slice)."
    return apply


def _seven_b(c) -> None:
    """A 7B-class decoder (LLaMA-7B's depth, width, heads, context and vocabulary; GPT blocks with a 4x GELU
    MLP and biases off: 6.6B parameters), batch 64 at context 2048."""
    _large(c, {"num_layers": 32, "num_heads": 32, "embed_dim": 4096, "mlp_dim": 16384, "dropout": 0.0,
               "position_embedding": "rotary", "tie_embeddings": False, "bias": False}, 2048, 64, 32_000)


PRESETS = {
    "smoke": smoke_preset(30, model={"num_layers": 1, "num_heads": 2, "embed_dim": 32},
                          data={"vocab_size": 64, "context": 16, "batch_size": 8, "eval_batch_size": 8,
                                "eval_batches": 2}),
    "gpt2": _gpt2_preset("gpt2"),
    "gpt2-medium": _gpt2_preset("gpt2-medium"),
    "gpt2-large": _gpt2_preset("gpt2-large"),
    "gpt2-xl": _gpt2_preset("gpt2-xl"),
    "7b": _seven_b,
}


def synthetic_windows(vocab_size: int, batch_size: int, context: int, seed: int, start_step: int = 0):
    """Infinite {'inputs', 'targets'} int32 batches [batch, context] of the recurrence t' = (A t + C) mod V,
    each row from a random start; batch s depends only on (seed, s)."""
    step = start_step
    while True:
        rows = np.empty((batch_size, context + 1), np.int64)
        rows[:, 0] = np.random.default_rng([seed, step]).integers(0, vocab_size, size=batch_size)
        for k in range(1, context + 1):
            rows[:, k] = (A * rows[:, k - 1] + C) % vocab_size
        rows = rows.astype(np.int32)
        yield {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
        step += 1


def lm_loss(logits, batch):
    """Next-token cross-entropy (nats) in float32, with its perplexity."""
    loss = losses.softmax_cross_entropy(logits.astype(np.float32), batch["targets"], mask=batch.get("mask"))
    return loss, {"perplexity": np.e ** loss}


def make_experiment(config):
    d = config.data
    batch, context, seed = int(d.batch_size), int(d.context), int(config.seed)
    if d.source:
        from depthlab.research.language.lm_training import load_token_files
        from depthlab.train import streaming
        tokens = load_token_files(d.source)
        vocab_size = tokens["tokenizer"].vocab_size
        train = lambda start: streaming.token_batches(tokens["train"], batch, context, seed, start,  # noqa: E731
                                                      num_workers=int(d.num_workers))
        val = tokens["val"]
        from depthlab.research.datasets import text
        test = lambda: text.eval_windows(val, int(d.eval_batch_size), context, int(d.eval_batches))  # noqa: E731
    else:
        vocab_size = int(d.vocab_size)
        train = lambda start: synthetic_windows(vocab_size, batch, context, seed, start)  # noqa: E731

        def test():
            windows = synthetic_windows(vocab_size, int(d.eval_batch_size), context, seed + 1_000_003)
            return [next(windows) for _ in range(int(d.eval_batches))]
    model = build_model(config.model, vocab_size=vocab_size, max_len=context)
    example = np.zeros((1, context), np.int32)
    return supervised_experiment(config, train, test, model=model, loss=lm_loss, example=example)
