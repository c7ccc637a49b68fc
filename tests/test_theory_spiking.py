"""Spiking study: a LIF net trained by BPTT with a surrogate gradient classifies digits from spike trains."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthlab.research.theory import spiking


def test_encodings_follow_their_definitions():
    images = jnp.asarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1))
    rate = spiking.encode(jax.random.key(0), jnp.repeat(images, 200, 0), 50, "rate")
    np.testing.assert_allclose(np.asarray(rate.mean((0, 1))), np.asarray(images).ravel(), atol=0.02)
    latency = np.asarray(spiking.encode(jax.random.key(0), images, 11, "latency", latency_min=0.05))[0]
    assert latency.sum(0).tolist() == [0.0] + [1.0] * 15  # the dark pixel never fires, the others once
    first = latency.argmax(0)[1:]
    assert np.all(np.diff(first) <= 0) and first[-1] == 0  # brighter fires earlier; the brightest at t = 0


def test_snn_learns_digits_and_counts_spikes(tmp_path):
    summary = spiking.run(spiking.get_config("smoke"), str(tmp_path))
    snn, ann = summary["rows"][0], summary["rows"][-1]
    assert snn["test_acc"] > 0.7 and ann["test_acc"] > 0.7, summary["rows"]
    assert snn["input spikes/inference"] > 0 and snn["hidden spikes/inference"] > 0
    assert os.path.exists(tmp_path / "raster.png")


def test_unknown_encoding_is_named(tmp_path):
    config = spiking.get_config("smoke")
    config.encodings = ("phase",)
    with pytest.raises(ValueError, match="phase"):
        spiking.run(config, str(tmp_path))
