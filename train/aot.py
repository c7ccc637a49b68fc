"""Ahead-of-time compilation for TPU topologies on a machine without a TPU.

libtpu compiles for any TPU slice on a plain CPU host: `topology_devices("v5e:4x4")` returns the 16
compile-only devices of that slice, and `compile_for_topology(experiment, config, devices)` lowers the
engine's own train and eval steps onto them (the mesh from `config.mesh`, the shardings from `place`,
the steps from `compile_steps`) and compiles them. From the compiled executables it reads:

- memory per device (`memory_analysis`): arguments, outputs, temporaries, generated code; the sum
  (minus donated aliases) against the chip's HBM (`fits`);
- FLOPs and bytes accessed per device (`cost_analysis`), and the compiler's own `optimal_seconds`
  (kept only when positive: for real steps it often comes back negative);
- the collectives of the optimised HLO by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute; async `-start` forms counted once) with their result bytes;
- whether the compiled input shardings of the state equal what `place` promised.

The step time is an ESTIMATE from a roofline, never a measurement:

    compute    = flops per device / the device's peak bf16 FLOP/s, the flops never below the model
                 FLOPs per device (x 4/3 under full remat): XLA counts a scanned loop's body once
    memory     = bytes accessed per device / the device's HBM bandwidth
    collective = sum over collectives of (bytes moved per device) / the device's one-way ICI bandwidth,
                 bytes moved ~ 2x result for all-reduce, result x group size for reduce-scatter,
                 result otherwise (ring algorithms, large groups)
    step time  = max(compute, memory) + collective       (no overlap of communication with compute)

It cannot see: kernel efficiency below peak (small matmuls, padding to the MXU's 128x128 tiles),
overlap of collectives with compute, latency of many small collectives, the torus's routing and
data-centre-network links between slices (multi-slice collectives are costed at ICI speed), host
input pipelines, or loops whose trip count the HLO does not state.

MFU = model FLOPs per step / (devices x peak x estimated step time). Model FLOPs are the caller's
(`model_flops`, e.g. 6*N*tokens + attention for a transformer, as nanoGPT and PaLM count them), or
XLA's own count of the compiled step (which includes recomputation) when the caller gives none.

Example:
    >>> devices = topology_devices("v5e:2x2")
    >>> report = compile_for_topology(experiment, config, devices)
    >>> report.memory["total"] / report.chip.hbm_bytes, report.estimate["step_seconds"]
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from depthlab.train import parallel
from depthlab.train import data as data_lib
from depthlab.train.loop import Experiment, compile_steps, default_mesh_config, place

GiB = 1024 ** 3
TPU_EXTRA_HINT = "pip install 'depthlab[tpu]'"
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class TopologyError(ValueError):
    """An unknown or unsupported TPU topology name, or libtpu missing."""


class DoesNotFitError(ValueError):
    """The compiled step needs more memory per device than the chip has; `.report` holds the figures."""

    def __init__(self, message: str, report: "CompileReport | None" = None):
        super().__init__(message)
        self.report = report


# ==============================================================================================
# Chips
# ==============================================================================================

@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-device figures of one TPU generation. For v2/v3 a JAX device is one TensorCore (half a
    chip): the figures here are then per core (the chip's halved); from v4 on (megacore) a device is a
    chip."""
    name: str
    device_kind: str
    peak_flops: float        # bf16 FLOP/s per device
    hbm_bytes: int           # HBM per device
    hbm_bandwidth: float     # bytes/s per device
    ici_bandwidth: float     # one-way bytes/s per device, all links together
    cores_per_device: int = 1
    source: str = ""


# Sources (per chip; bidirectional ICI figures halved to one-way):
# v2, v3: Jouppi et al., "A Domain-Specific Supercomputer for Training Deep Neural Networks", CACM 63(7),
#   2020, Table 3: v2 46 TFLOP/s bf16, 16 GiB HBM at 700 GB/s, 4 ICI links x 496 Gbit/s; v3 123 TFLOP/s,
#   32 GiB at 900 GB/s, 4 links x 656 Gbit/s (also https://cloud.google.com/tpu/docs/v3). Two TensorCores
#   per chip, each a JAX device: per-device figures are half the chip's.
# v4: https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; ICI 6 links x
#   ~45 GB/s one-way (jax-ml "How to scale your model", TPU chapter). Megacore: one device per chip.
# v5e: https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM at 819 GB/s, ICI 400 GB/s
#   bidirectional per chip (1600 Gbit/s).
# v5p: https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s
#   bidirectional per chip (4800 Gbit/s). Megacore: one device per chip.
# v6e: https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM at 1640 GB/s, ICI 3584 Gbit/s
#   per chip (~448 GB/s; the page's table also gives 800 GB/s bidirectional).
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v2", "TPU v2", 46e12 / 2, 8 * GiB, 700e9 / 2, 4 * 496e9 / 8 / 2, source="Jouppi et al. 2020"),
    Chip("v3", "TPU v3", 123e12 / 2, 16 * GiB, 900e9 / 2, 4 * 656e9 / 8 / 2, source="cloud.google.com/tpu/docs/v3"),
    Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, 6 * 45e9, cores_per_device=2,
         source="cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 400e9 / 2, source="cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 1200e9 / 2, cores_per_device=2,
         source="cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1640e9, 3584e9 / 8, source="cloud.google.com/tpu/docs/v6e"),
)}
_BY_KIND = {c.device_kind: c for c in CHIPS.values()}
_MEGACORE = ("v4", "v5p")                    # one JAX device per chip (both TensorCores)
_TWO_D = ("v2", "v3", "v5e", "v6e")          # 2D tori: topology AxB
# Accelerator-type sizes ("v5e-8", "v4-32") in chips -> topology. v2/v3/v4/v5p names count TensorCores.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
              512: "16x32", 1024: "32x32"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}
EXAMPLES = "v5e:2x2, v5e:16x16, v5e-8, v4:2x2x2, v4-32, v5p:4x4x4, v6e:1x1, v2:2x2, v3:4x4"


def chip_for(device) -> Chip:
    """The `Chip` of a TPU device (by its device_kind)."""
    kind = getattr(device, "device_kind", str(device))
    if kind not in _BY_KIND:
        raise TopologyError(f"no chip figures for device kind {kind!r}; known: {', '.join(sorted(_BY_KIND))}")
    return _BY_KIND[kind]


def parse_topology(name: str) -> tuple[str, str]:
    """("v5e", "2x4") from "v5e:2x4", "v5e-8", "v5litepod-8", "v4-32" (-> "2x2x4"), ..."""
    text = str(name).strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?::(\d+(?:x\d+){1,2})|-(\d+))", text)
    if not m:
        raise TopologyError(f"unknown TPU topology {name!r}; examples: {EXAMPLES}")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise TopologyError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: {', '.join(CHIPS)} "
                            f"(examples: {EXAMPLES})")
    if m.group(2):
        dims = m.group(2).split("x")
        if (gen in _TWO_D) != (len(dims) == 2):
            want = "AxB" if gen in _TWO_D else "AxBxC"
            raise TopologyError(f"TPU {gen} topologies are {want}, got {name!r}; examples: {EXAMPLES}")
        return gen, m.group(2)
    count = int(m.group(3))
    chips = count // 2 if gen in ("v2", "v3", "v4", "v5p") else count   # those names count TensorCores
    shapes = _SHAPES_2D if gen in _TWO_D else _SHAPES_3D
    if chips not in shapes:
        raise TopologyError(f"no standard {gen} slice named {name!r} ({chips} chips); use {gen}:"
                            f"{'AxB' if gen in _TWO_D else 'AxBxC'}; examples: {EXAMPLES}")
    return gen, shapes[chips]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only devices of a TPU slice (or `num_slices` slices), for AOT compilation on any host.

    A one-chip slice ("v5e:1x1", "v6e-1") is described with a one-chip host; "v5e-8"/"v6e-8" as the
    single 8-chip host; v4 and v5p in megacore mode (one device per chip, as they train).
    """
    gen, shape = parse_topology(name)
    if not libtpu_available():
        raise TopologyError(f"compiling for TPU needs libtpu, which is not installed: {TPU_EXTRA_HINT}")
    num_slices = int(num_slices)
    if num_slices < 1:
        raise TopologyError(f"num_slices must be >= 1, got {num_slices}")
    dims = [int(d) for d in shape.split("x")]
    kwargs: dict[str, Any] = {}
    if gen in _MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    if int(np.prod(dims)) == 1:
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    elif str(name).strip().lower().endswith("-8") and gen in ("v5e", "v6e"):
        kwargs["chips_per_host_bounds"] = (2, 4, 1)   # the single-host 8-chip machines (ct5lp-/ct6e-...-8t)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(topology_name=f"{gen}:{shape}", platform="tpu", **kwargs)
    except Exception as e:   # libtpu's errors are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lockfile" in first:
            raise TopologyError(f"libtpu is held by another process on this machine ({first}); set "
                                f"ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile alongside it") from e
        raise TopologyError(f"libtpu cannot describe TPU {gen}:{shape} x{num_slices} slice(s): {first}; "
                            f"examples: {EXAMPLES}") from e
    return list(topo.devices)


# ==============================================================================================
# HLO collectives
# ==============================================================================================

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _array_bytes(type_text: str) -> list[float]:
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        out.append(size * float(np.prod([int(d) for d in dims.split(",") if d] or [1])))
    return out


def _group_size(rest: str, total: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", rest)
    if m:
        return max(1, len([x for x in m.group(1).split(",") if x]))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
        axes = [a.strip("' ") for a in m.group(2).split(",") if a.strip("' ")]
        return int(np.prod([sizes.get(a, 1) for a in axes])) if axes else 1
    return total


def _trip_count(while_rest: str, comps: dict) -> int:
    """A while loop's trip count: XLA's `known_trip_count`, else a condition `i < N` on a constant N (the
    loops of `lax.scan`/`nn.scan` count from 0; the TPU compiler often drops known_trip_count from them),
    else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_rest)
    instrs = comps.get(cond.group(1), []) if cond else []
    constants = {name: re.match(r"\s*(-?\d+)\)", rest) for name, _, op, rest in instrs if op == "constant"}
    for _, _, op, rest in instrs:
        if op == "compare" and "direction=LT" in rest:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            if len(operands) == 2 and constants.get(operands[1]):
                return max(1, int(constants[operands[1]].group(1)))
    return 1


def parse_collectives(hlo_text: str, num_devices: int = 1) -> dict:
    """{kind: {"count", "bytes" (result bytes per device), "moved" (estimated bytes sent per device)}}
    for the collectives the optimised HLO module executes: from ENTRY through calls, conditionals and
    while loops (times their trip count: `_trip_count`); an async `-start` counts once (its `-done` not at all);
    a fusion whose computation is an all-reduce followed by a slice (XLA's "all-reduce-scatter") counts
    as a reduce-scatter of the fusion's result."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(1), m.group(2), m.group(3), m.group(4)))
    totals = {k: {"count": 0, "bytes": 0.0, "moved": 0.0} for k in COLLECTIVES}

    def add(kind, result_bytes, group, times):
        factor = {"all-reduce": 2.0 * (group - 1) / max(group, 1), "reduce-scatter": float(group - 1),
                  "all-gather": (group - 1) / max(group, 1), "all-to-all": (group - 1) / max(group, 1),
                  "collective-permute": 1.0}[kind]
        totals[kind]["count"] += times
        totals[kind]["bytes"] += times * result_bytes
        totals[kind]["moved"] += times * factor * result_bytes

    def walk(name: str, times: int, depth: int = 0):
        if name not in comps or depth > 32:
            return
        for _, type_text, op, rest in comps[name]:
            base = op[:-6] if op.endswith("-start") else op
            if op.endswith("-done"):
                continue
            if base in COLLECTIVES:
                sizes = _array_bytes(type_text)
                if op.endswith("-start") and base in ("all-gather", "collective-permute") and len(sizes) >= 2:
                    result = sizes[1]                       # (operand, result, ...) tuple
                elif op.endswith("-start") and len(sizes) >= 2 and base != "all-reduce":
                    result = sizes[len(sizes) // 2]
                else:
                    result = sum(sizes)
                add(base, result, _group_size(rest, num_devices), times)
            elif op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", rest)
                if called and called.group(1) in comps:
                    inner = [i for i in comps[called.group(1)] if i[2] in COLLECTIVES or
                             i[2].removesuffix("-start") in COLLECTIVES]
                    if inner and "reduce-scatter" in called.group(1):
                        add("reduce-scatter", sum(_array_bytes(type_text)),
                            _group_size(inner[0][3], num_devices), times)
                    elif inner:
                        walk(called.group(1), times, depth + 1)
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                if body:
                    walk(body.group(1), times * _trip_count(rest, comps), depth + 1)
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                for branch in re.findall(r"%?([\w.\-]+)", branches.group(1) if branches else ""):
                    walk(branch, times, depth + 1)
                for key in ("true_computation", "false_computation"):
                    b = re.search(key + r"=%?([\w.\-]+)", rest)
                    if b:
                        walk(b.group(1), times, depth + 1)
            elif op in ("call", "async-start"):
                b = re.search(r"(?:to_apply|calls)=%?([\w.\-]+)", rest)
                if b:
                    walk(b.group(1), times, depth + 1)

    if entry is not None:
        walk(entry, 1)
    return {k: {"count": v["count"], "bytes": int(v["bytes"]), "moved": int(v["moved"])} for k, v in totals.items()}


# ==============================================================================================
# Compile
# ==============================================================================================

@dataclasses.dataclass
class StepReport:
    """One compiled step (train or eval), per device."""
    lower_seconds: float
    compile_seconds: float
    memory: dict          # argument, output, alias, temp, generated_code, total, peak (bytes)
    flops: float
    bytes_accessed: float
    optimal_seconds: float | None      # the compiler's own estimate, None when it is not positive
    collectives: dict


@dataclasses.dataclass
class CompileReport:
    """What AOT compilation for a TPU topology tells about an experiment (see the module docstring)."""
    topology: str
    num_slices: int
    chip: Chip
    num_devices: int
    num_chips: int
    num_hosts: int
    mesh: dict
    strategy: str
    train: StepReport
    eval: StepReport | None
    memory: dict                 # the larger of train's and eval's, per device (bytes)
    fits: bool
    num_params: int
    state_bytes: int             # bytes of the whole (unsharded) state
    state_bytes_per_device: int  # bytes of the state each device holds under its sharding
    items_per_step: float
    item_name: str               # "tokens" or "examples"
    model_flops_per_step: float
    model_flops_source: str      # "6N+attention (nanoGPT/PaLM)" or "XLA's count"
    estimate: dict               # ESTIMATES: compute/memory/collective/step seconds, bound, mfu, items/s
    sharding_mismatches: list[str]
    replicated_parameters: list[str]   # parameters >= mesh.fsdp_min_size held whole on every device
    notes: list[str] = dataclasses.field(default_factory=list)
    # a together group's figures per member (research/aot.py `member_figures`: `depthlab compile --members N`);
    # empty for a single run
    members: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["chip"] = dataclasses.asdict(self.chip)
        return d


def _first(batches) -> dict:
    return {k: np.asarray(v) for k, v in data_lib.first_batch(batches).items()}


def memory_stats(compiled) -> dict:
    """Per-device bytes of a compiled executable: argument, output, alias (donated), temp, generated_code,
    total = argument + output - alias + temp + generated_code, and the compiler's peak when it reports one."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    get = lambda name: int(getattr(stats, name, 0) or 0)
    out = {"argument": get("argument_size_in_bytes"), "output": get("output_size_in_bytes"),
           "alias": get("alias_size_in_bytes"), "temp": get("temp_size_in_bytes"),
           "generated_code": get("generated_code_size_in_bytes"), "peak": get("peak_memory_in_bytes")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _compile(fn, *args, num_devices: int) -> tuple[Any, StepReport]:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = _cost(compiled)
    optimal = float(cost.get("optimal_seconds", -1.0))
    report = StepReport(lower_seconds=t1 - t0, compile_seconds=t2 - t1, memory=memory_stats(compiled),
                        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                        optimal_seconds=optimal if optimal > 0 else None,
                        collectives=parse_collectives(compiled.as_text(), num_devices))
    return compiled, report


def sharding_mismatches(compiled, promised: Any) -> list[str]:
    """Paths of state leaves whose compiled input sharding differs from the promised one."""
    compiled_state = compiled.input_shardings[0][0]
    out = []
    flat_c = jax.tree_util.tree_flatten_with_path(compiled_state)[0]
    flat_p = jax.tree.leaves(promised)
    for (path, got), want in zip(flat_c, flat_p):
        ndim = len(getattr(want, "spec", ())) or 0
        try:
            same = got.is_equivalent_to(want, max(ndim, len(getattr(got, "spec", ()))))
        except Exception:
            same = got == want
        if not same:
            out.append(f"{jax.tree_util.keystr(path)}: compiled {getattr(got, 'spec', got)} vs placed "
                       f"{getattr(want, 'spec', want)}")
    if len(flat_c) != len(flat_p):
        out.append(f"state has {len(flat_p)} leaves but the compiled step takes {len(flat_c)}")
    return out


def _params(state: Any) -> Any:
    """`state.params`; for a together group's stacked state (research/together.py `MemberStack`: the members'
    states under `.members`, with a leading member axis) the stacked params; None when there are none."""
    params = getattr(state, "params", None)
    if params is None and hasattr(state, "members"):
        params = getattr(state.members, "params", None)
    return params


def replicated_parameters(compiled, abstract_state, min_size: int) -> list[str]:
    """Parameters of at least `min_size` elements that the compiled step holds whole on every device."""
    compiled_state = compiled.input_shardings[0][0]
    params = _params(compiled_state)
    shapes = _params(abstract_state)
    if params is None or shapes is None:
        return []
    out = []
    for (path, sharding), leaf in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shapes)):
        size = int(np.prod(leaf.shape, dtype=np.int64))
        if size >= min_size and sharding.is_fully_replicated:
            out.append(f"params{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")
    return out


def _state_bytes(abstract_state) -> tuple[int, int, int]:
    """(bytes of the whole state, bytes per device under its shardings, parameter count)."""
    total, per_device = 0, 0
    for leaf in jax.tree.leaves(abstract_state):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        try:
            itemsize = np.dtype(leaf.dtype).itemsize
        except TypeError:      # PRNG key arrays
            itemsize = 8
        n = int(np.prod(leaf.shape, dtype=np.int64)) * itemsize
        total += n
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and hasattr(sharding, "shard_shape"):
            per_device += int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * itemsize
        else:
            per_device += n
    params = _params(abstract_state)
    num_params = sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(params)) if params is not None else 0
    return total, per_device, num_params


def fit_advice(config: ml_collections.ConfigDict, strategy: str) -> str:
    """What could make a config fit, from the keys it has."""
    ideas = []
    if strategy != "fsdp":
        ideas.append("shard parameters and optimizer state (--config.mesh.strategy=fsdp --config.mesh.fsdp=-1 "
                     "--config.mesh.data=1)")
    model = config.get("model") or {}
    if "remat" in model and str(model.get("remat")) in ("", "none", "None", "False", "false"):
        ideas.append("rematerialise activations (--config.model.remat=full)")
    data = config.get("data") or {}
    if "batch_size" in data:
        ideas.append(f"a smaller --config.data.batch_size (now {data['batch_size']})")
    ideas.append("more chips (a larger --topology)")
    return "; ".join(ideas)


def compile_for_topology(experiment: Experiment, config: ml_collections.ConfigDict, devices: Sequence,
                         *, topology: str = "", num_slices: int = 1,
                         model_flops: Callable[[Any], float] | float | None = None,
                         model_flops_source: str = "model",
                         items_per_step: float | None = None, item_name: str = "examples",
                         check_fits: bool = True) -> CompileReport:
    """AOT-compiles the experiment's train step (and eval step, when it has one) for `devices` (e.g.
    `topology_devices("v5e:4x4")`) with the mesh and sharding of `config.mesh`, exactly as `fit` would
    place and jit them, and reports memory, cost, collectives and a roofline ESTIMATE of the step.

    model_flops: model FLOPs per train step (a number, or a function of the abstract state); None uses
    XLA's count. items_per_step: tokens or examples per step (default: the train batch's leading size).
    check_fits: raise `DoesNotFitError` (one line: needed, available, what would help) when the step
    needs more memory per device than the chip's HBM.
    """
    devices = list(devices)
    chip = chip_for(devices[0])
    mesh_cfg = config.get("mesh") or default_mesh_config()
    axes = {k: mesh_cfg[k] for k in parallel.MESH_AXES if k in mesh_cfg}
    mesh = parallel.make_mesh(axes, devices=devices)
    placement = place(experiment, config, mesh)
    tc = config.get("train") or {}
    steps = compile_steps(experiment, placement, nonfinite=tc.get("nonfinite", "stop"), steps_per_call=1,
                          prng_impl=tc.get("prng_impl", "auto"))
    n = len(devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    if experiment.train_batches is not None:
        first = _first(experiment.train_batches(0))
        for key, value in first.items():
            if np.ndim(value) and np.shape(value)[0] % shards:
                raise ValueError(f"train batch {key!r} has {np.shape(value)[0]} rows, which the mesh's {shards} "
                                 f"data shards (mesh.data x mesh.fsdp) do not divide; use a --config.data.batch_size "
                                 f"that is a multiple of {shards}")
        train_args = (placement.abstract_state, data_lib.batch_spec(first, placement.batch_sharding))
    else:
        first = {}
        train_args = (placement.abstract_state, None)
    state_total, state_per_device, num_params = _state_bytes(placement.abstract_state)
    strategy = str(mesh_cfg.get("strategy", "replicated"))

    def compile_or_explain(fn, *args):
        try:
            return _compile(fn, *args, num_devices=n)
        except Exception as e:   # the TPU compiler refuses a program whose temporaries exceed HBM
            first = (str(e).strip().splitlines() or [""])[0]
            if "RESOURCE_EXHAUSTED" not in first and "out of memory" not in first.lower():
                raise
            per = "core" if chip.name in ("v2", "v3") else "chip"
            raise DoesNotFitError(
                f"does not fit: {first.split(':', 1)[-1].strip().rstrip('.')} (the state alone is "
                f"{state_per_device / GiB:.2f} GiB per {per}); a {chip.device_kind} {per} has "
                f"{chip.hbm_bytes / GiB:.0f} GiB HBM; to fit: {fit_advice(config, strategy)}") from None

    train_compiled, train = compile_or_explain(steps.train, *train_args)

    eval_report = None
    if steps.eval is not None:
        eval_first = _first(experiment.eval_batches())
        if all(not np.ndim(v) or np.shape(v)[0] % shards == 0 for v in eval_first.values()):
            _, eval_report = compile_or_explain(steps.eval, placement.abstract_state,
                                                data_lib.batch_spec(eval_first, placement.batch_sharding))
    mismatches = sharding_mismatches(train_compiled, placement.state_shardings)
    replicated = replicated_parameters(train_compiled, placement.abstract_state,
                                       int(mesh_cfg.get("fsdp_min_size", 1024)))

    memory = dict(train.memory)
    if eval_report is not None and eval_report.memory.get("total", 0) > memory.get("total", 0):
        memory = dict(eval_report.memory)

    if items_per_step is None:
        leading = [np.shape(v)[0] for v in first.values() if np.ndim(v)]
        items_per_step = float(leading[0]) if leading else 0.0
    if model_flops is None:
        mflops, source = train.flops * n, "XLA's count"
    else:
        mflops = float(model_flops(placement.abstract_state) if callable(model_flops) else model_flops)
        source = model_flops_source
    # XLA's cost analysis counts a while loop's body once: a scanned stack of layers is 1/num_layers of its
    # FLOPs. The model FLOPs per device (times 4/3 under full remat: the forward pass runs twice) are a floor.
    remat = str((config.get("model") or {}).get("remat", "none"))
    floor = 0.0 if model_flops is None else mflops / n * (4 / 3 if remat == "full" else 1.0)
    estimate = roofline(train, chip, n, mflops, items_per_step, min_flops_per_device=floor)
    kinds = [getattr(d, "device_kind", "") for d in devices]
    hosts = len({getattr(d, "process_index", 0) for d in devices})
    report = CompileReport(
        topology=topology or f"{chip.name} x{n}", num_slices=int(num_slices), chip=chip, num_devices=n,
        num_chips=n if chip.name not in ("v2", "v3") else n // 2, num_hosts=hosts,
        mesh=dict(mesh.shape), strategy=strategy, train=train, eval=eval_report,
        memory=memory, fits=memory.get("total", 0) <= chip.hbm_bytes, num_params=num_params,
        state_bytes=state_total, state_bytes_per_device=state_per_device, items_per_step=float(items_per_step),
        item_name=item_name, model_flops_per_step=mflops, model_flops_source=source, estimate=estimate,
        sharding_mismatches=mismatches, replicated_parameters=replicated)
    if len(set(kinds)) > 1:
        report.notes.append(f"mixed device kinds {sorted(set(kinds))}")
    if steps.eval is not None and eval_report is None:
        report.notes.append("eval step not compiled: the eval batch does not divide over the data shards")
    if check_fits and not report.fits:
        per = "core" if chip.name in ("v2", "v3") else "chip"
        raise DoesNotFitError(
            f"does not fit: needs {memory['total'] / GiB:.2f} GiB per {per} (arguments {memory['argument'] / GiB:.2f}, "
            f"temporaries {memory['temp'] / GiB:.2f}) but a {chip.device_kind} {per} has {chip.hbm_bytes / GiB:.0f} GiB "
            f"HBM; to fit: {fit_advice(config, report.strategy)}", report)
    return report


def roofline(step: StepReport, chip: Chip, num_devices: int, model_flops_per_step: float,
             items_per_step: float, min_flops_per_device: float = 0.0) -> dict:
    """ESTIMATED step time from the compiled step's per-device cost (see the module docstring).
    `min_flops_per_device` floors XLA's FLOP count, which counts a loop body (scanned layers) once;
    "flops_per_device" in the result is the count used (bytes inside such loops stay counted once)."""
    flops = max(step.flops, float(min_flops_per_device))
    compute = flops / chip.peak_flops
    memory = step.bytes_accessed / chip.hbm_bandwidth
    moved = sum(v["moved"] for v in step.collectives.values())
    collective = moved / chip.ici_bandwidth if num_devices > 1 else 0.0
    seconds = max(compute, memory) + collective
    parts = {"compute (FLOPs)": compute, "HBM bandwidth": memory, "collectives (ICI)": collective}
    bound = max(parts, key=parts.get) if seconds > 0 else "nothing"
    mfu = model_flops_per_step / (num_devices * chip.peak_flops * seconds) if seconds > 0 else 0.0
    return {"flops_per_device": flops, "flops_floored": flops > step.flops,
            "compute_seconds": compute, "memory_seconds": memory, "collective_seconds": collective,
            "step_seconds": seconds, "bound": bound, "mfu": mfu,
            "items_per_second": items_per_step / seconds if seconds > 0 else math.inf,
            "compiler_optimal_seconds": step.optimal_seconds}
