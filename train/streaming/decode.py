"""Decoding: a source's features -> model inputs. These run where the records are read, in Grain's worker
processes when there are any, so they are plain picklable callables.

`decode(features)` or `decode(features, where)` (where = "record r of FILE", for its error messages) returns
an example dict of arrays; `stack_examples` stacks a batch of them, naming both records when shapes disagree.

Example:
    >>> decode = ImageExample()                # {"image": PNG bytes, "label": 3} -> {"inputs", "labels"}
    >>> read_decoded(source, decode, takes_where(decode), [0, 1])[0]["inputs"].shape    # (32, 32, 3)
"""
from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np

from depthlab.train.optional import require
from depthlab.train.streaming.records import DataSourceError, first_line
from depthlab.train.streaming.sources import Source


def decode_image(value: Any, where: str = "a record") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ... via Pillow), a {'bytes': ...} dict (Hugging Face's Parquet
    layout) or an array -> [H, W, C] array (uint8 stays uint8)."""
    if isinstance(value, dict) and "bytes" in value:      # Hugging Face's image layout: bytes, or a file's path
        if value["bytes"] is None and value.get("path"):
            try:
                with open(value["path"], "rb") as f:
                    value = f.read()
            except OSError as e:
                raise DataSourceError(f"{where}: cannot read its image file ({e}); the dataset's files moved: "
                                      f"load it again") from None
        else:
            value = value["bytes"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        Image = require("PIL.Image", "stream", "streaming input")

        try:
            with Image.open(io.BytesIO(bytes(value))) as image:
                array = np.asarray(image)
        except Exception as e:  # noqa: BLE001 - Pillow raises several types on bad bytes
            raise DataSourceError(f"{where}: its image bytes do not decode ({first_line(e)}); the record is "
                                  f"corrupt: re-convert the dataset") from None
    else:
        array = np.asarray(value)
    return array[..., None] if array.ndim == 2 else array


class ImageExample:
    """decode(features) for classification: {image_key: encoded image or array, label_key: int} ->
    {"inputs": float32 [H, W, C] in [0, 1] (uint8 / 255), "labels": int32}."""

    def __init__(self, image_key: str = "image", label_key: str = "label", scale: float | None = None):
        self.image_key, self.label_key, self.scale = image_key, label_key, scale

    def __call__(self, features: dict, where: str = "a record") -> dict:
        for key in (self.image_key, self.label_key):
            if key not in features:
                present = ", ".join(sorted(features)) or "none"
                raise DataSourceError(f"{where} has no feature {key!r} (it has {present}); name the right one "
                                      f"(data.image_key / data.label_key) or re-convert")
        image = decode_image(features[self.image_key], where)
        scale = self.scale if self.scale is not None else (255.0 if image.dtype == np.uint8 else 1.0)
        return {"inputs": image.astype(np.float32) / np.float32(scale),
                "labels": np.asarray(features[self.label_key], np.int32)}


def takes_where(decode: Callable | None) -> bool:
    """Whether decode takes the record's description (`decode(features, where)`) or only the features."""
    import inspect

    if decode is None:
        return False
    try:
        params = list(inspect.signature(decode).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _decode(decode: Callable | None, pass_where: bool, features: dict, where: str) -> dict:
    if decode is None:
        return {k: np.asarray(v) for k, v in features.items()}
    return decode(features, where) if pass_where else decode(features)


def read_decoded(source: Source, decode: Callable | None, pass_where: bool, keys: Sequence[int]) -> list[dict]:
    """The records at `keys`, read and decoded (a bad one raises DataSourceError naming it). pass_where is
    `takes_where(decode)`, worked out once by the caller rather than once per record."""
    return [_decode(decode, pass_where, f, source.where(k)) for f, k in zip(source.read(keys), keys)]


def stack_examples(examples: list[dict], keys: Sequence[int], where: Callable[[int], str]) -> dict:
    """[{name: array}] -> {name: [n, ...] array}; one line naming both records when shapes disagree."""
    first = examples[0]
    for i, example in enumerate(examples[1:], 1):
        if example.keys() != first.keys():
            raise DataSourceError(f"{where(keys[i])} has features {sorted(example)} but {where(keys[0])} has "
                                  f"{sorted(first)}; every record needs the same features")
        for name, value in example.items():
            if np.shape(value) != np.shape(first[name]):
                raise DataSourceError(
                    f"mixed shapes: {where(keys[i])} has {name!r} of shape {np.shape(value)} but {where(keys[0])} "
                    f"has {np.shape(first[name])}; resize the images to one size (`depthlab data convert DIR "
                    f"--out OUT --size HxW`) or crop them in the data transform")
    return {name: np.stack([np.asarray(e[name]) for e in examples]) for name in first}
