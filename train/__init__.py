"""depthlab.train: the engine. Pure functions over any Flax module: state, optimizers, losses, steps,
sharding, checkpoints, the `fit` loop, logging and input pipelines.

Example:
    >>> from depthlab.train import TrainState, make_optimizer, make_train_step, Experiment, fit
"""
from depthlab.train import data, losses, parallel
from depthlab.train.checkpoint import (CheckpointCorruptError, CheckpointError, Checkpointer,
                                       CheckpointMismatchError, CheckpointWriteError, open_checkpoints)
from depthlab.train.metric_writers import MetricWriter, final_metrics, read_metrics
from depthlab.train.loop import (BatchSpecError, CompiledSteps, Experiment, FitResult, NonFiniteError, Placement,
                                 check_experiment, compile_steps, default_mesh_config, default_train_config,
                                 evaluate_state, finish_run, fit, place, resolved_mesh_config, resolved_train_config,
                                 restore_or_init, train_loop, with_resolved_train)
from depthlab.train.rundir import ConfigMismatchError, RunLockedError, open_run
from depthlab.train.optim import decay_mask, default_optim_config, make_optimizer, make_schedule
from depthlab.train.state import TrainState
from depthlab.train.step import apply_model, make_eval_step, make_train_step, mode_argument, mode_kwargs

__all__ = [
    "apply_model", "mode_argument", "mode_kwargs",
    "BatchSpecError", "CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError", "CheckpointWriteError",
    "Checkpointer", "CompiledSteps", "ConfigMismatchError", "Experiment", "FitResult",
    "MetricWriter", "NonFiniteError", "Placement", "RunLockedError", "TrainState", "check_experiment",
    "compile_steps", "data",
    "decay_mask", "default_mesh_config", "default_optim_config", "default_train_config", "evaluate_state",
    "final_metrics", "finish_run", "fit", "losses", "make_eval_step", "make_optimizer", "make_schedule",
    "make_train_step", "open_checkpoints", "open_run", "parallel", "place", "read_metrics",
    "resolved_mesh_config", "resolved_train_config", "restore_or_init", "train_loop", "with_resolved_train",
]
