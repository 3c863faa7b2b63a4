"""Collective traffic of a compiled program, read from its optimized HLO: what a step sends
between devices, and between TPU slices over the data-center network, before it runs.

XLA writes every transfer between devices into the partitioned program: all-reduce,
all-gather, reduce-scatter, all-to-all and collective-permute (and their asynchronous
``-start`` forms), each with its shapes and its device groups. For a TPU Multislice program
(:mod:`gfn_jax.targets`, ``2xv5p-64``) the TPU compiler splits a collective that crosses
slices into its part inside each slice (the ops above) and host transfers to the other
slices over the data-center network (DCN): ``send`` ops handled by the ``megascale``
runtime, tagged with the collective they belong to.

:func:`collective_traffic` adds them up per device, with the ring algorithm's bytes on the
wire (what one device sends):

* all-reduce of S bytes over n devices: 2 S (n - 1) / n;
* all-gather: output - operand; reduce-scatter: operand - output;
* all-to-all of S bytes: S (n - 1) / n; collective-permute: S;
* DCN: the bytes of each megascale ``send`` (what one device hands the network).

Ops in a ``while`` body (and its condition) count once per iteration: times its trip
count -- XLA's ``known_trip_count``, or, where the TPU compiler dropped it, read from the
loop (a counter from a constant start, stepped by a constant, below a constant bound: scans,
the layers of a scanned model, gradient accumulation, loops XLA peeled a trip from) -- or,
where neither is known (the sampler's decode loop, which stops when every row is done),
apart, as traffic per iteration (with the loop's bound where it is read). A
``conditional`` counts its heaviest branch. These are the compiler's own figures for one
call; how long they take depends on the links (and on overlap with compute), which this
does not model.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from gfn_jax.hlo import Instruction, array_types, parse_module, shape_bytes

__all__ = ["CollectiveTraffic", "collective_traffic", "traffic_of_hlo"]

#: Collective opcodes, by the kind they count under (``-start`` forms; ``-done`` is not
#: counted again).
_KINDS = {
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
    "collective-broadcast": "collective-permute",
}

_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _group_size(attrs: str, num_devices: int) -> Optional[int]:
    """Devices per group of a collective's ``replica_groups`` in any of XLA's printed
    forms: explicit ``{{0,1},{2,3}}``, iota ``[2,4]<=[8]``, mesh axes
    ``mesh['a'=4,'b'=2] ... {'a'}``; ``{}`` is every device. None when unreadable."""
    m = re.search(r"replica_groups=\{\{([0-9,\s]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    if re.search(r"replica_groups=\{\}", attrs):
        return num_devices
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{((?:'[^']*',?\s*)+)\}", attrs)
    if m:
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']*)'=(\d+)", m.group(1)))
        axes = re.findall(r"'([^']*)'", m.group(2))
        if axes and all(a in sizes for a in axes):
            return int(math.prod(sizes[a] for a in axes))
    return None


@dataclasses.dataclass(frozen=True)
class CollectiveTraffic:
    """Bytes one device sends in one call of a compiled program, by collective kind.

    ``device_bytes``: between the devices of a slice (or of a host / GPU node), ring model;
    ``dcn_bytes``: to other TPU slices over the data-center network; ``counts``: ops
    executed (a loop's ops times its trip count; DCN transfers as ``"dcn <kind>"``).
    ``per_iteration_*``: ops inside loops whose trip count XLA does not know (the sampler's
    decode loop), counted once, i.e. per iteration. ``ungrouped``: all-reduce / all-to-all ops whose device groups could not be
    read, counted as if over infinitely many devices (an upper bound)."""

    device_bytes: Mapping[str, float]
    dcn_bytes: Mapping[str, float]
    counts: Mapping[str, int]
    per_iteration_device_bytes: Mapping[str, float]
    per_iteration_dcn_bytes: Mapping[str, float]
    ungrouped: int = 0
    max_iterations: Optional[int] = None  # the loop bound of those loops, where read

    @property
    def total_device_bytes(self) -> float:
        return float(sum(self.device_bytes.values()))

    @property
    def total_dcn_bytes(self) -> float:
        return float(sum(self.dcn_bytes.values()))

    @property
    def per_iteration_bytes(self) -> float:
        return float(sum(self.per_iteration_device_bytes.values())
                     + sum(self.per_iteration_dcn_bytes.values()))

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_device_bytes=self.total_device_bytes,
                 total_dcn_bytes=self.total_dcn_bytes)
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}

    def summary(self, what: str = "a call", loop: str = "loop iteration") -> str:
        """One line: bytes per device between devices (by kind) and over the DCN."""
        from gfn_jax.memory import format_bytes

        def parts(d: Mapping[str, float]) -> str:
            return ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(d.items()) if v)

        s = f"collectives per device in {what}: {format_bytes(self.total_device_bytes)}"
        if self.device_bytes and self.total_device_bytes:
            s += f" between devices ({parts(self.device_bytes)})"
        if self.total_dcn_bytes:
            s += (f", {format_bytes(self.total_dcn_bytes)} between slices over the DCN "
                  f"({parts(self.dcn_bytes)})")
        if self.per_iteration_bytes:
            upto = f", up to {self.max_iterations}" if self.max_iterations else ""
            s += (f"; plus per {loop}{upto}: "
                  f"{format_bytes(sum(self.per_iteration_device_bytes.values()))}")
            if sum(self.per_iteration_dcn_bytes.values()):
                s += (f" between devices, "
                      f"{format_bytes(sum(self.per_iteration_dcn_bytes.values()))} over the DCN")
        if self.ungrouped:
            s += f" ({self.ungrouped} op(s) with unread device groups, counted as an upper bound)"
        return s


def _constant_int(ins: Optional[Instruction],
                  named: Mapping[str, Instruction]) -> Optional[int]:
    """The integer a scalar ``constant`` holds (through copies and bitcasts), else None."""
    ins = _through_copies(ins, named)
    if ins is None or ins.opcode != "constant":
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
    return int(m.group(1)) if m else None


def _trip_count(loop: Instruction, comps: Mapping[str, List[Instruction]],
                named_in: Mapping[str, Mapping[str, Instruction]], where: str, cond: str,
                body: str) -> Tuple[Optional[int], Optional[int]]:
    """(trip count, bound) of a ``while``: its ``known_trip_count`` where XLA kept it; else
    read from the loop (the TPU compiler drops the annotation): a condition that is only
    ``i < N``, on a counter that starts at a constant s and that the body steps by a
    constant d > 0, runs ceil((N - s) / d) times (a scan or fori loop; s = 1 after XLA peeled
    the first trip out of the loop). A condition ``i < N and ...`` (the sampler's decode
    loop: stop when every row is done) runs at most N times: (None, N). ``named_in``: each
    computation's instructions by name."""
    m = _TRIP.search(loop.attrs)
    if m:
        return int(m.group(1)), int(m.group(1))
    cond_ins = comps.get(cond, [])
    if not cond_ins:
        return None, None
    named = named_in[cond]
    bound, index = None, None
    for ins in cond_ins:
        if ins.opcode == "compare" and "direction=LT" in ins.attrs:
            a, b = (list(ins.operands) + [None, None])[:2]
            n = _constant_int(named.get(b), named)
            ga = _through_copies(named.get(a), named)
            if n is not None and ga is not None and ga.opcode == "get-tuple-element":
                im = re.search(r"index=(\d+)", ga.attrs)
                bound, index = n, int(im.group(1)) if im else None
    if bound is None or index is None:
        return None, bound
    root = cond_ins[-1]
    only_bound = _through_copies(root, named).opcode == "compare"
    # the counter's start: element ``index`` of the loop's operand tuple
    outer = named_in[where]
    tup = outer.get((loop.operands or ("",))[0])
    start = None
    if tup is not None and tup.opcode == "tuple":
        elems = tup.operands
        if index < len(elems):
            start = _constant_int(outer.get(elems[index]), outer)
    # its step: element ``index`` of the body's result is counter + constant
    step = None
    body_ins = comps.get(body, [])
    if body_ins and body_ins[-1].opcode == "tuple":
        bnamed = named_in[body]
        elems = body_ins[-1].operands
        nxt = _through_copies(bnamed.get(elems[index]), bnamed) if index < len(elems) else None
        if nxt is not None and nxt.opcode == "add":
            for o in nxt.operands:
                c = _constant_int(bnamed.get(o), bnamed)
                if c is not None:
                    step = c
    if only_bound and start is not None and step is not None and step > 0:
        return max(0, -(-(bound - start) // step)), bound
    return None, bound


def _through_copies(ins: Optional[Instruction],
                    named: Mapping[str, Instruction]) -> Optional[Instruction]:
    """``ins``, or what it copies or bitcasts (a few levels deep)."""
    for _ in range(8):
        if ins is None or ins.opcode not in ("copy", "bitcast"):
            break
        ins = named.get((ins.operands or ("",))[0])
    return ins


def _dcn_kind(rest: str) -> str:
    m = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', rest)
    return m.group(1).lower().replace("_", "-") if m else "transfer"


def traffic_of_hlo(text: str, num_devices: int) -> CollectiveTraffic:
    """:class:`CollectiveTraffic` of an optimized HLO module's text (``compiled.as_text()``)
    partitioned over ``num_devices`` devices."""
    comps, entry = parse_module(text)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    named_in = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}
    Counter = collections.Counter
    memo: Dict[str, Tuple[Any, ...]] = {}
    ungrouped = [0]
    bounds: List[Optional[int]] = []  # loop bounds of the loops of unknown trip count

    def visit(name: str, stack: Tuple[str, ...] = ()) -> Tuple[Any, ...]:
        """(device bytes, dcn bytes, counts, per-iteration device, per-iteration dcn)."""
        if name in memo:
            return memo[name]
        dev, dcn, cnt, it_dev, it_dcn = Counter(), Counter(), Counter(), Counter(), Counter()
        named = named_in.get(name, {})
        for ins in comps.get(name, []):
            kind = _KINDS.get(ins.opcode)
            if kind is not None:
                in_bytes = sum(shape_bytes(named[o].type) for o in ins.operands if o in named)
                out_bytes = shape_bytes(ins.type)
                if ins.opcode.endswith("-start") and ins.type.startswith("("):
                    out_bytes = max(out_bytes - in_bytes, 0.0)  # (operands, outputs, ...)
                if kind == "all-gather":
                    sent = max(out_bytes - in_bytes, 0.0)
                elif kind == "reduce-scatter":
                    sent = max(in_bytes - out_bytes, 0.0)
                elif kind == "collective-permute":
                    sent = in_bytes
                else:
                    n = _group_size(ins.attrs, num_devices)
                    if n is None:
                        ungrouped[0] += 1
                        frac = 1.0
                    else:
                        frac = (n - 1) / n if n > 0 else 0.0
                    sent = (2.0 if kind == "all-reduce" else 1.0) * in_bytes * frac
                if sent:
                    dev[kind] += sent
                cnt[kind] += 1
            elif ins.opcode == "send" and "xla_megascale_runtime" in ins.attrs:
                kind = _dcn_kind(ins.attrs)
                # the payload: the first array of the (data, context, token) result
                dcn[kind] += shape_bytes((array_types(ins.type) or [""])[0])
                cnt["dcn " + kind] += 1
            # computations this instruction runs (an async op's once, at its start)
            if ins.opcode.endswith("-done") or ins.opcode == "async-update":
                continue
            called = ins.calls
            if not called:
                continue
            if ins.opcode == "while":
                attrs = dict(called)
                body = attrs.get("body", "")
                cond = attrs.get("condition", "")
                if not body or body in stack:
                    continue
                parts = [visit(body, stack + (name,))]
                if cond in comps and cond not in stack:  # runs once per iteration too
                    parts.append(visit(cond, stack + (name,)))
                trips, bound = _trip_count(ins, comps, named_in, name, cond, body)
                for sub in parts:
                    if trips is not None:
                        for acc, part in zip((dev, dcn, cnt, it_dev, it_dcn), sub):
                            for key, v in part.items():
                                acc[key] += v * trips
                    else:  # unknown trip count: everything in it is per iteration
                        it_dev.update(sub[0]); it_dev.update(sub[3])
                        it_dcn.update(sub[1]); it_dcn.update(sub[4])
                        cnt.update(sub[2])
                if trips is None:
                    bounds.append(bound)
                continue
            names = [c for attr, c in called if attr != "condition"]
            subs = [visit(c, stack + (name,)) for c in names if c in comps and c not in stack]
            if not subs:
                continue
            if ins.opcode == "conditional":  # the heaviest branch
                subs = [max(subs, key=lambda t: sum(t[0].values()) + sum(t[1].values()))]
            for sub in subs:
                for acc, part in zip((dev, dcn, cnt, it_dev, it_dcn), sub):
                    acc.update(part)
        memo[name] = (dev, dcn, cnt, it_dev, it_dcn)
        return memo[name]

    dev, dcn, cnt, it_dev, it_dcn = visit(entry)
    return CollectiveTraffic(
        device_bytes=dict(dev), dcn_bytes=dict(dcn), counts=dict(cnt),
        per_iteration_device_bytes=dict(it_dev), per_iteration_dcn_bytes=dict(it_dcn),
        ungrouped=ungrouped[0],
        max_iterations=(max(bounds) if bounds and all(b is not None for b in bounds)
                        else None))


def collective_traffic(compiled: Any, num_devices: Optional[int] = None) -> CollectiveTraffic:
    """:class:`CollectiveTraffic` of a ``jax.stages.Compiled`` (a ``Lowered`` is compiled
    first); ``num_devices`` defaults to the program's device count."""
    import jax

    if isinstance(compiled, jax.stages.Lowered):
        compiled = compiled.compile()
    if num_devices is None:
        try:
            num_devices = len(compiled.input_shardings[0][0].device_set) if \
                compiled.input_shardings[0] else 1
        except Exception:  # noqa: BLE001 - no shardings to read
            num_devices = 1
    return traffic_of_hlo(compiled.as_text(), int(num_devices))
