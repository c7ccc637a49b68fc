"""Pieces every theory study shares: optimizers, digits data, augmentation, tables, results.json, figures.

A theory study is `run(config, workdir) -> dict`: one jitted, vmapped `train(rng)` per setting,
then a table printed and written to workdir/results.json and at least one PNG. Its config follows
the experiment contract of `depthlab.research.experiment` (PRESETS, `with_preset`, a "smoke" preset).

Example:
    >>> rows = [{"width": 8, "mse": 0.1}, {"width": 64, "mse": 0.01}]
    >>> summary = write_results(workdir, {"rows": rows}, tables={"error vs width": rows})
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthlab.research.datasets.images import load_dataset
from depthlab.train import default_optim_config, make_optimizer
from depthlab.train.optim import with_run_length


def optim_config(name: str = "adam", learning_rate: float = 1e-3, **overrides: Any) -> ml_collections.ConfigDict:
    """The engine's optimizer ConfigDict (`depthlab.train.default_optim_config`) with the given fields set."""
    config = default_optim_config()
    config.name = name
    config.learning_rate = learning_rate
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tx(config: ml_collections.ConfigDict, steps: int | None = None) -> optax.GradientTransformation:
    """`depthlab.train.make_optimizer(config)`; a decay schedule with decay_steps=0 decays over `steps`."""
    return make_optimizer(config if steps is None else with_run_length(config, steps))


def load_digits() -> dict[str, np.ndarray]:
    """The 8x8 digits through `depthlab.research.datasets.images.load_dataset("digits")` (80/20 split).

    Returns {"x_train": [1437, 8, 8, 1] float32 in [0, 1], "y_train": [1437] int32, "x_test", "y_test"}.
    """
    data = load_dataset("digits")
    return {"x_train": data["train"]["inputs"], "y_train": data["train"]["labels"],
            "x_test": data["test"]["inputs"], "y_test": data["test"]["labels"]}


def random_shift_images(rng: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Augmentation under jit: shifts each image [b, h, w, c] by a random (dy, dx) in [-max_shift, max_shift], filling with zeros."""
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def to_python(value: Any) -> Any:
    """Numpy/JAX scalars and arrays -> plain Python (JSON-safe; NaN/inf become strings)."""
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray)):
        return to_python(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def format_study_table(rows: Sequence[dict], title: str = "") -> str:
    """A fixed-width text table of `rows` (dicts with the same keys); floats in 4 significant digits."""
    if not rows:
        return f"{title}\n(no rows)"
    columns = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{float(v):.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def progress(items, desc: str):
    """The settings of a study with a progress bar (one tick per setting; a widget in a notebook), so a
    minutes-long study shows where it is."""
    from tqdm.auto import tqdm

    items = list(items)
    return tqdm(items, desc=desc, unit="setting", leave=False, disable=len(items) < 2)


def write_results(workdir: str, summary: dict, tables: dict[str, Sequence[dict]],
                  config: ml_collections.ConfigDict | None = None) -> dict:
    """Prints every table, writes workdir/results.json = {summary, tables, config}; returns the summary."""
    os.makedirs(workdir, exist_ok=True)
    for title, rows in tables.items():
        print(format_study_table(rows, title))
        print()
    payload = {"summary": to_python(summary), "tables": to_python(tables)}
    if config is not None:
        payload["config"] = to_python(config.to_dict())
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    return to_python(summary)


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 3.2)):
    """(figure, axes [nrows, ncols]): a `matplotlib.figure.Figure` of `size` inches per panel. It is not
    pyplot's, so drawing never touches the global backend (a notebook keeps its inline figures)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, workdir: str, name: str) -> str:
    """Saves `fig` as workdir/name (PNG); returns the path (`IPython.display.Image(path)` shows it)."""
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def make_classifier_trainer(model, x_train: np.ndarray, y_train: np.ndarray, optim: ml_collections.ConfigDict,
                            steps: int, batch_size: int):
    """Returns train(rng) -> TrainState: the engine's `make_train_step` run for `steps` in one `lax.scan`.

    Pure and jittable, so `jax.vmap(train)` trains one classifier per seed at once. Minibatches are
    drawn with replacement from `x_train` [n, ...] / `y_train` [n] with keys folded from the step.
    """
    from depthlab.train import TrainState, make_train_step
    from depthlab.train.losses import accuracy, softmax_cross_entropy

    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    tx = make_tx(optim, steps)

    def loss_fn(logits, batch):
        return softmax_cross_entropy(logits, batch["labels"]), {"accuracy": accuracy(logits, batch["labels"])}

    train_step = make_train_step(model, loss_fn)

    def train(rng):
        init_rng, data_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init(init_rng, x_train[:2], train=False)
        params = variables.pop("params")
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng,
                                  model_state=dict(variables))

        def step(state, t):
            idx = jax.random.randint(jax.random.fold_in(data_rng, t), (batch_size,), 0, len(y_train))
            return train_step(state, {"inputs": x_train[idx], "labels": y_train[idx]})

        state, metrics = jax.lax.scan(step, state, jnp.arange(steps))
        return state, metrics

    return train


def classifier_accuracy(model, state, x: np.ndarray, y: np.ndarray) -> jax.Array:
    """Accuracy of a trained classifier state on (x [n, ...], y [n]) in evaluation mode."""
    logits = model.apply({"params": state.params, **state.model_state}, jnp.asarray(x), train=False)
    return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y))
