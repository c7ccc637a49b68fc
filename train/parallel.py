"""Device mesh, sharding of state and batches, and multi-host start-up: one code path for 1 CPU,
8 GPUs or a TPU pod (GSPMD through `jax.jit` with in/out shardings; no pmap).

Mesh axes (config.mesh): `data` (batch), `fsdp` (batch + parameters/optimizer state), `tensor`
(model dimensions named by Flax logical axes). -1 means "all remaining devices".

Parameter sharding, in order:
  1. Leaves that carry Flax logical axis names (`nn.with_logical_partitioning`) map through
     `config.mesh.rules` (default `DEFAULT_RULES`) onto mesh axes: tensor parallel, and FSDP for `embed`.
  2. With `strategy="fsdp"`, every leaf of at least `fsdp_min_size` elements that rule 1 left off the
     fsdp axis (no logical names, or its `embed` dimension not divisible) is split along its largest
     free dimension divisible by the fsdp axis size; only leaves with no such dimension stay replicated.

Example:
    >>> mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    >>> shardings = state_shardings(jax.eval_shape(init, key), mesh, strategy="fsdp")
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
MEMBERS = "members"   # the logical name of a together group's leading member axis: replicated, never sharded
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("replicated", "fsdp")

# Flax logical axis name -> mesh axis (or None: replicated along that dimension).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves -1 entries of {axis: size} against the device count, checking the product."""
    unknown = [name for name in axes if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; valid axes: {', '.join(MESH_AXES)}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                         f"{num_devices} are available; set one axis to -1 to use the rest")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor). Default: every device on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    axes = dict(axes or {"data": -1})
    shape = mesh_shape(axes, len(devices))
    from jax.experimental import mesh_utils
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        # Several slices (multi-slice TPU): the first batch axis whose size the slice count divides spans the
        # slices over the data-centre network; every other axis stays inside a slice, on ICI.
        for i, name in enumerate(MESH_AXES):
            if name in BATCH_AXES and shape[i] % num_slices == 0:
                dcn = [1] * len(shape)
                dcn[i] = num_slices
                ici = [s // d for s, d in zip(shape, dcn)]
                return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices), MESH_AXES)
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} spans {num_slices} slices but neither mesh.data nor "
                         f"mesh.fsdp is a multiple of {num_slices}; set mesh.data to a multiple of the slice count")
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices or unusual topologies: plain order is fine
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data and fsdp axes; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def _uses(spec: Sequence[Any], axis: str) -> bool:
    return any(a == axis or (isinstance(a, tuple) and axis in a) for a in spec)


def _add_fsdp(shape: tuple[int, ...], spec: list, fsdp_size: int, min_size: int) -> list:
    """A logically named leaf whose names left it off the fsdp axis (its `embed` dimension missing or not
    divisible, e.g. width 1600 over 256 chips) goes on fsdp along its largest free divisible dimension, so
    that under `strategy=fsdp` no leaf of `min_size` elements or more stays whole on every device."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return spec
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if spec[dim] is None and shape[dim] % fsdp_size == 0:
            return spec[:dim] + ["fsdp"] + spec[dim + 1:]
    return spec


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str = "replicated",
                    rules: Sequence[tuple[str, Any]] | None = None, fsdp_min_size: int = 1024) -> Any:
    """NamedShardings for every leaf of a (possibly logically boxed) abstract state; the result has
    the structure of the *unboxed* state."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    rules = tuple(DEFAULT_RULES if rules is None else rules)
    logical = nn.get_partition_spec(abstract_state)   # PartitionSpec of logical names, or P() per leaf
    unboxed = nn.meta.unbox(abstract_state)
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(spec, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if spec is not None and len(spec) > 0 and spec[0] == MEMBERS:
            # a stacked state's member axis (research/together.py): never sharded; each member is placed as its
            # own run's leaf would be (its logical names, or none: the fsdp heuristic on the member's shape)
            rest = tuple(spec[1:])
            member = leaf_sharding(P(*rest) if any(n is not None for n in rest) else None,
                                   jax.ShapeDtypeStruct(shape[1:], getattr(leaf, "dtype", np.float32)))
            return NamedSharding(mesh, P(None, *member.spec, *([None] * (len(shape) - 1 - len(member.spec)))))
        if spec is not None and len(spec) > 0:
            mesh_spec = nn.logical_to_mesh_axes(spec, rules)
            # Drop mesh axes that do not divide the dimension (small vocabularies, odd head counts).
            fixed = []
            for dim, axis in zip(shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
                names = (axis,) if isinstance(axis, str) else tuple(axis or ())
                size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
                fixed.append(axis if size > 1 and dim % size == 0 else None)
            if strategy == "fsdp" and not _uses(fixed, "fsdp"):
                fixed = _add_fsdp(shape, fixed, fsdp_size, fsdp_min_size)
            return NamedSharding(mesh, P(*fixed))
        if strategy == "fsdp":
            return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, fsdp_min_size))
        return NamedSharding(mesh, P())

    leaves, treedef = jax.tree_util.tree_flatten(unboxed)
    specs = treedef.flatten_up_to(logical)
    return jax.tree_util.tree_unflatten(treedef, [leaf_sharding(s, l) for s, l in zip(specs, leaves)])


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Callable:
    """`fn` traced with the logical axis rules and `mesh` bound, so that the models'
    `nn.with_logical_constraint(x, ("batch", "length", "embed"))` becomes a real sharding constraint
    (batch over data+fsdp) instead of a no-op. Without it GSPMD is free to partition an FSDP step's matmuls
    along the sharded `embed` dimension and all-reduce activations (a GPT-2 small step on v5e-8: 9.3 GiB of
    all-reduces per step); bound, it all-gathers weights and reduce-scatters gradients, as MaxText does.
    Only the traced step is wrapped (never `init`: Flax's DenseGeneral unboxes its flat kernel there).

        >>> train = jax.jit(with_activation_sharding(train_step, mesh), in_shardings=...)
    """
    rules = tuple(DEFAULT_RULES if rules is None else rules)
    abstract = mesh.abstract_mesh

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(abstract):
            return fn(*args, **kwargs)

    return bound


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when this is one process of a multi-process job.

    Multi-process is signalled by explicit arguments or by the environment variables
    DEPTHLAB_COORDINATOR, DEPTHLAB_NUM_PROCESSES, DEPTHLAB_PROCESS_ID (or JAX's own auto-detection on
    TPU pods and SLURM when DEPTHLAB_DISTRIBUTED=auto). Returns True when it initialised.
    """
    coordinator_address = coordinator_address or os.environ.get("DEPTHLAB_COORDINATOR")
    if (coordinator_address or os.environ.get("DEPTHLAB_DISTRIBUTED") == "auto") and _distributed_ready():
        return False  # already initialised (e.g. by the CLI before the runner)
    if coordinator_address or os.environ.get("DEPTHLAB_DISTRIBUTED") == "auto":
        # CPU processes exchange collectives through gloo (GPUs and TPUs use their own fabric).
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # older JAX without the option
            pass
    if coordinator_address:
        num_processes = int(num_processes or os.environ["DEPTHLAB_NUM_PROCESSES"])
        process_id = int(process_id if process_id is not None else os.environ["DEPTHLAB_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if os.environ.get("DEPTHLAB_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    return False


def _distributed_ready() -> bool:
    try:
        from jax._src import distributed
        return distributed.global_state.client is not None
    except Exception:
        return False


def per_device_bytes(compiled) -> dict:
    """Per-device memory of a compiled computation (arguments, outputs, temporaries), in bytes."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {name: int(getattr(stats, f"{name}_size_in_bytes", 0))
            for name in ("argument", "output", "temp", "generated_code")}
