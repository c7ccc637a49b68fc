"""Data requirements: learning curves fall with n; SimCLR's pieces (views, NT-Xent) behave."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.research.theory import data_requirements as dr


def test_nt_xent_is_low_for_matching_views_and_high_for_random_ones():
    z = jax.random.normal(jax.random.key(0), (32, 16))
    matched = float(dr.nt_xent(z, z + 0.01, 0.1))
    random = float(dr.nt_xent(z, jax.random.normal(jax.random.key(1), (32, 16)), 0.1))
    assert matched < 0.1 < np.log(63) - 1 < random  # chance level is log(2b - 1)


def test_views_keep_shape_and_differ():
    config = dr.get_config("smoke")
    x = jnp.asarray(dr.studies.load_digits()["x_train"][:8])
    v1, v2 = dr.augment_view(jax.random.key(0), x, config), dr.augment_view(jax.random.key(1), x, config)
    assert v1.shape == x.shape and float(jnp.abs(v1 - v2).mean()) > 0.05


def test_subset_matches_between_numpy_and_the_trainer():
    a, b = dr.subset(30, 1, 1437), dr.subset(300, 1, 1437)
    assert len(set(a.tolist())) == 30 and np.array_equal(a, b[:30])  # nested: a larger n adds images


def test_smoke_learning_curves_fall_with_more_labels(tmp_path):
    summary = dr.run(dr.get_config("smoke"), str(tmp_path))
    for method, errors in summary["errors"].items():
        assert errors[-1] < errors[0], (method, errors)
        assert summary["slopes"][method] < 0
    assert os.path.exists(tmp_path / "learning_curves.png")


def test_unknown_method_is_named(tmp_path):
    config = dr.get_config("smoke")
    config.methods = ("knn",)
    with pytest.raises(ValueError, match="knn"):
        dr.run(config, str(tmp_path))
