"""Depth separation: at equal parameters the deep narrow net fits the sawtooth better than the shallow one."""
import os

import jax.numpy as jnp
import pytest

from depthlab.research.theory import depth_separation as ds


def test_constructed_deep_net_is_exact():
    x = jnp.linspace(0, 1, 1001)[:, None]
    for k in (1, 3, 6):
        params = ds.constructed_sawtooth_params(k)
        assert ds.num_params([1] + [2] * k + [1]) == 6 * k + 1
        assert jnp.max(jnp.abs(ds.apply(params, x) - ds.sawtooth(x[:, 0], k))) < 1e-5


@pytest.mark.usefixtures("default_threefry")
def test_deep_beats_shallow_at_equal_parameters(tmp_path):
    config = ds.get_config()
    config.deep_shapes = ((6, 4),)
    config.num_seeds = 8
    config.steps = 1500
    config.num_test = 1001
    summary = ds.run(config, str(tmp_path))
    (deep,), (shallow,) = summary["deep_best"], summary["shallow_best"]
    assert summary["params"] == [145]
    assert deep < 0.7 * shallow, (deep, shallow)
    assert os.path.exists(tmp_path / "error_vs_params.png")
    assert os.path.exists(tmp_path / "results.json")


def test_bad_k_is_rejected(tmp_path):
    config = ds.get_config()
    config.k = 0
    with pytest.raises(ValueError, match="k >= 1"):
        ds.run(config, str(tmp_path))
