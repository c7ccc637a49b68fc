"""The experiment contract (research/experiment.py, research/registry.py): one supervised builder, one
build_model, presets in one shape, experiments recognised by what they define."""
import ast
import importlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from depthlab.research import list_experiments
from depthlab.research.experiment import base_config, build_model, supervised_experiment, with_preset
from depthlab.train import fit

RESEARCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research")


def _module_path(name: str) -> str:
    return os.path.join(RESEARCH, *name.split("/")) + ".py"


def test_every_listed_experiment_meets_the_contract_and_presets_are_named_functions():
    names = list_experiments()
    assert "rl/ppo_cartpole" in names          # make_experiment assigned (= ppo_experiment), not defined
    for name in names:
        with open(_module_path(name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        presets = [n.value for n in tree.body if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in n.targets)]
        assert len(presets) == 1 and isinstance(presets[0], ast.Dict), f"{name}: PRESETS is not one dict literal"
        for key, value in zip(presets[0].keys, presets[0].values):
            # a named function, or a call building one (smoke_preset(...)); never a lambda
            assert isinstance(value, (ast.Name, ast.Call)), f"{name}: preset {ast.literal_eval(key)!r} is a lambda"
        assert "smoke" in [ast.literal_eval(k) for k in presets[0].keys], f"{name} has no smoke preset"


def test_ppo_modules_define_no_wrappers_and_import_cheaply():
    for name in ("rl/ppo_cartpole", "rl/ppo_pendulum", "rl/ppo_brax"):
        with open(_module_path(name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert not {"make_experiment", "evaluate_checkpoint"} & defined, name
    module = importlib.import_module("depthlab.research.rl.ppo_cartpole")
    from depthlab.research.rl.ppo_experiment import evaluate_ppo_checkpoint, ppo_experiment
    assert module.make_experiment is ppo_experiment and module.evaluate_checkpoint is evaluate_ppo_checkpoint
    config = module.get_config("smoke")
    assert "data" not in config and config.optim.name == "adam" and config.train.keep == 2


def test_build_model_overrides_and_dtype():
    config = ml_collections.ConfigDict({"name": "gpt", "num_layers": 1, "num_heads": 2, "embed_dim": 16,
                                        "vocab_size": 11, "max_len": 8, "dtype": "bfloat16"})
    model = build_model(config, max_len=4)
    assert model.max_len == 4 and model.dtype == jnp.bfloat16      # overrides win; dtype as a jnp dtype
    mlp = build_model(ml_collections.ConfigDict({"name": "mlp", "features": [8, 3]}))
    assert mlp.features == (8, 3)                                  # lists from JSON/CLI become tuples
    config.dtype = "int8"
    with pytest.raises(ValueError, match="model.dtype 'int8' is not a compute dtype; use float32, bfloat16"):
        build_model(config)


def _blobs(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    inputs = rng.normal(size=(n, 4)).astype(np.float32) + 2.0 * labels[:, None]
    return {"inputs": inputs, "labels": labels.astype(np.int32)}


def _config(**train) -> ml_collections.ConfigDict:
    config = base_config(model={"name": "mlp", "features": (16, 2)}, data={"batch_size": 16, "eval_batch_size": 32},
                         optim={"name": "adam", "learning_rate": 1e-2},
                         train={"steps": 30, "log_every": 10, "eval_every": 30, "checkpoint_every": 30,
                                "progress": False, "tensorboard": False, **train})
    return with_preset(config, None, {})


def test_supervised_experiment_learns_from_arrays_and_from_a_batch_function(tmp_path):
    train, test = _blobs(256, 0), _blobs(64, 1)
    config = _config()
    arrays = fit(supervised_experiment(config, train, test), config, str(tmp_path / "arrays"))
    assert arrays.metrics["eval/accuracy"] > 0.9 and arrays.metrics["eval/loss"] < 0.5

    def batches(start):      # the same shuffled epochs, from a function: the same run
        from depthlab.train import data
        return data.epoch_batches(train, 16, 0, start)

    stream = fit(supervised_experiment(config, batches, test, example=train["inputs"]), config,
                 str(tmp_path / "stream"))
    assert stream.metrics["eval/loss"] == arrays.metrics["eval/loss"]
    with pytest.raises(ValueError, match="needs `example`"):
        supervised_experiment(config, batches, test)


def test_supervised_experiment_init_params_and_ema_decay():
    train = _blobs(32, 0)
    config = _config()
    zeroed = supervised_experiment(config, train, None, init_params=lambda p: jax.tree.map(jnp.zeros_like, p),
                                   ema_decay=0.5)
    state = zeroed.init(jax.random.key(0))
    assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(state.params))
    assert state.ema_params is not None and zeroed.eval_step is None and zeroed.eval_batches is None
    assert supervised_experiment(config, train, None).init(jax.random.key(0)).ema_params is None   # optim default
