"""Reading XLA's optimized HLO text (``compiled.as_text()``): computations, instructions, and
the bytes of a result type. Shared by the static checks of compiled programs
(:mod:`gfn_jax.collective_order`, :mod:`gfn_jax.comms`)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

__all__ = ["Instruction", "parse_module", "parse_instruction", "array_types", "shape_bytes"]

_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(to_apply|body|condition|calls|true_computation|false_computation|"
                    r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_NAME = re.compile(r"%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "s2": 0.25, "u2": 0.25,
}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = type opcode(args), attrs``; ``operands`` are the names
    in ``args`` (a ``constant``'s literal stays in ``args``)."""

    name: str
    type: str
    opcode: str
    args: str
    operands: Tuple[str, ...]
    attrs: str

    @property
    def calls(self) -> List[Tuple[str, str]]:
        """(attribute, computation) pairs of the computations this instruction runs:
        ``to_apply``, ``body``, ``condition``, ``calls``, conditional branches."""
        out = []
        for attr, val in _CALLS.findall(self.attrs):
            out += [(attr, n) for n in _NAME.findall(val.strip("{}"))]
        return out

    @property
    def source(self) -> str:
        """The JAX ``op_name`` it was traced from ("" when absent)."""
        m = _OP_NAME.search(self.attrs)
        return m.group(1) if m else ""


def _split_type(rest: str) -> Tuple[str, str]:
    """(result type, the text after it) of an instruction's right-hand side; a tuple type
    has nested parentheses."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
        return rest, ""
    parts = rest.split(None, 1)
    return (parts[0], parts[1]) if len(parts) > 1 else (rest, "")


def parse_instruction(line: str) -> Optional[Instruction]:
    """The instruction on one line of HLO text, or None (a header, a brace, a comment)."""
    m = _INSTR.match(line)
    if not m:
        return None
    type_, rest = _split_type(m.group(2))
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    depth, i = 0, om.end() - 1
    for i in range(om.end() - 1, len(rest)):
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        if depth == 0:
            break
    opcode, args, attrs = om.group(1), rest[om.end():i], rest[i + 1:]
    operands = re.findall(r"%([\w.\-]+)", args)
    if not operands and args.strip() and opcode != "constant":
        # HLO printed without '%' sigils: operands are the bare tokens after their types
        operands = [tok.split()[-1] for tok in args.split(",") if tok.strip()
                    and re.match(r"^[\w.\-]+$", tok.split()[-1])]
    return Instruction(m.group(1), type_, opcode, args, tuple(operands), attrs)


def parse_module(text: str) -> Tuple[Dict[str, List[Instruction]], Optional[str]]:
    """({computation: its instructions in order}, the ENTRY computation's name or None)."""
    comps: Dict[str, List[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h and not line.lstrip().startswith("HloModule"):
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            comps[current].append(ins)
    return comps, entry


def array_types(type_text: str) -> List[str]:
    """The array types in a result type, in order (``(f32[8], u32[], token[])`` ->
    ``["f32[8]", "u32[]", "token[]"]``)."""
    return [m.group(0) for m in _ARRAY.finditer(type_text)]


def shape_bytes(type_text: str) -> float:
    """Bytes of every array in a result type (a tuple sums its elements; tokens count 0)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _DTYPE_BYTES.get(dtype)
        if size is None:
            if dtype.startswith("f8"):
                size = 1
            elif dtype.startswith(("f4", "f6")):
                size = 0.5 if dtype.startswith("f4") else 0.75
            else:
                continue
        total += size * (math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return total
