"""A paper's own code meets the engine: any Flax module trains through make_train_step + fit, and the
README's Python blocks run as pasted."""
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from depthlab.train import (Experiment, TrainState, data, default_train_config, fit, losses, make_eval_step,
                            make_train_step, mode_argument, mode_kwargs, read_metrics)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoMode(nn.Module):              # __call__(self, x): no train argument at all
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(32)(x)))


class Deterministic(nn.Module):       # the other Flax convention: Dropout(deterministic=...)
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(3)(nn.Dropout(0.9, deterministic=deterministic)(nn.Dense(32)(x)))


class WithBatchNorm(nn.Module):       # the README recipe's case: BatchNorm keeps "batch_stats"
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(32)(x))
        return nn.Dense(3)(nn.relu(x))


class Training(nn.Module):            # a look-alike the engine would silently ignore
    @nn.compact
    def __call__(self, x, training: bool = False):
        return nn.Dense(3)(x)


def _blobs(n=192, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (rng.normal(size=(n, 4)) + 3.0 * np.eye(3, 4)[y]).astype(np.float32)
    return {"inputs": x, "labels": y}


def _loss(logits, batch):
    mask = batch.get("mask")
    return (losses.softmax_cross_entropy(logits, batch["labels"], mask=mask),
            {"accuracy": losses.accuracy(logits, batch["labels"], mask=mask)})


def _experiment(model, train, test, from_model=False):
    tx = optax.adam(1e-2)

    def init(rng):
        if from_model:      # every collection model.init returns (BatchNorm's batch_stats) goes to model_state
            return TrainState.from_model(model, train["inputs"][:1], tx, rng)
        variables = model.init(rng, train["inputs"][:1], **mode_kwargs(model, train=False))
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, rng=rng)

    return Experiment(init=init, train_step=make_train_step(model, _loss), eval_step=make_eval_step(model, _loss),
                      train_batches=lambda start: data.epoch_batches(train, 32, seed=0, start_step=start),
                      eval_batches=lambda: data.eval_batches(test, 32))


def _config(steps=150):
    config = ml_collections.ConfigDict({"seed": 0, "train": default_train_config()})
    config.train.update({"steps": steps, "log_every": 50, "eval_every": steps, "checkpoint_every": steps,
                         "progress": False, "async_checkpoint": False, "tensorboard": False})
    return config


def test_a_module_without_a_train_argument_trains_through_fit(tmp_path, capsys):
    assert mode_argument(NoMode()) is None
    result = fit(_experiment(NoMode(), _blobs(), _blobs(96, seed=1)), _config(), tmp_path)
    assert result.metrics["eval/accuracy"] > 0.9
    # The same artefacts as `depthlab run`: curves, summary, the one-line result.
    assert (tmp_path / "curves.png").exists() and (tmp_path / "summary.json").exists()
    assert "Result at step 150 (" in capsys.readouterr().out


def test_a_batchnorm_module_trains_through_fit_with_nothing_extra(tmp_path):
    """TrainState.from_model keeps batch_stats; the train step updates them, evaluation reads them."""
    model = WithBatchNorm()
    experiment = _experiment(model, _blobs(), _blobs(96, seed=1), from_model=True)
    initial = experiment.init(jax.random.key(0))
    assert set(initial.model_state) == {"batch_stats"}
    result = fit(experiment, _config(), tmp_path)
    assert result.metrics["eval/accuracy"] > 0.9
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         result.state.model_state, initial.model_state)
    assert min(jax.tree.leaves(moved)) > 0      # every running mean and variance was updated


def test_create_takes_variables_and_keeps_every_collection_but_intermediates():
    class Sows(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            self.sow("intermediates", "hidden", x)
            return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))

    variables = Sows().init(jax.random.key(0), jnp.ones((2, 4)), mutable=True)     # intermediates too
    assert set(variables) == {"params", "batch_stats", "intermediates"}
    state = TrainState.create(apply_fn=Sows().apply, variables=variables, tx=optax.sgd(0.1), rng=jax.random.key(1))
    assert set(state.model_state) == {"batch_stats"} and state.params is variables["params"]
    with pytest.raises(TypeError, match="variables= or params=/model_state=, not both"):
        TrainState.create(apply_fn=Sows().apply, variables=variables, params=variables["params"], tx=optax.sgd(0.1),
                          rng=jax.random.key(1))
    # from_model splits the key as research.common.init_state does: the same parameters from the same key.
    key = jax.random.key(3)
    built = TrainState.from_model(Sows(), jnp.ones((1, 4)), optax.sgd(0.1), key)
    params_rng = jax.random.split(key, 3)[0]
    want = Sows().init({"params": params_rng}, jnp.ones((1, 4)))["params"]
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), built.params, want)
    assert all(jax.tree.leaves(same))


def test_a_state_without_the_modules_batch_stats_is_one_line_naming_the_collection():
    model = WithBatchNorm()
    batch = _blobs(32)
    tx = optax.sgd(0.1)
    params = model.init(jax.random.key(0), batch["inputs"][:1], train=False)["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.key(0))   # no batch_stats
    for step in (make_train_step(model, _loss), make_eval_step(model, _loss)):
        with pytest.raises(ValueError) as error:
            jax.eval_shape(step, state, batch)
        message = str(error.value)
        assert "\n" not in message and "uses the collection 'batch_stats'" in message
        assert "model_state holds none" in message and "TrainState.from_model" in message


def test_a_module_state_mismatch_fails_before_the_run_directory_is_written(tmp_path):
    experiment = _experiment(WithBatchNorm(), _blobs(), _blobs(96, seed=1))      # params only: no batch_stats
    with pytest.raises(ValueError, match="uses the collection 'batch_stats'"):
        fit(experiment, _config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_deterministic_false_while_training_true_in_evaluation():
    assert mode_argument(Deterministic()) == "deterministic"
    batch = _blobs(64)
    experiment = _experiment(Deterministic(), batch, batch)
    state = experiment.init(jax.random.key(0))
    _, train_metrics = jax.jit(experiment.train_step)(state, batch)
    eval_metrics = jax.jit(experiment.eval_step)(state, batch)
    # Dropout(0.9) is on in the train step only: the same parameters give another loss.
    assert not np.isclose(float(train_metrics["loss"]), float(eval_metrics["loss"]))
    again = jax.jit(experiment.eval_step)(state, batch)
    assert float(again["loss"]) == float(eval_metrics["loss"])     # evaluation is deterministic


def test_grad_norm_is_opt_in_and_is_the_gradients_global_norm():
    model, (train, _) = NoMode(), (_blobs(), None)
    batch = {k: v[:16] for k, v in train.items()}
    state = _experiment(model, train, train).init(jax.random.key(0))
    _, plain = jax.jit(make_train_step(model, _loss))(state, batch)
    _, with_norm = jax.jit(make_train_step(model, _loss, grad_norm=True))(state, batch)
    assert "grad_norm" not in plain and set(with_norm) == set(plain) | {"grad_norm"}
    grads = jax.grad(lambda p: _loss(model.apply({"params": p}, batch["inputs"]), batch)[0])(state.params)
    np.testing.assert_allclose(with_norm["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    np.testing.assert_allclose(with_norm["loss"], plain["loss"], rtol=1e-6)


def test_a_look_alike_mode_argument_is_an_error_that_says_what_the_engine_expects():
    with pytest.raises(TypeError, match="takes 'training'; the engine tells a module train from eval with "
                                        "`train: bool`.*or `deterministic: bool`"):
        make_train_step(Training(), _loss)


def test_readme_python_blocks_run_as_pasted(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600)
        assert out.returncode == 0, f"README block failed:\n{block}\n{out.stderr[-3000:]}"
        assert float(out.stdout.strip().splitlines()[-1]) > 0.8      # each prints a held-out accuracy
    assert read_metrics(tmp_path / "runs" / "paper_mlp")[-1]["step"] == 300
