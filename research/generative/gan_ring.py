"""GAN on a ring of 8 Gaussians (the standard mode-collapse check): modes covered and share of high-quality samples.

Data: an equal mixture of 8 isotropic Gaussians (std 0.02) evenly spaced on a circle of radius 2
(Metz et al. 2017). Metrics (Srivastava et al. 2017), from eval.num_samples generator samples: a
sample is high quality when it lies within 3 std of its nearest mode; a mode is covered when at
least 1% of the samples are high-quality samples of that mode. Logged as eval/modes_covered and
eval/high_quality at every evaluation; ring.png shows the final samples over the data.

Example:
    depthlab run generative/gan_ring --workdir runs/gan_ring
    depthlab run generative/gan_ring --workdir runs/gan_ring_sn --preset spectral_norm
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from depthlab.research.experiment import base_config, build_model, smoke_preset, with_preset
from depthlab.research.generative.data import ring_quality, ring_samples
from depthlab.research.generative.gan_training import gan_experiment, generate
from depthlab.research.generative.plots import save_scatter
from depthlab.train import default_optim_config


def get_config(preset: str | None = None):
    adam = {"name": "adam", "learning_rate": 5e-4, "b1": 0.5, "b2": 0.99}
    d_optim = default_optim_config()
    d_optim.update(adam)
    config = base_config(
        model={"latent_dim": 2,
               "generator": {"name": "mlp_generator", "hidden": (128, 128, 128), "output_dim": 2},
               "discriminator": {"name": "mlp_discriminator", "hidden": (128, 128, 128), "spectral_norm": False}},
        data={"num_modes": 8, "radius": 2.0, "std": 0.02, "batch_size": 256},
        optim={**adam, "ema_decay": 0.999},  # the generator's optimizer; samples use its EMA weights
        d_optim=d_optim,
        gan={"r1_gamma": 0.1},
        train={"steps": 8000, "log_every": 500, "eval_every": 1000, "checkpoint_every": 2000,
               "best_metric": "eval/high_quality"},
        eval={"num_samples": 2500},
    )
    return with_preset(config, preset, PRESETS)


def _spectral_norm(c):
    """Spectral normalisation in D instead of the R1 penalty."""
    c.model.discriminator.update({"spectral_norm": True})
    c.gan.update({"r1_gamma": 0.0})


def _plain(c):
    """The plain GAN (no R1 penalty, no generator EMA): the baseline the defaults improve on."""
    c.gan.update({"r1_gamma": 0.0})
    c.optim.update({"ema_decay": 0.0})


PRESETS = {
    "smoke": smoke_preset(50, log_every=25, eval_every=25),
    "spectral_norm": _spectral_norm,
    "plain": _plain,
}


def make_experiment(config):
    d = config.data
    ring = dict(num_modes=int(d.num_modes), radius=float(d.radius), std=float(d.std))
    latent_dim, num_samples = int(config.model.latent_dim), int(config.eval.num_samples)
    generator = build_model(config.model.generator)  # the network gan_experiment trains, for sampling

    def train_batches(start_step):
        step = start_step
        while True:  # batch i depends only on (seed, i): resumed runs see the same data
            yield {"inputs": ring_samples(np.random.default_rng([int(config.seed), step]), int(d.batch_size), **ring)}
            step += 1

    def samples(state):
        key = jax.random.key(int(config.seed) + 12345)  # the same latents at every evaluation
        return np.asarray(generate(generator, state, key, num_samples, latent_dim))

    def evaluate(state):
        return ring_quality(samples(state), **ring)

    def finish(state, workdir):
        fake = samples(state)
        quality = ring_quality(fake, **ring)
        real = ring_samples(np.random.default_rng(0), num_samples, **ring)
        save_scatter(real, fake, os.path.join(workdir, "ring.png"),
                     f"{quality['modes_covered']}/{ring['num_modes']} modes, "
                     f"{100 * quality['high_quality']:.1f}% high quality")
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(quality, f, indent=2)
        print(f"GAN ring: {quality['modes_covered']}/{ring['num_modes']} modes covered, "
              f"{100 * quality['high_quality']:.1f}% high-quality samples")
        return quality

    example = ring_samples(np.random.default_rng(0), int(d.batch_size), **ring)
    return gan_experiment(config, example, train_batches, evaluate, finish)
