"""English -> French numbers, ordinals and dates with an encoder-decoder transformer: exact match and BLEU on unseen phrases."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.models.transformer import beam_search, greedy_decode
from depthlab.research.datasets import require
from depthlab.research.datasets.text import SubwordTokenizer, pad_sequences
from depthlab.research.datasets.translation import translation_pairs
from depthlab.research.experiment import base_config, build_model, smoke_preset, supervised_experiment, with_preset
from depthlab.train import losses


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "encoder_decoder", "num_layers": 2, "num_heads": 4, "embed_dim": 128, "dropout": 0.1,
               "position_embedding": "learned", "dtype": "float32"},
        data={"languages": ("fr",), "max_number": 9999, "max_ordinal": 1000, "num_dates": 3000,
              "vocab_size": 400, "batch_size": 64, "eval_batch_size": 250},
        optim={"name": "adamw", "learning_rate": 2e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 0.01, "clip_norm": 1.0},
        train={"steps": 1200, "log_every": 100, "eval_every": 1200, "checkpoint_every": 400,
               "best_metric": "eval/exact_match"},
        decode={"beam_size": 4, "length_penalty": 0.6, "examples": 12},
    )
    return with_preset(config, preset, PRESETS)


def _multilingual(c):
    """English -> French and German with one model (the source's <2fr>/<2de> tag picks the language)."""
    c.data.update({"languages": ("fr", "de"), "vocab_size": 600})
    c.train.update({"steps": 5000, "eval_every": 5000})


PRESETS = {
    "multilingual": _multilingual,
    "smoke": smoke_preset(20, log_every=10, model={"num_layers": 1, "embed_dim": 32, "num_heads": 2},
                          data={"max_number": 300, "max_ordinal": 50, "num_dates": 100, "vocab_size": 120,
                                "batch_size": 16, "eval_batch_size": 32},
                          decode={"beam_size": 2}),
}


def prepare(config) -> dict:
    """Pairs, a SentencePiece model trained on the training pairs, and padded id arrays per split."""
    d = config.data
    pairs = translation_pairs(tuple(d.languages), int(d.max_number), int(d.max_ordinal), int(d.num_dates),
                              seed=int(config.seed))
    tags = [f"<2{lang}>" for lang in d.languages]
    texts = [s for s, _ in pairs["train"]] + [t for _, t in pairs["train"]]
    tokenizer = SubwordTokenizer.train(texts, vocab_size=int(d.vocab_size), user_symbols=tags)
    encoded = {name: ([tokenizer.encode(s) for s, _ in split], [tokenizer.encode(t) for _, t in split])
               for name, split in pairs.items()}
    source_len = max(len(s) for src, _ in encoded.values() for s in src)
    target_len = max(len(t) for _, tgt in encoded.values() for t in tgt) + 1       # + BOS / EOS
    arrays = {}
    for name, (src, tgt) in encoded.items():
        arrays[name] = {
            "source": pad_sequences(src, source_len),
            "target_in": pad_sequences([[tokenizer.BOS] + t for t in tgt], target_len),
            "target_out": pad_sequences([t + [tokenizer.EOS] for t in tgt], target_len),
        }
    return {"pairs": pairs, "tokenizer": tokenizer, "arrays": arrays, "source_len": source_len,
            "target_len": target_len}


def seq2seq_loss(logits, batch):
    """Token cross-entropy over real target tokens (pad ignored; padded eval rows ignored)."""
    weights = (batch["target_out"] != 0).astype(jnp.float32)
    if "mask" in batch:
        weights = weights * batch["mask"][:, None]
    loss = losses.softmax_cross_entropy(logits, batch["target_out"], mask=weights)
    return loss, {"token_accuracy": losses.accuracy(logits, batch["target_out"], mask=weights)}


def decode_all(model, params, sources: np.ndarray, tokenizer, max_len: int, batch_size: int,
               beam_size: int = 1, length_penalty: float = 0.6) -> list[str]:
    """Translations of every row of `sources` (greedy when beam_size == 1), as strings."""
    if beam_size == 1:
        decode = functools.partial(greedy_decode, model, max_len=max_len, bos_id=tokenizer.BOS, eos_id=tokenizer.EOS)
    else:
        decode = functools.partial(beam_search, model, max_len=max_len, bos_id=tokenizer.BOS, eos_id=tokenizer.EOS,
                                   beam_size=beam_size, length_penalty=length_penalty)
    fn = jax.jit(decode)
    out = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        padded = np.zeros((batch_size, sources.shape[1]), np.int32)   # full batches: one compilation
        padded[:len(chunk)] = chunk
        ids = np.asarray(fn(params, padded))[:len(chunk)]
        for row in ids:
            row = list(row)
            row = row[:row.index(tokenizer.EOS)] if tokenizer.EOS in row else row
            out.append(tokenizer.decode(row))
    return out


def score(hypotheses: list[str], references: list[str]) -> dict:
    sacrebleu = require("sacrebleu", "language")
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    return {"exact_match": exact, "bleu": float(bleu)}


def make_experiment(config):
    prep = prepare(config)
    tokenizer, arrays = prep["tokenizer"], prep["arrays"]
    max_len = max(prep["source_len"], prep["target_len"])
    model = build_model(config.model, vocab_size=tokenizer.vocab_size, max_len=max_len)
    d = config.data
    test_refs = [t for _, t in prep["pairs"]["test"]]
    print(f"translation pairs: {', '.join(f'{k} {len(v)}' for k, v in prep['pairs'].items())}; "
          f"subword vocabulary {tokenizer.vocab_size}; source <= {prep['source_len']}, "
          f"target <= {prep['target_len']} tokens")

    def evaluate(state):
        hyps = decode_all(model, state.eval_params(), arrays["test"]["source"], tokenizer, prep["target_len"],
                          int(d.eval_batch_size))
        return score(hyps, test_refs)

    def finish(state, workdir):
        params = state.eval_params()
        greedy = decode_all(model, params, arrays["test"]["source"], tokenizer, prep["target_len"],
                            int(d.eval_batch_size))
        beam = decode_all(model, params, arrays["test"]["source"], tokenizer, prep["target_len"],
                          int(d.eval_batch_size), int(config.decode.beam_size), float(config.decode.length_penalty))
        results = {f"greedy_{k}": v for k, v in score(greedy, test_refs).items()}
        results.update({f"beam{config.decode.beam_size}_{k}": v for k, v in score(beam, test_refs).items()})
        results["test_phrases"] = len(test_refs)
        lines = [f"{src}\n  reference: {ref}\n  greedy:    {g}\n  beam:      {b}"
                 for (src, ref), g, b in zip(prep["pairs"]["test"][: int(config.decode.examples)], greedy, beam)]
        with open(os.path.join(workdir, "examples.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
            f.write(tokenizer.model_proto)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print("\n".join(lines[:6]))
        print("held-out test phrases: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    return supervised_experiment(config, arrays["train"], arrays["val"], model=model, loss=seq2seq_loss,
                                 input_keys=("source", "target_in"), evaluate=evaluate, finish=finish)
