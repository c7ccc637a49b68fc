"""Character-level GPT on Shakespeare's plays (nanoGPT-style): bits/char vs n-gram baselines, and a sample."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.models.transformer import generate
from depthlab.research.experiment import base_config, smoke_preset, with_preset
from depthlab.research.language import lm_training


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "gpt", "num_layers": 4, "num_heads": 4, "embed_dim": 128, "dropout": 0.0,
               "position_embedding": "learned", "tie_embeddings": True, "dtype": "float32"},
        data=lm_training.data_config(context=64, batch_size=32),
        optim={"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 0.1, "b2": 0.99, "clip_norm": 1.0, "end_learning_rate": 2e-4},
        train={"steps": 1200, "log_every": 100, "eval_every": 400, "checkpoint_every": 400,
               "best_metric": "eval/loss", "best_mode": "min"},
        sample={"prompt": "\n", "length": 400, "temperature": 0.8, "top_k": 0})
    return with_preset(config, preset, PRESETS)


def _nanogpt(c):
    """nanoGPT's config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, context 256, dropout 0.2,
    batch 64, lr 1e-3 cosine to 1e-4 over 5000 steps, AdamW(b2=0.99), for an accelerator."""
    c.model.update({"num_layers": 6, "num_heads": 6, "embed_dim": 384, "dropout": 0.2, "dtype": "bfloat16"})
    c.data.update({"context": 256, "batch_size": 64, "eval_batch_size": 64, "eval_batches": 0})
    c.optim.update({"learning_rate": 1e-3, "warmup_steps": 100, "end_learning_rate": 1e-4, "weight_decay": 0.1})
    c.train.update({"steps": 5000, "log_every": 100, "eval_every": 250, "checkpoint_every": 1000})


def _nanogpt_cpu(c):
    """nanoGPT's README CPU run of Shakespeare-char (train_shakespeare_char.py with --device=cpu
    --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
    --lr_decay_iters=2000 --dropout=0.0): no biases and exact GELU as nanoGPT's defaults, lr 1e-3 cosine to
    1e-4 after 100 warm-up steps, AdamW(b2=0.99, weight decay 0.1), clip 1.0, evaluated on the whole
    validation split. For the comparison on nanoGPT's own text add
    --config.data.path=../shared/data/tinyshakespeare.txt (see docs/language.md)."""
    c.model.update({"num_layers": 4, "num_heads": 4, "embed_dim": 128, "dropout": 0.0, "bias": False,
                    "gelu_approximate": False, "tie_embeddings": True})
    c.data.update({"context": 64, "batch_size": 12, "eval_batch_size": 64, "eval_batches": 0})
    c.optim.update({"learning_rate": 1e-3, "warmup_steps": 100, "end_learning_rate": 1e-4, "weight_decay": 0.1,
                    "b2": 0.99, "clip_norm": 1.0})
    c.train.update({"steps": 2000, "log_every": 100, "eval_every": 500, "checkpoint_every": 1000})


PRESETS = {
    "nanogpt": _nanogpt,
    "nanogpt_cpu": _nanogpt_cpu,
    "smoke": smoke_preset(20, log_every=10, model={"num_layers": 1, "num_heads": 2, "embed_dim": 32},
                          data={"context": 32, "batch_size": 8, "eval_batch_size": 8, "eval_batches": 2},
                          sample={"length": 40}),
}


def sample_text(model, params, tokenizer, prompt: str, length: int, rng, temperature: float, top_k: int) -> str:
    """`length` characters after `prompt`. Longer than the context, it continues in chunks, each
    prompted by the last half-context of what came before."""
    ids = list(tokenizer.encode(prompt))
    window = model.max_len // 2
    top_k = top_k or None
    gen = jax.jit(lambda p, x, key, n: generate(model, p, x, n, key, temperature, top_k), static_argnums=3)
    produced = 0
    while produced < length:
        context = ids[-window:]
        n = min(model.max_len - len(context), length - produced)
        rng, key = jax.random.split(rng)
        out = np.asarray(gen(params, jnp.asarray([context], jnp.int32), key, n))[0]
        ids.extend(int(t) for t in out[len(context):])
        produced += n
    return tokenizer.decode(ids)


def make_experiment(config):
    data = lm_training.load_lm_data(config)
    model = lm_training.build_lm(config, data["tokenizer"].vocab_size)
    experiment = lm_training.lm_experiment(config, data, model)
    s = config.sample
    try:   # the sample is drawn after training: a prompt the corpus cannot encode fails now, not at the end
        data["tokenizer"].encode(s.prompt)
    except ValueError as e:
        raise ValueError(f"sample.prompt={s.prompt!r} cannot be encoded with this corpus's tokenizer ({e}); fix: "
                         f"--config.sample.prompt=TEXT with characters of the corpus") from None

    def finish(state, workdir):
        """The LM's own finish (baselines, curves), then sample.txt: a sample of the trained model."""
        summary = experiment.finish(state, workdir)
        text = sample_text(model, state.eval_params(), data["tokenizer"], s.prompt, int(s.length),
                           jax.random.key(int(config.seed) + 1), float(s.temperature), int(s.top_k))
        with open(os.path.join(workdir, "sample.txt"), "w") as f:
            f.write(text)
        print("---- sample ----\n" + text + "\n----------------")
        return {**summary, "sample_file": os.path.join(workdir, "sample.txt")}

    return dataclasses.replace(experiment, finish=finish)
