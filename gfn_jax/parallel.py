"""Device mesh, logical-axis sharding rules and multi-host set-up.

Model code only *names* the axes of its arrays (``gfn_jax.models.param_axes`` gives a
tuple of logical names per parameter leaf, e.g. ``("layers", "embed", "heads",
"head_dim")``). One rules table maps each logical name to mesh axes; everything
here turns (logical names, shape, mesh, rules) into ``PartitionSpec`` /
``NamedSharding`` objects:

* :class:`MeshConfig` / :func:`make_mesh` -- a ``('data', 'fsdp', 'tensor')`` mesh over
  all global devices (``-1`` fills with the remaining devices).
* :data:`DEFAULT_RULES`, :func:`merge_rules` -- the rules table and config overrides.
* :func:`logical_to_pspec` -- one leaf; a mesh axis of size 1, one that does not divide
  the dimension, or one already used by another dimension is dropped (that dimension
  is then replicated over it), so any model fits any mesh.
* :func:`tree_shardings`, :func:`shard_params`, :func:`batch_sharding`,
  :func:`replicated`, :func:`with_logical_constraint`; :func:`split_rows` -- host rows
  placed over the batch axes of the mesh a model lives on (a pass outside the train step).
* :func:`initialize_distributed`, :func:`global_batch_from_local`,
  :func:`process_batch_slice`, :func:`is_main_process`, :func:`to_host` -- multi-process
  (multi-host) runs: one process per host (TPU VM worker, SLURM node) or per GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES: Tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = Union[str, Tuple[str, ...], None]
Rules = Tuple[Tuple[str, MeshAxes], ...]

#: Logical axis name -> mesh axes. A name may appear several times: the first entry
#: that is usable for a dimension (after dropping size-1, non-dividing and already used
#: mesh axes) wins. Names not listed (e.g. LoRA's ``lora`` rank axis) are replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("positions", None),
    ("length", None),
    ("lora", None),
)


# ---------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes; at most one may be -1,
    meaning "all the devices the other axes leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, n_devices: int) -> Tuple[int, int, int]:
        """Concrete ``(data, fsdp, tensor)`` for ``n_devices`` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(MESH_AXES, sizes):
            if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
                raise ValueError(f"mesh axis {name}={s!r} must be a positive int or -1")
        n_fill = sum(s == -1 for s in sizes)
        if n_fill > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if n_fill == 1:
            if n_devices % known:
                raise ValueError(
                    f"mesh {self} cannot fill {n_devices} devices: the fixed axes "
                    f"multiply to {known}, which does not divide {n_devices}"
                )
            sizes = [n_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != n_devices:
            raise ValueError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                f"{math.prod(sizes)} devices, but {n_devices} devices are available"
            )
        return int(sizes[0]), int(sizes[1]), int(sizes[2])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MeshConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown MeshConfig keys: {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})


def _device_array(shape: Tuple[int, int, int], devices: Sequence[Any]) -> np.ndarray:
    """Arrange devices so ``tensor`` is innermost (fastest links) and hosts/slices are
    outermost (along ``data``, then ``fsdp``)."""
    devices = list(devices)
    if devices[0].platform == "tpu":
        slices = sorted({getattr(d, "slice_index", 0) for d in devices})
        n_slices = len(slices)
        try:
            if n_slices == 1:
                return mesh_utils.create_device_mesh(shape, devices)
            if shape[0] % n_slices == 0:
                ici = (shape[0] // n_slices, shape[1], shape[2])
                return mesh_utils.create_hybrid_device_mesh(
                    ici, (n_slices, 1, 1), devices
                )
            logger.warning(
                "data=%d is not a multiple of the %d TPU slices; slices will not be "
                "aligned with the data axis", shape[0], n_slices,
            )
        except (ValueError, NotImplementedError, AssertionError) as e:  # pragma: no cover
            logger.warning("topology-aware TPU mesh failed (%s); using device order", e)
    ordered = sorted(devices, key=lambda d: (d.process_index, getattr(d, "slice_index", 0), d.id))
    return np.asarray(ordered, dtype=object).reshape(shape)


def make_mesh(mesh_cfg: Optional[MeshConfig] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: all
    global devices, i.e. every process's devices in a multi-host run)."""
    mesh_cfg = mesh_cfg or MeshConfig()
    if devices is None:
        devices = jax.devices()
    devices = list(np.asarray(devices, dtype=object).ravel())
    if not devices:
        raise ValueError("make_mesh got an empty device list")
    shape = mesh_cfg.resolve(len(devices))
    warn_unsafe_cpu_flags(devices)
    return Mesh(_device_array(shape, devices), MESH_AXES)


_UNSAFE_CPU_FLAG = re.compile(r"--xla_cpu_use_fusion_emitters=(false|0)\b", re.IGNORECASE)
_warned_unsafe_cpu_flags = False


def warn_unsafe_cpu_flags(devices: Sequence[Any]) -> bool:
    """Warn once per process (and return True) when ``XLA_FLAGS`` asks XLA:CPU for its older
    elemental emitters while ``devices`` are several CPU devices: with them a train step's
    collectives can deadlock (devices join two all-reduces in different orders and XLA
    aborts after 40 s; see docs/reliability.md)."""
    global _warned_unsafe_cpu_flags
    devices = list(devices)
    if (_warned_unsafe_cpu_flags or len(devices) < 2 or devices[0].platform != "cpu"
            or not _UNSAFE_CPU_FLAG.search(os.environ.get("XLA_FLAGS", ""))):
        return False
    _warned_unsafe_cpu_flags = True
    logger.warning(
        "XLA_FLAGS has --xla_cpu_use_fusion_emitters=false and this mesh spans %d CPU "
        "devices: with those emitters XLA:CPU can deadlock a step in its collectives (the "
        "process aborts with 'Termination timeout for all reduce'); remove the flag from "
        "XLA_FLAGS (docs/reliability.md)", len(devices))
    return True


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------
def _normalize_target(name: str, target: Any) -> MeshAxes:
    """A rule's right-hand side as None, a mesh axis name, or a tuple of names.
    Strings ``"none"``/``""`` mean None and ``"data+fsdp"`` means ``("data", "fsdp")``."""
    if target is None:
        return None
    if isinstance(target, str):
        t = target.strip()
        if t.lower() in ("", "none", "null", "replicated"):
            return None
        parts = tuple(p.strip() for p in t.replace(",", "+").split("+") if p.strip())
        return parts[0] if len(parts) == 1 else parts
    if isinstance(target, (list, tuple)):
        if not all(isinstance(p, str) for p in target):
            raise ValueError(f"rule for {name!r}: mesh axes must be strings, got {target!r}")
        t = tuple(target)
        if not t:
            return None
        return t[0] if len(t) == 1 else t
    raise ValueError(f"rule for {name!r}: expected None, a mesh axis name or a tuple, got {target!r}")


def merge_rules(
    overrides: Union[Mapping[str, Any], Sequence[Tuple[str, Any]], None],
    base: Rules = DEFAULT_RULES,
) -> Rules:
    """``base`` with every logical name in ``overrides`` re-mapped (e.g. from a config:
    ``{"embed": None, "mlp": "fsdp", "batch": "data+fsdp"}``). Overridden names replace
    all of their entries in ``base``."""
    if not overrides:
        return tuple(base)
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    new = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"a rule must be a (logical_name, mesh_axes) pair, got {item!r}")
        new.append((item[0], _normalize_target(item[0], item[1])))
    names = {n for n, _ in new}
    return tuple(new) + tuple((n, t) for n, t in base if n not in names)


def _candidates(rules: Rules, name: str) -> list:
    return [_normalize_target(n, t) for n, t in rules if n == name]


def logical_to_pspec(
    axes: Sequence[Optional[str]],
    rules: Rules = DEFAULT_RULES,
    mesh: Optional[Mesh] = None,
    shape: Optional[Sequence[int]] = None,
) -> PartitionSpec:
    """``PartitionSpec`` for an array whose dims have logical names ``axes``.

    For each dim, in order, the first rule for its name that leaves at least one mesh
    axis wins; within a rule, mesh axes are kept left to right while each is larger than
    1, unused by an earlier dim, and (given ``shape``) keeps the product of kept sizes a
    divisor of the dim (size checks need ``mesh``). Unknown names and ``None`` are
    replicated.
    """
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(
            f"logical axes {axes} name {len(axes)} dims but the array has shape {tuple(shape)}"
        )
    mesh_sizes: Dict[str, int] = dict(mesh.shape) if mesh is not None else {}
    used: set = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and not isinstance(name, str):
            raise ValueError(f"logical axis names must be str or None, got {name!r} in {axes}")
        chosen: Tuple[str, ...] = ()
        for target in ([] if name is None else _candidates(rules, name)):
            if target is None:
                break  # explicitly replicated
            kept, prod = [], 1
            for ax in (target,) if isinstance(target, str) else target:
                if mesh is not None and ax not in mesh_sizes:
                    raise ValueError(
                        f"rule {name!r} -> {target!r} names mesh axis {ax!r}, but the mesh "
                        f"has axes {tuple(mesh_sizes)}"
                    )
                if ax in used or ax in kept:
                    continue
                size = mesh_sizes.get(ax)  # None without a mesh: sizes unknown, keep it
                if size is not None:
                    if size == 1 or (shape is not None and shape[i] % (prod * size)):
                        continue
                    prod *= size
                kept.append(ax)
            if kept:
                chosen = tuple(kept)
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def _is_axes_leaf(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of ``NamedSharding`` for a params-like tree. ``axes_tree`` has a tuple of
    logical names per leaf (``param_axes(cfg)``); ``shapes_tree`` has the same structure
    with arrays, ``jax.ShapeDtypeStruct`` or shape tuples at the leaves."""

    def one(axes, leaf):
        shape = tuple(leaf) if _is_shape_tuple(leaf) else tuple(np.shape(leaf))
        return NamedSharding(mesh, logical_to_pspec(axes, rules, mesh, shape))

    try:
        return jax.tree_util.tree_map(one, axes_tree, shapes_tree, is_leaf=_is_axes_leaf)
    except ValueError as e:
        if "logical" in str(e) or "mesh axis" in str(e):
            raise
        raise ValueError(
            "the logical-axes tree and the shapes tree have different structures: "
            f"{jax.tree_util.tree_structure(axes_tree, is_leaf=_is_axes_leaf)} vs "
            f"{jax.tree_util.tree_structure(shapes_tree)}"
        ) from e


def _is_shape_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)


def shard_params(tree: Any, shardings: Any) -> Any:
    """Place every leaf of ``tree`` with its sharding (``jax.device_put``). In a
    multi-process run every process must pass the same values."""
    return jax.device_put(tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_pspec(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """``PartitionSpec`` for a ``[B, ...]`` array: B over the ``batch`` rule's mesh axes
    (``data`` and ``fsdp`` by default, size-1 axes dropped), the rest replicated."""
    if ndim < 1:
        raise ValueError(f"a batch array needs at least one dim, got ndim={ndim}")
    return logical_to_pspec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` of :func:`batch_pspec`."""
    return NamedSharding(mesh, batch_pspec(mesh, ndim, rules))


def batch_axes_size(mesh: Optional[Mesh], rules: Rules = DEFAULT_RULES) -> int:
    """How many devices a row dimension splits over: the size of the mesh axes the logical
    ``batch`` axis maps to (1 without a mesh)."""
    if mesh is None:
        return 1
    spec = logical_to_pspec(("batch",), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def mesh_of(tree: Any) -> Optional[Mesh]:
    """The mesh of the first array of ``tree`` that has a ``NamedSharding``, else None."""
    for x in jax.tree_util.tree_leaves(tree):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            return sh.mesh
    return None


def split_rows(like: Any, *arrays: Any) -> Tuple[Any, ...]:
    """Host arrays whose first dimension is rows, placed for a jitted pass together with
    ``like`` (arrays on a mesh, e.g. the weights of the run): the rows split over the mesh's
    ``batch`` axes (``data`` x ``fsdp``), padded at the end with copies of the first rows to
    a multiple of them, so that each device computes its share of the rows instead of every
    device all of them (what host arrays next to replicated weights get). Read the result
    with ``to_host(out)[:n]`` (every process gets every row). Plain ``jnp`` arrays where
    ``like`` is on no mesh or the batch axes span one device."""
    import jax.numpy as jnp

    host = [np.asarray(a) for a in arrays]
    mesh = mesh_of(like)
    size = batch_axes_size(mesh)
    if size == 1:
        return tuple(jnp.asarray(a) for a in host)
    spec = logical_to_pspec(("batch",), DEFAULT_RULES, mesh)[0]
    n = host[0].shape[0]
    if any(a.shape[0] != n for a in host):
        raise ValueError(f"split_rows: the arrays have different row counts "
                         f"{[a.shape[0] for a in host]}")
    extra = np.arange((-n) % size) % max(n, 1)
    out = []
    for a in host:
        a = np.concatenate([a, a[extra]]) if len(extra) else a
        sh = NamedSharding(mesh, PartitionSpec(spec, *([None] * (a.ndim - 1))))
        out.append(jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]))
    return tuple(out)


def with_logical_constraint(
    x: jax.Array,
    axes: Sequence[Optional[str]],
    rules: Rules = DEFAULT_RULES,
    mesh: Optional[Mesh] = None,
) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` by logical names; identity when ``mesh`` is
    None, so model code can call it unconditionally."""
    if mesh is None:
        return x
    spec = logical_to_pspec(axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------
# Multi-process
# ---------------------------------------------------------------------------
ENV_COORDINATOR = "GFN_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GFN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GFN_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "GFN_JAX_LOCAL_DEVICE_IDS"
ENV_DISTRIBUTED = "GFN_JAX_DISTRIBUTED"  # "auto": always use JAX auto-detection; "off": never

_initialized = False


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def _cluster_detected() -> Optional[str]:
    """Name of a multi-process cluster JAX can auto-configure, or None."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("OMPI_COMM_WORLD_SIZE") and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "mpi"
    return None


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
) -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-process run.

    Sources, in order: explicit arguments; the env vars ``GFN_JAX_COORDINATOR``
    (``host:port`` of process 0), ``GFN_JAX_NUM_PROCESSES``, ``GFN_JAX_PROCESS_ID``
    (and optionally ``GFN_JAX_LOCAL_DEVICE_IDS``, comma-separated); else JAX's own
    cluster auto-detection when a multi-task SLURM job, a multi-host TPU VM or Open MPI
    is detected, or when ``GFN_JAX_DISTRIBUTED=auto`` (e.g. on Cloud TPU VMs, where JAX
    reads the pod layout from the metadata server). ``GFN_JAX_DISTRIBUTED=off`` disables
    the set-up. Otherwise (one process) nothing happens. Must run before any other JAX
    call that touches devices. Returns True iff the run is multi-process.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    mode = os.environ.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{ENV_DISTRIBUTED}={mode!r}: expected 'auto', 'off' or unset")
    if mode == "off":
        return False
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        raw = os.environ[ENV_LOCAL_DEVICE_IDS]
        try:
            local_device_ids = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={raw!r} is not a list of ints") from None

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if num_processes == 1 and process_id in (None, 0) and local_device_ids is None:
            return False  # explicitly a single process
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "multi-process set-up needs all of coordinator_address, num_processes and "
                f"process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator_address {coordinator_address!r} must be 'host:port'")
        kwargs: Dict[str, Any] = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        cluster = "requested" if mode == "auto" else _cluster_detected()
        if cluster is None:
            return False
        logger.info("multi-process %s cluster detected; using JAX auto-detection", cluster)
        kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            "jax.distributed.initialize failed; initialize_distributed() must be called "
            f"before anything else uses JAX devices ({e})"
        ) from e
    _initialized = True
    logger.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on process 0 (the one that logs and writes checkpoints metadata)."""
    return jax.process_index() == 0


def _as_pspec(pspec: Any, mesh: Mesh, ndim: int) -> PartitionSpec:
    if pspec is None:
        return batch_pspec(mesh, ndim)
    if isinstance(pspec, PartitionSpec):
        return pspec
    raise ValueError(f"expected a PartitionSpec or None, got {pspec!r}")


def global_batch_from_local(local_arrays: Any, mesh: Mesh, pspec: Optional[PartitionSpec] = None) -> Any:
    """Assemble global ``jax.Array``s from each process's rows.

    ``local_arrays`` is a tree of host arrays holding this process's contiguous slice of
    the global batch (see :func:`process_batch_slice`); ``pspec`` (default: batch over
    ``data``+``fsdp``) is applied to every leaf. In a single process this is a plain
    sharded ``device_put``.
    """

    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, _as_pspec(pspec, mesh, x.ndim))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(one, local_arrays)


def process_batch_slice(
    mesh: Mesh, global_batch: int, pspec: Optional[PartitionSpec] = None
) -> slice:
    """The rows ``[start, stop)`` of a ``global_batch``-row array that this process's
    devices hold under ``pspec`` (default: batch sharding) -- what its loader must feed
    to :func:`global_batch_from_local`."""
    spec = _as_pspec(pspec, mesh, 1)
    sharding = NamedSharding(mesh, PartitionSpec(*tuple(spec)[:1]))
    rows = set()
    for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*idx[0].indices(global_batch)))
    if not rows:
        raise ValueError("this process holds no devices of the mesh")
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(
            "this process's batch rows are not contiguous under this mesh; order the mesh "
            "devices by process (make_mesh does)"
        )
    return slice(start, stop)


@functools.lru_cache(maxsize=64)
def _replicate_fn(out_shardings: Tuple[NamedSharding, ...]):
    return jax.jit(lambda *xs: xs, out_shardings=out_shardings)


def to_host(tree: Any) -> Any:
    """A tree of ``jax.Array``s (e.g. a step's metrics) as numpy, the whole value on every
    process. In one process this is ``jax.device_get``. With several processes, a
    replicated leaf (metrics, scalars) is read from this process's own copy, with no
    communication; every other leaf of a mesh is made replicated by ONE jitted program for
    the whole tree, so fetching a step's dozens of metrics costs at most one collective
    (``multihost_utils.process_allgather`` runs one program, and one collective, per leaf).
    Numpy and fully addressable leaves are returned as they are (as numpy)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out: list = [None] * len(leaves)
    by_mesh: Dict[Any, list] = {}
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            out[i] = np.asarray(x)
        elif x.sharding.is_fully_replicated:
            out[i] = np.asarray(x.addressable_data(0))
        elif isinstance(x.sharding, NamedSharding):
            by_mesh.setdefault(x.sharding.mesh, []).append(i)
        else:  # another kind of sharding: JAX's per-leaf gather
            from jax.experimental import multihost_utils

            out[i] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for mesh, idx in by_mesh.items():
        rep = tuple(NamedSharding(mesh, PartitionSpec()) for _ in idx)
        gathered = _replicate_fn(rep)(*[leaves[i] for i in idx])
        for i, g in zip(idx, gathered):
            out[i] = np.asarray(g.addressable_data(0))
    return jax.tree_util.tree_unflatten(treedef, out)
