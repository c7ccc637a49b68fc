"""Language experiments: configs and presets, end-to-end smoke runs through the engine."""
import json
import math
import os

import numpy as np
import pytest

from depthlab.research import run_experiment
from depthlab.research.registry import load_experiment

EXPERIMENTS = ("char_gpt", "char_lstm", "translate", "bert_mlm", "sentiment")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_presets_and_unknown_preset(name):
    module = load_experiment(f"language/{name}")
    config = module.get_config()
    assert config.train.steps > 0
    for preset in module.PRESETS:
        module.get_config(preset)
    with pytest.raises(ValueError, match="smoke"):
        module.get_config("no_such_preset")
    with pytest.raises(AttributeError):
        config.trian = 1          # locked: a typo fails loudly


def test_nanogpt_preset_matches_nanogpt_shakespeare_char():
    config = load_experiment("language/char_gpt").get_config("nanogpt")
    m, d = config.model, config.data
    assert (m.num_layers, m.num_heads, m.embed_dim, m.dropout, d.context) == (6, 6, 384, 0.2, 256)


def test_char_gpt_smoke_run_prints_sample_and_baselines(tmp_path, capsys):
    result = run_experiment("language/char_gpt", preset="smoke", workdir=str(tmp_path))
    out = capsys.readouterr().out
    assert "bigram" in out and "---- sample ----" in out
    loss = result["metrics"]["eval/loss"]
    assert math.isfinite(loss) and result["metrics"]["eval/bits_per_char"] == pytest.approx(loss / math.log(2))
    assert result["summary"]["bigram_nats_per_char"] < result["summary"]["unigram_nats_per_char"]
    sample = (tmp_path / "sample.txt").read_text()
    assert len(sample) == 1 + 40          # the prompt ("\n") and 40 generated characters


def test_char_lstm_on_a_user_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    result = run_experiment("language/char_lstm", preset="smoke", workdir=str(tmp_path / "run"),
                            overrides={"data.path": str(path), "train.steps": 60, "train.eval_every": 60,
                                       "train.checkpoint_every": 60, "optim.learning_rate": 1e-2})
    baselines = json.loads((tmp_path / "run" / "baselines.json").read_text())
    # A repeated sentence: after 60 steps the LSTM is far below the bigram model.
    assert result["metrics"]["eval/loss"] < baselines["bigram"]


def test_mlm_masking_statistics():
    from depthlab.research.language.bert_mlm import mask_tokens

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 100, size=(400, 50)).astype(np.int32)
    tokens[:, 0], tokens[:, 40:] = 2, 0                       # [CLS] first, padding at the end
    out = mask_tokens(tokens, rng, mask_id=4, vocab_size=100, prob=0.15, first_regular_id=5)
    picked = out["mlm_weights"].astype(bool)
    assert not picked[:, 0].any() and not picked[:, 40:].any()
    assert 0.13 < picked[:, 1:40].mean() < 0.17
    masked = (out["inputs"] == 4)[picked].mean()
    unchanged = (out["inputs"] == tokens)[picked].mean()
    assert 0.77 < masked < 0.83 and 0.08 < unchanged < 0.14   # 10% kept + random hits of the same id
    np.testing.assert_array_equal(out["inputs"][~picked], tokens[~picked])


@pytest.mark.slow
def test_translate_smoke_run(tmp_path):
    result = run_experiment("language/translate", preset="smoke", workdir=str(tmp_path))
    for key in ("greedy_exact_match", "greedy_bleu", "beam2_exact_match"):
        assert key in result["summary"]
    assert os.path.exists(tmp_path / "examples.txt")


@pytest.mark.slow
def test_sentiment_smoke_run(tmp_path):
    result = run_experiment("language/sentiment", preset="smoke", workdir=str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tfidf_logreg_test_accuracy"] > results["majority_test_accuracy"]
    assert (tmp_path / "accuracy.png").exists()
    assert 0.0 <= result["summary"]["bert_test_accuracy"] <= 1.0
