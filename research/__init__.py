"""depthlab.research: experiments grouped by field, the CLI, and helpers to run them from Python.

Example:
    >>> from depthlab.research import run_experiment, list_experiments
    >>> result = run_experiment("vision/digits_cnn", overrides={"train.steps": 300}, workdir="runs/quick")
"""
from depthlab.research.registry import list_experiments, load_experiment
from depthlab.research.runner import apply_overrides, build_config, run_experiment, run_sweep

__all__ = ["apply_overrides", "build_config", "list_experiments", "load_experiment", "run_experiment", "run_sweep"]
