"""The record format of streaming input, and the one error every streaming module raises.

A record is a dict of named features (bytes, str, numbers, numpy arrays) stored as one msgpack blob; numpy
arrays travel as a msgpack extension type that keeps their dtype and shape. `depthlab data convert` writes
ArrayRecord files of such records; `ArrayRecordSource` reads them back.

Example:
    >>> blob = encode_record({"image": png_bytes, "label": 3, "box": np.zeros([4], np.float32)})
    >>> decode_record(blob)["box"].dtype      # float32
"""
from __future__ import annotations

import numpy as np

from depthlab.train.optional import require


class DataSourceError(ValueError):
    """A data file or record that cannot be used: the message names the file (and record) and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


_ARRAY_EXT = 1


def _pack_default(value):
    msgpack = require("msgpack", "stream", "streaming input")

    if isinstance(value, np.ndarray):
        return msgpack.ExtType(_ARRAY_EXT, msgpack.packb(
            [value.dtype.str, list(value.shape), np.ascontiguousarray(value).tobytes()]))
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a record; use bytes, str, numbers or numpy arrays")


def _unpack_ext(code, payload):
    msgpack = require("msgpack", "stream", "streaming input")

    if code != _ARRAY_EXT:
        return msgpack.ExtType(code, payload)
    dtype, shape, raw = msgpack.unpackb(payload)
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)


def encode_record(features: dict) -> bytes:
    """{name: bytes | str | int | float | np.ndarray} -> bytes (msgpack; arrays keep dtype and shape)."""
    msgpack = require("msgpack", "stream", "streaming input")

    return msgpack.packb(dict(features), default=_pack_default, use_bin_type=True)


def decode_record(blob: bytes) -> dict:
    """The inverse of `encode_record`."""
    msgpack = require("msgpack", "stream", "streaming input")

    features = msgpack.unpackb(blob, ext_hook=_unpack_ext, raw=False)
    if not isinstance(features, dict):
        raise ValueError(f"a record holds a {type(features).__name__}, not a dict of features")
    return features
