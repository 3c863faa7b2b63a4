"""Arithmetic data: the released files (read-only, from ../shared/data), malformed files,
de-duplication against training, and seeded fresh splits in the release's format."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from gfn_jax.tasks import arithmetic_data as ad
from gfn_jax.tasks.arithmetic_data import (
    ArithmeticDataError,
    ArithmeticProblem,
    dedup_against,
    generate_problems,
    generate_splits,
    load_problems,
    load_split,
    write_problems,
)

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                     "arithmetic"))
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no released data at {DATA}")


@pytest.fixture(scope="module")
def released():
    return {name: load_split(name, DATA) for name in ad.FILES}


def raw_json(name):
    with open(os.path.join(DATA, ad.FILES[name])) as f:
        return json.load(f)


def by_hand(query):
    """Value of 'Question: a op b ... = ? Answer:' computed from the text, independently."""
    toks = query[len("Question: "): -len(" = ? Answer:")].split(" ")
    v = int(toks[0])
    for op, b in zip(toks[1::2], toks[2::2]):
        v = v + int(b) if op == "+" else v - int(b)
    return v


# ---------------------------------------------------------------------------
# The released files
# ---------------------------------------------------------------------------
@needs_data
def test_released_files_load_and_match_the_json(released):
    sizes = {"train_50": 50, "hw": 1000, "test_34": 500, "test_3": 500, "test_4": 500,
             "test_5": 500}
    ops = {"train_50": {3, 4}, "hw": {3, 4}, "test_34": {3, 4}, "test_3": {3}, "test_4": {4},
           "test_5": {5}}
    for name, probs in released.items():
        rows = raw_json(name)
        assert len(probs) == len(rows) == sizes[name]
        assert {p.num_operands for p in probs} == ops[name]
        for i, (p, row) in enumerate(zip(probs, rows)):
            assert p.query == row["str_query"] and p.answer == row["num_sol"] == by_hand(p.query)
            assert p.rationale == row.get("str_rationale") and p.solution == row.get("str_sol")
            assert p.index == i and p.source.endswith(ad.FILES[name])
            assert p.expression in p.query and all(0 <= a <= 9 for a in p.operands)
    # the example from the data README
    first = released["train_50"][0]
    assert first.operands == (6, 0, 4, 8) and first.operators == ("-", "-", "-")
    assert first.rationale == "6 - 0 =, 6 - 4 =, 2 - 8 =" and first.solution == ". The answer is -6."
    assert first.answer == -6 and first.line == 2
    # line numbers point at each row's opening brace
    with open(released["hw"][0].source) as f:
        lines = f.read().split("\n")
    for p in released["hw"][:50]:
        assert lines[p.line - 1].strip() == "{" and p.query in lines[p.line]


@needs_data
def test_write_round_trip_is_byte_identical(released, tmp_path):
    for name, fields in (("train_50", ("str_query", "num_sol", "str_rationale", "str_sol")),
                         ("hw", ("str_query", "num_sol", "str_sol")),
                         ("test_3", ("str_query", "num_sol"))):
        out = tmp_path / f"{name}.json"
        write_problems(str(out), released[name], fields)
        with open(os.path.join(DATA, ad.FILES[name]), "rb") as f:
            assert out.read_bytes() == f.read()


@needs_data
def test_dedup_against_training(released):
    train = {"train_50": released["train_50"], "hw": released["hw"]}
    per_file = {n: {r["str_query"] for r in raw_json(n)} for n in train}
    train_q = per_file["train_50"] | per_file["hw"]
    counts = {}
    for name in ("test_34", "test_3", "test_4", "test_5"):
        res = dedup_against(released[name], train)
        queries = [r["str_query"] for r in raw_json(name)]
        want_kept = [q for q in queries if q not in train_q]
        assert [p.query for p in res.kept] == want_kept
        assert len(res.kept) + len(res.removed) == len(queries)
        assert res.overlap == {n: sum(q in per_file[n] for q in queries) for n in train}
        assert res.repeats == len(queries) - len(set(queries))
        uniq = dedup_against(released[name], train, drop_repeats=True)
        assert [p.query for p in uniq.kept] == list(dict.fromkeys(want_kept))
        counts[name] = (res.overlap["train_50"], res.overlap["hw"], len(res.kept))
    # The data README's "about 50 with train_50 and about 440 with hw": exactly 52 and 448,
    # which is every row of the 3/4-operand test file; the 5-operand file has no overlap.
    assert counts["test_34"] == (52, 448, 0)
    assert counts["test_5"] == (0, 0, 500)
    assert counts["test_3"][2] == 385 and counts["test_4"][2] == 444
    # one plain collection works too
    plain = dedup_against(released["test_4"], released["train_50"] + released["hw"])
    assert plain.overlap == {"train": 56} and len(plain.kept) == 444
    assert "444 kept" in plain.summary()


# ---------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------
GOOD = {"str_query": "Question: 6 - 0 - 4 - 8 = ? Answer:", "num_sol": -6,
        "str_rationale": "6 - 0 =, 6 - 4 =, 2 - 8 =", "str_sol": ". The answer is -6."}


def write_rows(tmp_path, rows, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows, indent=4))
    return str(path)


@pytest.mark.parametrize("bad,msg", [
    ({"str_query": "Question: 6 - 0 = ? Answer:"}, "missing key 'num_sol'"),
    ({"num_sol": 3}, "missing key 'str_query'"),
    (dict(GOOD, num_sol=-5), "num_sol -5 is not the value"),
    (dict(GOOD, num_sol="-6"), "num_sol must be an integer"),
    (dict(GOOD, num_sol=True), "num_sol must be an integer"),
    (dict(GOOD, num_sol=-6.0), "num_sol must be an integer"),
    (dict(GOOD, str_query="Question: 6 - 0 - 4 - 8 = ?"), "is not of the form"),
    (dict(GOOD, str_query="Question: 6 * 0 - 4 - 8 = ? Answer:"), "is not of the form"),
    (dict(GOOD, str_query="Question: 6 -0 - 4 - 8 = ? Answer:"), "is not of the form"),
    (dict(GOOD, str_query=7), "query must be a string"),
    (dict(GOOD, str_rationale="6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"), "str_rationale"),
    (dict(GOOD, str_sol=". The answer is 6."), "str_sol"),
    (dict(GOOD, extra=1), "unknown keys \\['extra'\\]"),
    (["not", "an", "object"], "expected an object"),
])
def test_malformed_row_names_file_row_and_line(tmp_path, bad, msg):
    path = write_rows(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ArithmeticDataError, match=msg) as e:
        load_problems(path)
    # rows are 0-based; with indent=4 each GOOD row spans a fixed number of lines after "["
    line = 2 + 2 * (json.dumps(GOOD, indent=4).count("\n") + 1)
    assert str(e.value).startswith(f"{path}: row 2 (line {line}): ")


def test_broken_json_and_structure(tmp_path):
    p = tmp_path / "trunc.json"
    p.write_text('[\n    {"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3},\n    {"str_query": \n')
    with pytest.raises(ArithmeticDataError, match=re.escape(f"{p}: row 1 (line ")):
        load_problems(str(p))
    p.write_text('{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3}')
    with pytest.raises(ArithmeticDataError, match="JSON array"):
        load_problems(str(p))
    p.write_text('[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3}] []')
    with pytest.raises(ArithmeticDataError, match="line 1: unexpected data after the array"):
        load_problems(str(p))
    p.write_text('[{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3}\n {"a": 1}]')
    with pytest.raises(ArithmeticDataError, match="line 2: expected ',' or '\\]' after row 0"):
        load_problems(str(p))
    p.write_bytes(b'[\xff]')
    with pytest.raises(ArithmeticDataError, match="UTF-8"):
        load_problems(str(p))
    p.write_text("[]")
    assert load_problems(str(p)) == []
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_problems(str(tmp_path / "nope.json"))
    p.write_text(json.dumps([{"str_query": "Question: 1 + 2 = ? Answer:", "num_sol": 3}]))
    with pytest.raises(ArithmeticDataError, match="row 0 .*missing key 'str_rationale'"):
        load_problems(str(p), require_rationale=True)
    # relative paths resolve against root
    assert load_problems("trunc.json", root=str(tmp_path))[0].answer == 3
    with pytest.raises(ValueError, match="unknown arithmetic split"):
        load_split("train_51")


# ---------------------------------------------------------------------------
# Fresh problems
# ---------------------------------------------------------------------------
def test_generate_format_reproducibility_and_disjointness():
    a = generate_problems(300, (3, 4), seed=7)
    assert a == generate_problems(300, (3, 4), seed=7)
    assert [p.key for p in a] != [p.key for p in generate_problems(300, (3, 4), seed=8)]
    assert len({p.key for p in a}) == 300
    for p in a:
        # exactly the released row format, checked against the text independently
        assert re.fullmatch(r"Question: \d( [+-] \d){2,3} = \? Answer:", p.query)
        assert p.answer == by_hand(p.query)
        steps = p.rationale.split(", ")
        assert len(steps) == p.num_operands - 1
        v = p.operands[0]
        for s, op, b in zip(steps, p.operators, p.operands[1:]):
            assert s == f"{v} {op} {b} ="
            v = v + b if op == "+" else v - b
        assert p.solution == f". The answer is {p.answer}."
    counts = {k: sum(p.num_operands == k for p in a) for k in (3, 4)}
    assert min(counts.values()) > 100  # both lengths drawn
    # excluded questions (problems or query strings) never come back
    b = generate_problems(300, (3, 4), seed=7, exclude=a[:150])
    assert not {p.key for p in b} & {p.key for p in a[:150]}
    c = generate_problems(300, (3, 4), seed=7, exclude=[p.query for p in a[:150]])
    assert c == b
    # the written file reloads through the validating loader
    splits = generate_splits({"train": 200, "valid": 50, "test": 100}, 4, seed=3, exclude=a)
    keys = [{p.key for p in s} for s in splits.values()]
    assert [len(k) for k in keys] == [200, 50, 100]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert not set().union(*keys) & {p.key for p in a}


def test_generate_exhausts_small_spaces(tmp_path):
    # 2 operands, digits 0..1: 2 * 2 * 2 = 8 questions
    allq = generate_problems(8, 2, seed=0, max_digit=1)
    assert len({p.key for p in allq}) == 8
    with pytest.raises(ValueError, match="only 8 distinct"):
        generate_problems(9, 2, seed=0, max_digit=1)
    with pytest.raises(ValueError, match="only 3 distinct"):
        generate_problems(4, 2, seed=0, max_digit=1, exclude=allq[:5])
    assert {p.key for p in generate_problems(3, 2, 1, max_digit=1, exclude=allq[:5])} == \
        {p.key for p in allq[5:]}
    with pytest.raises(ValueError, match="num_operands"):
        generate_problems(1, 1, seed=0)
    path = tmp_path / "gen.json"
    write_problems(str(path), allq, ("str_query", "num_sol", "str_rationale", "str_sol"))
    back = load_problems(str(path), require_rationale=True)
    assert [p.key for p in back] == [p.key for p in allq]
    assert [p.rationale for p in back] == [p.rationale for p in allq]


@needs_data
def test_seed_zero_reproduces_the_release(released):
    """The release drew every file from the same seed-0 stream (which is why they overlap):
    our generator with seed 0 gives train_50 exactly, so fresh splits must use exclude=."""
    assert [p.key for p in generate_problems(50, (3, 4), 0)] == [p.key for p in released["train_50"]]
    ref = random.Random(0)
    raw = []
    for _ in range(500):  # an independent re-implementation of one draw, repeats kept
        k = ref.choice((3, 4))
        ops = tuple(ref.randint(0, 9) for _ in range(k))
        raw.append((ops, tuple(ref.choice("+-") for _ in range(k - 1))))
    assert raw == [p.key for p in released["test_34"]]
    everything = [p for ps in released.values() for p in ps]
    fresh = generate_problems(500, (3, 4), 0, exclude=everything)
    assert not {p.key for p in fresh} & {p.key for p in everything}
