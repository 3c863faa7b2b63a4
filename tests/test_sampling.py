"""The jitted sampler against exact enumeration, the one-pass scorer and the behaviour definitions."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gfn_jax import sampling
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import transformer as tr
from gfn_jax.models.config import ModelConfig
from gfn_jax.sampling import behaviour_logprobs, sample
from gfn_jax.scoring import score_policy

# --- exact-enumeration model: vocab 6, ⊤ = {4, 5}, max_len 3 -------------------------------
EV = 6
ETERM = (4, 5)
EMAX = 3
EPROMPT = [1, 2]
NONTERM = [t for t in range(EV) if t not in ETERM]
ECFG = ModelConfig(family="llama", vocab_size=EV, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
EPARAMS = tr.init_params(ECFG, jax.random.PRNGKey(0), std=0.7)
PROMPT_T = np.array([EPROMPT], np.int32)
PROMPT_M = np.ones_like(PROMPT_T)
NS = 20000  # one num_samples (a static arg) for every test on this model: compiles are shared


def _lse(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _enumerate_logits():
    """Raw next-token logits after every prefix (tuple of non-⊤ tokens, length 0..EMAX), via
    plain right-padded ``forward`` calls (independent of the sampler and the scorer)."""
    prefixes = [p for n in range(EMAX + 1) for p in itertools.product(NONTERM, repeat=n)]
    L = len(EPROMPT) + EMAX
    toks = np.zeros((len(prefixes), L), np.int32)
    am = np.zeros((len(prefixes), L), np.int32)
    for r, p in enumerate(prefixes):
        s = EPROMPT + list(p)
        toks[r, : len(s)] = s
        am[r, : len(s)] = 1
    logits = np.asarray(tr.forward(ECFG, EPARAMS, toks, am), np.float64)
    return {p: logits[r, len(EPROMPT) + len(p) - 1] for r, p in enumerate(prefixes)}


ELOGITS = _enumerate_logits()


def _step_logp(prefix, spec, bias=None, temperature=1.0):
    """log of the (tempered) constrained next-token distribution at a prefix (numpy)."""
    x = ELOGITS[prefix] + (0.0 if bias is None else bias)
    i = len(prefix)
    is_term = np.isin(np.arange(EV), spec.term_ids)
    allowed = np.where(is_term, i >= spec.min_len, i < spec.max_len) & np.isfinite(x)
    x = np.where(allowed, x / temperature, -np.inf)
    return x - _lse(x)


def _outcome_logprobs(spec, bias=None, temperature=1.0):
    """Exact log-probability of every complete trajectory (product of per-step probs)."""
    out = {}
    for p in ELOGITS:
        lp = sum(_step_logp(p[:t], spec, bias, temperature)[p[t]] for t in range(len(p)))
        out[p] = lp + _lse(_step_logp(p, spec, bias, temperature)[list(ETERM)])
    return out


def _rows(out):
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tuple(int(t) for t in toks[r, : lens[r]]) for r in range(len(lens))]


def _chi2_pvalue(rows, logprobs):
    counts = {}
    for r in rows:
        counts[r] = counts.get(r, 0) + 1
    assert set(counts) <= {k for k, v in logprobs.items() if v > -np.inf}, "impossible outcome sampled"
    keys = sorted(logprobs, key=lambda k: -logprobs[k])
    exp = np.array([np.exp(logprobs[k]) for k in keys]) * len(rows)
    obs = np.array([counts.get(k, 0) for k in keys], np.float64)
    np.testing.assert_allclose(exp.sum(), len(rows), rtol=1e-6)  # enumeration is complete
    # Merge cells with small expectations into one.
    big = exp >= 5
    e = np.append(exp[big], exp[~big].sum())
    o = np.append(obs[big], obs[~big].sum())
    keep = e > 0
    return stats.chisquare(o[keep], e[keep] * o[keep].sum() / e[keep].sum()).pvalue


BIAS = np.zeros(EV, np.float32)
BIAS[3] = -np.inf  # disallowed by the policy
BIAS[0] = 1.0
BIAS[4] = -0.7

CASES = [
    ("plain", PolicySpec(ETERM, EMAX, 0), None, 1.0),
    ("bias_min1", PolicySpec(ETERM, EMAX, 1), BIAS, 1.0),
    ("bias_min1_tempered", PolicySpec(ETERM, EMAX, 1), BIAS, 0.6),
]


@pytest.mark.parametrize("name,spec,bias,temperature", CASES, ids=[c[0] for c in CASES])
def test_sampler_matches_exact_enumeration(name, spec, bias, temperature):
    n = NS
    out = sample(
        ECFG, EPARAMS, jax.random.PRNGKey(42), PROMPT_T, PROMPT_M, spec,
        num_samples=n, temperature=temperature, logit_bias=bias, pad_id=3,
    )
    rows = _rows(out)
    assert out.tokens.shape == (n, EMAX) and out.log_pterm.shape == (n, EMAX + 1)
    assert min(len(r) for r in rows) >= spec.min_len
    # The empirical distribution is the behaviour (tempered) one...
    behaviour = _outcome_logprobs(spec, bias, temperature)
    assert _chi2_pvalue(rows, behaviour) > 1e-4
    # ...and not the untempered one when tempered (the test has power).
    if temperature != 1.0:
        assert _chi2_pvalue(rows, _outcome_logprobs(spec, bias)) < 1e-6
    # log_pf / log_pterm are the untempered policy's, per step.
    lpf, lpt = np.asarray(out.log_pf), np.asarray(out.log_pterm)
    toks = np.asarray(out.tokens)
    for r in range(0, n, 97):
        z = rows[r]
        for t in range(EMAX):
            want = _step_logp(z[:t], spec, bias)[z[t]] if t < len(z) else 0.0
            np.testing.assert_allclose(lpf[r, t], want, atol=1e-5)
        for i in range(EMAX + 1):
            if i <= len(z):
                want = _lse(_step_logp(z[:i], spec, bias)[list(ETERM)])
                if want == -np.inf:
                    assert lpt[r, i] < -1e20
                    continue
            else:
                want = 0.0
            np.testing.assert_allclose(lpt[r, i], want, atol=1e-5)
        assert np.all(toks[r, len(z):] == 3)  # pad id after the end
    np.testing.assert_array_equal(np.asarray(out.action_mask), np.arange(EMAX)[None] < np.asarray(out.lengths)[:, None])
    np.testing.assert_array_equal(np.asarray(out.prompt_index), np.zeros(n))


def test_determinism_and_no_retrace_on_scalars():
    spec = CASES[0][1]
    kw = dict(num_samples=NS)
    a = sample(ECFG, EPARAMS, jax.random.PRNGKey(7), PROMPT_T, PROMPT_M, spec, **kw)
    before = sampling._TRACES["sample"]
    b = sample(ECFG, EPARAMS, jax.random.PRNGKey(7), PROMPT_T, PROMPT_M, spec, **kw)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    c = sample(ECFG, EPARAMS, jax.random.PRNGKey(8), PROMPT_T, PROMPT_M, spec, **kw)
    assert not np.array_equal(a.tokens, c.tokens) or not np.array_equal(a.lengths, c.lengths)
    for temp, top_p, eps in [(0.5, 0.9, 0.1), (2.0, 0.3, 0.0), (1.3, 1.0, 1.0)]:
        sample(ECFG, EPARAMS, jax.random.PRNGKey(9), PROMPT_T, PROMPT_M, spec,
               temperature=temp, top_p=top_p, epsilon=eps, **kw)
    assert sampling._TRACES["sample"] == before


def test_top_k_and_top_p_samples_stay_in_the_kept_set():
    spec = CASES[0][1]
    for top_k, top_p in [(2, 1.0), (0, 0.5)]:
        out = sample(ECFG, EPARAMS, jax.random.PRNGKey(3), PROMPT_T, PROMPT_M, spec,
                     num_samples=NS, top_k=top_k, top_p=top_p)
        for z in set(_rows(out)):
            for t in range(len(z) + 1):
                lp = _step_logp(z[:t], spec)
                order = np.argsort(-lp)
                if top_k:
                    kept = set(order[:top_k].tolist())
                else:
                    mass_before = np.cumsum(np.exp(lp[order])) - np.exp(lp[order])
                    kept = set(order[mass_before < top_p].tolist())
                if t < len(z):
                    assert z[t] in kept, (z, t, kept)
                else:  # terminated here: some ⊤ id was kept (or the length limit forced it)
                    assert t == EMAX or kept & set(ETERM), (z, kept)
        if top_k:  # the filter is not vacuous: some allowed token was never chosen at prefix 0
            assert len({z[0] for z in _rows(out) if z}) <= 2


def test_epsilon_one_is_uniform_over_allowed_tokens():
    spec = PolicySpec(ETERM, EMAX, 1)
    n = NS
    out = sample(ECFG, EPARAMS, jax.random.PRNGKey(5), PROMPT_T, PROMPT_M, spec,
                 num_samples=n, epsilon=1.0, logit_bias=BIAS, temperature=0.3)
    rows = _rows(out)
    # prefix 0: ⊤ masked (min_len 1), token 3 disallowed -> uniform over {0, 1, 2}.
    first = np.array([z[0] for z in rows])
    freq = np.bincount(first, minlength=EV) / n
    np.testing.assert_allclose(freq[[0, 1, 2]], 1 / 3, atol=4 * np.sqrt(2 / 9 / n))
    assert freq[3] == 0
    # prefix 1: allowed {0, 1, 2, 4, 5}: terminate with prob 2/5.
    stop1 = np.mean([len(z) == 1 for z in rows])
    np.testing.assert_allclose(stop1, 2 / 5, atol=4 * np.sqrt(0.24 / n))


def _np_behaviour(pl, temperature, top_k, top_p, eps, bb):
    allowed = (pl > -1e8) & (bb > -1e8)
    x = np.where(allowed, pl / temperature + bb, -np.inf)
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - _lse(x))
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(allowed)
    keep[order[(mass_before < top_p) | (top_p >= 1)]] = True
    p = np.where(keep, p, 0.0)
    p = p / p.sum()
    u = allowed / allowed.sum()
    return (1 - eps) * p + eps * u


@pytest.mark.parametrize(
    "temperature,top_k,top_p,eps",
    [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.5, 0, 0.6, 0.0), (1.0, 4, 0.8, 0.25), (1.0, 0, 1.0, 1.0)],
)
def test_behaviour_logprobs_match_definition(temperature, top_k, top_p, eps):
    rng = np.random.default_rng(0)
    pl = rng.normal(size=(4, 9)) * 2
    pl[:, 2] = -1e30  # disallowed by the policy
    bb = np.zeros(9)
    bb[5] = -np.inf  # disallowed by the behaviour bias
    bb[1] = 0.8
    got = np.exp(np.asarray(behaviour_logprobs(
        jnp.asarray(pl, jnp.float32), temperature=temperature, top_k=top_k, top_p=top_p,
        epsilon=eps, behaviour_bias=jnp.asarray(bb, jnp.float32))))
    for r in range(pl.shape[0]):
        np.testing.assert_allclose(got[r], _np_behaviour(pl[r], temperature, top_k, top_p, eps, bb), atol=1e-6)
    assert np.all(got[:, [2, 5]] == 0)


# --- sampler == scorer on a richer set-up ----------------------------------------------------
V = 10
TERM = (8, 9)


@dataclasses.dataclass(frozen=True)
class ForceTwoAfterOne:
    """Dummy tool: after a 1, the next token is forced to be 2."""

    def __call__(self, tokens, lengths, t):
        prev = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        force = (t > 0) & (lengths == t) & (prev == 1)
        return force, jnp.full_like(lengths, 2)


def _adapters(cfg, key, r=2):
    L, D, K, Dh = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.head_dim
    k1, k2 = jax.random.split(key)
    return {"scale": jnp.float32(1.5), "tree": {"layers": {"attn": {"v": {"kernel": {
        "a": 0.4 * jax.random.normal(k1, (L, D, r)), "b": 0.4 * jax.random.normal(k2, (L, r, K * Dh))}}}}}}


def _gpt2_case():
    """(cfg, params, adapters, spec, prompt tokens, prompt mask): a one-layer gpt2 (learned
    positions make left-padding / position mistakes visible), LoRA on v, T = 6, three
    left-padded prompts of different lengths."""
    cfg = ModelConfig(family="gpt2", vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=16)
    params = tr.init_params(cfg, jax.random.PRNGKey(1), std=0.5)
    adapters = _adapters(cfg, jax.random.PRNGKey(2))
    spec = PolicySpec(TERM, max_len=6, min_len=1)
    pt = np.array([[0, 0, 3, 4], [5, 6, 7, 1], [0, 0, 0, 2]], np.int32)
    pm = (np.arange(4)[None] >= np.array([[2], [0], [3]])).astype(np.int32)
    return cfg, params, adapters, spec, pt, pm


def test_sampler_log_probs_equal_scorer():
    cfg, params, adapters, spec, pt, pm = _gpt2_case()
    bias = np.zeros(V, np.float32)
    bias[7] = -1e9
    bias[1] = 1.0
    bb = np.zeros(V, np.float32)
    bb[8] = 0.5
    ns = 8
    tool = ForceTwoAfterOne()
    out = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=ns, temperature=1.3,
                 top_k=5, top_p=0.95, epsilon=0.1, behaviour_bias=bb, logit_bias=bias,
                 adapters=adapters, tool=tool, pad_id=0)
    toks, lens, act = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.action_mask)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(3), ns))
    # The tool fired, and exactly where it should.
    n_forced = 0
    for r in range(len(lens)):
        assert lens[r] >= 1 and not np.isin(toks[r, : lens[r]], TERM + (7,)).any()
        for t in range(lens[r]):
            forced = t > 0 and toks[r, t - 1] == 1
            assert act[r, t] == (not forced)
            if forced:
                assert toks[r, t] == 2 and out.log_pf[r, t] == 0.0
                n_forced += 1
        if 0 < lens[r] < spec.max_len:
            assert toks[r, lens[r] - 1] != 1  # a row cannot terminate right after a 1
    assert n_forced > 0
    sc = score_policy(cfg, params, np.repeat(pt, ns, 0), np.repeat(pm, ns, 0), out.tokens, out.lengths,
                      spec, logit_bias=bias, adapters=adapters, action_mask=out.action_mask)
    lpt, slpt = np.asarray(out.log_pterm), np.asarray(sc.log_pterm)
    np.testing.assert_allclose(out.log_pf, sc.log_pf, atol=1e-5)
    finite = slpt > -1e20
    np.testing.assert_array_equal(finite, lpt > -1e20)
    np.testing.assert_allclose(lpt[finite], slpt[finite], atol=1e-5)
    # With the adapters switched off (scale 0: same jit cache) the scores differ, so the
    # sampler really used them.
    off = dict(adapters, scale=jnp.float32(0.0))
    base = score_policy(cfg, params, np.repeat(pt, ns, 0), np.repeat(pm, ns, 0), out.tokens,
                        out.lengths, spec, logit_bias=bias, adapters=off, action_mask=out.action_mask)
    assert np.max(np.abs(np.asarray(base.log_pf) - np.asarray(sc.log_pf))) > 1e-3


@pytest.mark.parametrize("term_bias", [0.0, 8.0], ids=["long", "all-end-early"])
def test_decode_chunk_gives_the_same_samples(term_bias):
    """ModelConfig.decode_chunk: the decode loop in chunks of k steps (one test of "all rows
    done?" per chunk, then step by step) samples exactly what the step-by-step loop samples:
    T = 6 with k = 4 (a chunk and 2 single steps), 6 (one chunk), 8 (no chunk fits), with a
    tool, adapters and biases; with a large ⊤ bias every row ends within the first chunk, so
    the chunk's remaining steps run after all rows are done and must change nothing."""
    cfg, params, adapters, spec, pt, pm = _gpt2_case()
    bias = np.zeros(V, np.float32)
    bias[list(TERM)] = term_bias
    kw = dict(num_samples=8, temperature=1.3, epsilon=0.1, logit_bias=bias, adapters=adapters,
              tool=ForceTwoAfterOne(), pad_id=0)
    ref = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, **kw)
    lens = np.asarray(ref.lengths)
    if term_bias:
        assert lens.max() <= 3  # a row of length L draws ⊤ at step L: all inside steps 0-3
    else:
        assert lens.max() == spec.max_len and lens.min() < spec.max_len
    for k in (4, 6, 8):
        out = sample(dataclasses.replace(cfg, decode_chunk=k), params, jax.random.PRNGKey(3),
                     pt, pm, spec, **kw)
        for name in ("tokens", "lengths", "action_mask", "prompt_index"):
            np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
        for name in ("log_pf", "log_pterm", "beh_log_pf", "beh_log_pterm"):
            np.testing.assert_allclose(getattr(out, name), getattr(ref, name), atol=1e-6,
                                       err_msg=f"{name}, decode_chunk={k}")
    with pytest.raises(ValueError, match="decode_chunk"):
        dataclasses.replace(cfg, decode_chunk=0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_scanned_decode_layers_sample_what_the_unrolled_layout_samples(monkeypatch, chunk):
    """ModelConfig.decode_layers="scanned": the decode loop runs the layers under lax.scan
    over the stacked weights and writes the stacked cache in place, instead of a per-layer
    copy. On a three-layer llama with LoRA on every layer, a tool and biases, it samples the
    unrolled layout's tokens (projections stored plain, so only the layer loop differs), its
    log-probs are the one-pass scorer's, and a kept copy of the weights is not used."""
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg = ModelConfig(family="llama", vocab_size=V, d_model=16, n_layers=3, n_heads=4,
                      n_kv_heads=2, d_ff=32, max_seq_len=24, decode_chunk=chunk)
    params = tr.init_params(cfg, jax.random.PRNGKey(4), std=0.5)
    adapters = _adapters(cfg, jax.random.PRNGKey(5))
    _, _, _, spec, pt, pm = _gpt2_case()
    bias = np.zeros(V, np.float32)
    bias[1] = 1.0
    kw = dict(num_samples=8, temperature=1.2, epsilon=0.05, logit_bias=bias, adapters=adapters,
              tool=ForceTwoAfterOne(), pad_id=0)
    ref = sample(cfg, params, jax.random.PRNGKey(6), pt, pm, spec, **kw)
    scanned = cfg.replace(decode_layers="scanned")
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")  # a kept copy would be used...
    kept = sampling.DecodeWeights(params)
    tampered = dict(kept.weights, layers=jax.tree.map(lambda a: a * 0.0, kept.weights["layers"]))
    object.__setattr__(kept, "weights", tampered)  # ...and would change every score
    out = sample(scanned, params, jax.random.PRNGKey(6), pt, pm, spec, decode_weights=kept, **kw)
    lens = np.asarray(ref.lengths)
    assert lens.min() < spec.max_len and lens.max() == spec.max_len  # rows end at many steps
    for name in ("tokens", "lengths", "action_mask", "prompt_index"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    for name in ("log_pf", "log_pterm", "beh_log_pf", "beh_log_pterm"):
        np.testing.assert_allclose(getattr(out, name), getattr(ref, name), atol=1e-5,
                                   err_msg=name)
    sc = score_policy(cfg, params, np.repeat(pt, 8, 0), np.repeat(pm, 8, 0), out.tokens,
                      out.lengths, spec, logit_bias=bias, adapters=adapters,
                      action_mask=out.action_mask)
    np.testing.assert_allclose(out.log_pf, sc.log_pf, atol=1e-5)
    with pytest.raises(ValueError, match="decode_layers"):
        cfg.replace(decode_layers="stacked")


def test_scanned_decode_layers_under_a_sharded_mesh(monkeypatch):
    """The in-place cache write of the scanned layers under a 2 x 2 x 2 mesh (weights and
    adapters sharded by the rules, kv heads over "tensor"): the same samples as one device."""
    from gfn_jax import parallel

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=64, max_seq_len=24, decode_layers="scanned")
    params = tr.init_params(cfg, jax.random.PRNGKey(7), std=0.5)
    _, _, _, spec, pt, pm = _gpt2_case()
    kw = dict(num_samples=4, temperature=1.1, pad_id=0)
    ref = sample(cfg.replace(decode_layers="unrolled"), params, jax.random.PRNGKey(8), pt, pm,
                 spec, **kw)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, parallel.tree_shardings(tr.param_axes(cfg), params, mesh))
    out = sample(cfg, sharded, jax.random.PRNGKey(8), pt, pm, spec, **kw)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.log_pf, ref.log_pf, atol=1e-5)


@pytest.mark.parametrize("mesh_shape, ns, plan_ns", [
    ((8, 1, 1), 16, 512),
    ((2, 2, 2), 16, 512),
    ((8, 1, 1), 5, 500),  # 15 and 1,500 rows: padded to a multiple of 8, the extra dropped
], ids=["data8", "2x2x2", "data8-uneven"])
def test_sampler_splits_rows_over_the_mesh_batch_axes(monkeypatch, mesh_shape, ns, plan_ns):
    """Under ``activation_sharding`` (the trainer's policies sample inside it) each row is
    sampled on one device of the mesh's batch axes, not on every device: the compiled
    sampler's KV cache per device shrinks by the batch axes' size (closed form), the rows
    come back whole on every device, their log-probs are the one-pass scorer's of the tokens
    drawn, and they are the rows sampled without the mesh up to float rounding. A row count
    the batch axes do not divide is padded, and the padding is not returned."""
    from gfn_jax import memory, parallel

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=64, max_seq_len=24)
    params = tr.init_params(cfg, jax.random.PRNGKey(7), std=0.5)
    _, _, _, spec, pt, pm = _gpt2_case()
    kw = dict(num_samples=ns, temperature=1.1, pad_id=0)
    ref = sample(cfg, params, jax.random.PRNGKey(8), pt, pm, spec, **kw)
    d, f, t = mesh_shape
    mesh = parallel.make_mesh(parallel.MeshConfig(data=d, fsdp=f, tensor=t))
    rules = parallel.DEFAULT_RULES
    sharded = jax.device_put(params, parallel.tree_shardings(tr.param_axes(cfg), params, mesh))
    with tr.activation_sharding(mesh, rules):
        out = sample(cfg, sharded, jax.random.PRNGKey(8), pt, pm, spec, **kw)
    for a in jax.tree.leaves(out):
        assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8
        assert a.shape[0] == pt.shape[0] * ns
    toks = np.asarray(out.tokens)
    same = (toks == np.asarray(ref.tokens)).all(1)
    assert same.mean() >= 0.9  # a row may part ways where rounding moves a draw
    np.testing.assert_allclose(np.asarray(out.log_pf)[same], np.asarray(ref.log_pf)[same],
                               atol=1e-4)
    sc = score_policy(cfg, params, np.repeat(pt, ns, 0), np.repeat(pm, ns, 0), out.tokens,
                      out.lengths, spec, action_mask=out.action_mask)
    np.testing.assert_allclose(out.log_pf, sc.log_pf, atol=1e-4)
    # the compiled program: rows x (P + T) slots x 2 x layers x kv heads x head_dim floats
    # of cache, split over data x fsdp devices (kv heads also over tensor)
    N, P, T = pt.shape[0] * plan_ns, pt.shape[1], spec.max_len
    cache = N * (P + T) * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    one = parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1])
    plan = lambda m: memory.estimate_sampler_memory(  # noqa: E731
        cfg, prompts=pt.shape[0], num_samples=plan_ns, prompt_len=P, traj_len=T, mesh=m)
    whole, split = plan(one), plan(mesh)
    assert whole.temp_bytes >= cache
    assert whole.temp_bytes - split.temp_bytes >= 0.9 * cache * (1 - 1 / (d * f * t))


def test_padded_rows_move_no_cache_between_devices():
    """A draw the batch axes do not divide (3 x 500 rows on data=8, padded to 1,504): each
    device gathers its rows from the prompts' cache, so the compiled sampler sends no more
    between devices, and holds no more temporaries, than the unpadded 3 x 512 draw (which
    sends only the gathered outputs). Repeating then padding the rows made the partitioner
    move the row-split cache (1.19 MB per device against 0.16 MB; 4.5 MB of temporaries)."""
    from gfn_jax import memory, parallel

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    cfg = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=64, max_seq_len=24)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=8, fsdp=1, tensor=1))
    plan = lambda k: memory.estimate_sampler_memory(  # noqa: E731
        cfg, prompts=3, num_samples=k, prompt_len=6, traj_len=5, mesh=mesh)
    padded, even = plan(500), plan(512)
    assert padded.knobs["sampler.rows"] == 1500
    assert set(padded.comms.device_bytes) <= {"all-gather"}  # the outputs, gathered once
    assert padded.comms.total_device_bytes <= even.comms.total_device_bytes
    assert padded.temp_bytes <= 1.05 * even.temp_bytes


def test_weights_gathered_once_leave_the_decode_loop_without_collectives(monkeypatch):
    """``decode_gather_weights`` on an fsdp=8 mesh: the compiled sampler all-gathers the
    fsdp-sharded weights once before the decode loop (7/8 of their bytes per device, ring
    closed form) and sends nothing per decode step, where without it every decode step
    gathers them again; the samples are the same up to float rounding, with LoRA adapters."""
    from gfn_jax import memory, parallel
    from gfn_jax.models import lora as lora_lib

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")  # a CPU-only layout, no fsdp
    cfg = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=64, max_seq_len=24)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8, tensor=1))
    lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=(r"layers/attn/(q|v)/kernel",))
    plan = lambda c: memory.estimate_sampler_memory(  # noqa: E731
        c, prompts=2, num_samples=8, prompt_len=6, traj_len=5, mesh=mesh, lora=lcfg)
    per_step, once = plan(cfg), plan(cfg.replace(decode_gather_weights=True))
    params = tr.init_params(cfg, jax.random.PRNGKey(7), std=0.5)
    sharding = parallel.tree_shardings(tr.param_axes(cfg), params, mesh)
    fsdp_bytes = sum(x.size * x.dtype.itemsize
                     for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(sharding))
                     if "fsdp" in str(sh.spec))
    assert fsdp_bytes > 0
    assert per_step.comms.per_iteration_device_bytes.get("all-gather", 0) >= 0.5 * fsdp_bytes * 7 / 8
    # per decode step only the loop condition's "every row done?" (one byte per device)
    assert "all-gather" not in once.comms.per_iteration_device_bytes
    assert once.comms.per_iteration_bytes < 16
    assert once.comms.device_bytes["all-gather"] >= fsdp_bytes * 7 / 8

    adapters = lora_lib.init_lora(cfg, params, lcfg, jax.random.PRNGKey(3))
    adapters["tree"] = jax.tree.map(lambda a: a + 0.05, adapters["tree"])  # B starts at 0
    _, _, _, spec, pt, pm = _gpt2_case()
    kw = dict(num_samples=8, temperature=1.1, pad_id=0, adapters=adapters)
    placed = jax.device_put(params, sharding)
    with tr.activation_sharding(mesh, parallel.DEFAULT_RULES):
        a = sample(cfg, placed, jax.random.PRNGKey(8), pt, pm, spec, **kw)
        b = sample(cfg.replace(decode_gather_weights=True), placed, jax.random.PRNGKey(8),
                   pt, pm, spec, **kw)
    same = (np.asarray(a.tokens) == np.asarray(b.tokens)).all(1)
    assert same.mean() >= 0.9
    np.testing.assert_allclose(np.asarray(a.log_pf)[same], np.asarray(b.log_pf)[same],
                               atol=1e-4)


def test_bad_sampler_inputs_raise():
    spec = CASES[0][1]
    with pytest.raises(ValueError, match="temperature"):
        sample(ECFG, EPARAMS, jax.random.PRNGKey(0), PROMPT_T, PROMPT_M, spec, temperature=0.0)
    with pytest.raises(ValueError, match="logit_bias"):
        sample(ECFG, EPARAMS, jax.random.PRNGKey(0), PROMPT_T, PROMPT_M, spec, logit_bias=np.zeros(3))
    with pytest.raises(ValueError, match="longer than the model's context"):
        sample(ECFG, EPARAMS, jax.random.PRNGKey(0), PROMPT_T, PROMPT_M, PolicySpec(ETERM, 15))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(ECFG, EPARAMS, jax.random.PRNGKey(0), PROMPT_T, PROMPT_M, PolicySpec((EV,), 2))


def test_draw_matches_the_distribution_over_many_chunks():
    """The two-level inverse-CDF draw against exact probabilities: a 1,000-token vocabulary
    in chunks of 64 (the last one padded), disallowed tokens interleaved, a dynamic range of
    e^-12, two rows with different distributions."""
    V = 1000
    rs = np.random.RandomState(0)
    logits = rs.normal(0, 3, (2, V)).astype(np.float32)
    logits[:, ::7] = -1e30  # NEG_INF: never drawn
    logits[1, 500:] = -1e30  # row 1: the whole upper half disallowed (its last chunks empty)
    n = 200_000
    keys = jax.random.split(jax.random.PRNGKey(1), n // 2)
    # n/2 draws of both rows, 500 keys at a time (one small program, bounded memory)
    draws = jax.jit(lambda ks: jax.lax.map(
        lambda k: sampling.draw(k, jnp.asarray(logits), chunk=64), ks, batch_size=500))(keys)
    draws = np.asarray(draws).reshape(-1, 2)
    for r in range(2):
        p = np.exp(logits[r].astype(np.float64) - logits[r].max())
        p /= p.sum()
        counts = np.bincount(draws[:, r], minlength=V)
        assert counts[p == 0].sum() == 0, "a token of zero probability was drawn"
        exp = p * len(draws)
        big = exp >= 5
        o = np.append(counts[big], counts[~big].sum())
        e = np.append(exp[big], exp[~big].sum())
        assert stats.chisquare(o, e).pvalue > 1e-4


def test_inverse_cdf_edges_never_return_a_zero_probability_token():
    """u at and beyond the ends of [0, 1) (what float rounding can produce): the first and
    the last token of positive mass, also when whole chunks and the padding are empty."""
    V = 300  # chunks of 128: 3 chunks, the last padded with 84 zeros
    logp = np.full((3, V), -1e30, np.float32)
    logp[0, [5, 200, 250]] = [0.0, -1.0, -2.0]
    logp[1, 130] = 0.0  # one allowed token, alone in the middle chunk
    logp[2, :] = 0.0  # uniform: the last token is the padding's neighbour
    lp = jnp.asarray(logp)
    f = jax.jit(lambda u: sampling.inverse_cdf(lp, u, chunk=128))
    np.testing.assert_array_equal(f(jnp.zeros(3)), [5, 130, 0])
    np.testing.assert_array_equal(f(jnp.full(3, 1.0)), [250, 130, V - 1])
    np.testing.assert_array_equal(f(jnp.full(3, 1.5)), [250, 130, V - 1])
    np.testing.assert_array_equal(f(jnp.full(3, np.nextafter(np.float32(1), 0))),
                                  [250, 130, V - 1])
    # interior boundaries: the mass of token 5 is 1 / (1 + e^-1 + e^-2)
    m5 = 1 / (1 + np.exp(-1) + np.exp(-2))
    np.testing.assert_array_equal(f(jnp.asarray([m5 - 1e-4, 0.5, 0.5]))[0], 5)
    np.testing.assert_array_equal(f(jnp.asarray([m5 + 1e-4, 0.5, 0.5]))[0], 200)


def test_decode_weights_made_once_are_what_the_sampler_decodes_with(monkeypatch):
    """sampling.DecodeWeights (the base laid out feature-major once, kept across calls):
    samples exactly what the per-call feature-major layout samples; the sampler really
    decodes with the kept copy (tampering with it changes the log-probs) and only while it
    was made from the very arrays it is given (equal copies are laid out per call), and only
    in calls that decode feature-major."""
    cfg, params, adapters, spec, pt, pm = _gpt2_case()
    kw = dict(temperature=1.3, epsilon=0.1, adapters=adapters, tool=ForceTwoAfterOne(), pad_id=0)
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")
    kept = sampling.cache_decode_weights(params)
    assert isinstance(kept, sampling.DecodeWeights) and kept.made_from(params)
    assert kept.weights["embed"] is params["embed"]  # only the layers are copied
    ref = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=8, **kw)
    out = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=8,
                 decode_weights=kept, **kw)
    for name in ("tokens", "lengths", "action_mask"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
    for name in ("log_pf", "log_pterm", "beh_log_pf"):
        np.testing.assert_allclose(getattr(out, name), getattr(ref, name), atol=1e-6)

    def rescaled(lp):  # every [out, in] projection x 1.5: a visibly different policy
        return jax.tree_util.tree_map_with_path(
            lambda path, a: a * 1.5 if path[-1].key == tr.FM_KERNEL else a, lp)

    tampered = sampling.DecodeWeights(params)
    tampered.weights = dict(tampered.weights,
                            layers=tuple(rescaled(lp) for lp in tampered.weights["layers"]))
    out = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=8,
                 decode_weights=tampered, **kw)
    scores = score_policy(cfg, params, np.repeat(pt, 8, 0), np.repeat(pm, 8, 0), out.tokens,
                          out.lengths, spec, adapters=adapters, action_mask=out.action_mask)
    # prefill used params, the decode steps the tampered copy: step 0 agrees, later ones not
    np.testing.assert_allclose(out.log_pf[:, 0], scores.log_pf[:, 0], atol=1e-5)
    assert np.max(np.abs(np.asarray(out.log_pf) - np.asarray(scores.log_pf))) > 1e-2
    copies = jax.tree_util.tree_map(jnp.copy, params)  # equal values, other arrays: ignored
    assert not tampered.made_from(copies)
    out = sample(cfg, copies, jax.random.PRNGKey(3), pt, pm, spec, num_samples=8,
                 decode_weights=tampered, **kw)
    np.testing.assert_allclose(out.log_pf, ref.log_pf, atol=1e-6)
    # a call that does not decode feature-major lays out params itself (a new num_samples:
    # the variable is read when the sampler is traced)
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    assert sampling.cache_decode_weights(params) is None
    plain = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=4, **kw)
    out = sample(cfg, params, jax.random.PRNGKey(3), pt, pm, spec, num_samples=4,
                 decode_weights=tampered, **kw)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_allclose(out.log_pf, plain.log_pf, atol=1e-6)
