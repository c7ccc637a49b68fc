"""depthlab.train: the engine. Pure functions over any Flax module: state, optimizers, losses, steps,
sharding, checkpoints, the `fit` loop, logging and input pipelines.

Example:
    >>> from depthlab.train import TrainState, make_optimizer, make_train_step, Experiment, fit
"""
from depthlab.train import data, losses, parallel
from depthlab.train.checkpoint import Checkpointer
from depthlab.train.logging import MetricWriter, final_metrics, read_metrics
from depthlab.train.loop import (BatchSpecError, ConfigMismatchError, Experiment, FitResult, NonFiniteError,
                                 default_mesh_config, default_train_config, fit)
from depthlab.train.optim import decay_mask, default_optim_config, make_optimizer, make_schedule
from depthlab.train.state import TrainState
from depthlab.train.step import make_eval_step, make_train_step

__all__ = [
    "BatchSpecError", "Checkpointer", "ConfigMismatchError", "Experiment", "FitResult", "MetricWriter",
    "NonFiniteError", "TrainState", "data", "decay_mask", "default_mesh_config", "default_optim_config",
    "default_train_config", "final_metrics", "fit", "losses", "make_eval_step", "make_optimizer",
    "make_schedule", "make_train_step", "parallel", "read_metrics",
]
