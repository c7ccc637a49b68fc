"""Generative experiments end to end through `fit` (smoke configs), and their evaluation figures."""
import json
import os

import numpy as np
import pytest

from depthlab.research import run_experiment
from depthlab.research.generative import gan_mnist, gan_ring, vae_digits, vae_mnist
from depthlab.research.generative.data import binarize, dequantize
from depthlab.train import read_metrics


@pytest.mark.parametrize("module", [vae_mnist, vae_digits, gan_ring, gan_mnist])
def test_configs_and_presets(module):
    config = module.get_config()
    assert config.train.steps > 0 and config.seed == 0
    for preset in module.PRESETS:
        module.get_config(preset)
    with pytest.raises(ValueError, match="valid presets"):
        module.get_config("no_such_preset")
    with pytest.raises(AttributeError):  # locked: a typo fails loudly
        config.train.stepz = 3


def test_classifier_scores():
    confident = np.eye(10)[np.arange(1000) % 10] * 0.99 + 0.001
    scores = gan_mnist.classifier_scores(confident)
    assert scores["classes_present"] == 10
    assert scores["mean_confidence"] == pytest.approx(0.991)
    assert 9.0 < scores["inception_score"] <= 10.0       # near the maximum, the number of classes
    collapsed = gan_mnist.classifier_scores(np.tile(np.eye(10)[3] * 0.9 + 0.01, (500, 1)))
    assert collapsed["classes_present"] == 1 and collapsed["inception_score"] == pytest.approx(1.0)
    assert collapsed["class_histogram"][3] == 500


def test_binarize_and_dequantize():
    images = np.full((2000, 2, 2, 1), 0.25, np.float32)
    bits = binarize(images, seed=0)
    assert set(np.unique(bits)) <= {0.0, 1.0} and abs(bits.mean() - 0.25) < 0.02
    np.testing.assert_array_equal(bits, binarize(images, seed=0))
    levels = np.array([0.0, 0.5, 1.0], np.float32).reshape(3, 1, 1, 1)
    x = dequantize(levels, 17, np.random.default_rng(0))
    assert np.all(np.floor(x * 17) == np.array([0, 8, 16]).reshape(3, 1, 1, 1))


def test_vae_digits_runs_and_resumes(tmp_path):
    workdir = str(tmp_path / "vae")
    first = run_experiment("generative/vae_digits", preset="smoke", workdir=workdir,
                           overrides={"train.steps": 20, "train.progress": False})
    records = read_metrics(workdir)
    nelbos = [r["eval/nelbo"] for r in records if "eval/nelbo" in r]
    assert len(nelbos) == 1 and np.isfinite(nelbos[0])
    for name in ("samples.png", "reconstructions.png", "interpolation.png", "results.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert {"test_nelbo", "test_iwae_nll_k4", "baseline_factorized_nll"} <= set(results)
    # Resuming the finished run reloads the checkpoint and trains no further.
    again = run_experiment("generative/vae_digits", preset="smoke", workdir=workdir,
                           overrides={"train.steps": 20, "train.progress": False})
    assert again is not None and first is not None
    assert len([r for r in read_metrics(workdir) if "eval/nelbo" in r]) == 1


def test_gan_ring_runs_logs_mode_metrics_and_resumes_exactly(tmp_path):
    overrides = {"train.steps": 30, "train.eval_every": 15, "train.log_every": 15, "train.progress": False}
    workdir = str(tmp_path / "ring")
    run_experiment("generative/gan_ring", preset="smoke", workdir=workdir, overrides=overrides)
    records = [r for r in read_metrics(workdir) if "eval/modes_covered" in r]
    assert [r["step"] for r in records] == [15, 30]
    assert all(0 <= r["eval/modes_covered"] <= 8 and 0 <= r["eval/high_quality"] <= 1 for r in records)
    train_records = [r for r in read_metrics(workdir) if "d_loss" in r]
    assert train_records and all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in train_records)
    assert os.path.getsize(os.path.join(workdir, "ring.png")) > 0
    # Stopped at step 15 and resumed to 30: both networks, both optimizers and the data stream pick up
    # exactly where they were, so the logged figures equal the uninterrupted run's.
    resumed = str(tmp_path / "ring_resumed")
    run_experiment("generative/gan_ring", preset="smoke", workdir=resumed, overrides={**overrides, "train.steps": 15})
    run_experiment("generative/gan_ring", preset="smoke", workdir=resumed, overrides=overrides)
    last = lambda d: [r for r in read_metrics(d) if r["step"] == 30][-1]
    for key in ("d_loss", "g_loss", "eval/high_quality", "eval/modes_covered"):
        assert last(resumed)[key] == pytest.approx(last(workdir)[key], rel=1e-5), key


@pytest.mark.slow
def test_gan_mnist_smoke_scores_samples(tmp_path):
    workdir = str(tmp_path / "gan")
    run_experiment("generative/gan_mnist", preset="smoke", workdir=workdir, overrides={"train.progress": False})
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["real_classes_present"] == 10
    assert sum(results["generated_class_histogram"]) == 100
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 0


@pytest.mark.slow
def test_vae_mnist_smoke(tmp_path):
    workdir = str(tmp_path / "vae_mnist")
    run_experiment("generative/vae_mnist", preset="smoke", workdir=workdir, overrides={"train.progress": False})
    with open(os.path.join(workdir, "results.json")) as f:
        assert np.isfinite(json.load(f)["test_nelbo"])
