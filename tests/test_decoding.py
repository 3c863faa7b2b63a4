"""Decoding baselines against exact enumeration of every sequence on a tiny model.

The reference is built independently of the decoders and of :mod:`gfn_jax.logprobs`: plain
full ``forward`` calls on unpadded ``[X | prefix]`` rows, then the constrained policy in numpy.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import decoding
from gfn_jax.decoding import (
    beam_search,
    diverse_beam_search,
    greedy,
    sample_nucleus,
    sample_pure,
    sample_tempered,
)
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import transformer as tr
from gfn_jax.models.config import ModelConfig
from gfn_jax.scoring import score_policy
from tiny import CFG as LCFG, np_params

V = 8
TOKS = (1, 2, 3)  # the only non-⊤ tokens the bias allows
TERM = (5, 6)  # ⊤ is a set of two ids
T = 3
SPEC = PolicySpec(TERM, max_len=T, min_len=1)
PAD = 7
# gpt2: learned positions make left-padding mistakes visible.
CFG = ModelConfig(family="gpt2", vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                  max_seq_len=16)


def _np_params(seed=0, std=0.6):
    """Random parameters built in numpy (no per-leaf eager JAX compiles)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        x = rng.normal(0.0, std, s.shape).astype(np.float32)
        return 1.0 + 0.2 * x if "scale" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(leaf, tr.param_shapes(CFG))


PARAMS = _np_params(seed=1)
_forward = jax.jit(tr.forward, static_argnums=0)
BIAS = np.full(V, -np.inf, np.float32)
BIAS[list(TOKS + TERM)] = 0.0
BIAS[2] = 0.4
BIAS[6] = -0.5
PROMPTS = [[2], [4, 1, 7], [3, 1, 2, 4]]  # lengths 1, 3, 4: left-padded to P = 4
P = 4
PT = np.array([[0] * (P - len(p)) + p for p in PROMPTS], np.int32)
PM = np.array([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS], np.int32)
B = len(PROMPTS)


def _adapters(scale):
    L, D, K, Dh = CFG.n_layers, CFG.d_model, CFG.n_kv_heads, CFG.head_dim
    rng = np.random.default_rng(2)
    return {"scale": jnp.float32(scale), "tree": {"layers": {"attn": {"v": {"kernel": {
        "a": 0.5 * rng.normal(size=(L, D, 2)).astype(np.float32),
        "b": 0.5 * rng.normal(size=(L, 2, K * Dh)).astype(np.float32)}}}}}}


ADAPTERS = _adapters(1.5)
PREFIXES = [p for n in range(T + 1) for p in itertools.product(TOKS, repeat=n)]


def _lse(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m))) if np.isfinite(m) else -np.inf


def _reference(adapters, bias=BIAS, spec=SPEC):
    """Per prompt: {prefix: constrained next-token log-probs [V]} and {sequence: log q(Z⊤|X)}."""
    L = P + T
    rows = [(b, pre) for b in range(B) for pre in PREFIXES]
    toks = np.zeros((len(rows), L), np.int32)
    am = np.zeros((len(rows), L), np.int32)
    for r, (b, pre) in enumerate(rows):
        s = PROMPTS[b] + list(pre)
        toks[r, : len(s)] = s
        am[r, : len(s)] = 1
    logits = np.asarray(_forward(CFG, PARAMS, toks, am, adapters=adapters), np.float64)
    is_term = np.isin(np.arange(V), spec.term_ids)
    steps = [dict() for _ in range(B)]
    for r, (b, pre) in enumerate(rows):
        x = logits[r, len(PROMPTS[b]) + len(pre) - 1] + bias
        i = len(pre)
        ok = np.where(is_term, i >= spec.min_len, i < spec.max_len) & (x > -1e8)
        x = np.where(ok, x, -np.inf)
        steps[b][pre] = x - _lse(x)
    seqs = []
    for b in range(B):
        out = {}
        for pre in PREFIXES:
            lp = steps[b][pre]
            term = _lse(lp[list(spec.term_ids)])
            if not np.isfinite(term) or not all(np.isfinite(steps[b][pre[:t]][pre[t]]) for t in range(len(pre))):
                continue
            out[pre] = sum(steps[b][pre[:t]][pre[t]] for t in range(len(pre))) + term
        seqs.append(out)
    return steps, seqs


STEPS, SEQS = _reference(ADAPTERS)


def _rows(out, b):
    toks, lens = np.asarray(out.tokens[b]), np.asarray(out.lengths[b])
    return [tuple(int(t) for t in toks[i, : lens[i]]) for i in range(len(lens))]


def _best(seqs, n, length_penalty=0.0):
    key = lambda z: seqs[z] / (len(z) + 1) ** length_penalty
    order = sorted(seqs, key=key, reverse=True)
    vals = [key(z) for z in order]
    assert vals[n - 1] - vals[n] > 1e-4, "reference has a near-tie at the cut: test would be flaky"
    return order[:n]


def _check_pad(out):
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    assert np.all(np.where(np.arange(T)[None, None] >= lens[..., None], toks == PAD, True))


def test_beam_search_is_exact_with_enough_beams():
    # 9 = 3**2 allowed prefixes of length 2: every prefix is kept, so the n best are exact.
    n = 5
    out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=9, num_return=n, logit_bias=BIAS,
                      adapters=ADAPTERS, pad_id=PAD)
    assert out.tokens.shape == (B, n, T) and out.scores.shape == (B, n)
    assert out.lengths.dtype == jnp.int32 and out.tokens.dtype == jnp.int32
    _check_pad(out)
    np.testing.assert_array_equal(out.groups, 0)
    for b in range(B):
        want = _best(SEQS[b], n)
        assert _rows(out, b) == want
        np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in want], atol=1e-5)
    # The adapters matter here: without them the n best (or their scores) differ.
    _, base = _reference(_adapters(0.0))
    assert any(_best(base[b], n) != _best(SEQS[b], n) for b in range(B)) or max(
        abs(base[b][z] - SEQS[b][z]) for b in range(B) for z in _best(SEQS[b], n)) > 1e-2

    # A length penalty reranks the pool (same compile: it is traced); scores stay log q.
    before = decoding._TRACES["beam"]
    out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=9, num_return=n, logit_bias=BIAS,
                      adapters=ADAPTERS, pad_id=PAD, length_penalty=1.0)
    assert decoding._TRACES["beam"] == before
    for b in range(B):
        want = _best(SEQS[b], n, length_penalty=1.0)
        assert _rows(out, b) == want
        np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in want], atol=1e-5)
    assert any(_best(SEQS[b], n, 1.0) != _best(SEQS[b], n) for b in range(B))

    # Fewer distinct sequences than num_return: the bias leaves one token -> {1, 11, 111};
    # the two empty slots are -inf with length 0, pad tokens and group -1.
    bias1 = BIAS.copy()
    bias1[[2, 3]] = -np.inf
    _, seqs1 = _reference(ADAPTERS, bias1)
    out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=9, num_return=n, logit_bias=bias1,
                      adapters=ADAPTERS, pad_id=PAD)
    assert decoding._TRACES["beam"] == before
    _check_pad(out)
    for b in range(B):
        want = sorted(seqs1[b], key=lambda z: -seqs1[b][z])
        assert len(want) == 3 and _rows(out, b)[:3] == want
        np.testing.assert_allclose(out.scores[b, :3], [seqs1[b][z] for z in want], atol=1e-5)
        assert np.all(np.isneginf(out.scores[b, 3:]))
        np.testing.assert_array_equal(out.lengths[b, 3:], 0)
        np.testing.assert_array_equal(out.groups[b], [0, 0, 0, -1, -1])


def _term_bias(offset):
    bias = BIAS.copy()
    bias[list(TERM)] += offset
    return bias


def test_beam_search_early_exit_keeps_the_exact_best():
    # num_return = 1: once the pool holds a sequence, the loop exits as soon as no live prefix
    # can beat it. Default bias: some best sequence has 3 tokens, so exiting too early would
    # lose it; with ⊤ made likely (+6) every prompt's best is one token long and the exit
    # fires at prefix length 2 (checked on the reference below).
    for offset, exits_early in ((0.0, False), (6.0, True)):
        steps, seqs = _reference(ADAPTERS, _term_bias(offset))
        out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=9, num_return=1,
                          logit_bias=_term_bias(offset), adapters=ADAPTERS, pad_id=PAD)
        stop_at_2 = []
        for b in range(B):
            (z,) = _best(seqs[b], 1)
            assert _rows(out, b) == [z]
            np.testing.assert_allclose(out.scores[b, 0], seqs[b][z], atol=1e-5)
            best1 = max(v for k, v in seqs[b].items() if len(k) == 1)
            best_prefix2 = max(steps[b][p[:1]][p[1]] + steps[b][()][p[0]]
                               for p in PREFIXES if len(p) == 2)
            stop_at_2.append(best_prefix2 <= best1)
        assert all(stop_at_2) == exits_early
        if not exits_early:
            assert any(len(_rows(out, b)[0]) == T for b in range(B))


def test_narrow_beam_returns_true_scores_of_distinct_sequences():
    n = 4
    out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=2, num_return=n, logit_bias=BIAS,
                      adapters=ADAPTERS, pad_id=PAD)
    _check_pad(out)
    for b in range(B):
        rows = _rows(out, b)
        assert len(set(rows)) == n
        sc = np.asarray(out.scores[b])
        np.testing.assert_allclose(sc, [SEQS[b][z] for z in rows], atol=1e-5)
        assert np.all(np.diff(sc) <= 1e-6)
        # Exactly what width-2 beam search with a finished pool finds (numpy reference).
        found = dict(_np_diverse(b, 1, 2, 0.0)[0])
        assert rows == _best(found, n)
    # Narrower than exhaustive: for some prompt it misses one of the true n best.
    assert any(_rows(out, b) != _best(SEQS[b], n) for b in range(B))


def _greedy_path(steps):
    z = ()
    score = 0.0
    while True:
        lp = steps[z]
        term = _lse(lp[list(TERM)])
        best = max(TOKS, key=lambda v: lp[v])
        if len(z) == T or term >= lp[best]:
            return z, score + term
        assert abs(term - lp[best]) > 1e-3, "near-tie in the reference: test would be flaky"
        score += lp[best]
        z = z + (best,)


def test_greedy_is_the_argmax_path():
    # Shifting ⊤'s logits moves the stop decisions (the bias is traced: one compile).
    for offset in (0.0, 1.0, 2.0, 2.5, 3.0, 4.0):
        bias = _term_bias(offset)
        steps, seqs = _reference(ADAPTERS, bias)
        out = greedy(CFG, PARAMS, PT, PM, SPEC, logit_bias=bias, adapters=ADAPTERS, pad_id=PAD)
        assert out.tokens.shape == (B, 1, T)
        _check_pad(out)
        for b in range(B):
            z, score = _greedy_path(steps[b])
            assert _rows(out, b) == [z], (offset, b)
            np.testing.assert_allclose(out.scores[b, 0], score, atol=1e-5)
            np.testing.assert_allclose(out.scores[b, 0], seqs[b][z], atol=1e-5)


def test_scanned_decode_layers_are_exact_too():
    """ModelConfig.decode_layers="scanned" (the layers under lax.scan over the stacked weights,
    the stacked cache written in place, which beam search reorders every step): beam search
    with enough beams and greedy still give the exact enumeration's sequences and scores."""
    cfg = CFG.replace(decode_layers="scanned")
    n = 5
    out = beam_search(cfg, PARAMS, PT, PM, SPEC, num_beams=9, num_return=n, logit_bias=BIAS,
                      adapters=ADAPTERS, pad_id=PAD)
    _check_pad(out)
    for b in range(B):
        want = _best(SEQS[b], n)
        assert _rows(out, b) == want
        np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in want], atol=1e-5)
    for offset in (0.0, 2.5):
        bias = _term_bias(offset)
        steps, seqs = _reference(ADAPTERS, bias)
        out = greedy(cfg, PARAMS, PT, PM, SPEC, logit_bias=bias, adapters=ADAPTERS, pad_id=PAD)
        for b in range(B):
            z, score = _greedy_path(steps[b])
            assert _rows(out, b) == [z], (offset, b)
            np.testing.assert_allclose(out.scores[b, 0], seqs[b][z], atol=1e-5)


def _np_diverse(b, groups, per_group, strength):
    """Reference diverse beam search on the exact table: the finished sequences per group."""
    beams = [[((), 0.0, 0.0)] for _ in range(groups)]  # (prefix, true, search)
    found = [[] for _ in range(groups)]
    for t in range(T + 1):
        counts = np.zeros(V)
        for g in range(groups):
            for z, true, _ in beams[g]:
                lp = STEPS[b][z]
                term = _lse(lp[list(TERM)])
                if np.isfinite(term):
                    found[g].append((z, true + term))
            if t == T:
                continue
            cands = []
            for z, true, search in beams[g]:
                lp = STEPS[b][z]
                for v in TOKS:
                    cands.append((search + lp[v] - strength * counts[v], z + (v,), true + lp[v]))
            cands.sort(key=lambda c: -c[0])
            beams[g] = [(z, true, s) for s, z, true in cands[:per_group]]
            for z, _, _ in beams[g]:
                counts[z[-1]] += 1
    return found


def test_diverse_beam_search_groups_and_scores():
    G, n = 3, 12  # one beam per group; 12 >= every finished hypothesis of all groups
    kw = dict(num_beams=G, num_groups=G, num_return=n, logit_bias=BIAS, adapters=ADAPTERS,
              pad_id=PAD)
    strong = diverse_beam_search(CFG, PARAMS, PT, PM, SPEC, diversity_strength=100.0, **kw)
    before = decoding._TRACES["beam"]
    zero = diverse_beam_search(CFG, PARAMS, PT, PM, SPEC, diversity_strength=0.0, **kw)
    mid = diverse_beam_search(CFG, PARAMS, PT, PM, SPEC, diversity_strength=0.3, **kw)
    assert decoding._TRACES["beam"] == before  # the strength is traced
    for out in (strong, zero, mid):
        _check_pad(out)
    differs = 0
    for b in range(B):
        for out, lam in ((strong, 100.0), (zero, 0.0), (mid, 0.3)):
            rows = _rows(out, b)
            grp = np.asarray(out.groups[b])
            sc = np.asarray(out.scores[b])
            ok = np.isfinite(sc)
            # True log-probs, sorted, no duplicates.
            np.testing.assert_allclose(sc[ok], [SEQS[b][z] for z, o in zip(rows, ok) if o],
                                       atol=1e-5)
            assert np.all(np.diff(sc[ok]) <= 1e-6)
            assert len({z for z, o in zip(rows, ok) if o}) == ok.sum()
            # Per group, exactly the reference's finished sequences (first finder keeps it).
            ref = _np_diverse(b, G, 1, lam)
            seen = set()
            for g in range(G):
                want = {z for z, _ in ref[g]} - seen
                seen |= want
                got = {z for z, gg, o in zip(rows, grp, ok) if o and gg == g}
                assert got == want, (b, lam, g)
            assert ok.sum() == len(seen)
        # strength 0: all groups follow the same path, so only group 0 keeps anything.
        assert set(np.asarray(zero.groups[b])) <= {0, -1}
        # a large strength: at each step the groups choose different tokens, so no two
        # groups share a top sequence (or any sequence: first tokens all differ).
        tops = {}
        for z, g, s in zip(_rows(strong, b), np.asarray(strong.groups[b]),
                           np.asarray(strong.scores[b])):
            if np.isfinite(s) and g not in tops:
                tops[g] = z
        assert sorted(tops) == list(range(G))
        assert len({z[0] for z in tops.values()}) == G
        differs += _rows(mid, b) != _rows(zero, b)
    assert differs > 0  # the intermediate strength changes something

    # Two beams per group: the per-group top-k over (beam, token) against the reference.
    out = diverse_beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=6, num_groups=G,
                              num_return=18, diversity_strength=0.7, logit_bias=BIAS,
                              adapters=ADAPTERS, pad_id=PAD)
    for b in range(B):
        ref = _np_diverse(b, G, 2, 0.7)
        rows, grp = _rows(out, b), np.asarray(out.groups[b])
        ok = np.isfinite(np.asarray(out.scores[b]))
        seen = set()
        for g in range(G):
            want = {z for z, _ in ref[g]} - seen
            seen |= want
            assert {z for z, gg, o in zip(rows, grp, ok) if o and gg == g} == want, (b, g)
        assert ok.sum() == len(seen)


def test_sampling_wrappers_score_under_the_untempered_policy():
    ns = 64
    kw = dict(num_samples=ns, logit_bias=BIAS, adapters=ADAPTERS, pad_id=PAD)
    rng = jax.random.PRNGKey(4)
    outs = {
        "pure": sample_pure(CFG, PARAMS, rng, PT, PM, SPEC, **kw),
        "tempered": sample_tempered(CFG, PARAMS, rng, PT, PM, SPEC, temperature=0.5, **kw),
        "nucleus": sample_nucleus(CFG, PARAMS, rng, PT, PM, SPEC, p=0.5, **kw),
    }
    for name, out in outs.items():
        assert out.tokens.shape == (B, ns, T) and out.scores.shape == (B, ns), name
        _check_pad(out)
        for b in range(B):
            rows = _rows(out, b)
            np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in rows], atol=1e-5)
            if name == "nucleus":  # the first token is in the top-0.5 nucleus at prefix ()
                lp = STEPS[b][()]
                order = np.argsort(-lp)
                mass_before = np.cumsum(np.exp(lp[order])) - np.exp(lp[order])
                kept = set(order[mass_before < 0.5].tolist())
                assert all(z[0] in kept for z in rows)
    # Tempering at 0.5 concentrates the samples: fewer distinct sequences than pure sampling.
    distinct = {k: sum(len(set(_rows(o, b))) for b in range(B)) for k, o in outs.items()}
    assert distinct["tempered"] < distinct["pure"], distinct


def test_bad_decoder_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        diverse_beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=4, num_groups=3, num_return=2)
    with pytest.raises(ValueError, match="logit_bias"):
        beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=2, num_return=2, logit_bias=np.zeros(3))
    with pytest.raises(ValueError, match=">= 1"):
        beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=0, num_return=2)
    with pytest.raises(ValueError, match="longer than the model's context"):
        greedy(CFG, PARAMS, PT, PM, PolicySpec(TERM, 15))


def test_llama_without_bias_or_adapters_matches_the_scorer():
    # Another family (rotary positions, grouped KV heads) and the None paths; the one-pass
    # scorer (full forward over [X | Z]) gives the reference sequence log-probs.
    lparams = np_params(3)
    spec = PolicySpec((LCFG.vocab_size - 1,), max_len=4, min_len=0)
    pt = np.array([[0, 0, 5, 9], [7, 3, 2, 1]], np.int32)
    pm = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
    n = 3
    out = beam_search(LCFG, lparams, pt, pm, spec, num_beams=4, num_return=n)
    toks = np.asarray(out.tokens).reshape(2 * n, spec.max_len)
    lens = np.asarray(out.lengths).reshape(2 * n)
    sc = score_policy(LCFG, lparams, np.repeat(pt, n, 0), np.repeat(pm, n, 0), toks, lens, spec)
    lpf, lpt = np.asarray(sc.log_pf, np.float64), np.asarray(sc.log_pterm, np.float64)
    want = [lpf[r, : lens[r]].sum() + lpt[r, lens[r]] for r in range(2 * n)]
    np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), want, atol=1e-5)
    assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 1e-6)
    g = greedy(LCFG, lparams, pt, pm, spec)
    gl = np.asarray(g.lengths)[:, 0]
    sg = score_policy(LCFG, lparams, pt, pm, np.asarray(g.tokens)[:, 0], gl, spec)
    want = [np.asarray(sg.log_pf)[b, : gl[b]].sum() + np.asarray(sg.log_pterm)[b, gl[b]]
            for b in range(2)]
    np.testing.assert_allclose(np.asarray(g.scores)[:, 0], want, atol=1e-5)


def test_decoders_decode_with_weights_laid_out_once(monkeypatch):
    """``decode_weights`` (sampling.DecodeWeights, the weights laid out feature-major once):
    greedy, beam search and the sampling wrappers still give the exact-enumeration answers,
    and they really decode with the kept copy (a tampered copy moves greedy's scores)."""
    from gfn_jax import sampling

    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")
    kept = sampling.cache_decode_weights(PARAMS)
    kw = dict(logit_bias=BIAS, adapters=ADAPTERS, pad_id=PAD)
    out = greedy(CFG, PARAMS, PT, PM, SPEC, decode_weights=kept, **kw)
    for b in range(B):
        z, score = _greedy_path(STEPS[b])
        assert _rows(out, b) == [z]
        np.testing.assert_allclose(out.scores[b, 0], score, atol=1e-5)
    out = beam_search(CFG, PARAMS, PT, PM, SPEC, num_beams=9, num_return=5, decode_weights=kept,
                      **kw)
    for b in range(B):
        want = _best(SEQS[b], 5)
        assert _rows(out, b) == want
        np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in want], atol=1e-5)
    out = sample_pure(CFG, PARAMS, jax.random.PRNGKey(4), PT, PM, SPEC, num_samples=16,
                      decode_weights=kept, **kw)
    for b in range(B):
        np.testing.assert_allclose(out.scores[b], [SEQS[b][z] for z in _rows(out, b)], atol=1e-5)

    tampered = sampling.DecodeWeights(PARAMS)
    tampered.weights = dict(tampered.weights, layers=tuple(
        jax.tree_util.tree_map_with_path(
            lambda path, a: a * 1.5 if path[-1].key == tr.FM_KERNEL else a, lp)
        for lp in tampered.weights["layers"]))
    out = greedy(CFG, PARAMS, PT, PM, SPEC, decode_weights=tampered, **kw)
    got = [float(out.scores[b, 0]) for b in range(B)]
    want = [SEQS[b].get(_rows(out, b)[0], np.inf) for b in range(B)]
    assert max(abs(g - w) for g, w in zip(got, want)) > 1e-2
