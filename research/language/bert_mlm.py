"""BERT masked-language-model pre-training on ~38k human-labelled tweets (labels unused): masked-token accuracy."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from depthlab.models import get_model
from depthlab.research.common import base_config, finalize, init_state, resolved_optim
from depthlab.research.datasets import sentiment, text
from depthlab.train import Experiment, data, losses, make_eval_step, make_optimizer, make_train_step

SPECIAL = ("[CLS]", "[MASK]")


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "bert", "num_layers": 2, "num_heads": 4, "embed_dim": 128, "dropout": 0.1,
               "position_embedding": "learned", "dtype": "float32"},
        data=data_config(),
        optim={"name": "adamw", "learning_rate": 1e-3, "schedule": "warmup_cosine", "warmup_steps": 100,
               "weight_decay": 0.01, "clip_norm": 1.0},
        train={"steps": 1500, "log_every": 100, "eval_every": 500, "checkpoint_every": 500},
    )
    return finalize(config, preset, PRESETS)


def data_config() -> dict:
    return {"corpus": "tweets", "vocab_size": 2000, "max_len": 48, "batch_size": 64, "eval_batch_size": 250,
            "mask_prob": 0.15, "val_fraction": 0.05}


PRESETS = {
    "smoke": lambda c: (c.model.update({"num_layers": 1, "embed_dim": 32, "num_heads": 2}),
                        c.data.update({"vocab_size": 300, "batch_size": 16, "eval_batch_size": 64}),
                        c.train.update({"steps": 20, "log_every": 10, "eval_every": 20, "checkpoint_every": 20})),
}


def pretraining_texts(corpus: str, exclude: set[str] = frozenset()) -> list[str]:
    """'tweets': every text of the sentiment corpus (all labels, all rater agreements) except those
    in `exclude` (the sentiment test split); 'shakespeare' / 'pydoc' / a path: its non-empty lines."""
    if corpus == "tweets":
        every = sentiment.sentiment_sentences(sentiment.LABELS, min_confidence=0.0, test_fraction=0.0,
                                              val_fraction=0.0)
        return [t for t in every["train"]["texts"] if t not in exclude]
    return [line.strip() for line in text.load_corpus(corpus).splitlines() if line.strip()]


def make_tokenizer(texts: list[str], vocab_size: int) -> text.SubwordTokenizer:
    return text.SubwordTokenizer.train(texts, vocab_size=vocab_size, user_symbols=SPECIAL)


def encode(tokenizer: text.SubwordTokenizer, texts: list[str], max_len: int) -> np.ndarray:
    """[CLS] + subword ids, right-padded/truncated to [len(texts), max_len]."""
    cls = tokenizer.piece_id("[CLS]")
    return text.pad_sequences([[cls] + tokenizer.encode(t) for t in texts], max_len, tokenizer.PAD)


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int, prob: float,
                first_regular_id: int) -> dict:
    """BERT's corruption: pick `prob` of the real tokens (never [CLS] or pad); of those 80% become
    [MASK], 10% a random token, 10% stay. Returns inputs, targets and mlm_weights (1 where picked)."""
    real = tokens >= first_regular_id
    picked = real & (rng.random(tokens.shape) < prob)
    roll = rng.random(tokens.shape)
    inputs = np.where(picked & (roll < 0.8), mask_id, tokens)
    random_ids = rng.integers(first_regular_id, vocab_size, size=tokens.shape)
    inputs = np.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, inputs).astype(np.int32)
    return {"inputs": inputs, "targets": tokens.astype(np.int32), "mlm_weights": picked.astype(np.float32)}


def mlm_loss(logits, batch):
    weights = batch["mlm_weights"]
    if "mask" in batch:
        weights = weights * batch["mask"][:, None]
    loss = losses.softmax_cross_entropy(logits, batch["targets"], mask=weights)
    return loss, {"masked_accuracy": losses.accuracy(logits, batch["targets"], mask=weights)}


def build_model(config, vocab_size: int, **overrides):
    kwargs = config.model.to_dict()
    name = kwargs.pop("name")
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
    kwargs.update(overrides)
    return get_model(name, vocab_size=vocab_size, max_len=int(config.data.max_len), **kwargs)


def mlm_experiment(config, texts: list[str], tokenizer: text.SubwordTokenizer, workdir_files: bool = True
                   ) -> Experiment:
    """Masked-LM pre-training of config.model on `texts` (last val_fraction held out)."""
    d = config.data
    tokens = encode(tokenizer, texts, int(d.max_len))
    n_val = max(int(len(tokens) * float(d.val_fraction)), int(d.eval_batch_size))
    train, val = tokens[:-n_val], tokens[-n_val:]
    mask_id, first_regular = tokenizer.piece_id("[MASK]"), tokenizer.piece_id(SPECIAL[-1]) + 1
    corrupt = lambda t, rng: mask_tokens(t, rng, mask_id, tokenizer.vocab_size, float(d.mask_prob),  # noqa: E731
                                         first_regular)
    val_batch = corrupt(val, np.random.default_rng([int(config.seed), 7]))      # fixed masks: comparable evals
    model = build_model(config, tokenizer.vocab_size, head="mlm")
    tx = make_optimizer(resolved_optim(config))

    def finish(state, workdir):
        with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
            f.write(tokenizer.model_proto)
        from depthlab.research.report import plot_run
        return {"pretraining_texts": len(texts), **plot_run(workdir)}

    return Experiment(
        init=lambda rng: init_state(model, train[:1], tx, rng),
        train_step=make_train_step(model, mlm_loss),
        train_batches=lambda start: data.epoch_batches(
            {"tokens": train}, int(d.batch_size), int(config.seed), start,
            transform=lambda batch, rng: corrupt(batch["tokens"], rng)),
        eval_step=make_eval_step(model, mlm_loss),
        eval_batches=lambda: data.eval_batches(val_batch, int(d.eval_batch_size)),
        finish=finish if workdir_files else None,
    )


def make_experiment(config):
    exclude = set(sentiment.sentiment_sentences(seed=int(config.seed))["test"]["texts"])
    texts = pretraining_texts(config.data.corpus, exclude)
    tokenizer = make_tokenizer(texts, int(config.data.vocab_size))
    print(f"pre-training texts: {len(texts):,}; subword vocabulary {tokenizer.vocab_size}")
    return mlm_experiment(config, texts, tokenizer)
