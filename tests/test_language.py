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


def test_nanogpt_cpu_preset_is_nanogpts_readme_cpu_run():
    import jax
    from depthlab.research.language import lm_training
    c = load_experiment("language/char_gpt").get_config("nanogpt_cpu")
    assert (c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.data.context, c.data.batch_size,
            c.train.steps, c.optim.learning_rate, c.model.dropout) == (4, 4, 128, 64, 12, 2000, 1e-3, 0.0)
    model = lm_training.build_lm(c, 65)
    assert model.bias is False and model.gelu_approximate is False and c.data.eval_batches == 0   # whole val split
    params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64), np.int32))["params"]
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    assert not [n for n in names if n.endswith("bias") and "ln" not in n.lower() and "norm" not in n.lower()], names


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
    from depthlab.research.language.bert_mlm import mask_tokens, max_predictions

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 100, size=(400, 50)).astype(np.int32)
    tokens[:, 0], tokens[:, 40:] = 2, 0                       # [CLS] first, padding at the end
    tokens[1, 3:] = 0                                         # a row with two real tokens
    tokens[2, 1:] = 0                                         # a row with none
    out = mask_tokens(tokens, rng, mask_id=4, vocab_size=100, prob=0.15, first_regular_id=5)
    slots = max_predictions(50, 0.15)
    assert slots == 8
    for key in ("mlm_positions", "targets", "mlm_weights"):
        assert out[key].shape == (400, slots), key
    weights = out["mlm_weights"].astype(bool)
    # round(0.15 x 39 real tokens) = 6 predictions a row; at least one if any token is real; none without.
    assert np.all(weights.sum(1)[3:] == 6) and weights[1].sum() == 1 and weights[2].sum() == 0
    positions = np.where(weights, out["mlm_positions"], -1)
    rows = [set(p[p >= 0]) for p in positions]
    assert all(len(r) == w for r, w in zip(rows, weights.sum(1)))            # distinct positions
    picked = np.zeros(tokens.shape, bool)
    for i, r in enumerate(rows):
        picked[i, list(r)] = True
    assert not picked[:, 0].any() and not picked[:, 40:].any() and not picked[1, 3:].any()
    np.testing.assert_array_equal(out["targets"][weights], tokens[np.nonzero(weights)[0],
                                                                  out["mlm_positions"][weights]])
    masked = (out["inputs"] == 4)[picked].mean()
    unchanged = (out["inputs"] == tokens)[picked].mean()
    assert 0.77 < masked < 0.83 and 0.08 < unchanged < 0.14   # 10% kept + random hits of the same id
    np.testing.assert_array_equal(out["inputs"][~picked], tokens[~picked])


def test_bert_mlm_positions_give_the_same_logits_as_the_full_output():
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    from depthlab.models.transformer import BERT

    model = BERT(vocab_size=40, num_layers=1, num_heads=2, embed_dim=16, max_len=12, dropout=0.0)
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 1, 40)
    params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
    positions = jnp.array([[1, 5, 11], [0, 0, 0], [7, 2, 3]])
    full = model.apply({"params": params}, tokens)
    gathered = model.apply({"params": params}, tokens, positions)
    assert gathered.shape == (3, 3, 40)
    np.testing.assert_allclose(gathered, np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None],
                                                            axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # 38 s loaded; the masked-positions logits test stays fast
def test_bert_mlm_smoke_run_predicts_only_masked_positions(tmp_path):
    result = run_experiment("language/bert_mlm", preset="smoke", workdir=str(tmp_path))
    metrics = result["metrics"]
    assert math.isfinite(metrics["eval/loss"]) and 0.0 <= metrics["eval/masked_accuracy"] <= 1.0
    assert (tmp_path / "tokenizer.model").stat().st_size > 0      # the tokenizer a fine-tuning run reuses
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss"] < first["loss"]                          # the masked-LM loss falls


@pytest.mark.slow
def test_translate_smoke_run(tmp_path):
    result = run_experiment("language/translate", preset="smoke", workdir=str(tmp_path))
    for key in ("greedy_exact_match", "greedy_bleu", "beam2_exact_match"):
        assert key in result["summary"]
    assert os.path.exists(tmp_path / "examples.txt")


@pytest.mark.slow          # two end-to-end pipelines: ~130 s, too long for the fast suite
def test_sentiment_smoke_run_and_fine_tuning_on_an_earlier_pretraining(tmp_path):
    result = run_experiment("language/sentiment", preset="smoke", workdir=str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tfidf_logreg_test_accuracy"] > results["majority_test_accuracy"]
    assert (tmp_path / "accuracy.png").exists()
    assert 0.0 <= result["summary"]["bert_test_accuracy"] <= 1.0
    assert 0.0 <= results["bert_vs_tfidf_mcnemar_p"] <= 1.0
    pretraining = (tmp_path / "pretrain" / "metrics.jsonl").read_text()
    # Another fine-tuning setting in a new run directory, on the finished pre-training of the first.
    other = tmp_path / "other"
    again = run_experiment("language/sentiment", preset="smoke", workdir=str(other),
                           overrides={"finetune.token_dropout": 0.3, "pretrain.workdir": str(tmp_path / "pretrain")})
    assert (tmp_path / "pretrain" / "metrics.jsonl").read_text() == pretraining     # not trained again
    assert not (other / "pretrain").exists() and (other / "bert" / "metrics.jsonl").exists()
    assert again["summary"]["pretrain_masked_accuracy"] == results["pretrain_masked_accuracy"]


@pytest.mark.slow
def test_sentiment_full_preset_bert_beats_tfidf(tmp_path):
    """The headline figure, with `--preset full` (about 26 minutes on 2 CPU cores)."""
    run_experiment("language/sentiment", preset="full", workdir=str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bert_test_accuracy"] > results["tfidf_logreg_test_accuracy"] > results["majority_test_accuracy"]
    assert results["bert_beats_tfidf"]


def test_mcnemar_counts_disagreements_and_gives_the_exact_p_value():
    sentiment = load_experiment("language/sentiment")
    labels = np.ones(30, np.int32)
    first, second = labels.copy(), labels.copy()
    first[:2] = 0            # 2 only the second gets right
    second[2:12] = 0         # 10 only the first gets right; 18 both right
    out = sentiment.mcnemar(labels, first, second)
    assert (out["only_first"], out["only_second"]) == (10, 2)
    assert out["p_value"] == pytest.approx(2 * (66 + 12 + 1) / 2**12)      # two-sided binomial, n=12, k=10
    assert sentiment.mcnemar(labels, labels, labels)["p_value"] == 1.0


def test_sentiment_token_dropout_masks_only_real_tokens():
    sentiment = load_experiment("language/sentiment")
    config = sentiment.get_config("smoke")
    config.unlock()
    config.finetune.token_dropout = 0.5
    mask_id, first_regular, cls = 4, 6, 5
    inputs = np.zeros((32, 12), np.int32)
    inputs[:, 0] = cls
    inputs[:, 1:9] = np.arange(first_regular, first_regular + 8)          # 8 real tokens, then padding
    arrays = {"train": {"inputs": inputs, "labels": np.zeros(32, np.int32)}}
    arrays["test"] = arrays["train"]
    experiment = sentiment.finetune_experiment(config, arrays, 30, None, (mask_id, first_regular))
    batch = next(iter(experiment.train_batches(0)))
    tokens = np.asarray(batch["inputs"])
    assert np.all(tokens[:, 0] == cls) and np.all(tokens[:, 9:] == 0)    # [CLS] and padding untouched
    masked = tokens[:, 1:9] == mask_id
    assert 0.3 < masked.mean() < 0.7                                       # about half of the real tokens
    kept = np.broadcast_to(np.arange(first_regular, first_regular + 8), masked.shape)
    np.testing.assert_array_equal(tokens[:, 1:9][~masked], kept[~masked])  # the others keep their ids
    config.finetune.token_dropout = 0.0
    plain = sentiment.finetune_experiment(config, arrays, 30, None, (mask_id, first_regular))
    np.testing.assert_array_equal(np.asarray(next(iter(plain.train_batches(0)))["inputs"]), inputs[:16])
