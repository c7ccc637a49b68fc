"""`depthlab compile EXPERIMENT --topology v5e:4x4`: an experiment's real train and eval steps AOT-compiled
for a TPU slice on this machine (no TPU needed, libtpu is: `pip install 'depthlab[tpu]'`).

The experiment is built from the very config `depthlab run` would use (`build_config` with the preset and
`--config.KEY=VALUE` overrides, then the module's `make_experiment`); the engine's `place` and
`compile_steps` lower the steps onto the slice's devices (train/aot.py). Step times and MFU are ESTIMATES
from a roofline over the compiled step's own FLOPs, bytes and collectives, never measurements.

`--members N` compiles N seeds of the experiment as the ONE program `depthlab sweep --together` trains
(research/together.py): member i is the config with seed = the config's seed + i (seeds 0..N-1 at the default
seed 0, the points of `--sweep seed=0,...,N-1`), each built by the module's `make_experiment`, checked by
`together.member_check` and stacked by `together.stacked_experiment` (mode vmap); the engine places the stacked
state as `fit` would (every device holds every member, a batch's rows `[rows, members, ...]` split over the
data-parallel devices). The report adds the figures per member (`member_figures`): state and memory per chip
divided by N, and the ESTIMATED member-steps per second, N / the estimated step time.

Example:
    >>> report = compile_experiment("language/char_gpt", "v5e:2x2", overrides={"mesh.strategy": "fsdp",
    ...                             "mesh.fsdp": -1, "mesh.data": 1})
    >>> print(format_report(report))
    >>> group = compile_experiment("vision/digits_mlp", "v5e:1x1", members=64)
    >>> group.members["member_steps_per_second"], group.members["memory_per_chip_per_member"]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from depthlab.research.registry import load_experiment
from depthlab.research.runner import build_config
from depthlab.train import aot
from depthlab.train.aot import CompileReport, DoesNotFitError, TopologyError

GiB = aot.GiB
MiB = 1024 ** 2


# ==============================================================================================
# Model FLOPs (nanoGPT's estimate_mfu / PaLM appendix B)
# ==============================================================================================

def transformer_shape(config: ml_collections.ConfigDict) -> dict | None:
    """{"layers", "heads", "width", "context", "batch"} of a transformer config (GPT, BERT, ...), else None."""
    model, data = config.get("model") or {}, config.get("data") or {}
    if not all(k in model for k in ("num_layers", "num_heads", "embed_dim")):
        return None
    context = data.get("context", data.get("max_len"))
    if context is None or "batch_size" not in data:
        return None
    return {"layers": int(model["num_layers"]), "heads": int(model["num_heads"]), "width": int(model["embed_dim"]),
            "context": int(context), "batch": int(data["batch_size"])}


def _non_position_params(abstract_state) -> int:
    """Parameters, less learned position embeddings (nanoGPT's get_num_params(non_embedding=True): the token
    embedding stays in, it is the output layer's matmul when tied)."""
    import jax
    import numpy as np
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(abstract_state, "params", {}))[0]:
        if "position" in jax.tree_util.keystr(path):
            continue
        total += int(np.prod(leaf.shape, dtype=np.int64))
    return total


def transformer_flops(shape: dict):
    """A function of the abstract state: 6*N*tokens + 12*L*H*Q*T*tokens per train step (forward + backward;
    N without position embeddings, Q = width / heads, T = context), nanoGPT's and PaLM's count."""
    tokens = shape["batch"] * shape["context"]
    attention = 12 * shape["layers"] * shape["width"] * shape["context"]   # 12 L H Q T, H*Q = width

    def flops(abstract_state) -> float:
        return float((6 * _non_position_params(abstract_state) + attention) * tokens)
    return flops


# ==============================================================================================
# Compile
# ==============================================================================================

def compile_experiment(name: str, topology: str, preset: str | None = None, overrides=None, num_slices: int = 1,
                       check_fits: bool = True, members: int | None = None) -> CompileReport:
    """Builds `name` from the config `depthlab run` would use and AOT-compiles its steps for `topology`.
    Raises `DoesNotFitError` (one line) when the step needs more HBM per chip than the chip has, and
    `TopologyError` for an unknown topology or a missing libtpu.

    members: N >= 1 compiles N members (seeds config.seed + 0..N-1) stacked as one `depthlab sweep --together`
    program (see the module docstring) and fills `report.members` (`member_figures`); None: the single run.
    A ValueError (one line) says why the members cannot go together (`together.member_check`)."""
    if members is not None and int(members) < 1:
        raise ValueError(f"--members must be >= 1, got {members}")
    devices = aot.topology_devices(topology, num_slices=num_slices)   # fails fast, before any data is loaded
    config = build_config(name, preset, overrides)
    module = load_experiment(name)
    if not hasattr(module, "make_experiment"):
        raise ValueError(f"{name} is a study (a `run(config, workdir)`), not an experiment with train steps; "
                         f"`depthlab compile` needs one built by `make_experiment`")
    if members is not None:
        return _compile_members(name, module, config, int(members), topology, devices, preset=preset,
                                num_slices=num_slices, check_fits=check_fits)
    experiment = module.make_experiment(config)
    shape = transformer_shape(config)
    kwargs: dict[str, Any] = {}
    if shape is not None:
        kwargs = dict(model_flops=transformer_flops(shape), model_flops_source="6N+12LHQT per token (nanoGPT/PaLM)",
                      items_per_step=shape["batch"] * shape["context"], item_name="tokens")
    report = aot.compile_for_topology(experiment, config, devices, topology=topology, num_slices=num_slices,
                                      check_fits=check_fits, **kwargs)
    report.notes.append(f"experiment {name}" + (f" --preset {preset}" if preset else ""))
    return report


def member_configs(config: ml_collections.ConfigDict, count: int) -> list[ml_collections.ConfigDict]:
    """The configs of `count` members: `config` with seed = config.seed + i (0..count-1 at the default seed 0)."""
    base = int(config.get("seed", 0) or 0)
    out = []
    for i in range(count):
        member = ml_collections.ConfigDict(config.to_dict())
        with member.unlocked():
            member.seed = base + i
        out.append(member)
    return out


def _compile_members(name: str, module, config: ml_collections.ConfigDict, count: int, topology: str, devices,
                     *, preset: str | None, num_slices: int, check_fits: bool) -> CompileReport:
    """`compile_experiment(..., members=count)`: the stacked program of `depthlab sweep --together` (vmap)."""
    import flax.linen as nn
    import jax

    from depthlab.research import together
    from depthlab.train import with_resolved_train
    from depthlab.train.data import first_batch
    from depthlab.train.step import resolve_prng_impl

    start = time.perf_counter()
    configs = member_configs(config, count)
    experiments = [module.make_experiment(c) for c in configs]
    # as `run_group` does: the group's train settings are the first member's, resolved (every key present)
    group_config = with_resolved_train(configs[0])
    tc = group_config.train
    # stacked_experiment resolves "auto" for this process's first device (a CPU here); a together group on the
    # slice resolves it for TPU, so resolve it for the devices the program is compiled for
    prng_impl = resolve_prng_impl(str(tc.prng_impl), getattr(devices[0], "platform", "tpu"))
    why, programs = together.member_check(experiments, configs, prng_impl)   # traced once, for both
    if why:
        raise ValueError(f"the {count} members of {name} cannot train together: {why}")
    stacked = together.stacked_experiment(experiments, configs, prng_impl, "vmap", nonfinite=str(tc.nonfinite),
                                          programs=programs)
    build_seconds = time.perf_counter() - start

    # per member: items (tokens or examples) and, for transformers, the model FLOPs; times `count` for the step
    shape = transformer_shape(config)
    kwargs: dict[str, Any]
    if shape is not None:
        member_state = nn.meta.unbox(jax.eval_shape(experiments[0].init, jax.random.key(int(configs[0].seed))))
        member_items = float(shape["batch"] * shape["context"])
        kwargs = dict(model_flops=count * transformer_flops(shape)(member_state),
                      model_flops_source=f"{count} members x 6N+12LHQT per token (nanoGPT/PaLM)",
                      items_per_step=count * member_items, item_name="tokens")
    else:
        batch = first_batch(experiments[0].train_batches(0))
        leading = [np.shape(v)[0] for v in batch.values() if np.ndim(v)]
        member_items = float(leading[0]) if leading else 0.0
        kwargs = dict(items_per_step=count * member_items)
    try:
        report = aot.compile_for_topology(stacked, group_config, devices, topology=topology, num_slices=num_slices,
                                          check_fits=check_fits, **kwargs)
    except DoesNotFitError as e:   # one more way to fit; its report (--json) with the figures per member too
        if e.report is not None:
            e.report.members = member_figures(e.report, count, member_items, base_seed=int(configs[0].seed),
                                              build_seconds=build_seconds)
        raise DoesNotFitError(f"{e}; fewer --members (now {count})", e.report) from None
    report.members = member_figures(report, count, member_items, base_seed=int(configs[0].seed),
                                    build_seconds=build_seconds)
    report.notes.append(f"experiment {name}" + (f" --preset {preset}" if preset else "")
                        + f" --members {count}: seeds {configs[0].seed}..{configs[-1].seed} as one "
                          f"`depthlab sweep --together` program (vmap)")
    return report


def member_figures(report: CompileReport, count: int, member_items: float, base_seed: int = 0,
                   build_seconds: float = 0.0) -> dict:
    """The figures per member of a together group's report (`count` members in one compiled step). Times and
    throughputs are ESTIMATES (the roofline's step time), memory and FLOPs the compiler's:
    state_bytes_per_member (the stacked state's bytes / count), state_bytes_per_device_per_member,
    memory_per_chip_per_member (the chip's total / count), flops_per_step (XLA's count of the compiled step,
    all devices, all members), flops_per_member_step, member_steps_per_second (count / step time),
    items_per_second (across members) and per member."""
    est = report.estimate
    step = est["step_seconds"]
    flops = report.train.flops * report.num_devices
    return {
        "count": count, "mode": "vmap", "seeds": [base_seed, base_seed + count - 1],
        "params_per_member": report.num_params // count,
        "state_bytes_per_member": report.state_bytes / count,
        "state_bytes_per_device_per_member": report.state_bytes_per_device / count,
        "memory_per_chip_per_member": report.memory.get("total", 0) / count,
        "flops_per_step": flops,
        "flops_per_member_step": flops / count,
        "items_per_member_step": member_items,
        "member_steps_per_second": count / step if step > 0 else math.inf,          # ESTIMATE
        "items_per_second": est["items_per_second"],                               # ESTIMATE, across members
        "items_per_second_per_member": est["items_per_second"] / count,            # ESTIMATE
        "build_seconds": build_seconds,    # building and checking the members on this host (not compiling)
    }


# ==============================================================================================
# Output
# ==============================================================================================

def _bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def format_report(report: CompileReport) -> str:
    """One table: the slice, memory per device against HBM, FLOPs, the estimated step time and MFU
    (labelled estimates), throughput, and the collectives by kind."""
    r, chip, est, mem = report, report.chip, report.estimate, report.memory
    per = "core" if chip.name in ("v2", "v3") else "chip"
    slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    rows = [
        ("topology", f"{r.topology}{slices}: {r.num_chips} {chip.device_kind} chip(s), {r.num_devices} device(s), "
                     f"{r.num_hosts} host(s)"),
        ("mesh", f"{mesh}, strategy={r.strategy}"),
        ("parameters", f"{r.num_params:,}; state {_bytes(r.state_bytes)} whole, {_bytes(r.state_bytes_per_device)} "
                       f"per device"),
        (f"memory per {per}", f"{_bytes(mem.get('total', 0))} of {_bytes(chip.hbm_bytes)} HBM "
                              f"({100 * mem.get('total', 0) / chip.hbm_bytes:.1f}%) "
                              f"{'fits' if r.fits else 'DOES NOT FIT'}"),
        ("  arguments / outputs", f"{_bytes(mem.get('argument', 0))} / {_bytes(mem.get('output', 0))} "
                                  f"(donated {_bytes(mem.get('alias', 0))})"),
        ("  temporaries / code", f"{_bytes(mem.get('temp', 0))} / {_bytes(mem.get('generated_code', 0))}"),
        ("FLOPs per step per device", f"{r.train.flops:.4g} (XLA); bytes accessed {_bytes(r.train.bytes_accessed)}"
                                      + (f"; {est['flops_per_device']:.4g} used (XLA counts a scanned loop's body "
                                         f"once: floored at the model FLOPs)" if est.get("flops_floored") else "")),
        ("model FLOPs per step", f"{r.model_flops_per_step:.4g} ({r.model_flops_source})"),
        ("step time (estimate)", f"{_seconds(est['step_seconds'])}, bound by {est['bound']}: compute "
                                 f"{_seconds(est['compute_seconds'])}, HBM {_seconds(est['memory_seconds'])}, "
                                 f"collectives {_seconds(est['collective_seconds'])}"),
        ("MFU (estimate)", f"{100 * est['mfu']:.1f}%"),
        (f"{r.item_name}/s (estimate)", f"{est['items_per_second']:,.0f} ({r.items_per_step:,.0f} per step)"),
    ]
    if r.members:
        m, n = r.members, r.members["count"]
        rows[2] = ("parameters", f"{r.num_params:,} ({m['params_per_member']:,} per member x {n}); state "
                                 f"{_bytes(r.state_bytes)} whole, {_bytes(r.state_bytes_per_device)} per device")
        rows[-1] = (f"{r.item_name}/s (estimate)", f"{est['items_per_second']:,.0f} across the members "
                    f"({r.items_per_step:,.0f} per step: {n} x {m['items_per_member_step']:,.0f}); "
                    f"{m['items_per_second_per_member']:,.0f} per member")
        rows.insert(6, ("memory per member", f"{_bytes(m['memory_per_chip_per_member'])} of the {per}'s total; "
                                             f"state {_bytes(m['state_bytes_per_member'])} whole, "
                                             f"{_bytes(m['state_bytes_per_device_per_member'])} per device"))
        rows.insert(2, ("members", f"{n} (seeds {m['seeds'][0]}..{m['seeds'][1]}) in one compiled step, as "
                                   f"`depthlab sweep --together` ({m['mode']})"))
        rows.append(("member-steps/s (estimate)", f"{m['member_steps_per_second']:,.1f} ({n} members / the "
                                                  f"estimated step time)"))
        rows.append(("FLOPs per step (XLA)", f"{m['flops_per_step']:.4g} all devices and members; "
                                             f"{m['flops_per_member_step']:.4g} per member-step"))
    if r.train.optimal_seconds is not None:
        rows.append(("compiler's optimal_seconds", f"{_seconds(r.train.optimal_seconds)} (XLA's own estimate)"))
    kinds = [f"{k} {v['count']} x, {_bytes(v['bytes'])}" for k, v in r.train.collectives.items() if v["count"]]
    rows.append(("collectives (train step)", "; ".join(kinds) or "none"))
    times = f"train lowered {r.train.lower_seconds:.1f} s, compiled {r.train.compile_seconds:.1f} s"
    if r.members:
        times = f"members built and checked {r.members['build_seconds']:.1f} s; " + times
    if r.eval is not None:
        times += f"; eval compiled {r.eval.compile_seconds:.1f} s"
    rows.append(("compile time (this host)", times))
    if r.sharding_mismatches:
        rows.append(("SHARDING MISMATCH", f"{len(r.sharding_mismatches)} leaves, e.g. {r.sharding_mismatches[0]}"))
    for note in r.notes:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def to_json(report: CompileReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)


# ==============================================================================================
# Command line (wired into research/cli.py as `depthlab compile`)
# ==============================================================================================

def command(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    """Runs `depthlab compile`; returns the exit code (2 and one line for a config that does not fit, an
    unknown topology or a missing libtpu). Writes nothing to disk."""
    # Compile-only use of libtpu: another JAX process on this host (a run, the tests) may hold libtpu's
    # lockfile; this process never opens the chips, so it may load libtpu alongside.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        report = compile_experiment(args.experiment, args.topology, preset=args.preset, overrides=overrides,
                                    num_slices=args.num_slices, members=getattr(args, "members", None))
    except DoesNotFitError as e:
        print(f"depthlab compile: {args.experiment} on {args.topology}: {e}", file=sys.stderr)
        if getattr(args, "json", False) and e.report is not None:
            print(to_json(e.report))
        return 2
    except (TopologyError, ValueError) as e:
        print(f"depthlab compile: {e}", file=sys.stderr)
        return 2
    print(to_json(report) if args.json else format_report(report))
    return 0
