"""The calculator: host evaluator, jitted tool vs a pure-Python splice rule, and the tool
inside the real sampler with re-scoring (tool tokens in the context, out of the log-prob)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.registry import tiny_model
from gfn_jax.models.tokenizer import char_tokenizer
from gfn_jax.sampling import sample
from gfn_jax.scoring import score_policy
from gfn_jax.tasks import calculator
from gfn_jax.tasks.calculator import (
    VALUE_LIMIT,
    CalculatorTool,
    evaluate_expression,
    rationale_trajectory,
)

ALPHABET = "0123456789+-*() =,.ab"
TOK = char_tokenizer(ALPHABET)
EOS = TOK.eos_id
TOOL = CalculatorTool.from_tokenizer(TOK, term_ids=[EOS])
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "arithmetic")


# ---------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------
def ast_value(text):
    """Python's own parse of an integer expression, walked by hand (no code is executed)."""
    def walk(n):
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return n.value
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -walk(n.operand)
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = walk(n.left), walk(n.right)
            return a + b if isinstance(n.op, ast.Add) else a - b if isinstance(n.op, ast.Sub) else a * b
        raise ValueError(ast.dump(n))
    return walk(ast.parse(text, mode="eval"))


def random_expr(rng, depth=0, max_depth=3):
    """(text, value) of a random expression of the grammar, with random spacing."""
    sp = lambda: rng.choice(["", "", " ", "  "])
    r = rng.random()
    if depth >= max_depth or r < 0.35:
        v = rng.randint(0, 99)
        text, val = str(v), v
    elif r < 0.5:
        t, v = random_expr(rng, depth + 1, max_depth)
        text, val = "(" + sp() + t + sp() + ")", v
    else:
        a, va = random_expr(rng, depth + 1, max_depth)
        b, vb = random_expr(rng, depth + 1, max_depth)
        op = rng.choice("+-*")
        # parenthesise operands so the tree's value is the text's value
        a, b = "(" + a + ")", "(" + b + ")"
        text = a + sp() + op + sp() + b
        val = va + vb if op == "+" else va - vb if op == "-" else va * vb
    if rng.random() < 0.15:
        text, val = "-" + sp() + (text if r < 0.5 else "(" + text + ")"), -val
    return text, val


def flat_expr(rng, n_terms):
    """Unparenthesised chains (precedence and associativity come from the grammar)."""
    parts = [str(rng.randint(0, 20))]
    for _ in range(n_terms - 1):
        parts += [rng.choice(["+", "-", "*", "- -", "* -"]), str(rng.randint(0, 20))]
    if rng.random() < 0.3:
        parts[0] = "-" + parts[0]
    return " ".join(parts)


# ---------------------------------------------------------------------------
# evaluate_expression
# ---------------------------------------------------------------------------
def test_evaluate_matches_python_parse_on_random_expressions():
    rng = random.Random(0)
    n = 0
    for _ in range(1500):
        text, val = random_expr(rng)
        if abs(val) > VALUE_LIMIT or text.count("(") > 8:
            continue
        depth, best = 0, 0
        for ch in text:
            depth += ch == "("
            depth -= ch == ")"
            best = max(best, depth)
        if best > calculator.MAX_DEPTH:
            continue
        assert ast_value(text) == val  # the generator itself is right
        assert evaluate_expression(text) == val, text
        n += 1
    assert n > 1000
    for _ in range(1500):
        text = flat_expr(rng, rng.randint(1, 7))
        assert evaluate_expression(text) == ast_value(text), text


@pytest.mark.parametrize("text,value", [
    ("6 - 0", 6), (" -4 - 3 ", -7), ("14 - 3", 11), ("2 - 8", -6), ("--2", 2), ("---2", -2),
    ("2*-3", -6), ("-(2+3)*4", -20), ("2 - -4", 6), ("1-2-3", -4), ("2+3*4", 14),
    ("2*3-4*5", -14), ("007", 7), ("0", 0), ("((((((((1))))))))", 1), ("- (- (3))", 3),
    ("999999999", 999_999_999), ("-999999999", -999_999_999), ("31622*31622", 999_950_884),
    ("999999999 - 1 + 1", 999_999_999),
    pytest.param("1" + "+1" * 20000, 20001, id="long-sum"),
])
def test_evaluate_valid(text, value):
    assert evaluate_expression(text) == value
    if len(text) < 1000 and not text.lstrip(" -(").startswith("0"):
        assert ast_value(text.strip()) == value  # same meaning as Python's parse


HOSTILE = [
    "__import__('os')", "__import__('os').system('true')", "1+", "2**99999", "2**3", "", "   ",
    "1 2", "()", "(1", "1)", ")(", "+1", "1 + + 2", "1/2", "1//2", "1%2", "1.5", "1e5", "0x10",
    "1_000", "\u0663", "\uff11", "1\n", "\t1", "1 = 2", "a", "1,2", "(" * 9 + "1" + ")" * 9,
    "9" * 10, "9" * 5000, "1" * 100000, "999999999 + 1", "-999999999 - 1", "99999*99999",
    "31623*31623", "1" + "*9" * 20, "(" * 100000, "-" * 100000, "1" + "+" * 100000 + "1",
    "lambda: 1", "[1]", "1 if 1 else 2", "True", "None", "-", "*", "1 -", "(1))", "((1)",
]


def test_malformed_and_hostile_inputs_return_none_quickly(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("code evaluation called")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, boom)
    t0 = time.perf_counter()
    results = [evaluate_expression(s) for s in HOSTILE]
    monkeypatch.undo()
    assert results == [None] * len(HOSTILE), [s[:20] for s, r in zip(HOSTILE, results) if r is not None]
    assert evaluate_expression(None) is None and evaluate_expression(12) is None
    assert time.perf_counter() - t0 < 5.0


def test_module_never_calls_code_evaluation():
    src = inspect.getsource(calculator)
    assert not re.search(r"(?<![\w.])(eval|exec|compile)\s*\(", src)
    assert "literal_eval" not in src and "__import__" not in src


# ---------------------------------------------------------------------------
# The jitted tool vs a pure-Python splice rule
# ---------------------------------------------------------------------------
def reference_rule(ids, max_abs=TOOL.max_abs, seps=",."):
    """(force, token) from the decoded text: last '=', expression since the last separator."""
    pieces = [TOK.decode([i]) for i in ids]
    trig = [i for i, p in enumerate(pieces) if p.endswith("=")]
    if not trig:
        return False, None
    j = trig[-1]
    before = "".join(pieces[:j]) + pieces[j][:-1]
    cut = max(before.rfind(c) for c in seps)
    v = evaluate_expression(before[cut + 1 :])
    if v is None or abs(v) > max_abs:
        return False, None
    splice = TOK.encode(" " + str(v))
    k = len(ids) - 1 - j
    return (True, splice[k]) if k < len(splice) else (False, None)


def random_rows(rng, n, T):
    rows = []
    for _ in range(n):
        text = ""
        while len(text) < T + 4:
            r = rng.random()
            if r < 0.45:
                r2 = rng.random()
                if r2 < 0.35:
                    e = random_expr(rng, max_depth=2)[0]
                elif r2 < 0.7:
                    e = flat_expr(rng, rng.randint(1, 3))
                else:  # negative results
                    e = f"{rng.randint(0, 9)} - {rng.randint(10, 99)}"
                text += e + rng.choice([" =", "=", " = "])
                good = evaluate_expression(e)
                if good is not None and rng.random() < 0.8:
                    text += (" " + str(good))[: rng.randint(0, 4)]
            elif r < 0.7:
                text += rng.choice([",", ", ", ".", " "])
            else:
                text += "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
        rows.append(TOK.encode(text))
    return rows


def test_tool_matches_reference_rule_on_random_sequences():
    rng = random.Random(1)
    T, n = 28, 600
    rows = random_rows(rng, n, T)
    tokens = np.full((n, T), EOS, np.int32)
    lengths = np.zeros(n, np.int32)
    eq = TOK.encode("=")[0]
    for r, ids in enumerate(rows):
        L = rng.randint(0, T)
        eqs = [i for i in range(T) if ids[i] == eq]
        if eqs and rng.random() < 0.6:  # end the row at or just after an '='
            L = min(T, rng.choice(eqs) + 1 + rng.randint(0, 3))
        tokens[r, :L] = ids[:L]
        lengths[r] = L
    small = CalculatorTool.from_tokenizer(TOK, term_ids=[EOS], max_abs=50)
    for tool in (TOOL, small):
        force, forced = jax.jit(tool)(tokens, lengths, jnp.int32(0))
        force, forced = np.asarray(force), np.asarray(forced)
        assert force.dtype == bool and forced.dtype == np.int32
        kinds = {"force": 0, "later": 0, "neg": 0, "no": 0}
        for r in range(n):
            ids = tokens[r, : lengths[r]].tolist()
            f, tok = reference_rule(ids, max_abs=tool.max_abs)
            assert bool(force[r]) == f, (TOK.decode(ids), tool.max_abs)
            if f:
                assert forced[r] == tok, TOK.decode(ids)
                kinds["force"] += 1
                kinds["later"] += ids[-1] != TOK.encode("=")[0]
                kinds["neg"] += TOK.decode([tok]) == "-"
            else:
                kinds["no"] += 1
        # the random rows exercise every branch
        assert kinds["force"] >= 60 and kinds["later"] >= 50 and kinds["neg"] >= 10, kinds
        assert kinds["no"] >= 100, kinds


def test_tool_on_hand_made_rows():
    cases = {
        "6 - 0 =": " ", "6 - 0 = ": "6", "6 - 0 = 6": None, "6 - 0 = 6, 6 - 4 =": " ",
        "2 - 8 = -": "6", "2 - 8 = ": "-", "5 + 9 = 1": "4", "-4 - 3 =": " ", "1 2 =": None,
        "=": None, "1 + =": None, "1 = 2 =": None, "ab 3 =": None, "ab, 3 =": " ",
        "x. 7*(1+2) = ": "2", "(((((((((1))))))))) =": None, "((((((((1)))))))) = ": "1",
        "9999 + 1 = ": None, "9999 = ": "9", "6 - 0 = 5": None,
    }
    ids = [TOK.encode(s.replace("x", "a")) for s in cases]
    T = max(map(len, ids))
    tokens = np.array([i + [EOS] * (T - len(i)) for i in ids], np.int32)
    lengths = np.array([len(i) for i in ids], np.int32)
    force, forced = jax.jit(TOOL)(tokens, lengths, jnp.int32(0))
    for r, (s, want) in enumerate(cases.items()):
        got = TOK.decode([int(forced[r])]) if force[r] else None
        assert got == want, (s, got, want)


def test_tool_hash_and_builder_checks():
    again = CalculatorTool.from_tokenizer(TOK, term_ids=[EOS])
    assert again == TOOL and hash(again) == hash(TOOL) and again is not TOOL
    assert CalculatorTool.from_tokenizer(TOK, max_abs=50) != TOOL
    assert CalculatorTool.from_tokenizer(TOK, separators=",") != TOOL
    with pytest.raises(ValueError, match="termination ids"):
        CalculatorTool.from_tokenizer(TOK, term_ids=TOK.encode(" "))
    with pytest.raises(ValueError, match="width"):
        CalculatorTool.from_tokenizer(TOK, width=2)
    with pytest.raises(ValueError, match="vocab_size"):
        CalculatorTool.from_tokenizer(TOK, vocab_size=3)
    # model vocabularies larger than the tokenizer: extra ids never trigger
    big = CalculatorTool.from_tokenizer(TOK, vocab_size=TOK.vocab_size + 5)
    assert big.char_table.shape[0] == TOK.vocab_size + 5 and not big.is_trigger[TOK.vocab_size:].any()


def test_token_compression_keeps_meaning():
    """A token's characters are compressed into 4 class slots (runs collapsed, everything
    before its last separator dropped); in any context the verdict must not change."""
    from gfn_jax.tasks.calculator import _char_classes, _compress

    rng = random.Random(2)
    back = {11: "+", 12: "-", 13: "*", 14: "(", 15: ")", 16: " ", 17: "=", 18: ",", 19: "a"}
    n_cut = 0
    for _ in range(4000):
        s = "".join(rng.choice("12 -----***++==()a,") for _ in range(rng.randint(1, 12)))
        c = _compress(_char_classes(s, ",."))
        text = "".join(str(x - 1) if 1 <= x <= 10 else back[x] for x in c)
        assert s.endswith("=") == text.endswith("=") and ("," in s) == ("," in text)
        pre = "".join(rng.choice("12 -*(") for _ in range(rng.randint(0, 4)))
        suf = "".join(rng.choice("12 -*)") for _ in range(rng.randint(0, 4)))
        if "," in s:  # the expression restarts after the separator: the prefix is gone
            pre = ""
            s, text = s[s.rfind(",") + 1 :], text[1:]
            n_cut += 1
        assert evaluate_expression(pre + s + suf) == evaluate_expression(pre + text + suf), (s, text)
        if s.endswith("="):  # the expression a trailing '=' closes
            assert evaluate_expression(pre + s[:-1]) == evaluate_expression(pre + text[:-1])
    assert n_cut > 100


def test_rationale_trajectory_matches_tool():
    tokens, mask = rationale_trajectory(TOOL, TOK, "6 - 0 =, 6 - 4 =, 2 - 8 =")
    assert TOK.decode(tokens) == "6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"
    spliced = "".join(TOK.decode([t]) for t, m in zip(tokens, mask) if not m)
    assert spliced == " 6 2 -6"
    # the jitted tool, applied to every prefix, forces exactly the spliced positions
    T = len(tokens)
    pre = np.array([tokens[:i] + [EOS] * (T - i) for i in range(T)], np.int32)
    force, forced = jax.jit(TOOL)(pre, np.arange(T, dtype=np.int32), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(force), ~np.array(mask))
    np.testing.assert_array_equal(np.asarray(forced)[~np.array(mask)], np.array(tokens)[~np.array(mask)])


# ---------------------------------------------------------------------------
# End to end: the real sampler with the tool, then re-scoring
# ---------------------------------------------------------------------------
def test_sampler_with_calculator_and_rescoring():
    tok = char_tokenizer("0123456789+- =,")
    eos = tok.eos_id
    tool = CalculatorTool.from_tokenizer(tok, term_ids=[eos])
    model = tiny_model("llama", tokenizer=tok, seed=3)
    cfg, params = model.config, model.params
    V = cfg.vocab_size
    bias = np.zeros(V, np.float32)
    for ch, b in {"=": 2.5, ",": 1.0, "-": 0.5, " ": 0.5}.items():
        bias[tok.encode(ch)[0]] = b
    bias[eos] = -3.0
    T = 24
    # min_len 0: a length mask would also differ between the two re-scorings below
    spec = PolicySpec((eos,), max_len=T, min_len=0)
    prompts = [tok.encode("3 - 5 - 1 = "), tok.encode("12 + 4,")]
    P = max(map(len, prompts))
    pt = np.array([[eos] * (P - len(p)) + p for p in prompts], np.int32)
    pm = np.array([[0] * (P - len(p)) + [1] * len(p) for p in prompts], np.int32)
    ns = 48
    out = sample(cfg, params, jax.random.PRNGKey(0), pt, pm, spec, num_samples=ns,
                 logit_bias=bias, tool=tool, pad_id=eos, temperature=1.0)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    act, lpf = np.asarray(out.action_mask), np.asarray(out.log_pf)
    eq = tok.encode("=")[0]
    n_splices, values = 0, set()
    for r in range(len(lens)):
        L = lens[r]
        ids = toks[r, :L].tolist()
        for t in range(L):
            f, want = reference_rule_for(tok, ids[:t])
            assert act[r, t] == (not f), (tok.decode(ids), t)
            if f:
                assert ids[t] == want and lpf[r, t] == 0.0
            else:
                assert lpf[r, t] < 0.0
        assert eos not in ids
        if L < T:  # a row can only end once no splice is pending
            assert not reference_rule_for(tok, ids)[0]
        # every '=' the policy wrote is followed by the value of its expression
        text = tok.decode(ids)
        for j, i in enumerate(ids):
            if i != eq:
                continue
            seg = text[: j][max(text[:j].rfind(","), text[:j].rfind(".")) + 1 :]
            v = evaluate_expression(seg)
            if v is None or abs(v) > tool.max_abs:  # malformed or too large: no splice
                assert j + 1 >= L or act[r, j + 1]
                continue
            want = " " + str(v)
            got = text[j + 1 : j + 1 + len(want)]
            assert got == want or (L == T and want.startswith(got)), (text, j)
            n_splices += 1
            values.add(v)
    assert n_splices >= 20 and any(v < 0 for v in values) and any(abs(v) >= 10 for v in values), values
    # Re-scoring with the tool tokens in the context and out of the log-prob = the sampler.
    ptr, pmr = np.repeat(pt, ns, 0), np.repeat(pm, ns, 0)
    sc = score_policy(cfg, params, ptr, pmr, out.tokens, out.lengths, spec, logit_bias=bias,
                      action_mask=out.action_mask)
    np.testing.assert_allclose(np.asarray(sc.log_pf), lpf, atol=1e-5)
    a, b = np.asarray(sc.log_pterm), np.asarray(out.log_pterm)
    np.testing.assert_array_equal(a > -1e20, b > -1e20)
    np.testing.assert_allclose(a[a > -1e20], b[b > -1e20], atol=1e-5)
    # The release's re-scoring drops the tool outputs from the context: the same policy
    # actions then get different log-probs (only rows with a splice before a later action).
    comp = np.full_like(toks, eos)
    clen = np.zeros_like(lens)
    for r in range(len(lens)):
        keep = toks[r, : lens[r]][act[r, : lens[r]]]
        comp[r, : len(keep)] = keep
        clen[r] = len(keep)
    dropped = score_policy(cfg, params, ptr, pmr, comp, clen, spec, logit_bias=bias,
                           action_mask=np.ones_like(act))  # (same jit entry as above)
    ours = lpf.sum(1)
    theirs = np.asarray(dropped.log_pf).sum(1)
    affected = np.array([
        (~act[r, : lens[r]]).any() and act[r, np.argmax(~act[r, : lens[r]]) :lens[r]].any()
        for r in range(len(lens))])
    assert affected.sum() >= 10 and (~affected).sum() >= 1
    assert np.all(np.abs(ours - theirs)[affected] > 1e-3)
    np.testing.assert_allclose(ours[~affected], theirs[~affected], atol=1e-4)


def reference_rule_for(tok, ids, max_abs=9999):
    pieces = [tok.decode([i]) for i in ids]
    trig = [i for i, p in enumerate(pieces) if p == "="]
    if not trig:
        return False, None
    j = trig[-1]
    before = "".join(pieces[:j])
    v = evaluate_expression(before[max(before.rfind(","), before.rfind(".")) + 1 :])
    if v is None or abs(v) > max_abs:
        return False, None
    splice = tok.encode(" " + str(v))
    k = len(ids) - 1 - j
    return (True, splice[k]) if k < len(splice) else (False, None)


# ---------------------------------------------------------------------------
# The real SmolLM2 tokenizer (slow: reads the GGUF's metadata; downloads it once)
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tokenizer_and_data_rationales():
    from gfn_jax.models import registry
    from gfn_jax.models.gguf import _open, read_metadata, tokenizer_from_metadata

    path = registry.smollm2_gguf_path()
    tok = tokenizer_from_metadata(read_metadata(_open(path)), path)
    show = lambda s: [tok.decode([i]) for i in tok.encode(s, add_bos=False)]
    # digits are single tokens; minus and '=' merge with the preceding space
    assert show(" 6 - 0 =") == [" ", "6", " -", " ", "0", " ="]
    assert show(" -6") == [" -", "6"] and show(" 14") == [" ", "1", "4"]
    tool = CalculatorTool.from_tokenizer(tok, term_ids=[tok.eos_id])
    assert tool.num_truncated == 0
    assert tool.splice_ids(-6) == tok.encode(" -6", add_bos=False)
    with open(os.path.join(DATA, "1digit_34_op+-_train_50.json")) as f:
        rows = json.load(f)
    T = 40
    step = jax.jit(tool)
    for row in rows:
        tokens, mask = rationale_trajectory(tool, tok, row["str_rationale"])
        text = tok.decode(tokens)
        # "a op b = r, r op c = s, ..." and the last result is the answer
        assert text.split("=")[-1].strip() == str(row["num_sol"]), text
        steps = [s.strip() for s in text.split(",")]
        for s in steps:
            lhs, rhs = s.split("=")
            assert evaluate_expression(lhs) == int(rhs)
        n = len(tokens)
        assert n <= T
        pre = np.array([tokens[:i] + [0] * (T - min(i, n)) for i in range(T)], np.int32)  # one shape
        force, forced = step(pre, np.minimum(np.arange(T), n).astype(np.int32), jnp.int32(0))
        force, forced, m = np.asarray(force)[:n], np.asarray(forced)[:n], np.array(mask)
        np.testing.assert_array_equal(force, ~m)
        np.testing.assert_array_equal(forced[~m], np.array(tokens)[~m])
