"""DCGAN on real MNIST (embedded 5,000-digit subset), scored by a CNN digit classifier trained with the engine.

The generator's samples (EMA weights) are scored by a small CNN (depthlab.models CNN) trained on the
same 4,000 training digits through `fit` (run directory <workdir>/classifier, reused on resume):
  - class histogram of the classifier's predictions and the number of classes with >= 1% of samples,
  - mean classifier confidence (max softmax probability),
  - an Inception-score-style figure exp(E_x KL(p(y|x) || p(y))) with that classifier (at most 10),
each next to the same figures on the 1,000 real test digits. Writes samples.png, class_histogram.png
and results.json into the run directory.

Example:
    depthlab run generative/gan_mnist --workdir runs/gan_mnist
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthlab.research.experiment import (base_config, build_model, classification_experiment, smoke_preset,
                                     with_preset)
from depthlab.research.datasets.images import load_dataset
from depthlab.research.generative.gan_training import gan_experiment, generate
from depthlab.research.generative.plots import save_class_histogram, save_image_grid
from depthlab.train import data, default_optim_config, fit


def get_config(preset: str | None = None):
    adam = {"name": "adam", "learning_rate": 2e-4, "b1": 0.5, "b2": 0.999}
    d_optim = default_optim_config()
    d_optim.update(adam)
    config = base_config(
        model={"latent_dim": 32,
               "generator": {"name": "dcgan_generator", "image_shape": (28, 28, 1), "channels": (64, 32),
                             "batch_norm": True, "output": "tanh"},
               "discriminator": {"name": "dcgan_discriminator", "channels": (32, 64), "spectral_norm": False}},
        data={"name": "mnist", "batch_size": 64},
        optim={**adam, "ema_decay": 0.999},  # the generator's optimizer; samples use its EMA weights
        d_optim=d_optim,
        gan={"r1_gamma": 0.0},
        # 2,000 steps: under 5 minutes on 2 CPU cores; `--preset full` is the 3,000-step run of the README's figures.
        train={"steps": 2000, "log_every": 100, "eval_every": 1000, "checkpoint_every": 1000},
        classifier={"channels": (32, 64), "dense": (128,), "steps": 800, "batch_size": 64, "learning_rate": 2e-3},
        eval={"num_samples": 1000},
    )
    return with_preset(config, preset, PRESETS)


def _full(c):
    c.train.update({"steps": 3000})


def _spectral_norm(c):
    """Spectral normalisation in D (Miyato et al. 2018)."""
    c.model.discriminator.update({"spectral_norm": True})


def _large(c):
    """Accelerator scale: the full DCGAN widths, longer."""
    c.model.generator.update({"channels": (256, 128)})
    c.model.discriminator.update({"channels": (64, 128)})
    c.train.update({"steps": 20000, "eval_every": 5000, "checkpoint_every": 5000})


PRESETS = {
    "smoke": smoke_preset(30, log_every=10, classifier={"steps": 30}, eval={"num_samples": 100}),
    "full": _full,
    "spectral_norm": _spectral_norm,
    "large": _large,
}


def classifier_config(config):
    """The digit classifier's own run config (a vision experiment: CNN on the 28x28 MNIST subset)."""
    c = config.classifier
    out = base_config(
        model={"name": "cnn", "channels": tuple(c.channels), "dense": tuple(c.dense), "num_classes": 10},
        data={"name": "mnist", "batch_size": int(c.batch_size), "eval_batch_size": 500},
        optim={"name": "adam", "learning_rate": float(c.learning_rate), "schedule": "warmup_cosine",
               "warmup_steps": 50},
        train={"steps": int(c.steps), "log_every": 100, "eval_every": int(c.steps),
               "checkpoint_every": int(c.steps), "progress": bool(config.train.progress), "tensorboard": False},
        seed=int(config.seed),
    )
    out.lock()
    return out


def train_classifier(config, workdir: str):
    """Trains (or reloads) the digit CNN in <workdir>/classifier; returns (model, state, test accuracy)."""
    ccfg = classifier_config(config)
    result = fit(classification_experiment(ccfg, load_dataset("mnist", seed=int(config.seed))), ccfg,
                 os.path.join(workdir, "classifier"))
    return build_model(ccfg.model), result.state, float(result.metrics["eval/accuracy"])


def classifier_scores(probs: np.ndarray, min_share: float = 0.01) -> dict:
    """Figures of a set of images from the classifier's probabilities [N, classes]."""
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(probs.argmax(-1), minlength=probs.shape[-1])
    marginal = probs.mean(0)
    kl = np.sum(probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12)), axis=-1)
    return {
        "classes_present": int((counts >= min_share * len(probs)).sum()),
        "mean_confidence": float(probs.max(-1).mean()),
        "inception_score": float(np.exp(kl.mean())),
        "class_histogram": counts.tolist(),
    }


def make_experiment(config):
    dataset = load_dataset(config.data.name, seed=int(config.seed))
    train = {"inputs": dataset["train"]["inputs"] * 2.0 - 1.0}  # the generator's tanh range
    latent_dim, num_samples = int(config.model.latent_dim), int(config.eval.num_samples)
    generator = build_model(config.model.generator)  # the network gan_experiment trains, for sampling

    def samples(state):
        key = jax.random.key(int(config.seed) + 12345)
        return (np.asarray(generate(generator, state, key, num_samples, latent_dim)) + 1.0) / 2.0

    def finish(state, workdir):
        model, cstate, accuracy = train_classifier(config, workdir)
        predict = jax.jit(lambda x: jax.nn.softmax(model.apply({"params": cstate.params, **cstate.model_state}, x)))
        probs = lambda images: np.concatenate([np.asarray(predict(jnp.asarray(images[i:i + 500])))
                                               for i in range(0, len(images), 500)])
        fake = samples(state)
        real = dataset["test"]["inputs"][:num_samples]
        generated, reference = classifier_scores(probs(fake)), classifier_scores(probs(real))
        save_image_grid(fake[:100], os.path.join(workdir, "samples.png"), columns=10, title="DCGAN samples (EMA)")
        save_class_histogram({"generated": generated["class_histogram"], "real test": reference["class_histogram"]},
                             os.path.join(workdir, "class_histogram.png"), "classifier predictions")
        summary = {"classifier_test_accuracy": accuracy,
                   **{f"generated_{k}": v for k, v in generated.items()},
                   **{f"real_{k}": v for k, v in reference.items()}}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"GAN MNIST (classifier accuracy {accuracy:.3f}): " + ", ".join(
            f"{k}: generated {generated[k]:.3g} vs real {reference[k]:.3g}"
            for k in ("classes_present", "mean_confidence", "inception_score")))
        return summary

    return gan_experiment(
        config, train["inputs"][:2],
        lambda start: data.epoch_batches(train, int(config.data.batch_size), int(config.seed), start),
        finish=finish)
