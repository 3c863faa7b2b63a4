"""Integer-arithmetic data of the paper's §4.4: loading, de-duplication and fresh splits.

The released files (``../shared/data/arithmetic/*.json``) are JSON arrays of objects::

    {"str_query": "Question: 6 - 0 - 4 - 8 = ? Answer:",   # always
     "num_sol": -6,                                          # always
     "str_rationale": "6 - 0 =, 6 - 4 =, 2 - 8 =",           # train_50 only
     "str_sol": ". The answer is -6."}                       # train_50 and hw

Operands are single digits and operators ``+``/``-``, evaluated left to right; the rationale
lists the successive binary steps *without* their results (with the calculator on, the tool
splices each result after its ``=``, see :mod:`gfn_jax.tasks.calculator`).

:func:`load_problems` validates every row (types, query syntax, answer, rationale and
solution consistent with the query) and raises :class:`ArithmeticDataError` naming the file,
the row index and its line. :func:`dedup_against` removes test queries that occur in training
files (the release's in-distribution test files overlap with them; see
``../shared/data/README.md``). :func:`generate_problems` makes fresh, seeded problems in exactly
the release's format, disjoint from any given problems.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from gfn_jax.tasks.continuation import resolve_data_path

__all__ = [
    "DEFAULT_DIR",
    "FILES",
    "ArithmeticDataError",
    "ArithmeticProblem",
    "DedupResult",
    "load_problems",
    "load_split",
    "dedup_against",
    "generate_problems",
    "generate_splits",
    "write_problems",
    "parse_query",
    "format_query",
    "format_rationale",
    "format_solution",
    "solve",
]

DEFAULT_DIR = "../shared/data/arithmetic"
"""Where the released files live, relative to the working directory (the repository root)."""

FILES = {
    "train_50": "1digit_34_op+-_train_50.json",
    "hw": "1digit_34_op+-_hw.json",
    "test_34": "1digit_34_op+-_test.json",
    "test_3": "1digit_3_op+-_test.json",
    "test_4": "1digit_4_op+-_test.json",
    "test_5": "1digit_5_op+-_test.json",
}
"""Short names of the released files."""

_QUERY = re.compile(r"Question: (\d+(?: [+-] \d+)+) = \? Answer:")
_KEYS = {"str_query", "num_sol", "str_rationale", "str_sol"}


class ArithmeticDataError(ValueError):
    """A malformed data file or row (the message names the file, row and line)."""


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """One question. ``operators[i]`` joins ``operands[i]`` and ``operands[i + 1]``.

    ``rationale`` / ``solution`` are the file's ``str_rationale`` / ``str_sol`` when present.
    ``source``, ``index`` and ``line`` locate the row (empty / -1 / 0 for generated ones).
    """

    query: str
    operands: Tuple[int, ...]
    operators: Tuple[str, ...]
    answer: int
    rationale: Optional[str] = None
    solution: Optional[str] = None
    source: str = ""
    index: int = -1
    line: int = 0

    @property
    def expression(self) -> str:
        """``"6 - 0 - 4 - 8"``."""
        return _expression(self.operands, self.operators)

    @property
    def key(self) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
        """Identity of the question (what de-duplication compares)."""
        return (self.operands, self.operators)

    @property
    def num_operands(self) -> int:
        return len(self.operands)

    def to_json(self, fields: Sequence[str] = ("str_query", "num_sol", "str_rationale", "str_sol")
                ) -> Dict[str, Any]:
        """The release's row format with the chosen fields (rationale/solution recomputed)."""
        full = {
            "str_query": self.query,
            "num_sol": self.answer,
            "str_rationale": format_rationale(self.operands, self.operators),
            "str_sol": format_solution(self.answer),
        }
        bad = [f for f in fields if f not in full]
        if bad:
            raise ValueError(f"unknown fields {bad}; choose from {list(full)}")
        return {f: full[f] for f in fields}


# ---------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------
def _expression(operands: Sequence[int], operators: Sequence[str]) -> str:
    parts = [str(operands[0])]
    for op, b in zip(operators, operands[1:]):
        parts += [op, str(b)]
    return " ".join(parts)


def _check_terms(operands: Sequence[int], operators: Sequence[str]) -> None:
    if len(operands) < 2 or len(operators) != len(operands) - 1:
        raise ValueError(f"need n >= 2 operands and n - 1 operators, got {operands}, {operators}")
    if any(type(a) is not int or a < 0 for a in operands):
        raise ValueError(f"operands must be non-negative ints, got {operands}")
    if any(op not in ("+", "-") for op in operators):
        raise ValueError(f"operators must be '+' or '-', got {operators}")


def format_query(operands: Sequence[int], operators: Sequence[str]) -> str:
    """``"Question: 6 - 0 - 4 - 8 = ? Answer:"``."""
    _check_terms(operands, operators)
    return f"Question: {_expression(operands, operators)} = ? Answer:"


def solve(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Left-to-right value (only ``+`` and ``-``, so this is the usual value)."""
    _check_terms(operands, operators)
    acc = operands[0]
    for op, b in zip(operators, operands[1:]):
        acc = acc + b if op == "+" else acc - b
    return acc


def format_rationale(operands: Sequence[int], operators: Sequence[str]) -> str:
    """Successive binary steps without results: ``"6 - 0 =, 6 - 4 =, 2 - 8 ="``."""
    _check_terms(operands, operators)
    steps = []
    acc = operands[0]
    for op, b in zip(operators, operands[1:]):
        steps.append(f"{acc} {op} {b} =")
        acc = acc + b if op == "+" else acc - b
    return ", ".join(steps)


def format_solution(answer: int) -> str:
    """``". The answer is -6."``."""
    return f". The answer is {int(answer)}."


def parse_query(query: str) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
    """Operands and operators of a query in the release's format; ValueError otherwise."""
    if not isinstance(query, str):
        raise ValueError(f"query must be a string, got {type(query).__name__}")
    m = _QUERY.fullmatch(query)
    if m is None:
        raise ValueError(
            f"query {query!r} is not of the form 'Question: a op b [op c ...] = ? Answer:' "
            "(non-negative integers, op '+' or '-', single spaces)"
        )
    parts = m.group(1).split(" ")
    return tuple(int(p) for p in parts[::2]), tuple(parts[1::2])


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def _row_error(path: str, index: int, line: int, msg: str) -> ArithmeticDataError:
    return ArithmeticDataError(f"{path}: row {index} (line {line}): {msg}")


def _iter_array(path: str, text: str):
    """(index, line, value) of each element of a top-level JSON array, with line numbers."""
    dec = json.JSONDecoder()
    ws = " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def fail(i: int, msg: str) -> ArithmeticDataError:
        line = text.count("\n", 0, i) + 1
        return ArithmeticDataError(f"{path}: line {line}: {msg}")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise fail(i, "expected a JSON array of objects ('[' ...)")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
        if i != len(text):
            raise fail(i, "unexpected data after the array")
        return
    n = 0
    while True:
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ArithmeticDataError(
                f"{path}: row {n} (line {e.lineno}, column {e.colno}): invalid JSON: {e.msg}"
            ) from None
        yield n, text.count("\n", 0, i) + 1, value
        n += 1
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            i = skip(i + 1)
            if i != len(text):
                raise fail(i, "unexpected data after the array")
            return
        raise fail(i, f"expected ',' or ']' after row {n - 1}")


def _problem_from_row(path: str, index: int, line: int, row: Any) -> ArithmeticProblem:
    err = lambda msg: _row_error(path, index, line, msg)
    if not isinstance(row, dict):
        raise err(f"expected an object, got {type(row).__name__}")
    unknown = sorted(set(row) - _KEYS)
    if unknown:
        raise err(f"unknown keys {unknown} (expected some of {sorted(_KEYS)})")
    for k in ("str_query", "num_sol"):
        if k not in row:
            raise err(f"missing key {k!r}")
    try:
        operands, operators = parse_query(row["str_query"])
    except ValueError as e:
        raise err(str(e)) from None
    ans = row["num_sol"]
    if type(ans) is not int:
        raise err(f"num_sol must be an integer, got {ans!r}")
    want = solve(operands, operators)
    if ans != want:
        raise err(f"num_sol {ans} is not the value of {_expression(operands, operators)!r} ({want})")
    rat = row.get("str_rationale")
    if rat is not None:
        want_r = format_rationale(operands, operators)
        if not isinstance(rat, str) or rat != want_r:
            raise err(f"str_rationale {rat!r} does not match the query's steps {want_r!r}")
    sol = row.get("str_sol")
    if sol is not None:
        if not isinstance(sol, str) or sol != format_solution(ans):
            raise err(f"str_sol {sol!r} is not {format_solution(ans)!r}")
    return ArithmeticProblem(
        query=row["str_query"], operands=operands, operators=operators, answer=ans,
        rationale=rat, solution=sol, source=path, index=index, line=line,
    )


def load_problems(path: str, *, root: str = "", require_rationale: bool = False
                  ) -> List[ArithmeticProblem]:
    """Every row of one released JSON file, validated (see the module docstring).

    ``path`` is absolute or relative to ``root`` (default: the working directory).
    Raises FileNotFoundError for a missing file and :class:`ArithmeticDataError` (a
    ValueError naming the file, row index and line) for a malformed one.
    """
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"arithmetic data file not found: {full!r} (relative paths resolve against "
            f"{root or os.getcwd()!r}; the released files live in {DEFAULT_DIR} of the "
            "repository's parent, see README)")
    with open(full, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise ArithmeticDataError(f"{full}: not UTF-8 text ({e})") from None
    out = [_problem_from_row(full, i, line, row) for i, line, row in _iter_array(full, text)]
    if require_rationale:
        for p in out:
            if p.rationale is None:
                raise _row_error(full, p.index, p.line, "missing key 'str_rationale'")
    return out


def load_split(name: str, data_dir: str = DEFAULT_DIR, root: str = "") -> List[ArithmeticProblem]:
    """A released file by short name (``train_50``, ``hw``, ``test_34``, ``test_3``,
    ``test_4``, ``test_5``), from ``data_dir``."""
    if name not in FILES:
        raise ValueError(f"unknown arithmetic split {name!r}; known: {sorted(FILES)}")
    return load_problems(os.path.join(data_dir, FILES[name]), root=root,
                         require_rationale=name == "train_50")


# ---------------------------------------------------------------------------
# De-duplication
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class DedupResult:
    """``kept``: test problems whose question is in no training set (file order).
    ``removed``: the others. ``overlap``: per training set, how many *test rows* share a
    question with it (a row in two sets counts in both). ``repeats``: test rows whose
    question already occurred earlier in the test set (kept unless ``drop_repeats``)."""

    kept: List[ArithmeticProblem]
    removed: List[ArithmeticProblem]
    overlap: Dict[str, int]
    repeats: int

    def summary(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.overlap.items())
        n = len(self.kept) + len(self.removed)
        return (f"{n} test rows: {len(self.removed)} removed (overlap {per}), "
                f"{len(self.kept)} kept; {self.repeats} repeated questions within the test set")


Problems = Iterable[ArithmeticProblem]


def dedup_against(
    test: Problems,
    train: Union[Problems, Mapping[str, Problems]],
    *,
    drop_repeats: bool = False,
) -> DedupResult:
    """Remove every test problem whose question (operands and operators) is in ``train``.

    ``train`` is one collection of problems or a mapping ``name -> problems`` (overlap is
    then counted per name). With ``drop_repeats`` a question repeated within the test set is
    also kept only once.
    """
    sets: Dict[str, set] = {}
    if isinstance(train, Mapping):
        for name, probs in train.items():
            sets[str(name)] = {p.key for p in probs}
    else:
        sets["train"] = {p.key for p in train}
    union = set().union(*sets.values()) if sets else set()
    kept: List[ArithmeticProblem] = []
    removed: List[ArithmeticProblem] = []
    overlap = {name: 0 for name in sets}
    seen: set = set()
    repeats = 0
    for p in test:
        for name, s in sets.items():
            overlap[name] += p.key in s
        rep = p.key in seen
        repeats += rep
        seen.add(p.key)
        if p.key in union:
            removed.append(p)
        elif not (drop_repeats and rep):
            kept.append(p)
    return DedupResult(kept=kept, removed=removed, overlap=overlap, repeats=repeats)


# ---------------------------------------------------------------------------
# Fresh problems
# ---------------------------------------------------------------------------
def _as_keys(exclude: Iterable[Any]) -> set:
    keys = set()
    for e in exclude:
        if isinstance(e, ArithmeticProblem):
            keys.add(e.key)
        elif isinstance(e, str):
            keys.add(parse_query(e))
        else:
            raise TypeError(f"exclude items must be ArithmeticProblem or query strings, got {e!r}")
    return keys


def generate_problems(
    n: int,
    num_operands: Union[int, Sequence[int]],
    seed: int,
    exclude: Iterable[Any] = (),
    *,
    max_digit: int = 9,
) -> List[ArithmeticProblem]:
    """``n`` distinct new problems in the release's format (with rationale and solution).

    Each problem draws its number of operands uniformly from ``num_operands`` (an int, or a
    sequence such as ``(3, 4)`` for the in-distribution mix), operands uniformly from
    ``0..max_digit`` and operators uniformly from ``+``/``-``. Questions in ``exclude``
    (problems or query strings) and repeats are skipped, so the result is disjoint from them.
    The same arguments always give the same list (``random.Random(seed)``). Raises if fewer
    than ``n`` such questions exist.

    Pass the released files as ``exclude``: the release drew *all* its files from this same
    procedure with seed 0 (``generate_problems(50, (3, 4), 0)`` is exactly ``train_50``, and
    each test file is the first 500 draws, repeats included), which is why they overlap.
    """
    counts = (int(num_operands),) if isinstance(num_operands, int) else tuple(int(k) for k in num_operands)
    if not counts or any(k < 2 for k in counts):
        raise ValueError(f"num_operands must be >= 2, got {num_operands}")
    if not 0 <= max_digit <= 9:
        raise ValueError(f"max_digit must be in 0..9 (single-digit operands), got {max_digit}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    excluded = _as_keys(exclude)
    space = sum((max_digit + 1) ** k * 2 ** (k - 1) for k in set(counts))
    available = space - sum(1 for e in excluded
                            if len(e[0]) in counts and max(e[0]) <= max_digit)
    if n > available:
        raise ValueError(
            f"only {available} distinct questions with {counts} operands (digits 0..{max_digit}) "
            f"remain outside exclude; asked for {n}")
    rng = random.Random(seed)
    seen = set(excluded)
    out: List[ArithmeticProblem] = []
    while len(out) < n:
        k = rng.choice(counts)
        operands = tuple(rng.randint(0, max_digit) for _ in range(k))
        operators = tuple(rng.choice("+-") for _ in range(k - 1))
        if (operands, operators) in seen:
            continue
        seen.add((operands, operators))
        ans = solve(operands, operators)
        out.append(ArithmeticProblem(
            query=format_query(operands, operators), operands=operands, operators=operators,
            answer=ans, rationale=format_rationale(operands, operators),
            solution=format_solution(ans),
        ))
    return out


def generate_splits(
    sizes: Mapping[str, int],
    num_operands: Union[int, Sequence[int]],
    seed: int,
    exclude: Iterable[Any] = (),
) -> Dict[str, List[ArithmeticProblem]]:
    """Named, pairwise disjoint splits (e.g. ``{"train": 1000, "test": 500}``), all disjoint
    from ``exclude``; one seeded draw cut in the order of ``sizes``."""
    total = sum(int(v) for v in sizes.values())
    probs = generate_problems(total, num_operands, seed, exclude)
    out: Dict[str, List[ArithmeticProblem]] = {}
    i = 0
    for name, size in sizes.items():
        out[name] = probs[i : i + int(size)]
        i += int(size)
    return out


def write_problems(
    path: str,
    problems: Iterable[ArithmeticProblem],
    fields: Sequence[str] = ("str_query", "num_sol"),
) -> None:
    """Write problems as the release does (a JSON array, 4-space indent) with ``fields``
    (e.g. add ``"str_rationale", "str_sol"`` for a training file)."""
    rows = [p.to_json(fields) for p in problems]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=4)
    os.replace(tmp, path)
