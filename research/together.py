"""Sweeps together: the points of a sweep that differ only in the seed, in optimizer scalars and in the numbers of
the model and the loss trained as one compiled program, through the one engine (`fit`).

Points of a sweep whose configs differ only in `seed`, in the numbers of an optimizer section that
`train.optim.INJECTABLE` names (learning_rate, weight_decay, b1, ...: `optim.learning_rate=1e-3,3e-3`) and in the
floats of the model and loss sections (`model.dropout`, `loss.label_smoothing`, `loss.dice_weight`, ...) form a
group. The group is one member-stacked `Experiment`: `init` is the experiment's own init over the members' keys
(`lax.map`), `train_step`/`eval_step` are its own steps over (state, batch) with a leading member axis on the state
(`jax.vmap`, `lax.map` or unrolled: `over_members`, `resolve_mode`), and a batch is the members' own batches
(each member keeps its own data order and data split) stacked on axis 1, `[rows, members, ...]`, so that rows
stay the data-parallel axis. Optimizer scalars that differ enter as arrays in each member's optimizer state: the members
are built with `optim.inject` naming them (`optax.inject_hyperparams`, same arithmetic), and written back without
it (`optim.without_injected`), so each member's checkpoint has a separate run's layout. Model and loss numbers
are Python constants of each member's traced program (a dropout's `1 - rate`, a smoothing's `rate / classes`):
`lift` traces every member's init and steps, checks that they are one program but for such constants, and runs
that program with each member's own constants as inputs, so each member computes exactly its own step; nothing
in the models or losses had to change, and an experiment of a user's own gets the same.
`fit` trains the group in a scratch run directory, `SWEEP/.together/<group>` (stacked checkpoints there: a
killed group resumes from them); then each member is written as the run a separate `depthlab run` of its point
leaves: `SWEEP/<tag>/` with config.json (its own values), experiment.json, metrics.jsonl, summary.json,
curves.png and its final state as its own checkpoint (a slice of the stacked state), and the scratch
directory is removed. `depthlab report`, `depthlab eval --workdir` and a later sequential `depthlab sweep`
(which sees the points finished) read the members as separate runs.

What cannot go together, and runs one point after the other instead (one line says so): points that differ
in any other key (width, activation, model name, schedule, batch size: they change shapes or the program; each
setting is its own group), in whether an optional part is on (weight_decay 0 vs 0.1, dropout 0 vs 0.1, a loss
term's weight 0 vs 1: the code leaves the part out), experiments without train data (RL collects its own), and
experiments whose members still differ beyond those constants (checked: a value used in a Python branch, or
inside a `lax.cond` branch, a while loop or a custom derivative, makes the members' traced programs differ;
constants inside scanned layers and remats are reached).

Example:
    >>> from depthlab.research import run_sweep
    >>> sweep = ["seed=0,1", "optim.learning_rate=1e-3,3e-3", "model.dropout=0.1,0.3"]
    >>> records = run_sweep("vision/digits_mlp", sweep, together=True)   # 8 members, one program
    >>> [r["status"] for r in records], records[0]["workdir"]          # each member its own run directory
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

TOGETHER_KEYS = ("seed",)          # config keys whose values may differ between the members of one program,
                                   # besides the optimizer sections' INJECTABLE scalars (`varies_inside`)
GROUP_FOLDER = ".together"         # SWEEP/.together/<group>: the group's scratch run directory while it trains


@flax.struct.dataclass
class MemberStack:
    """The state of a group: `members` is the experiment's own state with a leading [members] axis on every
    leaf; `step` the group's step (a scalar, as `fit` reads it); `failed_at[i]` the step at which member i's
    metrics or state went non-finite (0: they did not), after which it is frozen and the others go on."""
    step: jax.Array
    members: Any
    failed_at: jax.Array


def member_prefix(i: int) -> str:
    return f"member{i}/"


def _optim_section(section: str) -> bool:
    from depthlab.train.schema import OPTIM_SECTIONS
    return any(fnmatch.fnmatchcase(section, pattern) for pattern in OPTIM_SECTIONS)


LIFTED_SECTIONS = ("model", "loss")   # sections whose float values may differ inside one program: they enter
                                      # the traced step as constants, which `lift` turns into member inputs


def varies_inside(key: str, value: Any = None) -> bool:
    """Whether config key `key` (dotted) may differ between the members of one program: the seed; a scalar of
    an optimizer section that the optimizer can hold in its state (`optim.learning_rate`, `optim.b1`, ...); or a
    float of the model or loss section (`model.dropout`, `loss.label_smoothing`: constants of the traced step,
    `lift`). `value`: the key's value, where known (a model or loss key varies inside only as a float)."""
    from depthlab.train.optim import INJECTABLE

    section, _, name = key.rpartition(".")
    if key.split(".")[0] in LIFTED_SECTIONS:
        return value is None or (isinstance(value, float) and not isinstance(value, bool))
    return key in TOGETHER_KEYS or (name in INJECTABLE and _optim_section(section))


def _setting(config: ml_collections.ConfigDict) -> str:
    """The config as JSON with the values that may differ inside a group reduced to what changes the program
    (an optional optimizer part, a dropout or a loss term on or off): equal for points of one group."""
    from depthlab.train.rundir import flat_config

    values = flat_config(json.loads(config.to_json_best_effort()))
    return json.dumps({k: (bool(v) if k not in TOGETHER_KEYS else None) if varies_inside(k, v) else v
                       for k, v in values.items()}, sort_keys=True)


def varying_keys(configs: list) -> list[str]:
    """The keys (dotted) whose values differ between `configs` (the members of a group)."""
    from depthlab.train.rundir import flat_config

    flats = [flat_config(json.loads(c.to_json_best_effort())) for c in configs]
    return sorted(k for k in flats[0] if any(f.get(k) != flats[0][k] for f in flats[1:]))


def injected_configs(configs: list) -> list:
    """The members' configs with each optimizer section's differing scalars named in its `inject` key, so that
    each member's optimizer holds them in its state (one program); the configs themselves when only the seed
    differs."""
    sections: dict[str, list[str]] = {}
    for key in varying_keys(configs):
        section, _, name = key.rpartition(".")
        if key not in TOGETHER_KEYS and _optim_section(section):   # model and loss values: `lift`, not inject
            sections.setdefault(section, []).append(name)
    if not sections:
        return configs
    out = []
    for config in configs:
        config = ml_collections.ConfigDict(config.to_dict())
        for section, names in sections.items():
            optim = config
            for part in section.split("."):
                optim = optim[part]
            have = [k for k in str(optim.get("inject", "") or "").split(",") if k]
            with optim.unlocked():
                optim.inject = ",".join(have + [n for n in names if n not in have])
        out.append(config)
    return out


def plan_groups(points: list, configs: dict) -> list[list]:
    """The points (runner.SweepPoint) in groups of equal settings (configs equal but for the values that may
    vary inside one program, `varies_inside`), in the order of their first point; a group of one point runs
    alone."""
    groups: dict[str, list] = {}
    for p in points:
        groups.setdefault(_setting(configs[p.index]), []).append(p)
    return list(groups.values())


CAN_VARY = ("seed, optimizer scalars (optim.learning_rate, weight_decay, b1, b2, eps, momentum, ...) and model "
            "and loss numbers (model.dropout, loss.label_smoothing, ...)")


def shard_groups(points: list, configs: dict, shard: tuple[int, int]) -> list:
    """The points of shard (index, count) of a together sweep: the groups (`plan_groups` over every point) dealt
    round robin, whole, when there are at least `count` of them; else each group cut first into equal runs of
    members, ceil(count / groups) per group, so every shard gets work. Stable: every shard computes the same
    deal from the same sweep. In point order."""
    index, count = shard
    groups = plan_groups(points, configs)
    parts = -(-count // len(groups)) if groups else 1
    chunks = []
    for group in groups:
        size = -(-len(group) // parts)
        chunks += [group[i:i + size] for i in range(0, len(group), size)]
    mine = {p.index for number, chunk in enumerate(chunks) if number % count == index for p in chunk}
    return [p for p in points if p.index in mine]


def plan_lines(groups: list[list]) -> list[str]:
    """The plan of `plan_groups`, one line per group (and a note when no point has a partner)."""
    count = sum(len(g) for g in groups)
    lines = [f"Together: {count} points in {len(groups)} group(s):"]
    for number, group in enumerate(groups):
        if len(group) > 1:
            lines.append(f"  group {number}: {len(group)} members in one program: " + ", ".join(p.tag for p in group))
        else:
            lines.append(f"  group {number}: 1 point, runs alone: {group[0].tag}")
    if groups and all(len(g) == 1 for g in groups):
        keys = []
        for p in (g[0] for g in groups):
            keys += [k for k in p.overrides if not varies_inside(k) and k not in keys]
        lines.append(f"Note: no two points differ only in {CAN_VARY} (they differ in {', '.join(keys) or 'other keys'}"
                     f", which change the program, or in turning an optional part (an optimizer's, a dropout, a "
                     f"loss term) on or off), so every "
                     f"point runs on its own.")
    return lines


def _group_tag(points: list) -> str:
    """The group's name: its shared settings and the values its members take, e.g.
    "optim.name=sgd,optim.learning_rate=0.1-0.3,seed=0-1" (members in order)."""
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    shared = [f"{k}={points[0].overrides[k]}" for k in keys
              if all(p.overrides.get(k) == points[0].overrides.get(k) for p in points)]
    varying = [f"{k}=" + "-".join(str(p.overrides.get(k, "default")) for p in points) for k in keys
               if not all(p.overrides.get(k) == points[0].overrides.get(k) for p in points)]
    tag = ",".join(shared + varying)
    if len(tag) > 150:   # a file name's limit is 255 bytes
        import hashlib
        tag = tag[:100] + "-" + hashlib.sha1(tag.encode()).hexdigest()[:12]
    return tag


# ==============================================================================================
# The member-stacked Experiment
# ==============================================================================================

@dataclasses.dataclass(frozen=True)
class Lifted:
    """The members' functions as one: `lifted(values, *args)` is `fns[i](*args)` for `values` =
    `[v[i] for v in lifted.values]`. `jaxpr` is the first member's program with the constants in which the
    members differ (a dropout's keep probability, a loss weight) turned into trailing constants read from
    `values` (its shared constants are `consts`); `values[k]` holds every member's k-th such constant,
    [members, ...]. `text` is the program as jaxpr text."""
    jaxpr: Any
    consts: list
    values: tuple
    out_tree: Any
    text: str

    def __call__(self, values: Any, *args: Any) -> Any:
        from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

        closed = ClosedJaxpr(self.jaxpr, [*self.consts, *values])
        return jax.tree.unflatten(self.out_tree, jaxpr_as_fun(closed)(*jax.tree.leaves(args)))


def _host(x: Any) -> np.ndarray:
    """A traced program's constant on the host (a typed PRNG key as its key data)."""
    x = jnp.asarray(x) if not isinstance(x, np.ndarray) else x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


_NESTED = {"scan": "consts", "remat2": "append", "checkpoint": "append"}   # where lift reaches inside: a loop's
                                   # body (its constants) and a remat (its inputs), e.g. nn.scan'd, remat'd layers


def _lift_level(jaxprs: list) -> tuple[list, list, list, list] | None:
    """The members' jaxprs of one level walked in lockstep: (equations per member, outputs per member, columns,
    inputs per member), where each literal in which the members differ, at this level or inside a loop body or
    a remat below it, is replaced by a variable of this level, one per distinct column of values
    ((type, values) in `columns`); `inputs[m][k]` is member m's variable for columns[k], which the caller binds.
    None where the members differ in their operations."""
    from jax.extend.core import ClosedJaxpr, Literal, Var

    base = jaxprs[0]
    if any(len(j.eqns) != len(base.eqns) or len(j.outvars) != len(base.outvars) for j in jaxprs[1:]):
        return None
    columns: list[tuple] = []
    inputs: list[list] = [[] for _ in jaxprs]

    def variables(column: tuple, avals: list) -> list:   # this level's variable, per member, for a column
        if column not in columns:
            columns.append(column)
            for inp, aval in zip(inputs, avals):
                inp.append(Var(aval))
        return [inp[columns.index(column)] for inp in inputs]

    def lifted(atoms_per_member: list) -> list[list]:   # the members' operands, differing literals replaced
        out = [list(atoms) for atoms in atoms_per_member]
        for j, atoms in enumerate(zip(*atoms_per_member)):
            if (all(isinstance(x, Literal) and x.aval == atoms[0].aval for x in atoms)
                    and any(not np.array_equal(x.val, atoms[0].val) for x in atoms)):
                column = (str(atoms[0].aval), tuple(np.asarray(x.val).item() for x in atoms))
                for m, var in enumerate(variables(column, [x.aval for x in atoms])):
                    out[m][j] = var
        return out

    new_eqns: list[list] = [[] for _ in jaxprs]
    for i in range(len(base.eqns)):
        eqns = [j.eqns[i] for j in jaxprs]
        if any(e.primitive != eqns[0].primitive or len(e.invars) != len(eqns[0].invars) for e in eqns[1:]):
            return None
        invars = lifted([e.invars for e in eqns])
        where = _NESTED.get(eqns[0].primitive.name)
        if where is not None:
            subs = [e.params["jaxpr"] for e in eqns]
            closed_sub = isinstance(subs[0], ClosedJaxpr)
            inner = _lift_level([sub.jaxpr if closed_sub else sub for sub in subs])
            if inner is None:
                return None
            sub_eqns, sub_outvars, sub_columns, sub_inputs = inner
            if sub_columns:
                outer = [variables(c, [sub_inputs[m][k].aval for m in range(len(eqns))])
                         for k, c in enumerate(sub_columns)]
                for m, (e, sub) in enumerate(zip(eqns, subs)):
                    mine = [outer[k][m] for k in range(len(sub_columns))]
                    open_sub = sub.jaxpr if closed_sub else sub
                    if where == "consts":   # a loop: the new inputs are its first constants
                        body = open_sub.replace(invars=sub_inputs[m] + open_sub.invars, eqns=sub_eqns[m],
                                                outvars=sub_outvars[m])
                        params = {**e.params, "jaxpr": ClosedJaxpr(body, sub.consts),
                                  "num_consts": e.params["num_consts"] + len(mine)}
                        if "linear" in params:   # older JAX's scan: one flag per operand
                            params["linear"] = (False,) * len(mine) + tuple(params["linear"])
                        invars[m] = mine + invars[m]
                    else:                   # a remat: more inputs after its own
                        body = open_sub.replace(invars=open_sub.invars + sub_inputs[m], eqns=sub_eqns[m],
                                                outvars=sub_outvars[m])
                        params = {**e.params, "jaxpr": ClosedJaxpr(body, sub.consts) if closed_sub else body}
                        invars[m] = invars[m] + mine
                    eqns[m] = eqns[m].replace(params=params)
        for m, e in enumerate(eqns):
            new_eqns[m].append(e.replace(invars=invars[m]))
    return new_eqns, lifted([j.outvars for j in jaxprs]), columns, inputs


def _nested_consts(jaxpr: Any) -> list[np.ndarray]:
    """The constants of every closed jaxpr nested in `jaxpr`'s equations (which its text does not print)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    out = []
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                if isinstance(sub, ClosedJaxpr):
                    out += [_host(c) for c in sub.consts] + _nested_consts(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    out += _nested_consts(sub)
    return out


def lift(fns: list[Callable], *args: Any) -> Lifted | None:
    """The members' functions `fns` (each traced at `args`, concrete or abstract) as one program that takes
    their differing constants as inputs (`Lifted`), or None when they differ otherwise: in their operations,
    shapes, or a constant inside a nested computation other than a loop body or a remat (a `lax.cond` branch,
    a custom derivative, an array closed over by a jitted inner function). Each member's constants are taken
    from its own trace, so each computes exactly its own program: a member's dropout rate or loss weight is
    whatever its own code made of its config (`1 - rate`, `rate / classes`, ...), in a scanned, rematerialised
    layer as well."""
    traced = [jax.make_jaxpr(fn, return_shape=True)(*args) for fn in fns]
    closed = [c for c, _ in traced]
    if any(len(c.jaxpr.constvars) != len(closed[0].jaxpr.constvars) for c in closed[1:]):
        return None
    level = _lift_level([c.jaxpr for c in closed])
    if level is None:
        return None
    eqns, outvars, columns, inputs = level
    consts = [[_host(c) for c in closed_jaxpr.consts] for closed_jaxpr in closed]
    if any(c[k].shape != consts[0][k].shape or c[k].dtype != consts[0][k].dtype
           for c in consts[1:] for k in range(len(c))):
        return None
    differing = [k for k in range(len(consts[0])) if any(not np.array_equal(c[k], consts[0][k]) for c in consts[1:])]
    if any(jax.dtypes.issubdtype(jnp.asarray(closed[0].consts[k]).dtype, jax.dtypes.prng_key) for k in differing):
        return None   # a closed-over key that differs: not a constant to stack
    # the constants of nested closed jaxprs (JAX usually hoists them to the top) do not show in the programs'
    # text: they must be equal
    nested = [_nested_consts(c.jaxpr) for c in closed]
    if any(len(n) != len(nested[0]) or any(a.shape != b.shape or not np.array_equal(a, b)
                                           for a, b in zip(n, nested[0])) for n in nested[1:]):
        return None

    def with_inputs(m: int):   # member m's program, its differing constants and literals as trailing constvars
        jaxpr = closed[m].jaxpr
        shared = [v for k, v in enumerate(jaxpr.constvars) if k not in differing]
        moved = [jaxpr.constvars[k] for k in differing]
        return jaxpr.replace(constvars=shared + moved + inputs[m], eqns=eqns[m], outvars=outvars[m])

    programs = [with_inputs(m) for m in range(len(closed))]
    texts = [str(p) for p in programs]
    if any(t != texts[0] for t in texts[1:]):
        return None
    values = tuple(np.stack([c[k] for c in consts]) for k in differing) + tuple(
        np.asarray(column, var.aval.dtype) for (_, column), var in zip(columns, inputs[0]))
    shared_consts = [c for k, c in enumerate(closed[0].consts) if k not in differing]
    return Lifted(jaxpr=programs[0], consts=shared_consts, values=values,
                  out_tree=jax.tree.structure(traced[0][1]), text=texts[0])


KEPT = "_kept"   # a member's metric under train.nonfinite=skip: 1 for a step whose update it kept, 0 if skipped


INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _injected_sections(configs: list) -> dict[str, list[str]]:
    """{optimizer section: the scalars its `inject` key names} of the members' configs (`injected_configs`)."""
    from depthlab.train.rundir import flat_config

    flat = flat_config(configs[0].to_dict())
    return {key.rpartition(".")[0]: [k for k in str(value).split(",") if k]
            for key, value in flat.items() if key.rpartition(".")[2] == "inject" and value
            and _optim_section(key.rpartition(".")[0])}


def member_hyperparams(configs: list) -> dict[str, np.ndarray]:
    """{scalar: [members] values} of the one optimizer section whose scalars the members hold in their state
    ({} when none is injected)."""
    sections = _injected_sections(configs)
    if len(sections) != 1:
        return {}
    (section, names), = sections.items()

    def value(config, name):
        for part in section.split("."):
            config = config[part]
        return float(config[name])
    return {name: np.array([value(c, name) for c in configs]) for name in names}


def check_members(experiments: list, configs: list) -> str | None:
    """None when the members can be one program; else why not (one line). They can when each has train data,
    their states and first batches have equal shapes, their optimizer states hold the optimizer scalars in which
    they differ, and their traced inits, train and eval steps are one program but for top-level constants
    (`lift`: the seed enters through the state's keys and the data, a dropout rate or a loss weight as a
    constant). The runner has already checked each member alone (`check_experiment`)."""
    return member_check(experiments, configs)[0]


@dataclasses.dataclass(frozen=True)
class MemberPrograms:
    """What `member_check` traced: the members' init, train step and eval step as one program each (`Lifted`;
    eval None when the experiment has none)."""
    init: Lifted
    train: Lifted
    eval: Lifted | None


def member_check(experiments: list, configs: list, prng_impl: str = "threefry"
                 ) -> tuple[str | None, MemberPrograms | None]:
    """(`check_members`'s answer, the members' programs (`MemberPrograms`, whose train step's jaxpr text
    `resolve_mode` reads); None when they cannot be one program). `prng_impl`: the resolved implementation the
    train steps draw with (`train.step.with_prng_impl`)."""
    from depthlab.train.step import with_prng_impl

    from depthlab.train.data import batch_spec, first_batch

    first = experiments[0]
    if first.train_batches is None:
        return "the experiment makes its own data in its step (no train_batches)", None
    if len(sections := _injected_sections(configs)) > 1:
        return (f"the scalars of more than one optimizer section differ ({', '.join(sections)}); only one "
                f"section's can vary inside one program"), None
    abstract, batches = [], []
    for experiment, config in zip(experiments, configs):
        abstract.append(nn.meta.unbox(jax.eval_shape(experiment.init, jax.random.key(int(config.seed)))))
        batch = first_batch(experiment.train_batches(0))
        batches.append(batch_spec(batch))

    def layout(tree):   # paths, shapes and dtypes (the static fields, e.g. each state's own `tx`, aside)
        return [(jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]

    if any(layout(a) != layout(abstract[0]) for a in abstract):
        return "their states differ in structure or shape", None
    if hyperparams := member_hyperparams(configs):
        nodes = [n for n in jax.tree.leaves(abstract[0], is_leaf=lambda n: isinstance(n, INJECTED))
                 if isinstance(n, INJECTED)]
        if not nodes or any(set(hyperparams) - set(n.hyperparams) for n in nodes):
            section = next(iter(sections))
            return (f"their {', '.join(hyperparams)} differ but the experiment's optimizer state does not hold them "
                    f"(its optimizer is not `make_optimizer(config.{section})`, which reads {section}.inject)"), None
    if any(b != batches[0] for b in batches):
        return "their batches differ in shape", None
    keys = [k for k in varying_keys(configs) if k not in TOGETHER_KEYS and not k.endswith(".inject")]
    beyond = (f"differ in more than the constants that {', '.join(keys) or 'the seed'} set (a shape, a Python branch, "
              f"or a constant inside a lax.cond branch, a while loop or a custom derivative)")
    init = lift([e.init for e in experiments], jax.random.key(0))
    if init is None:
        return f"their inits {beyond}", None
    train = lift([with_prng_impl(e.train_step, prng_impl) for e in experiments], abstract[0], batches[0])
    if train is None:
        return f"their train steps {beyond}", None
    evaluation = None
    if first.eval_step is not None and first.eval_batches is not None:
        try:
            batch = first_batch(first.eval_batches())
        except StopIteration:
            batch = None
        if batch is not None:
            evaluation = lift([e.eval_step for e in experiments], abstract[0], batch_spec(batch))
            if evaluation is None:
                return f"their eval steps {beyond}", None
    return None, MemberPrograms(init=init, train=train, eval=evaluation)


def _flat(metrics_by_member: dict, count: int) -> dict:
    """{name: [members] array} -> {"member<i>/name": scalar}."""
    return {member_prefix(i) + name: value[i] for name, value in metrics_by_member.items() for i in range(count)}


def _stacked_batches(iterators: list) -> Iterable[dict]:
    """The members' batches stacked as [rows, members, ...]; members whose streams end at different batches
    fail (their eval sets differ in size: they cannot be evaluated together)."""
    try:
        try:
            for batches in zip(*iterators, strict=True):
                yield {key: np.stack([b[key] for b in batches], axis=1) for key in batches[0]}
        except ValueError as e:
            if "zip()" not in str(e):
                raise
            raise ValueError(f"the members' data streams differ in length ({e}); their data splits differ in size, "
                             f"so they cannot train together: run the sweep without --together") from None
    finally:
        for iterator in iterators:
            if hasattr(iterator, "close"):
                iterator.close()


def member_state(state: MemberStack, i: int) -> Any:
    """Member i's own state (the experiment's state type) sliced from the group's."""
    return jax.tree.map(lambda x: x[i], state.members)


MODES = ("auto", "vmap", "map", "unroll")


def resolve_mode(mode: str, experiment, config: ml_collections.ConfigDict, platform: str,
                 program: str | None = None) -> tuple[str | None, str]:
    """("vmap" | "map" | "unroll", how) for `mode`, or (None, why) when "auto" finds that the members are faster
    one after the other. "auto" is vmap, except on CPU for a step with convolutions: XLA:CPU runs a vmapped
    convolution as one grouped convolution and a convolution inside a rolled loop (`lax.map`) several times
    slower than alone, and even unrolled the members ran 0.7x a separate run's steps (mnist1d_cnn, 8 members:
    78 member-steps/s vmapped, 19 mapped, 133 unrolled, 187 one run at a time; docs/sweeps.md), so there
    the points run one after the other. `program`: the train step's jaxpr text, when already traced."""
    if mode not in MODES:
        raise ValueError(f"together mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode, ""
    if platform != "cpu":
        return "vmap", "auto"
    if program is None:   # `member_check` has traced it already when it checked the members
        from depthlab.train.data import batch_spec, first_batch

        state = nn.meta.unbox(jax.eval_shape(experiment.init, jax.random.key(int(config.seed))))
        program = str(jax.make_jaxpr(experiment.train_step)(
            state, batch_spec(first_batch(experiment.train_batches(0)))).jaxpr)
    if "conv_general_dilated" in program:
        return None, ("auto: the step has convolutions, which XLA:CPU runs slower over a member axis (vmap 0.4x, "
                      "map 0.1x, unroll 0.7x a separate run's steps); --together vmap|map|unroll forces one program")
    return "vmap", "auto"


def over_members(fn: Callable, members: Any, batch: Any, mode: str = "vmap") -> Any:
    """fn(member state, member batch) for every member: `members` has a leading [members] axis, `batch` a
    [rows, members, ...] one. "vmap": one vectorised computation (the speed-up on accelerators; on XLA:CPU a
    batched convolution or reduction may round differently from the single one: ~1e-7 relative per step,
    which training can grow); "map": `lax.map`, the members one after the other inside the one program
    (the separate run's arithmetic; the saving is the per-run start, compile, eval and checkpoint work);
    "unroll": the same, each member's step traced on its own inside the program (no loop: XLA:CPU runs
    convolutions in a rolled loop slowly; compiles as many copies of the step as there are members)."""
    if mode == "vmap":
        return jax.vmap(fn, in_axes=(0, 1))(members, batch)
    if mode == "map":
        return jax.lax.map(lambda pair: fn(*pair), (members, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batch)))
    if mode == "unroll":
        count = jax.tree.leaves(members)[0].shape[0]
        outs = [fn(jax.tree.map(lambda x: x[i], members), jax.tree.map(lambda x: x[:, i], batch)) for i in range(count)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    raise ValueError(f"together mode must be one of {', '.join(MODES)}, got {mode!r}")


def _finite_per_member(tree: Any, count: int) -> jax.Array:
    """[members] bool: every floating value of member i (leading axis) is finite."""
    checks = [jnp.all(jnp.isfinite(x).reshape(count, -1), axis=1) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks), axis=0) if checks else jnp.ones((count,), bool)


def _select_members(keep: jax.Array, new: Any, old: Any) -> Any:
    """Per member: `new` where keep[i], else `old` (typed PRNG keys through their raw data)."""
    def select(a, b):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(select(jax.random.key_data(a), jax.random.key_data(b)),
                                            impl=jax.random.key_impl(a))
        return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(select, new, old)


def with_member_axis(members: Any) -> Any:
    """The stacked state's leaves named for placement: the leading axis `train.parallel.MEMBERS` (never sharded),
    then the member's own logical names where it has them, so that under any mesh strategy (replicated, fsdp,
    tensor) each member is placed as its separate run is and every device holds every member (the batch rows,
    not the members, are split over the data-parallel devices)."""
    from depthlab.train.parallel import MEMBERS

    def name(x):
        if isinstance(x, nn.meta.AxisMetadata):
            return x.add_axis(0, {nn.PARTITION_NAME: MEMBERS})
        return nn.LogicallyPartitioned(x, (MEMBERS,) + (None,) * (jnp.ndim(x) - 1))
    return jax.tree.map(name, members, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def stacked_experiment(experiments: list, configs: list, prng_impl: str = "auto", mode: str = "vmap",
                       nonfinite: str = "stop", programs: MemberPrograms | None = None):
    """One Experiment training the members together: member i starts from `experiments[i].init` at
    `configs[i].seed`'s key, reads `experiments[i]`'s batches, and steps with the (identical, see
    `check_members`) train and eval steps of the experiments, over the members as `mode` says
    (`over_members`). Metrics are "member<i>/<name>".

    nonfinite (the members' train.nonfinite), so that one member's non-finite step never touches the others:
    "stop": a member whose metrics or new state are not finite is frozen at its last finite state, its step
    recorded in `failed_at` and its metrics reported as 0 from then on (once all are frozen the metrics are NaN
    and the engine stops the group). "skip": a member whose metrics are not finite keeps its state (its step
    advances), as a separate run's skip does; its metrics are reported as 0 with "member<i>/_kept" 0 (1 for a
    kept step), from which `member_records` rebuilds its separate run's means and `skipped_steps`.

    programs: what `member_check` traced for this `prng_impl` (resolved); traced here when not given. Where the
    members differ in constants of their programs (`lift`: a dropout rate, a loss weight, an init scale), each
    member runs the one program with its own constants as inputs; else the first member's functions run."""
    from depthlab.train import Experiment
    from depthlab.train.step import resolve_prng_impl, with_prng_impl

    count, first = len(experiments), experiments[0]
    key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(c.seed)))) for c in configs])
    # fit's own PRNG conversion looks for `state.rng`, which the group state does not have: each member's step
    # is converted here instead, so the members draw with the implementation a separate run would.
    impl = resolve_prng_impl(prng_impl, jax.devices()[0].platform)
    if programs is None:
        why, programs = member_check(experiments, configs, impl)
        if why:
            raise ValueError(f"these members cannot train as one program: {why}")

    def member_fn(lifted: Lifted | None, fn: Callable) -> tuple[Callable, tuple]:
        """(fn'(constants, *args), the members' constants): the first member's fn when they share them."""
        if lifted is None or not lifted.values:
            return (lambda _values, *args: fn(*args)), ()
        return lifted, tuple(jnp.asarray(v) for v in lifted.values)

    init_fn, init_values = member_fn(programs.init, first.init)
    member_step, step_values = member_fn(programs.train, with_prng_impl(first.train_step, impl))
    member_eval, eval_values = member_fn(programs.eval, first.eval_step)

    def init(_rng):
        keys = jax.random.wrap_key_data(jnp.asarray(key_data))
        # lax.map, not vmap, whatever the mode: each member's init is the separate run's computation, bit for
        # bit, and it compiles as one init (a vmapped init compiled ~2x slower on CPU and is run only once)
        # (injected optimizer scalars are constants of each member's init: lifted, each member holds its own)
        members = jax.lax.map(lambda pair: init_fn(pair[1], pair[0]), (keys, init_values))
        members = with_member_axis(members)
        return MemberStack(step=jnp.zeros((), jnp.int32), members=members, failed_at=jnp.zeros((count,), jnp.int32))

    def train_step(state, batch):
        members, metrics = over_members(lambda pair, b: member_step(pair[0], pair[1], b),
                                        (step_values, state.members), batch, mode)
        failed_at = state.failed_at
        if nonfinite == "skip":
            kept = _finite_per_member(metrics, count)
            old = state.members.replace(step=members.step) if hasattr(state.members, "replace") else state.members
            members = _select_members(kept, members, old)
            metrics = jax.tree.map(lambda m: jnp.where(kept.reshape((-1,) + (1,) * (m.ndim - 1)), m,
                                                       jnp.zeros((), m.dtype)), metrics)
            metrics = {**metrics, KEPT: kept.astype(jnp.float32)}
        elif nonfinite == "stop":
            ok = _finite_per_member(metrics, count) & _finite_per_member(members, count)
            alive = (failed_at == 0) & ok
            failed_at = jnp.where((failed_at == 0) & ~ok, state.step + 1, failed_at)
            members = _select_members(alive, members, state.members)
            # a frozen member reports 0; once every member is frozen, NaN: the engine's check stops the group
            # (as the separate runs would have stopped) instead of stepping frozen members to the end
            frozen = jnp.where(jnp.all(failed_at > 0), jnp.nan, 0.0)
            metrics = jax.tree.map(lambda m: jnp.where(alive.reshape((-1,) + (1,) * (m.ndim - 1)), m,
                                                       frozen.astype(m.dtype)), metrics)
        return MemberStack(step=state.step + 1, members=members, failed_at=failed_at), _flat(metrics, count)

    def eval_step(state, batch):
        return _flat(over_members(lambda pair, b: member_eval(pair[0], pair[1], b), (eval_values, state.members),
                                  batch, mode), count)

    def evaluate(state):
        out = {}
        for i, experiment in enumerate(experiments):
            for k, v in (experiment.evaluate(member_state(state, i)) or {}).items():
                out[member_prefix(i) + k.removeprefix("eval/")] = v
        return out

    has_eval = first.eval_step is not None and first.eval_batches is not None
    return Experiment(
        init=init, train_step=train_step,
        train_batches=lambda start: _stacked_batches([e.train_batches(start) for e in experiments]),
        eval_step=eval_step if has_eval else None,
        eval_batches=(lambda: _stacked_batches([e.eval_batches() for e in experiments])) if has_eval else None,
        evaluate=evaluate if first.evaluate is not None else None)


def as_run_state(state: Any, experiment, config: ml_collections.ConfigDict) -> Any:
    """A member's state (trained with injected optimizer scalars) in the layout of its separate run's state: the
    optimizer's own state in place of each injected one (`optim.without_injected`), and the static fields (the
    optimizer) of `experiment`'s, the member's experiment built from its recorded config."""
    from depthlab.train.optim import without_injected

    template = nn.meta.unbox(jax.eval_shape(experiment.init, jax.random.key(int(config.seed))))
    leaves = jax.tree.leaves(without_injected(state))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def member_records(records: Iterable[dict], i: int) -> list[dict]:
    """Member i's metrics.jsonl records from the group's: its "member<i>/" metrics without the prefix (and
    "eval/member<i>/x" as "eval/x"), and the group's own keys (step, perf/*) as they are."""
    prefix, out = member_prefix(i), []
    for record in records:
        mine = {}
        for key, value in record.items():
            head, _, rest = key.rpartition(prefix) if prefix in key else ("", "", "")
            if rest and head in ("", "eval/"):
                mine[head + rest] = value
            elif not key.startswith("member") and not key.startswith("eval/member"):
                mine[key] = value
        out.append(mine)
    return out


def unskipped(records: list[dict], max_skipped_fraction: float) -> tuple[list[dict], str | None]:
    """A member's records (`member_records`) of a group trained under train.nonfinite=skip, as its separate run
    logs them: each train mean over the steps it kept (the group averaged 0 for a skipped step: mean / mean of
    `_kept`; keys left out where it kept none), `skipped_steps` counted, and cut where the separate run stops
    (its skipped share above `max_skipped_fraction` at a logged step). Returns (records, the reason it stopped
    or None)."""
    out, skipped, last = [], 0, 0
    for record in records:
        record = dict(record)
        if KEPT in record:    # a record with train means: the rows since the last one, all in the group
            kept = float(record.pop(KEPT))
            rows, last = record["step"] - last, record["step"]
            skipped += round(rows * (1.0 - kept))
            for key in [k for k in record if k != "step" and not k.startswith(("eval/", "perf/"))]:
                if kept > 0:
                    record[key] = record[key] / kept
                else:
                    del record[key]
            record["skipped_steps"] = skipped
            if skipped > max_skipped_fraction * record["step"]:
                return out, (f"NonFiniteError: train.nonfinite=skip dropped {skipped} of the first {record['step']} "
                             f"steps' updates ({skipped / record['step']:.0%}, more than train.max_skipped_fraction="
                             f"{max_skipped_fraction:g}): the loss or gradients are non-finite (this member alone; "
                             f"the other members of its group went on). Lower optim.learning_rate or set "
                             f"optim.clip_norm (e.g. 1.0), or raise train.max_skipped_fraction")
        out.append(record)
    return out, None


# ==============================================================================================
# Running a sweep's groups
# ==============================================================================================

def _run_record(name: str, preset: str | None, overrides: dict) -> dict:
    """experiment.json of a point, as `runner.run_experiment` writes it (so `finished_run` recognises it)."""
    from depthlab.research.registry import canonical_name, code_fingerprint

    return {"experiment": canonical_name(name), "preset": preset,
            "overrides": {k.removeprefix("config."): str(v) for k, v in sorted(overrides.items())},
            "code": code_fingerprint(name)}


def write_member(experiment, config: ml_collections.ConfigDict, state: Any, records: list[dict], workdir: str,
                 record: dict, finished: bool = True) -> dict:
    """Member `state` and its metric `records` written as the run directory `workdir` of a separate run: under
    its lock, config.json and experiment.json (open_run), metrics.jsonl (and TensorBoard), its state as its
    own checkpoint at its step, then the experiment's `finish`, curves.png and summary.json (`finish_run`).
    Not `finished` (a member that failed): the files up to metrics.jsonl only, as a failed run leaves them.
    Returns its final metrics."""
    from depthlab.train import (MetricWriter, final_metrics, finish_run, open_checkpoints, open_run,
                                with_resolved_train)

    config = with_resolved_train(config)
    tc = config.train
    with open_run(workdir, config, record=record):
        for stale in ("metrics.jsonl", "metrics.window.json"):
            if os.path.lexists(os.path.join(workdir, stale)):
                os.remove(os.path.join(workdir, stale))
        writer = MetricWriter(workdir, tensorboard=bool(tc.tensorboard))
        try:
            for r in records:
                writer.write(r["step"], {k: v for k, v in r.items() if k != "step"})
        finally:
            writer.close()
        if not finished:
            return final_metrics(records)
        step = int(jax.device_get(state.step))
        ckpt = open_checkpoints(workdir, config)
        try:
            if step not in ckpt.all_steps():
                last = records[-1] if records else {}
                best = {tc.best_metric: last[tc.best_metric]} if tc.best_metric and tc.best_metric in last else None
                ckpt.save(step, state, metrics=best)
        finally:
            ckpt.close()
        result = finish_run(experiment, state, workdir)
    return result.metrics


def run_together(name: str, points: list, configs: dict, preset: str | None, overrides: dict,
                 run_point: Callable[[Any], dict], signals: Any = None, mode: str = "vmap") -> list[dict]:
    """Runs a sweep's `points` (runner.SweepPoint; `configs[index]` their built configs) in groups: points
    equal but for the seed train together (`run_group`), the others through `run_point` (the runner's
    one-point path). Prints the plan first, one line per group. Returns one record per point, in their order
    (the records of `runner.run_sweep`). `signals` (the runner's): once it names a signal, no group starts.
    `mode`: "auto", "vmap" or "map" (`over_members`, `resolve_mode`)."""
    if mode not in MODES:
        raise ValueError(f"together mode must be one of {', '.join(MODES)}, got {mode!r}")
    groups = plan_groups(points, configs)
    print("\n" + "\n".join(plan_lines(groups)))
    by_index: dict[int, dict] = {}
    for group in groups:
        if signals is not None and signals.signal_name:
            break
        if len(group) == 1:
            print(f"\n== Sweep point #{group[0].index}: {group[0].tag}")
            by_index[group[0].index] = run_point(group[0])
            continue
        for r in run_group(name, group, configs, preset, overrides, run_point, signals, mode):
            by_index[r["index"]] = r
    return [by_index.get(p.index, {"index": p.index, "point": p.tag, "workdir": p.workdir, "status": "not started",
                                   "metrics": {}}) for p in points]


def run_group(name: str, group: list, configs: dict, preset: str | None, overrides: dict,
              run_point: Callable[[Any], dict], signals: Any = None, mode: str = "vmap") -> list[dict]:
    """Trains the points of one group (configs equal but for the seed) as one program; see the module's
    docstring. Members already finished (by a separate run or an earlier together run) are kept as they are
    and only the others train (all of them when the whole group's scratch directory exists: it resumes); when
    all are finished, nothing trains. Falls back to `run_point` for each point when `check_members` says no."""
    from depthlab.research.registry import load_experiment
    from depthlab.research.runner import finished_run, is_point_error

    start = time.perf_counter()
    root = os.path.dirname(group[0].workdir)
    group_dir = os.path.join(root, GROUP_FOLDER, _group_tag(group))
    member_configs = [configs[p.index] for p in group]
    member_overrides = [{**overrides, **p.overrides} for p in group]
    records = [{"index": p.index, "point": p.tag, "workdir": p.workdir, "metrics": {}, "together": group_dir}
               for p in group]
    done = [finished_run(name, p.workdir, preset, o) for p, o in zip(group, member_overrides)]
    pending = [p for p, d in zip(group, done) if d is None]
    if pending and len(pending) < len(group) and not os.path.isdir(group_dir):
        print(f"\n== Together: {len(group) - len(pending)} of {len(group)} members already finished "
              f"({', '.join(p.tag for p, d in zip(group, done) if d is not None)}); the others train.")
        ran = [run_point(pending[0])] if len(pending) == 1 else run_group(name, pending, configs, preset, overrides,
                                                                          run_point, signals, mode)
        by_index = {r["index"]: r for r in ran}
        return [by_index.get(p.index) or {**r, "status": "finished", "metrics": d["metrics"], "summary": d["summary"],
                                          "seconds": 0.0}
                for p, r, d in zip(group, records, done)]
    print(f"\n== Together: {len(group)} members ({', '.join(p.tag for p in group)}) in {group_dir}")
    if all(d is not None for d in done):
        print("Every member already finished; nothing to do.")
        for r, d in zip(records, done):
            r.update(status="finished", metrics=d["metrics"], summary=d["summary"], seconds=0.0)
        shutil.rmtree(group_dir, ignore_errors=True)
        return records
    try:
        module = load_experiment(name)
        if not hasattr(module, "make_experiment"):
            why = "the experiment is a self-contained study (run), not trained by fit"
        else:
            # the members as they train: differing optimizer scalars held in their optimizer states
            train_configs = injected_configs(member_configs)
            train_experiments = [module.make_experiment(c) for c in train_configs]
            experiments = (train_experiments if train_configs is member_configs
                           else [module.make_experiment(c) for c in member_configs])   # as their runs record them
            from depthlab.train import with_resolved_train
            from depthlab.train.step import resolve_prng_impl

            group_config = with_resolved_train(train_configs[0])   # the group trains with the first member's
            impl = resolve_prng_impl(str(group_config.train.prng_impl), jax.devices()[0].platform)
            why, programs = member_check(train_experiments, train_configs, impl)
            if not why:
                mode, how = resolve_mode(mode, train_experiments[0], train_configs[0], jax.devices()[0].platform,
                                         programs.train.text)
                if mode is None:
                    why = how
                else:
                    print(f"The members train as one program, over the members by {mode}"
                          + (f" ({how})" if how else ""))
    except Exception as e:
        if not is_point_error(e):
            raise
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if why:
        print(f"Note: these points cannot train together ({why}); they run one after the other.")
        out = []
        for p in group:
            if signals is not None and signals.signal_name:
                out.append({**records[len(out)], "status": "not started"})
                continue
            print(f"\n== Sweep point #{p.index}: {p.tag}")
            out.append(run_point(p))
        return out

    from depthlab.train import fit
    from depthlab.train.metric_writers import final_metrics, read_metrics

    with group_config.unlocked():
        # the members' metrics are "member<i>/..."; the best checkpoint by a member's metric is the member's
        # business (its own directory); TensorBoard files go to the members' directories.
        group_config.train.best_metric = ""
        group_config.train.tensorboard = False
        group_config.train.plot = False     # each member draws its own curves.png
    try:
        result = fit(stacked_experiment(train_experiments, train_configs, group_config.train.prng_impl, mode,
                                        nonfinite=group_config.train.nonfinite, programs=programs),
                     group_config, group_dir)
    except Exception as e:
        if not is_point_error(e):
            raise
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        print(f"\nTogether group {group_dir} failed: {reason}")
        for i, r in enumerate(records):
            r.update(status="failed", error=reason, seconds=time.perf_counter() - start,
                     metrics=final_metrics(member_records(read_metrics(group_dir), i)))
        return records
    group_records = read_metrics(group_dir)
    if result.preempted:
        if signals is not None:
            signals.signal_name = signals.signal_name or result.preempted_by
        for i, r in enumerate(records):   # the metrics logged so far; the members resume with the group
            r.update(status="interrupted", signal=result.preempted_by, seconds=time.perf_counter() - start,
                     metrics={**final_metrics(member_records(group_records, i)), "step": result.metrics.get("step")})
        return records
    failed_at = np.asarray(jax.device_get(result.state.failed_at))
    for i, (p, experiment, config, r) in enumerate(zip(group, experiments, member_configs, records)):
        if done[i] is not None:
            r.update(status="finished", metrics=done[i]["metrics"], summary=done[i]["summary"])
            continue
        failed, reason = int(failed_at[i]), None
        mine = [m for m in member_records(group_records, i) if not failed or m["step"] < failed]
        if failed:
            reason = (f"NonFiniteError: non-finite training metric or state at step {failed} (this member was "
                      f"frozen there; the other members of its group went on). Lower optim.learning_rate or set "
                      f"optim.clip_norm (e.g. 1.0)")
        if group_config.train.nonfinite == "skip":
            mine, reason = unskipped(mine, float(group_config.train.max_skipped_fraction))
        state = member_state(result.state, i)
        if train_configs is not member_configs:   # the separate run's optimizer state: no injected scalars
            state = as_run_state(state, experiment, config)
        metrics = write_member(experiment, config, state, mine, p.workdir,
                               _run_record(name, preset, member_overrides[i]), finished=reason is None)
        r.update(status="finished", metrics=metrics)
        if reason:
            print(f"\nSweep point #{p.index} ({p.tag}) failed: {reason}")
            r.update(status="failed", error=reason)
    seconds = time.perf_counter() - start
    for r in records:
        r["seconds"] = seconds
    shutil.rmtree(group_dir, ignore_errors=True)   # every member holds its own run now
    try:
        os.rmdir(os.path.dirname(group_dir))
    except OSError:
        pass
    print(f"Together: {len(group)} members trained in {seconds:.1f} s; their runs are in {root}")
    return records
