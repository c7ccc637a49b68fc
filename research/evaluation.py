"""`depthlab eval`: restore the checkpoint of a run directory and evaluate it, with the engine's own phases
(`place`, `restore_or_init`, `compile_steps`, `evaluate_state`): the same mesh and sharding as training,
the same weighted means over padded eval batches.

An experiment module may define `evaluate_checkpoint(state, config, workdir) -> dict` (RL returns,
a sample game, sample grids); otherwise the experiment's own evaluation (eval_step over its eval
batches, and `evaluate`) runs on the restored state.

Example:
    >>> evaluate_run("vision/digits_cnn", "runs/vision_digits_cnn")
    {'step': 1500, 'eval/accuracy': 0.997, 'eval/loss': 0.011}
"""
from __future__ import annotations

import json
import os

import ml_collections

from depthlab.research.registry import load_experiment
from depthlab.research.runner import apply_overrides
from depthlab.train import compile_steps, evaluate_state, open_checkpoints, place, restore_or_init
from depthlab.train.rundir import flat_config, read_config


def recorded_experiment(workdir: str) -> dict:
    """{"experiment": name, "preset": preset} that `run_experiment` recorded in the run directory ({} if none)."""
    path = os.path.join(workdir, "experiment.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_config(name: str, workdir: str, preset=None, overrides=None) -> ml_collections.ConfigDict:
    """The config a run directory was trained with: the experiment's config (and preset) with the values
    of its config.json, then `overrides`."""
    config = load_experiment(name).get_config(preset)
    saved = read_config(workdir)
    if saved is not None:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in flat_config(saved).items() if _has(config, k)}
        apply_overrides(config, known)
    return apply_overrides(config, overrides)


def _has(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def resolve_experiment(name: str | None, workdir: str) -> str:
    """The experiment of a run directory: the recorded one, and `name` must agree with it."""
    from depthlab.research.registry import canonical_name

    if not os.path.isdir(workdir):
        what = "is a file, not a run directory" if os.path.lexists(workdir) else "does not exist"
        raise FileNotFoundError(f"--workdir {workdir!r} {what}; expected the run directory of a trained run; fix: "
                                f"pass the --workdir that `depthlab run {name or 'FIELD/NAME'} --workdir DIR` trained")
    recorded = recorded_experiment(workdir).get("experiment")
    if name and recorded and canonical_name(name) != recorded:
        raise ValueError(f"run directory {workdir!r} belongs to {recorded!r}, not {name!r}; use "
                         f"`depthlab eval {recorded} --workdir {workdir}`")
    if not (name or recorded):
        raise ValueError(f"run directory {workdir!r} does not record its experiment (a run made by fit from "
                         f"Python without record=): name it, `depthlab eval path/to/my_experiment.py --workdir "
                         f"{workdir}` (or FIELD/NAME), or train with fit(..., record={{'experiment': "
                         f"'path/to/my_experiment.py'}})")
    return name or recorded


def restore_run(name: str | None, workdir: str, preset=None, overrides=None):
    """(module, config, experiment, placement, state, step) for the newest intact checkpoint in `workdir`."""
    workdir = os.path.abspath(workdir)
    name = resolve_experiment(name, workdir)
    module = load_experiment(name)
    if not hasattr(module, "make_experiment"):
        raise ValueError(f"{name} is a self-contained study with no checkpoint; see {workdir}/results.json")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: train first with `depthlab run {name} "
                                f"--workdir {workdir}`")
    preset = preset if preset is not None else recorded_experiment(workdir).get("preset")
    config = run_config(name, workdir, preset, overrides)
    experiment = module.make_experiment(config)
    placement = place(experiment, config)
    ckpt = open_checkpoints(workdir, config)
    try:
        if not ckpt.all_steps():
            raise FileNotFoundError(f"no readable checkpoint in {os.path.join(workdir, 'checkpoints')!r}")
        state, step = restore_or_init(experiment, config, placement, ckpt)
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"no readable checkpoint in {os.path.join(workdir, 'checkpoints')!r}")
    return module, config, experiment, placement, state, step


def evaluate_run(name: str | None, workdir: str, preset=None, overrides=None) -> dict:
    """{"step", "eval/...": ...} of the newest checkpoint in `workdir` (name None: the recorded experiment)."""
    module, config, experiment, placement, state, step = restore_run(name, workdir, preset, overrides)
    if hasattr(module, "evaluate_checkpoint"):
        return {"step": step, **module.evaluate_checkpoint(state, config, workdir)}
    compiled = compile_steps(experiment, placement)
    return {"step": step, **evaluate_state(experiment, compiled, placement, state,
                                           int(config.train.prefetch))}
