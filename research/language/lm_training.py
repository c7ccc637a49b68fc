"""Training pieces of the character language-model experiments (char_gpt, char_lstm).

Data: a corpus (config.data.corpus, or any file via config.data.path), a character tokenizer,
the first 90% for training and the last 10% for validation, random windows of config.data.context
characters. The loss is next-character cross-entropy in nats; bits/char = nats / ln 2. Unigram
and bigram baselines of the same split are printed and saved so the numbers mean something.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.models import get_model
from depthlab.research.common import init_state, resolved_optim
from depthlab.research.datasets import text
from depthlab.train import Experiment, losses, make_eval_step, make_optimizer, make_train_step

LN2 = float(np.log(2.0))


def data_config(**overrides) -> dict:
    """The data section of a char-LM config: the corpus (or a file: `path` wins), the validation share,
    the window length (`context`) and batch sizes; `eval_batches` windows of the validation text."""
    return {"corpus": "shakespeare", "path": "", "val_fraction": 0.1, "context": 128, "batch_size": 32,
            "eval_batch_size": 32, "eval_batches": 16, **overrides}


def compute_dtype(name: str):
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype {name!r} is not a compute dtype; use float32, bfloat16 or float16")
    return jnp.dtype(name)


def load_lm_data(config: ml_collections.ConfigDict) -> dict:
    """{'tokenizer', 'train', 'val', 'baselines'} for config.data (path wins over corpus)."""
    corpus = load_text(config)
    tokenizer = text.CharTokenizer.from_text(corpus)
    train, val = text.split_tokens(tokenizer.encode(corpus), float(config.data.val_fraction))
    baselines = text.ngram_baselines(train, val, tokenizer.vocab_size)
    return {"tokenizer": tokenizer, "train": train, "val": val, "baselines": baselines, "chars": len(corpus)}


def load_text(config: ml_collections.ConfigDict) -> str:
    return text.load_corpus(config.data.path or config.data.corpus)


def build_lm(config: ml_collections.ConfigDict, vocab_size: int):
    kwargs = config.model.to_dict()
    name = kwargs.pop("name")
    kwargs["dtype"] = compute_dtype(kwargs.get("dtype", "float32"))
    if name == "gpt":
        kwargs["max_len"] = int(config.data.context)   # the context is the model's length
    return get_model(name, vocab_size=vocab_size, **kwargs)


def lm_loss(logits, batch):
    loss = losses.softmax_cross_entropy(logits, batch["targets"], mask=batch.get("mask"))
    return loss, {"bits_per_char": loss / LN2}


def print_baselines(data: dict) -> None:
    b = data["baselines"]
    print(f"corpus: {data['chars']:,} characters, vocabulary {data['tokenizer'].vocab_size}; "
          f"train {len(data['train']):,}, validation {len(data['val']):,}")
    print(f"baselines on the validation text: unigram {b['unigram']:.3f} nats/char ({b['unigram'] / LN2:.3f} bits), "
          f"bigram {b['bigram']:.3f} nats/char ({b['bigram'] / LN2:.3f} bits)")


def lm_experiment(config: ml_collections.ConfigDict, data: dict, model) -> Experiment:
    """An Experiment training `model` (from `build_lm`) as a character LM on `data` (from `load_lm_data`).

    Its finish writes tokenizer.json, baselines.json and curves.png and returns the baselines (nats
    and bits per character) and the plot's path.
    """
    print_baselines(data)
    tx = make_optimizer(resolved_optim(config))
    d = config.data
    example = data["train"][: int(d.context)][None]

    def finish(state, workdir):
        summary = {"unigram_nats_per_char": data["baselines"]["unigram"],
                   "bigram_nats_per_char": data["baselines"]["bigram"],
                   "unigram_bits_per_char": data["baselines"]["unigram"] / LN2,
                   "bigram_bits_per_char": data["baselines"]["bigram"] / LN2}
        with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
            f.write(data["tokenizer"].to_json())
        from depthlab.research.report import plot_run
        summary.update(plot_run(workdir))
        with open(os.path.join(workdir, "baselines.json"), "w") as f:
            json.dump(data["baselines"], f)
        return summary

    return Experiment(
        init=lambda rng: init_state(model, example, tx, rng),
        train_step=make_train_step(model, lm_loss),
        train_batches=lambda start: text.random_windows(data["train"], int(d.batch_size), int(d.context),
                                                        int(config.seed), start),
        eval_step=make_eval_step(model, lm_loss),
        eval_batches=lambda: text.eval_windows(data["val"], int(d.eval_batch_size), int(d.context),
                                               int(d.eval_batches)),
        finish=finish,
    )
