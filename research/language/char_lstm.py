"""Character-level LSTM language model on Shakespeare's plays: bits/char vs unigram and bigram baselines."""
from __future__ import annotations

from depthlab.research.experiment import base_config, smoke_preset, with_preset
from depthlab.research.language import lm_training


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "rnn_lm", "hidden_size": 256, "num_layers": 2, "cell": "lstm", "embed_dim": 64,
               "dropout": 0.0, "dtype": "float32"},
        data=lm_training.data_config(context=64, batch_size=32),
        optim={"name": "adam", "learning_rate": 3e-3, "schedule": "warmup_cosine", "warmup_steps": 50,
               "clip_norm": 1.0, "end_learning_rate": 3e-4},
        train={"steps": 800, "log_every": 100, "eval_every": 400, "checkpoint_every": 400,
               "best_metric": "eval/loss", "best_mode": "min"})
    return with_preset(config, preset, PRESETS)


def _char_rnn(c):
    """Karpathy's char-rnn setting (2 x 512 LSTM, dropout 0.5, sequence 100) for an accelerator."""
    c.model.update({"hidden_size": 512, "dropout": 0.5, "embed_dim": 128})
    c.data.update({"context": 100, "batch_size": 64, "eval_batches": 0})
    c.train.update({"steps": 10000, "eval_every": 1000, "checkpoint_every": 1000})


def _gru(c):
    c.model.update({"cell": "gru"})


PRESETS = {
    "char_rnn": _char_rnn,
    "gru": _gru,
    "smoke": smoke_preset(20, log_every=10, model={"hidden_size": 32, "num_layers": 1, "embed_dim": 16},
                          data={"context": 32, "batch_size": 8, "eval_batch_size": 8, "eval_batches": 2}),
}


def make_experiment(config):
    data = lm_training.load_lm_data(config)
    return lm_training.lm_experiment(config, data, lm_training.build_lm(config, data["tokenizer"].vocab_size))
