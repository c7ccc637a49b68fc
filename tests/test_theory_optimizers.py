"""Optimizer study: momentum beats plain SGD on an ill-conditioned quadratic; Adam handles Rosenbrock."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from depthlab.research.theory import studies
from depthlab.research.theory import optimizers as opt


def test_momentum_beats_sgd_on_ill_conditioned_quadratic(tmp_path):
    config = opt.get_config()
    config.problems = ("quadratic",)
    config.optimizers = ("sgd", "momentum", "adamw")
    config.learning_rates = (0.01, 0.1, 1.0)
    config.num_seeds = 3
    config.steps.quadratic = 150
    summary = opt.run(config, str(tmp_path))
    best = {r["optimizer"]: r["final_loss_median"] for r in summary["rows"]}
    assert best["momentum"] < 1e-3 * best["sgd"], best  # ~sqrt(kappa) vs ~kappa iterations
    assert best["sgd"] < 0.05  # and SGD does make progress from the initial ~3
    assert os.path.exists(tmp_path / "optimizers.png")


def test_learning_rate_is_swept_exactly():
    """Scaling a learning-rate-1 chain's update by lr equals the chain built with lr (what the vmap relies on)."""
    config = opt.get_config()
    config.steps.rosenbrock = 20
    config.num_seeds = 1
    train = opt.make_train("rosenbrock", "adamw", config, None)
    curves, _ = train(jnp.asarray([3e-3]), jax.random.split(jax.random.key(0), 1))
    # the same run with the engine's optimizer at lr 3e-3, step by step
    init, loss, _ = opt.make_problem("rosenbrock", config, None)
    tx = studies.make_tx(studies.optim_config("adamw", 3e-3, weight_decay=config.optim.weight_decay))
    params = init(jax.random.split(jax.random.split(jax.random.key(0), 1)[0])[0])
    state, values = tx.init(params), []
    for _ in range(20):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        values.append(value)
    np.testing.assert_allclose(np.asarray(curves[0, 0]), np.asarray(values), rtol=1e-4)


def test_unknown_optimizer_is_named(tmp_path):
    config = opt.get_config()
    config.optimizers = ("adamx",)
    with pytest.raises(ValueError, match="adamx"):
        opt.run(config, str(tmp_path))
