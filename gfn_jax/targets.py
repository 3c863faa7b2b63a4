"""Compile targets without the hardware: a TPU slice's devices, for plans made on any host.

XLA's TPU compiler runs on any Linux x86-64 host (it ships in the ``libtpu`` wheel; no TPU
needed): JAX builds *compile-only* devices for a named topology
(``jax.experimental.topologies.get_topology_desc``), a program is lowered with shardings over
them and compiled, and ``memory_analysis()`` gives the TPU compiler's own per-device figures
-- bfloat16 kept as bfloat16 and the TPU's fusion, where a plan compiled by the CPU backend
widens bfloat16 matmuls to float32 (``docs/performance.md``). Nothing runs on them.

* :func:`parse_target` -- ``"v5p-64"``, ``"v5litepod-8"``, ``"tpu:v6e-16"``, an explicit
  topology ``"v5p:4x4x2"``, or several slices joined by the data-center network (Multislice)
  ``"2xv5p-64"`` -> :class:`TpuTarget` (chips, hosts, HBM per chip).
* :meth:`TpuTarget.devices` -- the compile-only devices (needs ``libtpu``:
  ``pip install "gfn-jax[tpu]"``).
* :func:`hbm_bytes_of_kind` -- a TPU ``device_kind``'s memory per chip, for devices that
  report none (compile-only ones).

``gfn-jax plan --config ... --target v5p-64`` plans a run for that slice
(:func:`gfn_jax.train.plan_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["TpuTarget", "TargetError", "TPU_GENERATIONS", "parse_target", "hbm_bytes_of_kind"]

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class _Generation:
    kind: str  # the devices' device_kind
    hbm_bytes: int  # per chip (Google Cloud TPU documentation)
    dims: int  # torus / mesh dimensions of a slice
    cores_in_name: int  # accelerator-type names count TensorCores (v4, v5p: 2 per chip)
    chip_config: Optional[str]  # libtpu's chip config: "megacore" = one device per chip
    host_chips: Tuple[int, int, int]  # chips per host in a multi-host slice


#: TPU generations a target may name: HBM per chip from the Cloud TPU documentation (v4
#: 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB).
TPU_GENERATIONS: Dict[str, _Generation] = {
    "v4": _Generation("TPU v4", 32 * GiB, 3, 2, "megacore", (2, 2, 1)),
    "v5p": _Generation("TPU v5", 95 * GiB, 3, 2, None, (2, 2, 1)),
    "v5e": _Generation("TPU v5 lite", 16 * GiB, 2, 1, None, (2, 2, 1)),
    "v6e": _Generation("TPU v6 lite", 32 * GiB, 2, 1, None, (2, 2, 1)),
}
_NAME_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e",
                 "v6e": "v6e"}

# Slice shapes (chips along each axis) of the standard slice sizes, as Cloud TPU builds them.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
# single-host slices of the 2-D generations (v5litepod-8, v6e-8: one host with 8 chips)
_SINGLE_HOST_2D = 8

_FORMS = ("an accelerator type such as v5p-64, v4-32, v5litepod-8 (v5e-8), v6e-16, or a "
          "topology such as v5p:4x4x2, v6e:4x4 (an optional 'tpu:' prefix is allowed), "
          "either after N x for N slices (2xv5p-64)")


class TargetError(ValueError):
    """A target that cannot be parsed or built (a short message naming what to do)."""


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU slice to compile for: ``generation`` (``v4 | v5p | v5e | v6e``) and ``shape``
    (chips along each axis); ``name`` is the spec it was parsed from. ``slices`` > 1: that
    many such slices, joined by the data-center network (DCN; Cloud TPU Multislice)."""

    name: str
    generation: str
    shape: Tuple[int, ...]
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return int(math.prod(self.shape))

    @property
    def chips(self) -> int:
        """Chips of every slice."""
        return self.slices * self.chips_per_slice

    @property
    def _gen(self) -> _Generation:
        return TPU_GENERATIONS[self.generation]

    @property
    def host_shape(self) -> Tuple[int, int, int]:
        """Chips per host: the whole slice for single-host v5e / v6e slices (up to 8 chips),
        else the generation's host block (2 x 2 x 1)."""
        g = self._gen
        full = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if g.dims == 2 and self.chips_per_slice <= _SINGLE_HOST_2D:
            return full  # type: ignore[return-value]
        return tuple(min(a, b) for a, b in zip(g.host_chips, full))  # type: ignore[return-value]

    @property
    def hosts(self) -> int:
        """Hosts (TPU VM workers) of every slice."""
        return self.chips // int(math.prod(self.host_shape))

    @property
    def hbm_bytes(self) -> int:
        """Memory per chip (one device per chip: v4 and v5p as megacore)."""
        return self._gen.hbm_bytes

    @property
    def accelerator_type(self) -> str:
        """One slice's name as Cloud TPU gives it (``v5p-16``, ``v5litepod-8``, ``v6e-8``):
        what ``--accelerator-type`` takes, for each slice of a Multislice request."""
        prefix = "v5litepod" if self.generation == "v5e" else self.generation
        return f"{prefix}-{self.chips_per_slice * self._gen.cores_in_name}"

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(str(a) for a in self.shape)}"

    def describe(self) -> str:
        per = (f"{self.chips} x {self._gen.kind} chip(s), topology {self.topology_name}"
               if self.slices == 1 else
               f"{self.slices} slices joined by the data-center network (DCN), each "
               f"{self.chips_per_slice} x {self._gen.kind} chip(s), topology "
               f"{self.topology_name}; {self.chips} chips")
        return (f"{self.name}: {per}, {self.hosts} host(s), {self.hbm_bytes / GiB:.0f} GiB "
                f"per chip")

    def devices(self) -> List[Any]:
        """The compile-only devices (one per chip, every slice; ``slice_index`` tells the
        slices apart). Raises :class:`TargetError` when this host has no TPU compiler
        (``libtpu``) or it rejects the topology."""
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - every supported JAX has it
            raise TargetError(f"this JAX cannot build compile-only devices ({e})") from e
        kwargs: Dict[str, Any] = {"chips_per_host_bounds": self.host_shape}
        if self._gen.chip_config:
            kwargs["chip_config_name"] = self._gen.chip_config
        if self.slices > 1:
            kwargs["num_slices"] = self.slices
        try:
            with _compile_only_env(self.accelerator_type):
                desc = topologies.get_topology_desc(platform="tpu",
                                                    topology_name=self.topology_name, **kwargs)
        except Exception as e:  # noqa: BLE001 - libtpu missing, or a topology it rejects
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if _has_libtpu():
                raise TargetError(f"the TPU compiler rejected target {self.name!r} "
                                  f"(topology {self.topology_name}): {msg}") from e
            raise TargetError(
                f"planning for target {self.name!r} needs the TPU compiler on this host: "
                f"pip install \"gfn-jax[tpu]\" (the libtpu wheel matching this JAX; no TPU "
                f"needed). ({msg})") from e
        return list(desc.devices)


def _has_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


#: What libtpu reads of a TPU VM: one local worker, no metadata-server query.
_LOCAL_WORKER_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_WORKER_ID": "0"}


def _local_libtpu_env(accelerator_type: str) -> Dict[str, str]:
    """One local worker of ``accelerator_type``, no metadata query, no lock file."""
    return dict(_LOCAL_WORKER_ENV, TPU_ACCELERATOR_TYPE=accelerator_type,
                ALLOW_MULTIPLE_LIBTPU_LOAD="1")


@contextlib.contextmanager
def _compile_only_env(accelerator_type: str) -> Iterator[None]:
    """The environment libtpu starts in, set where unset while compile-only devices are
    built, then put back: one local worker and no metadata-server query (else, on a host
    that is not a TPU VM, it prints warnings), and no single-process lock file (libtpu takes
    /tmp/libtpu_lockfile for the chips it drives; compile-only devices drive none, so two
    plans at once, e.g. two test workers, must not refuse each other). The topology built
    is the one named."""
    values = _local_libtpu_env(accelerator_type)
    unset = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in unset})
    try:
        yield
    finally:
        for k in unset:
            os.environ.pop(k, None)


#: Device files of TPU chips (v4 / v5e: /dev/accel*; v5p / v6e: /dev/vfio).
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def quiet_tpu_probe() -> bool:
    """On a host with ``libtpu`` installed (the ``tpu`` extra) but no TPU chip and no
    ``JAX_PLATFORMS`` choice, JAX probes for a TPU when it starts, and libtpu prints a few
    lines of warnings about the TPU VM environment it cannot find before JAX falls back; it
    also takes /tmp/libtpu_lockfile for the process's lifetime. Set that environment (where
    unset) to one local worker, no metadata query and no lock (there is no chip to guard),
    so the probe fails quietly; returns whether it did. Call before JAX starts its backends
    (the CLI does)."""
    import glob

    if os.environ.get("JAX_PLATFORMS") or not _has_libtpu():
        return False
    if any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES):
        return False  # a TPU host: its own environment applies
    for k, v in _local_libtpu_env("v5p-8").items():
        os.environ.setdefault(k, v)
    return True


def parse_target(spec: str) -> TpuTarget:
    """A :class:`TpuTarget` from ``spec``: an accelerator type (``v5p-64``: 64 TensorCores =
    32 chips for v4 / v5p; ``v5litepod-8`` / ``v5e-8`` / ``v6e-8``: 8 chips) or a topology
    (``v5p:4x4x2``), either after ``N x`` for N slices joined by the data-center network
    (``2xv5p-64``: Multislice). Raises :class:`TargetError` naming the accepted forms."""
    raw = str(spec).strip()
    s = raw.lower()
    if s.startswith("tpu:"):
        s = s[4:]
    slices = 1
    m = re.fullmatch(r"(\d+)\s*[x*]\s*(.+)", s)
    if m:
        slices, s = int(m.group(1)), m.group(2)
        if slices < 1:
            raise TargetError(f"target {raw!r}: the number of slices must be at least 1")
        if s.startswith("tpu:"):
            s = s[4:]
    return dataclasses.replace(_parse_slice(raw, s), slices=slices)


def _parse_slice(raw: str, s: str) -> TpuTarget:
    m = re.fullmatch(r"(v\d[a-z]*)[:](\d+(?:x\d+)*)", s)
    if m:
        gen = _generation(m.group(1), raw)
        shape = tuple(int(a) for a in m.group(2).split("x"))
        want = TPU_GENERATIONS[gen].dims
        if len(shape) != want or min(shape) < 1:
            raise TargetError(f"target {raw!r}: a {gen} topology has {want} dimensions "
                              f"(e.g. {gen}:{'x'.join(['2'] * want)})")
        return TpuTarget(raw, gen, shape)
    m = re.fullmatch(r"(v\d[a-z]*)-(\d+)", s)
    if not m:
        raise TargetError(f"target {raw!r}: expected {_FORMS}")
    gen = _generation(m.group(1), raw)
    g = TPU_GENERATIONS[gen]
    n = int(m.group(2))
    shapes = _SHAPES_3D if g.dims == 3 else _SHAPES_2D
    if n % g.cores_in_name or n // g.cores_in_name not in shapes:
        sizes = ", ".join(f"{m.group(1)}-{c * g.cores_in_name}" for c in shapes)
        raise TargetError(f"target {raw!r}: not a standard {gen} slice ({sizes}); name "
                          f"its topology instead, e.g. {gen}:{'x'.join(['2'] * g.dims)}")
    return TpuTarget(raw, gen, shapes[n // g.cores_in_name])


def _generation(name: str, raw: str) -> str:
    gen = _NAME_ALIASES.get(name)
    if gen is None:
        raise TargetError(f"target {raw!r}: unknown TPU generation {name!r}; known: "
                          f"{', '.join(sorted(_NAME_ALIASES))}")
    return gen


def hbm_bytes_of_kind(kind: str) -> Optional[int]:
    """Memory per chip of a TPU ``device_kind`` (``"TPU v5 lite"``, ...), None if unknown."""
    k = str(kind).strip().lower()
    for g in TPU_GENERATIONS.values():
        if g.kind.lower() == k:
            return g.hbm_bytes
    return None
