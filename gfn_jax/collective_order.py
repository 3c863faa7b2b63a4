"""Audit a compiled program for collectives whose order the program leaves open.

XLA:CPU runs one device's operations concurrently, ordered only by data dependencies. Two
operations that both communicate (a collective, or a loop / call / conditional whose body
holds one) and that do not depend on each other may then start in a different order on
different devices; when one device waits inside the first and another inside the second,
the program deadlocks until XLA aborts it (``Termination timeout for all reduce``). GPUs and
TPUs issue collectives in one stream order and are not affected, so this matters for
multi-device CPU runs (tests, ``--xla_force_host_platform_device_count``) and is a warning
sign elsewhere. See ``docs/reliability.md`` ("Several devices on one CPU").

:func:`unordered_collectives` reads the optimized HLO text of a compiled program
(``jax.jit(f).lower(...).compile().as_text()``) and lists every such pair, in every
computation (the entry, loop bodies, called computations). It is a static check: it needs
no run. It is conservative (it ignores control edges and the orderings the runtime adds on
its own), so a listed pair is a place to look, not a proven deadlock.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

from gfn_jax.hlo import parse_module

__all__ = ["CollectivePair", "unordered_collectives", "format_pairs"]

# opcodes that communicate between devices (with their async -start forms)
_COLLECTIVES = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
    "collective-permute", "collective-broadcast", "send", "recv",
)


@dataclasses.dataclass(frozen=True)
class CollectivePair:
    """Two communicating operations of one computation that depend on neither each other.

    ``first`` / ``second`` are HLO instruction names, ``first_op`` / ``second_op`` their
    opcodes (``all-reduce``, ``while``, ...), ``first_source`` / ``second_source`` the JAX
    ``op_name`` metadata (which traced operation they come from; empty when absent)."""

    computation: str
    first: str
    first_op: str
    first_source: str
    second: str
    second_op: str
    second_source: str

    @property
    def involves_loop(self) -> bool:
        """One side is a loop (or call) with collectives inside: the deadlock seen on CPU."""
        return not (_is_collective(self.first_op) and _is_collective(self.second_op))


def _is_collective(opcode: str) -> bool:
    op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return op in _COLLECTIVES


def _topological(preds: List[List[int]]) -> List[int]:
    """Indices ordered so that each comes after its predecessors (Kahn's algorithm)."""
    n = len(preds)
    succs: List[List[int]] = [[] for _ in range(n)]
    missing = [0] * n
    for k, ps in enumerate(preds):
        for j in set(ps):
            succs[j].append(k)
            missing[k] += 1
    ready = [k for k in range(n) if not missing[k]]
    order: List[int] = []
    while ready:
        k = ready.pop()
        order.append(k)
        for s in succs[k]:
            missing[s] -= 1
            if not missing[s]:
                ready.append(s)
    if len(order) != n:
        raise ValueError("the HLO computation has a dependency cycle (malformed text?)")
    return order


def unordered_collectives(program: Any, *, include_bare: bool = False) -> List[CollectivePair]:
    """Every pair of communicating operations the program leaves unordered.

    Args:
      program: a compiled program (``jax.stages.Compiled``, whose optimized HLO is read) or
        its HLO text.
      include_bare: also report pairs of two bare collectives (no loop or call on either
        side). These are everywhere in sharded programs (e.g. FSDP's all-gathers of
        different weights in one layer) and were never seen to deadlock; by default only
        pairs with a loop, call or conditional holding collectives on one side are
        reported, the order XLA:CPU was seen to deadlock on.

    Returns:
      the pairs, in program order; an empty list when every communicating operation of each
      computation is ordered by data dependencies.
    """
    text = program if isinstance(program, str) else program.as_text()
    comps, _ = parse_module(text)

    memo: Dict[str, bool] = {}

    def communicates(comp: str, stack: Tuple[str, ...] = ()) -> bool:
        if comp in memo:
            return memo[comp]
        if comp in stack or comp not in comps:
            return False
        out = any(_is_collective(i.opcode) or any(communicates(c, stack + (comp,))
                                                  for _, c in i.calls)
                  for i in comps[comp])
        memo[comp] = out
        return out

    pairs: List[CollectivePair] = []
    for comp, instrs in comps.items():
        index = {ins.name: k for k, ins in enumerate(instrs)}
        units = [k for k, ins in enumerate(instrs)
                 if _is_collective(ins.opcode) or any(communicates(c) for _, c in ins.calls)]
        if len(units) < 2:
            continue
        # ancestors as bitsets, visiting instructions in a topological order
        # control edges are left out: XLA:CPU's runtime orders its operations by the
        # buffers they read and write, and an optimization barrier lowered to control
        # dependencies was seen not to order a collective against a loop
        preds = [[index[d] for d in ins.operands if d in index and d != ins.name]
                 for ins in instrs]
        anc: List[int] = [0] * len(instrs)
        for k in _topological(preds):
            a = 0
            for j in preds[k]:
                a |= anc[j] | (1 << j)
            anc[k] = a
        for x, i in enumerate(units):
            for j in units[x + 1:]:
                if (anc[j] >> i) & 1 or (anc[i] >> j) & 1:
                    continue
                a, b = instrs[i], instrs[j]
                pair = CollectivePair(comp, a.name, a.opcode, a.source, b.name, b.opcode,
                                      b.source)
                if not include_bare and not pair.involves_loop:
                    continue
                pairs.append(pair)
    return pairs


def format_pairs(pairs: Sequence[CollectivePair], limit: int = 20) -> str:
    """A short human-readable listing of :func:`unordered_collectives`' result."""
    lines = []
    for p in pairs[:limit]:
        lines.append(f"{p.computation}: {p.first} ({p.first_op}; {p.first_source or '?'})"
                     f"  <->  {p.second} ({p.second_op}; {p.second_source or '?'})")
    if len(pairs) > limit:
        lines.append(f"... and {len(pairs) - limit} more")
    return "\n".join(lines)
