"""`depthlab eval`: restore the checkpoint of a run directory and evaluate it.

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

import flax.linen as nn
import jax
import ml_collections

from depthlab.research.registry import load_experiment
from depthlab.research.runner import apply_overrides
from depthlab.train import Checkpointer, data, parallel


def _saved_config(name: str, workdir: str, preset, overrides) -> ml_collections.ConfigDict:
    module = load_experiment(name)
    config = module.get_config(preset)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        flat = {}

        def walk(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    flat[f"{prefix}{k}"] = v
        walk(saved)
        known = {k: v for k, v in flat.items() if _has(config, k)}
        apply_overrides(config, {k: (tuple(v) if isinstance(v, list) else v) for k, v in known.items()})
    return apply_overrides(config, overrides)


def _has(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def restore_run(name: str, workdir: str, preset=None, overrides=None):
    """(module, config, experiment, state, step) for the newest checkpoint in `workdir`."""
    module = load_experiment(name)
    if not hasattr(module, "make_experiment"):
        raise ValueError(f"{name} is a self-contained study with no checkpoint; see {workdir}/results.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: train first with `depthlab run {name} "
                                f"--workdir {workdir}`")
    config = _saved_config(name, workdir, preset, overrides)
    experiment = module.make_experiment(config)
    mesh = parallel.make_mesh({"data": -1})
    abstract = jax.eval_shape(experiment.init, jax.random.key(int(config.seed)))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(abstract), shardings)
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        state, step = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir!r}")
    return module, config, experiment, state, step


def evaluate_run(name: str, workdir: str, preset=None, overrides=None) -> dict:
    module, config, experiment, state, step = restore_run(name, os.path.abspath(workdir), preset, overrides)
    if hasattr(module, "evaluate_checkpoint"):
        return {"step": step, **module.evaluate_checkpoint(state, config, workdir)}
    out = {"step": step}
    if experiment.eval_step is not None and experiment.eval_batches is not None:
        eval_step = jax.jit(experiment.eval_step)
        totals, weight = {}, 0.0
        for batch in experiment.eval_batches():
            n = float(batch["mask"].sum()) if "mask" in batch else float(len(next(iter(batch.values()))))
            for k, v in jax.device_get(eval_step(state, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
            weight += n
        out.update({f"eval/{k}": v / weight for k, v in totals.items()})
    if experiment.evaluate is not None:
        out.update({f"eval/{k}": float(v) for k, v in experiment.evaluate(state).items()})
    return out
