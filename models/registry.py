"""Model registry: configs name a model by string.

Example:
    >>> from depthlab.models import get_model
    >>> model = get_model("mlp", features=(64, 10), activation="gelu")
"""
from __future__ import annotations

from typing import Any, Callable

_MODELS: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator that makes a Flax module available as `get_model(name, ...)`."""

    def add(cls: type) -> type:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice ({_MODELS[name]} and {cls})")
        _MODELS[name] = cls
        return cls

    return add


def model_names() -> list[str]:
    """Names accepted by `get_model`, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs: Any):
    """Builds the registered Flax module `name` with keyword hyper-parameters."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
    return _MODELS[name](**kwargs)
