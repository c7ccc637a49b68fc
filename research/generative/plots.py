"""PNG figures for the generative experiments: image grids, 2-D scatter plots, class histograms.

Each draws on its own `matplotlib.figure.Figure` (never pyplot, so a notebook's backend is left alone),
saves it and returns the path.

Example:
    >>> save_image_grid(samples, "runs/a/samples.png", columns=8)     # samples [N, H, W, 1] in [0, 1]
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure


def tile_images(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] -> one [rows*(H+pad)+pad, columns*(W+pad)+pad, C] mosaic (empty cells stay 0)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32) * 0.5
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def save_image_grid(images: np.ndarray, path: str, columns: int = 8, title: str | None = None) -> str:
    """Writes images [N, H, W, 1 or 3] with values in [0, 1] as one PNG grid; returns the path."""
    grid = np.clip(tile_images(images, columns), 0.0, 1.0)
    height, width = grid.shape[:2]
    fig = Figure(figsize=(max(2.0, width / 40), max(2.0, height / 40) + (0.4 if title else 0.0)))
    ax = fig.add_axes((0, 0, 1, 0.92 if title else 1))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_scatter(real: np.ndarray, fake: np.ndarray, path: str, title: str = "") -> str:
    """Real and generated 2-D points [N, 2] on one plot."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.scatter(real[:, 0], real[:, 1], s=2, alpha=0.3, label="data")
    ax.scatter(fake[:, 0], fake[:, 1], s=2, alpha=0.3, label="generator")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_class_histogram(counts: dict[str, np.ndarray], path: str, title: str = "") -> str:
    """Bar chart of class shares, one group of bars per entry of `counts` (e.g. generated vs real)."""
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    width = 0.8 / len(counts)
    for i, (name, values) in enumerate(counts.items()):
        values = np.asarray(values, np.float64)
        ax.bar(np.arange(len(values)) + i * width, values / max(values.sum(), 1), width, label=name)
    ax.set_xticks(np.arange(len(values)) + 0.4 - width / 2, [str(c) for c in range(len(values))])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("share")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
