"""depthlab.research: experiments grouped by field, the CLI, and helpers to run them from Python.

Example:
    >>> from depthlab.research import run_experiment, list_experiments
    >>> result = run_experiment("vision/digits_cnn", overrides={"train.steps": 300}, workdir="runs/quick")
"""
import importlib

# Imported on first use (PEP 562), so that `depthlab --help` and `depthlab list` import nothing heavy.
_EXPORTS = {"list_experiments": "registry", "load_experiment": "registry", "apply_overrides": "runner",
            "build_config": "runner", "run_experiment": "runner", "run_sweep": "runner"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'depthlab.research' has no attribute {name!r}")
    return getattr(importlib.import_module(f"depthlab.research.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
