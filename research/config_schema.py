"""The experiments' config schema: the domain of every key, checked (train/schema.py) before anything is written.

Rules are (pattern over the dotted key, Domain), first match wins: an experiment's own `CONFIG_SCHEMA` (a
module attribute, same shape: only where its keys need more than these), then `PER_EXPERIMENT` below, then the
engine's keys (seed, train.*, mesh.*, optimizer sections: `engine_rules`), then `COMMON`: the keys that mean the
same in every experiment (dropout rates, batch sizes, layer widths, ...). A key no rule names keeps its default's
type (an int count stays >= 0); `describe_schema` lists every key with its domain and where it came from.

Example:
    >>> config = build_config("vision/digits_mlp", overrides={"model.dropout": 1.5})   # calls check_config_domains:
    ValueError: model.dropout=1.5: expected a number in [0, 1) (a probability); fix: pass
    --config.model.dropout=0.1 (its default) or another value of that kind
"""
from __future__ import annotations

import ml_collections

from depthlab.models.options import ATTENTION_IMPLS, REMAT_POLICIES
from depthlab.train.schema import (Domain, boolean, check, choice, domain_of, engine_rules, flat, fraction, integer,
                                   number, positive, probability, sizes)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")   # research/experiment.py's build_model accepts these
COUNT = integer(1)
NONNEGATIVE = number(0.0)

# Keys that mean the same thing wherever they appear (matched on the dotted key; `*` spans dots).
COMMON: list[tuple[str, Domain]] = [
    # probabilities: a rate of 1 would drop (or mask) everything
    ("*dropout", probability("a dropout rate")),
    ("*mask_prob", probability()),
    ("*label_smoothing", probability("label smoothing")),
    # sizes of batches and of the model: at least 1
    ("*batch_size", integer(1, note="examples per batch")),
    ("*_batch", integer(1, note="examples per batch")),
    ("*num_classes", integer(1)),
    ("*.features", sizes(1, "layer widths; the last is the output width")),
    ("*.channels", sizes(1, "channels per stage")),
    ("*channels", sizes(1)),
    ("*hidden", sizes(1, "hidden widths")),
    ("*.dense", sizes(1, "dense widths")),
    ("*dense", sizes(1)),
    ("*widths", sizes(1)), ("sizes", sizes(1)), ("train_sizes", sizes(1)),
    ("*stage_sizes", sizes(1)),
    ("*image_shape", sizes(1)),
    ("*_dim", integer(1, optional=True)),
    ("*_size", integer(1)),
    ("*num_heads", COUNT), ("*num_layers", COUNT), ("*num_blocks", COUNT), ("*num_filters", COUNT),
    ("*width", COUNT), ("*value_hidden", COUNT), ("model.depth", integer(1, optional=True)),
    ("model.dtype", choice(*COMPUTE_DTYPES, optional=True)),
    ("model.attention_impl", choice(*(i for i in ATTENTION_IMPLS if i is not None), optional=None in ATTENTION_IMPLS)),
    ("model.remat", choice(*REMAT_POLICIES)),
    # counts: steps, examples, episodes, ... (0 would do nothing or divide by zero)
    ("*warmup_steps", integer(0)),
    ("data.eval_batches", integer(0, note="0: the whole held-out split")),
    ("pretrain.steps", integer(0, note="0: no pretraining")),
    ("*eval_every", integer(0, note="0: only at the end")),
    ("*num_workers", integer(0, note="0: in this process")),
    ("*augment_shift", integer(0)),
    ("*top_k", integer(0, note="0: all")),
    ("*steps", COUNT), ("steps.*", COUNT), ("*_samples", COUNT), ("depth", COUNT), ("units_per_layer", COUNT),
    ("*ngram_max", COUNT), ("deletion_points", COUNT), ("*num_*", COUNT), ("*eval_*", COUNT), ("*episodes", COUNT), ("*repeats", COUNT),
    ("*length", COUNT), ("*max_len", COUNT), ("*context", COUNT), ("*k_shot", COUNT), ("*_shot", COUNT),
    ("*_way", COUNT), ("*meta_batch", COUNT), ("*update_epochs", COUNT), ("*beam_size", COUNT),
    ("*max_detections", COUNT), ("*pre_nms_top_k", COUNT), ("*examples", COUNT), ("*_games", COUNT),
    ("*_iterations", COUNT), ("*max_moves", COUNT), ("*considered_actions", COUNT), ("*time_steps", COUNT),
    # rates, weights and thresholds
    ("*learning_rate", positive("a learning rate")), ("*_lr", positive("a learning rate")),
    ("*inner_lr", positive()),
    ("*temperature", positive()),
    ("*_fraction", number(0.0, 1.0, low_open=True)),
    ("*.gamma", fraction("a discount")), ("*gae_lambda", fraction()),
    ("*clip_eps", positive()),
    ("*_coef", NONNEGATIVE), ("*_weight", NONNEGATIVE), ("*_gamma", NONNEGATIVE),
    ("detect.*_threshold", fraction()), ("*min_confidence", fraction()), ("*_C", positive()),
    ("*length_penalty", NONNEGATIVE),
    ("*ema_decay", number(0.0, 1.0)),
    ("*.l1", NONNEGATIVE), ("*.l2", NONNEGATIVE), ("l1", NONNEGATIVE), ("l2", NONNEGATIVE),
    ("*weight_decay", NONNEGATIVE),
    ("*std", NONNEGATIVE), ("*radius", positive()), ("*size_prior", positive()), ("*tolerance", positive()),
    ("zero_threshold", NONNEGATIVE), ("clip_norm", NONNEGATIVE), ("ascent_l2", NONNEGATIVE), ("*noise", NONNEGATIVE), ("*sigma", NONNEGATIVE),
    ("*_every", integer(0)),
    ("*lowercase", boolean()),
]

# Keys whose domain is specific to one experiment (only where COMMON and the type of the default say too little).
PER_EXPERIMENT: dict[str, list[tuple[str, Domain]]] = {
    "theory/depth_separation": [("k", integer(1, note="compositions of the tent map"))],
    "theory/spiking": [("threshold", positive("the membrane threshold")), ("slope", positive("surrogate slope")),
                       ("beta", number(0.0, 1.0, high_open=False, note="membrane decay")),
                       ("latency_min", fraction())],
    "theory/energy_efficiency": [("alpha", fraction("the distillation loss weight"))],
    "theory/optimizers": [("condition_number", number(1.0, note="the largest over the smallest curvature"))],
    "generative/vae": [("model.likelihood", choice("bernoulli", "gaussian"))],
    "generative/conv_vae": [("model.likelihood", choice("bernoulli", "gaussian"))],
}


def experiment_rules(name: str, module=None) -> list[tuple[str, Domain]]:
    """The rules of experiment `name` (its module's CONFIG_SCHEMA first), in the order they are tried."""
    from depthlab.research.registry import canonical_name, load_experiment

    module = module if module is not None else load_experiment(name)
    own = list(getattr(module, "CONFIG_SCHEMA", []) or [])
    return own + PER_EXPERIMENT.get(canonical_name(name), []) + engine_rules() + COMMON


def check_config_domains(name: str, config: ml_collections.ConfigDict, preset: str | None = None, *, module=None) -> None:
    """Raises ConfigValueError (a ValueError: the CLI prints it as one line, exit 2) naming the first value of
    `config` outside its domain: "KEY=VALUE: expected ...; fix: ...". Nothing is built, traced or written."""
    from depthlab.research.registry import load_experiment

    module = module if module is not None else load_experiment(name)
    defaults = module.get_config(preset)
    check(config, experiment_rules(name, module), defaults=defaults)


def describe_schema(name: str, preset: str | None = None) -> dict[str, tuple[str, str]]:
    """{key: (its domain in words, the rule that declared it or "inferred")} of experiment `name`'s config."""
    from depthlab.research.registry import load_experiment

    module = load_experiment(name)
    rules = experiment_rules(name, module)
    out = {}
    for key, default in flat(module.get_config(preset)).items():
        domain, source = domain_of(key, rules, default)
        out[key] = (domain.describe(), source)
    return out
