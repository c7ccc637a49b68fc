"""The experiment contract, and the one builder of supervised experiments.

An experiment is a module research/<field>/<name>.py that defines (or assigns) at its top level
  - `get_config(preset=None) -> ConfigDict`: the laptop default (fit experiments start from
    `base_config`), ending with `return with_preset(config, preset, PRESETS)`, which applies the
    named preset and locks the config;
  - `PRESETS = {name: function(config) -> None}`: named functions editing the config (or `smoke_preset(...)`
    results), always with a "smoke" preset: the seconds-long setting of the tests and the notebooks' CPU runs;
  - `make_experiment(config) -> Experiment` (trained by `fit`) or `run(config, workdir) -> dict`
    (a self-contained study). `make_experiment = ppo_experiment` counts as much as a `def`.
A module of a field without them holds pieces its experiments share (e.g. generative/gan_training.py,
theory/studies.py); `depthlab list` skips it. A supervised experiment's `make_experiment` is one call of
`supervised_experiment` (model, loss, data, optimizer from the config); `fit` draws curves.png.

Example (a whole experiment module):
    >>> def get_config(preset=None):
    ...     config = base_config(model={"name": "cnn", "channels": (32, 64), "num_classes": 10},
    ...                          data={"name": "digits", "batch_size": 64})
    ...     return with_preset(config, preset, PRESETS)
    >>> PRESETS = {"smoke": smoke_preset(60)}
    >>> def make_experiment(config):
    ...     dataset = load_dataset(config.data.name, seed=config.seed)
    ...     return supervised_experiment(config, dataset["train"], dataset["test"])
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthlab.models import get_model
from depthlab.train import (Experiment, TrainState, data, default_mesh_config, default_optim_config,
                            default_train_config, losses, make_eval_step, make_optimizer, make_train_step,
                            mode_kwargs)
from depthlab.train.optim import with_run_length


def base_config(*, model: dict, data: dict | None = None, optim: dict | None = None, train: dict | None = None,
                seed: int = 0, **extra: Any) -> ml_collections.ConfigDict:
    """The standard config: seed, model, data, optim, train, mesh (+ extra sections), unlocked. `optim` and
    `train` update the engine's defaults; no `data` (an agent that collects its own): no data section."""
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.model = ml_collections.ConfigDict(model)
    if data is not None:
        config.data = ml_collections.ConfigDict(data)
    config.optim = default_optim_config()
    config.optim.update(optim or {})
    config.train = default_train_config()
    config.train.update(train or {})
    config.mesh = default_mesh_config()
    for key, value in extra.items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return config


def with_preset(config: ml_collections.ConfigDict, preset: str | None,
                presets: Mapping[str, Callable[[ml_collections.ConfigDict], None]]) -> ml_collections.ConfigDict:
    """The one way an experiment declares presets: `PRESETS = {name: function editing the config}`.

    Applies `presets[preset]` to `config` (no preset: the laptop default) and locks the config, so
    that a typo in a key fails loudly. An unknown name fails with the valid ones. Every experiment's
    `get_config(preset=None)` ends with `return with_preset(config, preset, PRESETS)`.
    """
    if preset:
        if preset not in presets:
            valid = ", ".join(sorted(presets)) or "none"
            raise ValueError(f"unknown preset {preset!r}; valid presets: {valid} (or no preset for the default)")
        presets[preset](config)
    config.lock()
    return config


def smoke_preset(train_steps: int | None = None, /, *, log_every: int | None = None,
                 eval_every: int | None = None, checkpoint_every: int | None = None,
                 **updates: Any) -> Callable[[ml_collections.ConfigDict], None]:
    """The "smoke" preset every experiment has: the tests' and the notebooks' CPU setting (seconds).

    `train_steps` shortens config.train (logging 3 times, evaluating and checkpointing once, unless
    given). Each other keyword names a config entry: a dict updates that section, any other value
    replaces the field.
        >>> PRESETS = {"smoke": smoke_preset(20, model={"num_layers": 1}, data={"batch_size": 8})}
        >>> PRESETS = {"smoke": smoke_preset(widths=(2, 32), steps=100)}      # a theory study's fields
    """

    def apply(config: ml_collections.ConfigDict) -> None:
        if train_steps:
            config.train.update({"steps": train_steps, "log_every": log_every or max(1, train_steps // 3),
                                 "eval_every": eval_every or train_steps,
                                 "checkpoint_every": checkpoint_every or train_steps})
        for name, value in updates.items():
            if isinstance(value, dict):
                config[name].update(value)
            else:
                config[name] = value

    return apply


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def build_model(model_config: ml_collections.ConfigDict, **overrides: Any):
    """The registered model named by model_config.name, with the other keys (and `overrides`, which win) as
    hyper-parameters. `dtype` (a name: float32, bfloat16, float16) is the compute dtype: it is given to a
    module whose dataclass has a `dtype` field; a module without one computes in float32 only.
        >>> model = build_model(config.model, vocab_size=tokenizer.vocab_size, head="mlm")
    """
    kwargs = {**_tuples(model_config.to_dict()), **overrides}
    name = kwargs.pop("name")
    dtype = kwargs.pop("dtype", None)
    model = get_model(name, **kwargs)
    if dtype is None:
        return model
    if str(jnp.dtype(dtype)) not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype {dtype!r} is not a compute dtype; use {', '.join(COMPUTE_DTYPES)}")
    if "dtype" in {f.name for f in dataclasses.fields(model)}:
        return model.clone(dtype=jnp.dtype(dtype))
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(f"model {name!r} has no dtype field, so it computes in float32 only; "
                         f"remove model.dtype={dtype!r} or set it to float32")
    return model


def resolved_optim(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.optim with decay_steps defaulting to the run's length (train.steps)."""
    return with_run_length(config.optim, int(config.train.steps))


def init_state(model, example_input, tx, rng: jax.Array, ema_decay: float = 0.0,
               init_params: Callable | None = None) -> TrainState:
    """A TrainState for `model` initialised on one example (an array, or a tuple of arrays for a model of
    several inputs); mutable collections go to model_state. `init_params(params) -> params` edits the fresh
    parameters (e.g. loads pre-trained weights into them).

    Build `tx` once, outside the init function: the state's static fields (apply_fn, tx) must be the
    same objects at every call, or jit sees a different state type.
    """
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    variables = dict(model.init({"params": params_rng, "dropout": dropout_rng},
                                *(jnp.asarray(x[:1]) for x in inputs), **mode_kwargs(model, train=False)))
    params = variables.pop("params")
    if init_params is not None:
        params = init_params(params)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng, model_state=variables,
                             ema_decay=ema_decay)


def device_divisible(eval_batch_size: int) -> int:
    """An eval batch size rounded up to a multiple of the device count. Eval batches are padded
    (with a mask), so the means stay exact while the batch splits evenly over the devices."""
    devices = jax.device_count()
    return -(-int(eval_batch_size) // devices) * devices


def predict_all(predict: Callable, state: Any, inputs: np.ndarray, batch_size: int) -> Any:
    """`predict(state, batch)` over all `inputs`, batch by batch, concatenated along the batch axis (an array,
    or a pytree of arrays such as a dict of detections). The last batch is padded (with copies of its last
    row) so that one compiled shape serves every call."""
    out = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(jax.tree.map(lambda v: np.asarray(v)[:batch_size - pad], jax.device_get(predict(state, chunk))))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def supervised_experiment(config: ml_collections.ConfigDict, train: dict | Callable, test: dict | Callable | None,
                          *, model=None, loss: Callable | None = None, input_keys: Sequence[str] = ("inputs",),
                          example=None, transform: Callable | None = None, init_params: Callable | None = None,
                          ema_decay: float | None = None, evaluate: Callable | None = None,
                          finish: Callable | None = None) -> Experiment:
    """The Experiment of a supervised task: `model` (default `build_model(config.model)`) trained on `train`
    with `loss(outputs, batch) -> (loss, metrics)` (default: classification cross-entropy with
    config.loss.label_smoothing) by config.optim over config.train.steps, evaluated on `test`.

    train: a dict of arrays, read in shuffled epochs of config.data.batch_size (with `transform(batch, rng)`,
        e.g. augmentation), or `train_batches(start_step) -> iterator` for any other stream.
    test: a dict of arrays, read in batches of config.data.eval_batch_size (default 500, rounded up to the
        device count; the last batch padded, with a mask), or `eval_batches() -> iterable`, or None.
    input_keys: the batch entries given to the model, in order; `example` its init input (default
        train[input_keys[0]], a tuple of arrays for several inputs). `init_params(params) -> params` edits the
        fresh parameters (pre-trained weights); `ema_decay` defaults to config.optim.ema_decay.
    evaluate(state) -> dict and finish(state, workdir) -> dict as in `depthlab.train.Experiment`.
        >>> experiment = supervised_experiment(config, dataset["train"], dataset["test"])
    """
    model = build_model(config.model) if model is None else model
    loss = classification_loss(float(config.get("loss", {}).get("label_smoothing", 0.0))) if loss is None else loss
    input_keys = tuple(input_keys)
    if callable(train):
        if transform is not None:
            raise ValueError("transform is applied to arrays; with a train_batches function, apply it there")
        train_batches = train
    else:
        batch_size, seed = int(config.data.batch_size), int(config.seed)
        train_batches = lambda start: data.epoch_batches(train, batch_size, seed, start, transform)  # noqa: E731
    if example is None:
        if callable(train):
            raise ValueError("a train_batches function needs `example`: the model's init input (one row is enough)")
        example = tuple(train[k] for k in input_keys) if len(input_keys) > 1 else train[input_keys[0]]
    if test is None or callable(test):
        eval_batches = test
    else:
        eval_batch_size = device_divisible(int(config.data.get("eval_batch_size", 500)))
        eval_batches = lambda: data.eval_batches(test, eval_batch_size)  # noqa: E731
    tx = make_optimizer(resolved_optim(config))
    ema = float(config.optim.ema_decay if ema_decay is None else ema_decay)
    return Experiment(
        init=lambda rng: init_state(model, example, tx, rng, ema, init_params),
        train_step=make_train_step(model, loss, input_keys=input_keys),
        train_batches=train_batches,
        eval_step=make_eval_step(model, loss, input_keys=input_keys) if eval_batches is not None else None,
        eval_batches=eval_batches,
        evaluate=evaluate,
        finish=finish,
    )


def classification_loss(label_smoothing: float = 0.0):
    """loss_fn(logits, batch) -> (cross-entropy, {"accuracy"}), honouring batch["mask"] if present."""

    def loss_fn(logits, batch):
        mask = batch.get("mask")
        loss = losses.softmax_cross_entropy(logits, batch["labels"], label_smoothing, mask=mask)
        return loss, {"accuracy": losses.accuracy(logits, batch["labels"], mask=mask)}

    return loss_fn


def _where(source: str | None, split: str) -> str:
    """The prefix naming the data in a message: the npz file and its arrays, or the data's name."""
    if not source:
        return ""
    return f"{source} (x_{split}, y_{split}): " if source.startswith("npz:") else f"{source}: "


def check_classification_data(train: dict, test: dict, num_classes: int | None, *, source: str | None = None,
                              fix: str | None = None) -> None:
    """One line naming the problem and the fix, before anything is written: inputs without a feature axis,
    train and test inputs of different shapes or dtypes, labels that are not integer class indices [N] in
    [0, num_classes) (`num_classes`: the model's output width; None: not checked). `source` (e.g. the data
    file) and `fix` (how to widen the model) go into the message."""
    for split, arrays in (("train", train), ("test", test)):
        where = _where(source, split)
        data.check_arrays(arrays, f"{where}{split}")
        if np.ndim(arrays["inputs"]) < 2:
            raise ValueError(f"{where}{split} inputs have shape {np.shape(arrays['inputs'])}: one row per example "
                             f"with its features, [N, features] or images [N, H, W, C], is needed")
        labels = np.asarray(arrays["labels"])
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{where}{split} labels are {labels.dtype}, not integers; give class indices 0..K-1 "
                             f"(np.unique(y, return_inverse=True)[1] makes them)")
        if labels.ndim != 1:
            raise ValueError(f"{where}{split} labels have shape {labels.shape}; expected class indices [N] "
                             f"(one-hot rows: y.argmax(axis=1))")
    a, b = np.asarray(train["inputs"]), np.asarray(test["inputs"])
    if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}train inputs are {a.dtype}{list(a.shape[1:])} per example but test inputs "
                         f"{b.dtype}{list(b.shape[1:])}; give both splits the same shape and dtype")
    if num_classes:
        check_label_range(train, test, num_classes, source=source, fix=fix)


def check_label_range(train: dict, test: dict, num_classes: int, *, source: str | None = None,
                      fix: str | None = None) -> None:
    """Labels (integer class indices, checked by `check_classification_data`) in [0, num_classes)."""
    for split, arrays in (("train", train), ("test", test)):
        where = _where(source, split)
        labels = np.asarray(arrays["labels"])
        if labels.min() < 0 or labels.max() >= int(num_classes):
            widen = fix or f"set --config.model.num_classes={int(labels.max()) + 1}"
            raise ValueError(f"{where}{split} labels run from {labels.min()} to {labels.max()}, outside [0, "
                             f"{num_classes}); {widen} or relabel the data ({num_classes}: the model's output "
                             f"width)")


def output_width(model, example: np.ndarray) -> int | None:
    """The size of the last axis of `model`'s output for one example, traced (`jax.eval_shape`: shapes only,
    nothing computed); None when the output is not one [1, K] array."""
    def forward(x):
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init_with_output(rngs, x, **mode_kwargs(model, train=False))[0]

    row = jax.ShapeDtypeStruct((1, *np.shape(example)[1:]), np.asarray(example).dtype)
    out = jax.eval_shape(forward, row)
    return int(out.shape[-1]) if hasattr(out, "shape") and len(out.shape) == 2 else None


def _widen_hint(model_config: ml_collections.ConfigDict, needed: int) -> str:
    if "num_classes" in model_config:
        return f"set --config.model.num_classes={needed}"
    if "features" in model_config and isinstance(model_config.features, (tuple, list)):
        widths = (*tuple(model_config.features)[:-1], needed)
        return f"set --config.model.features=({','.join(map(str, widths))}) (its last width is the class count)"
    return f"give the model {needed} outputs"


def classification_experiment(config: ml_collections.ConfigDict, dataset: dict,
                              transform: Callable | None = None, finish: Callable | None = None) -> Experiment:
    """An Experiment training config.model on dataset["train"], evaluating on dataset["test"]. The labels are
    checked against the model's output width (traced), whatever config key sets it."""
    train, test = dataset["train"], dataset["test"]
    source = config.get("data", {}).get("name") or None
    check_classification_data(train, test, None, source=source)   # shapes and dtypes first: the trace needs them
    model = build_model(config.model)
    width = output_width(model, np.asarray(train["inputs"]))
    needed = int(max(np.max(train["labels"]), np.max(test["labels"]))) + 1
    if width:
        check_label_range(train, test, width, source=source, fix=_widen_hint(config.model, needed))
    return supervised_experiment(config, train, test, model=model, transform=transform, finish=finish)


def random_shift(max_shift: int) -> Callable:
    """Augmentation: shifts each image by up to `max_shift` pixels (zero fill), as a data transform."""

    def transform(batch: dict, rng: np.random.Generator) -> dict:
        x = batch["inputs"]
        n, h, w = x.shape[:3]
        padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
        dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
        rows = dy[:, None] + np.arange(h)[None, :]
        cols = dx[:, None] + np.arange(w)[None, :]
        shifted = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return {**batch, "inputs": shifted}

    return transform


class PerExample:
    """A batch transform (e.g. `random_shift`) applied to one example: the `transform(example, rng)` that
    train/streaming/ runs in its workers, with an rng drawn for that example's place in the stream."""

    def __init__(self, batch_transform: Callable):
        self.batch_transform = batch_transform

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        batch = self.batch_transform({k: np.asarray(v)[None] for k, v in example.items()}, rng)
        return {k: v[0] for k, v in batch.items()}


def streaming_classification(config: ml_collections.ConfigDict, transform: Callable | None = None,
                             finish: Callable | None = None) -> Experiment:
    """classification_experiment for config.data.source=arrayrecord:PATTERN (or parquet:PATTERN): the records
    are read, decoded and augmented (`transform`, per example) in config.data.num_workers Grain processes."""
    from depthlab.research.datasets.images import image_sources
    from depthlab.train import streaming

    d = config.data
    sources = image_sources(config)
    if sources["num_classes"] and "num_classes" in config.model and sources["num_classes"] > config.model.num_classes:
        raise ValueError(f"{d.source} has {sources['num_classes']} classes but model.num_classes is "
                         f"{config.model.num_classes}; set --config.model.num_classes={sources['num_classes']}")
    decode = streaming.ImageExample(d.get("image_key", "image"), d.get("label_key", "label"))
    example = decode(sources["train"].read([0])[0], sources["train"].where(0))["inputs"][None]
    eval_batch_size = device_divisible(int(d.get("eval_batch_size", 500)))
    skip = bool(d.get("skip_bad_records", False))
    experiment = supervised_experiment(
        config,
        lambda start: streaming.stream_batches(
            sources["train"], int(d.batch_size), int(config.seed), start, decode=decode,
            transform=PerExample(transform) if transform else None, num_workers=int(d.get("num_workers", 0)),
            skip_bad_records=skip),
        lambda: streaming.stream_eval_batches(sources["test"], eval_batch_size, decode=decode, skip_bad_records=skip),
        example=example, finish=finish)
    if not skip:
        return experiment
    step = experiment.train_step   # replaced records are counted: data/skipped_records (per step, averaged)

    def train_step(state, batch):
        state, metrics = step(state, {k: v for k, v in batch.items() if k != "skipped"})
        return state, {**metrics, "data/skipped_records": jnp.sum(batch["skipped"]).astype(jnp.float32)}

    return dataclasses.replace(experiment, train_step=train_step)


def image_classification(config: ml_collections.ConfigDict) -> Experiment:
    """The make_experiment of the vision classifiers: embedded data by config.data.name (or files streamed from
    config.data.source), optional random-shift augmentation (config.data.augment_shift); `fit` draws curves.png."""
    from depthlab.research.datasets.images import load_dataset

    shift = int(config.data.get("augment_shift", 0))
    transform = random_shift(shift) if shift else None
    if config.data.get("source"):
        return streaming_classification(config, transform=transform)
    return classification_experiment(config, load_dataset(config.data.name, seed=config.seed), transform=transform)
