"""Embedded text data: corpora, tokenizers, LM windows, n-gram baselines, translation and sentiment sets."""
import numpy as np
import pytest

from depthlab.research.datasets import text
from depthlab.research.datasets.sentiment import sentiment_sentences
from depthlab.research.datasets.translation import translation_pairs


@pytest.fixture(scope="module")
def shakespeare():
    return text.load_corpus("shakespeare")


def test_shakespeare_corpus_is_plain_speeches(shakespeare):
    assert len(shakespeare) > 3_000_000
    assert "To be, or not to be" in shakespeare
    assert "Hamlet:\n" in shakespeare            # speaker headers in Tiny-Shakespeare layout
    for markup in ("**", "#", "_", "\\"):
        assert markup not in shakespeare, markup


def test_pydoc_fallback_and_user_file(tmp_path):
    assert "lambda" in text.load_corpus("pydoc")
    path = tmp_path / "mine.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert text.load_corpus(str(path)) == "hello world\n"
    with pytest.raises(FileNotFoundError, match="shakespeare"):
        text.load_corpus(str(tmp_path / "missing.txt"))


def test_char_tokenizer_round_trip_and_errors():
    tok = text.CharTokenizer.from_text("hello world")
    assert tok.vocab_size == len(set("hello world"))
    ids = tok.encode("low hello")
    assert ids.dtype == np.int32 and tok.decode(ids) == "low hello"
    assert text.CharTokenizer.from_json(tok.to_json()).decode(ids) == "low hello"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("zoo")


def test_subword_tokenizer_round_trip_specials_and_determinism():
    texts = ["the cat sat on the mat", "a dog ran after the cat", "cats and dogs"] * 30
    tok = text.SubwordTokenizer.train(texts, vocab_size=40, user_symbols=("[MASK]",))
    ids = tok.encode("the cat ran", bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert tok.decode(ids) == "the cat ran"
    assert tok.piece_id("[MASK]") in tok.encode("[MASK] cat")   # a user symbol is one piece
    again = text.SubwordTokenizer.train(texts, vocab_size=40, user_symbols=("[MASK]",))
    assert again.model_proto == tok.model_proto
    restored = text.SubwordTokenizer(tok.model_proto)
    assert restored.encode("the mat") == tok.encode("the mat")


def test_windows_are_shifted_deterministic_and_resumable():
    ids = np.arange(1000, dtype=np.int32)
    train, val = text.split_tokens(ids, 0.1)
    assert len(train) == 900 and val[0] == 900
    stream = text.random_windows(train, batch_size=4, context=16, seed=3)
    batches = [next(stream) for _ in range(3)]
    assert batches[0]["inputs"].shape == (4, 16)
    np.testing.assert_array_equal(batches[0]["targets"], batches[0]["inputs"] + 1)
    resumed = next(text.random_windows(train, batch_size=4, context=16, seed=3, start_step=2))
    np.testing.assert_array_equal(resumed["inputs"], batches[2]["inputs"])
    evals = text.eval_windows(val, batch_size=2, context=10)
    assert all(b["inputs"].shape == (2, 10) for b in evals) and len(evals) == 4
    assert len(text.eval_windows(val, batch_size=2, context=10, max_batches=2)) == 2


def test_ngram_baselines_order():
    rng = np.random.default_rng(0)
    # A Markov chain: the bigram model must beat the unigram model, which must beat uniform.
    transition = rng.dirichlet(np.full(6, 0.3), size=6)
    ids = [0]
    for _ in range(20000):
        ids.append(rng.choice(6, p=transition[ids[-1]]))
    ids = np.array(ids, np.int32)
    b = text.ngram_baselines(ids[:18000], ids[18000:], 6)
    assert b["bigram"] < b["unigram"] < np.log(6)


def test_translation_split_is_by_value_and_multilingual():
    pairs = translation_pairs(("fr", "de"), max_number=300, max_ordinal=30, num_dates=40, seed=0)
    sources = {name: {s.split(" ", 1)[1] for s, _ in split} for name, split in pairs.items()}
    assert not sources["test"] & sources["train"] and not sources["val"] & sources["train"]
    assert {s.split(" ", 1)[0] for s, _ in pairs["train"]} == {"<2fr>", "<2de>"}
    assert ("<2fr> twenty-one", "vingt et un") in [p for split in pairs.values() for p in split]
    with pytest.raises(ValueError, match="xx"):
        translation_pairs(("xx",))


def test_sentiment_sentences_split():
    data = sentiment_sentences(seed=0)
    assert data["classes"] == ("negative", "positive")
    sizes = {k: len(data[k]["texts"]) for k in ("train", "val", "test")}
    assert sizes["train"] > 10_000 and sizes["test"] > 2_000
    assert not set(data["train"]["texts"]) & set(data["test"]["texts"])
    labels = data["train"]["labels"]
    assert set(np.unique(labels)) == {0, 1} and 0.1 < labels.mean() < 0.5
    assert all("http" not in t or "http " in t + " " for t in data["test"]["texts"][:200])
