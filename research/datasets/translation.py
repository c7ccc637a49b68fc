"""English -> French / German translation pairs generated offline with num2words and Babel.

Three kinds of phrase, each written out by the libraries' own language rules:
  * cardinals  "three hundred and twenty-one" -> "trois cent vingt et un" / "dreihunderteinundzwanzig"
  * ordinals   "twenty-first" -> "vingt et unième" / "einundzwanzigste"
  * dates      "Friday, March 5, 2021" -> "vendredi 5 mars 2021" / "Freitag, 5. März 2021"
The split is by *value*: a number or date in the test set never occurs in training in any
language, so test accuracy measures generalisation to unseen phrases, not recall. The source
starts with a target-language tag ("<2fr> ...") so one model can serve several languages.

Example:
    >>> data = translation_pairs(("fr",), max_number=9999, seed=0)
    >>> data["train"][0]      # ('<2fr> four thousand and six', 'quatre mille six')
"""
from __future__ import annotations

import datetime

import numpy as np

from depthlab.research.datasets import require

LANGUAGES = ("fr", "de")


def _cardinal(n: int, lang: str) -> str:
    return require("num2words", "language").num2words(n, lang=lang)


def _ordinal(n: int, lang: str) -> str:
    return require("num2words", "language").num2words(n, lang=lang, to="ordinal")


def _date(d: datetime.date, lang: str) -> str:
    return require("babel.dates", "language").format_date(d, format="full", locale=lang)


def _split(values: list, fractions: tuple[float, float], rng: np.random.Generator) -> tuple[list, list, list]:
    order = rng.permutation(len(values))
    n_test, n_val = int(len(values) * fractions[0]), int(len(values) * fractions[1])
    pick = lambda idx: [values[i] for i in idx]  # noqa: E731
    return pick(order[n_test + n_val:]), pick(order[n_test:n_test + n_val]), pick(order[:n_test])


def translation_pairs(languages: tuple[str, ...] = ("fr",), max_number: int = 9999, max_ordinal: int = 1000,
                      num_dates: int = 3000, test_fraction: float = 0.1, val_fraction: float = 0.05,
                      seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{'train' | 'val' | 'test': [(source, target), ...]} for the given target languages.

    Cardinals 0..max_number, ordinals 1..max_ordinal and num_dates random dates (1900-2099) are
    each split by value into train/val/test (test_fraction, val_fraction); every value yields one
    pair per language.
    """
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(f"unknown target language {lang!r}; valid: {LANGUAGES}")
    rng = np.random.default_rng(seed)
    first = datetime.date(1900, 1, 1).toordinal()
    day_numbers = rng.choice(datetime.date(2099, 12, 31).toordinal() - first + 1, num_dates, replace=False)
    kinds = {
        "cardinal": (list(range(max_number + 1)), _cardinal),
        "ordinal": (list(range(1, max_ordinal + 1)), _ordinal),
        "date": ([datetime.date.fromordinal(first + int(d)) for d in sorted(day_numbers)], _date),
    }
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for values, write in kinds.values():
        for name, part in zip(("train", "val", "test"), _split(values, (test_fraction, val_fraction), rng)):
            for value in part:
                english = write(value, "en")
                for lang in languages:
                    splits[name].append((f"<2{lang}> {english}", write(value, lang)))
    # Shuffle within a split so batches mix kinds and languages (order is fixed by the seed).
    for name in splits:
        order = rng.permutation(len(splits[name]))
        splits[name] = [splits[name][i] for i in order]
    return splits
