"""Data helpers for the generative experiments: binarisation, dequantisation and the 8-Gaussian ring.

Image sets come from `depthlab.research.datasets.images.load_dataset` (embedded, no download).

Example:
    >>> test = binarize(load_dataset("mnist")["test"]["inputs"], seed=0)     # {0, 1} pixels
    >>> points = ring_samples(np.random.default_rng(0), 512)                # [512, 2]
    >>> ring_quality(points)                                                # {"modes_covered": 8, ...}
"""
from __future__ import annotations

import numpy as np


def binarize(images: np.ndarray, seed: int) -> np.ndarray:
    """Fixed stochastic binarisation: pixel ~ Bernoulli(intensity) (the usual binarised-MNIST test set)."""
    return (np.random.default_rng(seed).random(images.shape) < images).astype(np.float32)


def dequantize(images: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform dequantisation of images with `levels` grey levels in [0, 1]: (v + u) / levels, u ~ U[0, 1).

    A continuous density p on the result bounds the discrete likelihood (Theis et al. 2016):
    log P(v) >= E_u[log p((v + u) / levels)] - num_pixels * log(levels).
    """
    v = np.round(images * (levels - 1))
    return ((v + rng.random(images.shape)) / levels).astype(np.float32)


def ring_modes(num_modes: int = 8, radius: float = 2.0) -> np.ndarray:
    """Centres of the ring mixture, [num_modes, 2], evenly spaced on a circle."""
    angles = 2 * np.pi * np.arange(num_modes) / num_modes
    return (radius * np.stack([np.cos(angles), np.sin(angles)], -1)).astype(np.float32)


def ring_samples(rng: np.random.Generator, n: int, num_modes: int = 8, radius: float = 2.0,
                 std: float = 0.02) -> np.ndarray:
    """n points from an equal-weight mixture of isotropic Gaussians on a ring, [n, 2]."""
    modes = ring_modes(num_modes, radius)
    centres = modes[rng.integers(0, num_modes, n)]
    return (centres + std * rng.standard_normal((n, 2))).astype(np.float32)


def ring_quality(samples: np.ndarray, num_modes: int = 8, radius: float = 2.0, std: float = 0.02,
                 min_share: float = 0.01) -> dict:
    """Mode coverage and sample quality of 2-D samples [n, 2] against the ring mixture.

    A sample is high quality when it lies within 3 std of its nearest mode; a mode is covered when
    at least `min_share` of all samples are high-quality samples assigned to it (Srivastava et al. 2017).
    """
    modes = ring_modes(num_modes, radius)
    dist = np.linalg.norm(samples[:, None, :] - modes[None], axis=-1)  # [n, modes]
    nearest = dist.argmin(-1)
    good = dist.min(-1) <= 3 * std
    counts = np.bincount(nearest[good], minlength=num_modes)
    return {
        "modes_covered": int((counts >= min_share * len(samples)).sum()),
        "high_quality": float(good.mean()),
    }
