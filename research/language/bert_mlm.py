"""BERT masked-language-model pre-training on ~33k tweets outside the sentiment test split (labels unused): masked-token accuracy."""
from __future__ import annotations

import math
import os

import numpy as np

from depthlab.research.datasets import sentiment, text
from depthlab.research.experiment import base_config, build_model, smoke_preset, supervised_experiment, with_preset
from depthlab.train import Experiment, losses

SPECIAL = ("[CLS]", "[MASK]")
MLM_INPUTS = ("inputs", "mlm_positions")      # the model's arguments, read from each batch


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "bert", "num_layers": 2, "num_heads": 4, "embed_dim": 128, "dropout": 0.1,
               "position_embedding": "learned", "dtype": "float32"},
        data=data_config(),
        optim={"name": "adamw", "learning_rate": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 0.01, "clip_norm": 1.0},
        # 700 steps: under 5 minutes on 2 CPU cores (1,000 took 320 s of CPU at load 5); `--preset long` is
        # sentiment's full pre-training (6,000 steps).
        train={"steps": 700, "log_every": 100, "eval_every": 350, "checkpoint_every": 350},
    )
    return with_preset(config, preset, PRESETS)


def data_config() -> dict:
    """Pre-training data: lower-cased tweets (as TF-IDF sees them), an 8k-piece SentencePiece vocabulary
    (most words are one piece), 48 pieces per text (99% of tweets fit), 15% of the pieces masked."""
    return {"corpus": "tweets", "lowercase": True, "vocab_size": 8000, "max_len": 48, "batch_size": 64,
            "eval_batch_size": 250, "mask_prob": 0.15, "val_fraction": 0.05}


def _long(c):
    """The pre-training stage of `language/sentiment --preset full`: 37.3% masked-token accuracy, ~21 minutes."""
    c.train.update({"steps": 6000, "eval_every": 1000, "checkpoint_every": 1000})


PRESETS = {
    "long": _long,
    "smoke": smoke_preset(20, log_every=10, model={"num_layers": 1, "embed_dim": 32, "num_heads": 2},
                          data={"vocab_size": 300, "batch_size": 16, "eval_batch_size": 64}),
}


def pretraining_texts(corpus: str, exclude: set[str] = frozenset(), lowercase: bool = False) -> list[str]:
    """'tweets': every text of the sentiment corpus (all labels, all rater agreements) except those
    in `exclude` (the sentiment test split); 'shakespeare' / 'pydoc' / a path: its non-empty lines.
    `lowercase` lower-cases them. The exclusion ignores case, so no case variant of a test text is
    pre-trained on."""
    if corpus == "tweets":
        every = sentiment.sentiment_sentences(sentiment.LABELS, min_confidence=0.0, test_fraction=0.0,
                                              val_fraction=0.0)
        excluded = {t.lower() for t in exclude}      # the split de-duplicates case-insensitively too
        texts = [t for t in every["train"]["texts"] if t.lower() not in excluded]
    else:
        texts = [line.strip() for line in text.load_corpus(corpus).splitlines() if line.strip()]
    return [t.lower() for t in texts] if lowercase else texts


def make_tokenizer(texts: list[str], vocab_size: int) -> text.SubwordTokenizer:
    return text.SubwordTokenizer.train(texts, vocab_size=vocab_size, user_symbols=SPECIAL)


def special_ids(tokenizer: text.SubwordTokenizer) -> tuple[int, int]:
    """([MASK] id, first id of a regular token): ids below it are pad/unk/bos/eos and SPECIAL."""
    return tokenizer.piece_id("[MASK]"), max(tokenizer.piece_id(s) for s in SPECIAL) + 1


def encode(tokenizer: text.SubwordTokenizer, texts: list[str], max_len: int) -> np.ndarray:
    """[CLS] + subword ids, right-padded/truncated to [len(texts), max_len]."""
    cls = tokenizer.piece_id("[CLS]")
    return text.pad_sequences([[cls] + tokenizer.encode(t) for t in texts], max_len, tokenizer.PAD)


def max_predictions(max_len: int, prob: float) -> int:
    """How many masked positions each sequence carries (BERT's max_predictions_per_seq)."""
    return max(1, math.ceil(max_len * prob))


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int, prob: float,
                first_regular_id: int) -> dict:
    """BERT's corruption: in each row pick round(`prob` x its real tokens) positions (at least one,
    never [CLS] or pad); of those 80% become [MASK], 10% a random token, 10% stay.

    Returns inputs [n, time], and per row a fixed number P = max_predictions(time, prob) of
    mlm_positions, targets (the original tokens there) and mlm_weights (1 for a picked position,
    0 for the padding of rows with fewer picks), so the model predicts P tokens a row, not `time`.
    """
    n, time = tokens.shape
    slots = max_predictions(time, prob)
    real = tokens >= first_regular_id
    count = np.clip(np.rint(prob * real.sum(1)), 1, slots).astype(int) * real.any(1)
    # A random order of each row's real positions (padding and specials sort last).
    order = np.argsort(np.where(real, rng.random(tokens.shape), 2.0), axis=1, kind="stable")[:, :slots]
    weights = np.arange(slots)[None, :] < count[:, None]
    positions = np.where(weights, order, 0)
    picked = np.zeros(tokens.shape, bool)
    picked[np.nonzero(weights)[0], positions[weights]] = True
    roll = rng.random(tokens.shape)
    inputs = np.where(picked & (roll < 0.8), mask_id, tokens)
    random_ids = rng.integers(first_regular_id, vocab_size, size=tokens.shape)
    inputs = np.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, inputs).astype(np.int32)
    targets = np.take_along_axis(tokens, positions, axis=1)
    return {"inputs": inputs, "mlm_positions": positions.astype(np.int32), "targets": targets.astype(np.int32),
            "mlm_weights": weights.astype(np.float32)}


def mlm_loss(logits, batch):
    weights = batch["mlm_weights"]
    if "mask" in batch:
        weights = weights * batch["mask"][:, None]
    loss = losses.softmax_cross_entropy(logits, batch["targets"], mask=weights)
    return loss, {"masked_accuracy": losses.accuracy(logits, batch["targets"], mask=weights)}


def mlm_experiment(config, texts: list[str], tokenizer: text.SubwordTokenizer, workdir_files: bool = True
                   ) -> Experiment:
    """Masked-LM pre-training of config.model on `texts` (last val_fraction held out)."""
    d = config.data
    tokens = encode(tokenizer, texts, int(d.max_len))
    n_val = max(int(len(tokens) * float(d.val_fraction)), int(d.eval_batch_size))
    train, val = tokens[:-n_val], tokens[-n_val:]
    mask_id, first_regular = special_ids(tokenizer)
    corrupt = lambda t, rng: mask_tokens(t, rng, mask_id, tokenizer.vocab_size, float(d.mask_prob),  # noqa: E731
                                         first_regular)
    val_batch = corrupt(val, np.random.default_rng([int(config.seed), 7]))      # fixed masks: comparable evals

    def finish(state, workdir):
        with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
            f.write(tokenizer.model_proto)
        return {"pretraining_texts": len(texts)}

    model = build_model(config.model, vocab_size=tokenizer.vocab_size, max_len=int(d.max_len), head="mlm")
    return supervised_experiment(config, {"tokens": train}, val_batch, model=model, loss=mlm_loss,
                                 input_keys=MLM_INPUTS, example=train,
                                 transform=lambda batch, rng: corrupt(batch["tokens"], rng),
                                 finish=finish if workdir_files else None)


def make_experiment(config):
    exclude = set(sentiment.sentiment_sentences(seed=int(config.seed))["test"]["texts"])
    texts = pretraining_texts(config.data.corpus, exclude, bool(config.data.lowercase))
    tokenizer = make_tokenizer(texts, int(config.data.vocab_size))
    print(f"pre-training texts: {len(texts):,}; subword vocabulary {tokenizer.vocab_size}")
    return mlm_experiment(config, texts, tokenizer)
