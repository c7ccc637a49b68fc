"""Training pieces of the character language-model experiments (char_gpt, char_lstm).

Data: a corpus (config.data.corpus, or any file via config.data.path), a character tokenizer,
the first 90% for training and the last 10% for validation, random windows of config.data.context
characters. Or, with config.data.source=tokens:DIR (or tokens:DIR/train.bin), token files made by
`depthlab data convert FILE.txt --out DIR` (DIR/train.bin, val.bin, meta.json and the tokenizer), read
through a memory map by train/streaming/ (`TokenFile`): the same windows as in memory, for corpora of any size.
The loss is next-character cross-entropy in nats; bits/char = nats / ln 2. Unigram and bigram
baselines of the same split are printed and saved so the numbers mean something.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from depthlab.research.datasets import text
from depthlab.research.experiment import build_model, supervised_experiment
from depthlab.train import Experiment, losses

LN2 = float(np.log(2.0))


def data_config(**overrides) -> dict:
    """The data section of a char-LM config: the corpus (or a file: `path` wins), the validation share,
    the window length (`context`) and batch sizes; `eval_batches` windows of the validation text."""
    return {"corpus": "shakespeare", "path": "", "val_fraction": 0.1, "context": 128, "batch_size": 32,
            "eval_batch_size": 32, "eval_batches": 16, "source": "", "num_workers": 0, **overrides}


def load_lm_data(config: ml_collections.ConfigDict) -> dict:
    """{'tokenizer', 'train', 'val', 'baselines'} for config.data (source wins over path, path over corpus)."""
    if config.data.get("source"):
        return load_token_files(config.data.source)
    corpus = load_text(config)
    tokenizer = text.CharTokenizer.from_text(corpus)
    train, val = text.split_tokens(tokenizer.encode(corpus), float(config.data.val_fraction))
    baselines = text.ngram_baselines(train, val, tokenizer.vocab_size)
    return {"tokenizer": tokenizer, "train": train, "val": val, "baselines": baselines, "chars": len(corpus)}


BASELINE_TOKENS = 2_000_000   # n-gram baselines of a token file: from its first 2M tokens (and vocab <= 4096)


def load_token_files(source: str) -> dict:
    """'tokens:DIR' or 'tokens:DIR/train.bin' -> the load_lm_data dict, with 'train' a memory-mapped
    streaming.TokenFile and 'val' the validation ids (DIR/val.bin) in memory."""
    from depthlab.research.datasets.convert import load_tokenizer
    from depthlab.train import streaming

    kind, _, path = source.partition(":")
    if kind != "tokens" or not path:
        raise ValueError(f"data.source={source!r}: a language model reads tokens:DIR or tokens:DIR/train.bin "
                         f"(made by `depthlab data convert FILE.txt --out DIR`)")
    train_path = os.path.join(path, "train.bin") if os.path.isdir(path) else path
    folder = os.path.dirname(train_path)
    train = streaming.TokenFile(train_path)
    val_path = os.path.join(folder, "val.bin")
    if not os.path.exists(val_path):
        raise streaming.DataSourceError(f"no validation tokens {val_path!r} beside {train_path}; the converter writes "
                                        f"both (depthlab data convert FILE.txt --out {folder})")
    val = np.asarray(streaming.TokenFile(val_path, dtype=str(train.dtype)).tokens, np.int32)
    tokenizer = load_tokenizer(folder)
    head = np.asarray(train.tokens[:BASELINE_TOKENS], np.int32)
    if max(int(head.max(initial=0)), int(val.max(initial=0))) >= tokenizer.vocab_size:
        raise streaming.DataSourceError(f"{train_path} holds ids beyond its tokenizer's vocabulary of "
                                        f"{tokenizer.vocab_size}; the token files and tokenizer in {folder} do "
                                        f"not match")
    baselines = (text.ngram_baselines(head, val[:BASELINE_TOKENS], tokenizer.vocab_size)
                 if tokenizer.vocab_size <= 4096 else {"unigram": float("nan"), "bigram": float("nan")})
    return {"tokenizer": tokenizer, "train": train, "val": val, "baselines": baselines, "chars": len(train)}


def load_text(config: ml_collections.ConfigDict) -> str:
    return text.load_corpus(config.data.path or config.data.corpus)


def build_lm(config: ml_collections.ConfigDict, vocab_size: int):
    """config.model for `vocab_size` characters; a GPT's length is the context (config.data.context)."""
    max_len = {"max_len": int(config.data.context)} if config.model.name == "gpt" else {}
    return build_model(config.model, vocab_size=vocab_size, **max_len)


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

    Its finish writes tokenizer.json and baselines.json and returns the baselines (nats and bits per
    character); `fit` draws curves.png.
    """
    print_baselines(data)
    d = config.data
    streamed = not isinstance(data["train"], np.ndarray)   # a streaming.TokenFile (data.source=tokens:...)
    example = np.asarray((data["train"].tokens if streamed else data["train"])[: int(d.context)], np.int32)[None]

    def train_batches(start):
        if streamed:
            from depthlab.train import streaming
            return streaming.token_batches(data["train"], int(d.batch_size), int(d.context), int(config.seed), start,
                                           num_workers=int(d.get("num_workers", 0)))
        return text.random_windows(data["train"], int(d.batch_size), int(d.context), int(config.seed), start)

    def finish(state, workdir):
        summary = {"unigram_nats_per_char": data["baselines"]["unigram"],
                   "bigram_nats_per_char": data["baselines"]["bigram"],
                   "unigram_bits_per_char": data["baselines"]["unigram"] / LN2,
                   "bigram_bits_per_char": data["baselines"]["bigram"] / LN2}
        with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
            f.write(data["tokenizer"].to_json())
        with open(os.path.join(workdir, "baselines.json"), "w") as f:
            json.dump(data["baselines"], f)
        return summary

    return supervised_experiment(
        config, train_batches, lambda: text.eval_windows(data["val"], int(d.eval_batch_size), int(d.context),
                                                         int(d.eval_batches)),
        model=model, loss=lm_loss, example=example, finish=finish)
