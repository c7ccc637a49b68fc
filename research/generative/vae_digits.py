"""MLP VAE with a Gaussian decoder on scikit-learn's 8x8 digits (dequantised grey levels): test -ELBO and IWAE in nats.

The 17 grey levels v are uniformly dequantised, x = (v + u) / 17 (fresh u every training step, one
fixed draw for the test set), so the Gaussian decoder's density on [0, 1]^64 is a proper likelihood;
results.json also converts it to a bound on the discrete likelihood in bits per pixel. The baseline is
a factorised Gaussian (per-pixel mean and std of the dequantised training set).

Example:
    depthlab run generative/vae_digits --workdir runs/vae_digits
"""
from __future__ import annotations

from depthlab.research.experiment import base_config, smoke_preset, with_preset
from depthlab.research.generative.vae_training import vae_experiment


def get_config(preset: str | None = None):
    config = base_config(
        model={"name": "mlp_vae", "latent_dim": 8, "hidden": (256, 128), "likelihood": "gaussian"},
        data={"name": "digits", "batch_size": 64, "eval_batch_size": 360, "binarize": "none",
              "dequantize_levels": 17},
        optim={"name": "adam", "learning_rate": 1e-3},
        train={"steps": 4000, "log_every": 100, "eval_every": 500, "checkpoint_every": 1000,
               "best_metric": "eval/nelbo", "best_mode": "min"},
        eval={"iwae_samples": 200, "num_images": 64},
    )
    return with_preset(config, preset, PRESETS)


def _bernoulli(c):
    """Binary pixels (> 0.5) with a Bernoulli decoder instead of dequantised grey levels."""
    c.model.update({"likelihood": "bernoulli"})
    c.data.update({"binarize": "threshold", "dequantize_levels": 0})


PRESETS = {
    "smoke": smoke_preset(40, log_every=20, eval_every=20, eval={"iwae_samples": 4, "num_images": 16}),
    "bernoulli": _bernoulli,
}


def make_experiment(config):
    return vae_experiment(config)
