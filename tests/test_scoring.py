"""One-pass scorers against naive per-prefix loops of plain ``forward`` calls (numpy maths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import transformer as tr
from gfn_jax.models.config import ModelConfig
from gfn_jax.scoring import score_policy, score_reward_prefixes, score_suffix_prefixes

V = 10
TERM = (7, 9)
P, T, S = 4, 5, 3

# Left-padded prompts of different lengths, rows of different lengths (incl. 0 and T),
# pad ids that differ from 0 (they must not matter), right-padded suffixes.
PROMPTS = [[3, 1, 4], [2], [5, 6, 1, 8], [1, 2]]
ZS = [[4, 0, 2], [], [1, 3, 5, 2, 6], [8]]
YS = [[2, 5, 3], [6], [4, 4], [1, 0, 8]]


def _cfg(family):
    return ModelConfig(
        family=family, vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32,
        n_kv_heads=1 if family == "llama" else None,
    )


def _batch():
    B = len(PROMPTS)
    pt = np.full((B, P), 8, np.int32)
    pm = np.zeros((B, P), np.int32)
    z = np.full((B, T), 6, np.int32)
    y = np.full((B, S), 7, np.int32)
    ym = np.zeros((B, S), bool)
    for b in range(B):
        pt[b, P - len(PROMPTS[b]):] = PROMPTS[b]
        pm[b, P - len(PROMPTS[b]):] = 1
        z[b, : len(ZS[b])] = ZS[b]
        y[b, : len(YS[b])] = YS[b]
        ym[b, : len(YS[b])] = True
    lengths = np.array([len(zz) for zz in ZS], np.int32)
    return pt, pm, z, lengths, y, ym


def _adapters(cfg, key, r=2):
    L, D, H, Dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "scale": jnp.float32(2.0),
        "tree": {
            "layers": {
                "attn": {
                    "q": {"kernel": {"a": 0.3 * jax.random.normal(k1, (L, D, r)), "b": 0.3 * jax.random.normal(k2, (L, r, H * Dh))}}
                },
                "mlp": {
                    "up": {"kernel": {"a": 0.3 * jax.random.normal(k3, (L, D, r)), "b": 0.3 * jax.random.normal(k4, (L, r, cfg.d_ff))}}
                },
            }
        },
    }


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _naive_next_logits(cfg, params, seqs, adapters=None):
    """Next-token logits after each (unpadded) sequence: one right-padded plain forward."""
    Lmax = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), Lmax), np.int32)
    am = np.zeros((len(seqs), Lmax), np.int32)
    for r, s in enumerate(seqs):
        toks[r, : len(s)] = s
        am[r, : len(s)] = 1
    logits = np.asarray(tr.forward(cfg, params, toks, am, adapters=adapters), np.float64)
    return np.stack([logits[r, len(s) - 1] for r, s in enumerate(seqs)])


def _naive_suffix_logprob(cfg, params, prefixes, ys):
    seqs = [list(x) + list(y) for x, y in zip(prefixes, ys)]
    Lmax = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), Lmax), np.int32)
    am = np.zeros((len(seqs), Lmax), np.int32)
    for r, s in enumerate(seqs):
        toks[r, : len(s)] = s
        am[r, : len(s)] = 1
    logp = _log_softmax(tr.forward(cfg, params, toks, am))
    out = []
    for r, (x, y) in enumerate(zip(prefixes, ys)):
        out.append(sum(logp[r, len(x) - 1 + j, y[j]] for j in range(len(y))))
    return np.array(out)


def _lse(x):
    m = np.max(x)
    if m == -np.inf:
        return -np.inf
    return m + np.log(np.sum(np.exp(x - m)))


@pytest.mark.parametrize("family", ["llama"])
def test_reward_prefixes_match_naive_loop(family):
    cfg = _cfg(family)
    params = tr.init_params(cfg, jax.random.PRNGKey(1), std=0.4)
    pt, pm, z, lengths, _, _ = _batch()
    out = score_reward_prefixes(cfg, params, pt, pm, z, lengths, TERM)
    assert out.log_pz.shape == (len(PROMPTS), T + 1) and out.log_pterm.shape == (len(PROMPTS), T + 1)
    prefixes = [(b, i) for b in range(len(PROMPTS)) for i in range(len(ZS[b]) + 1)]
    logp = _log_softmax(
        _naive_next_logits(cfg, params, [PROMPTS[b] + ZS[b][:i] for b, i in prefixes])
    )
    want_pz = np.zeros((len(PROMPTS), T + 1))
    want_pt = np.zeros((len(PROMPTS), T + 1))
    for r, (b, i) in enumerate(prefixes):
        want_pt[b, i] = _lse(logp[r, list(TERM)])
        if i < len(ZS[b]):
            want_pz[b, i + 1] = want_pz[b, i] + logp[r, ZS[b][i]]
    np.testing.assert_allclose(out.log_pz, want_pz, atol=1e-4)
    np.testing.assert_allclose(out.log_pterm, want_pt, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_suffix_prefixes_match_naive_loop(family):
    cfg = _cfg(family)
    params = tr.init_params(cfg, jax.random.PRNGKey(2), std=0.4)
    pt, pm, z, lengths, y, ym = _batch()
    out = np.asarray(score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym))
    assert out.shape == (len(PROMPTS), T + 1)
    prefixes = [(b, i) for b in range(len(PROMPTS)) for i in range(len(ZS[b]) + 1)]
    got = _naive_suffix_logprob(
        cfg, params, [PROMPTS[b] + ZS[b][:i] for b, i in prefixes], [YS[b] for b, _ in prefixes]
    )
    want = np.zeros((len(PROMPTS), T + 1))
    for r, (b, i) in enumerate(prefixes):
        want[b, i] = got[r]
    np.testing.assert_allclose(out, want, atol=1e-4)
    # Values differ across prefixes, so the per-copy masking really matters.
    assert np.ptp(want[2, : len(ZS[2]) + 1]) > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_suffix_block_mask_is_the_layout_mask_and_attends_alike(family):
    """The suffix layout's mask in block form equals the dense mask, and a forward under it
    equals the dense forward, values and gradients, at every query that sees a key (a query
    of a left-padded prompt slot sees none; its output is ignored either way)."""
    from gfn_jax.scoring import suffix_block_mask, suffix_layout

    pt, pm, z, lengths, y, ym = (jnp.asarray(a) for a in _batch())
    positions, dense, _ = suffix_layout(pm, lengths, ym, T)
    block = suffix_block_mask(pm, lengths, ym, T)
    L = P + T + (T + 1) * (S - 1)
    assert block.shape == dense.shape == (len(PROMPTS), L, L)
    np.testing.assert_array_equal(np.asarray(block.dense()), np.asarray(dense))

    cfg = _cfg(family)
    params = tr.init_params(cfg, jax.random.PRNGKey(4), std=0.4)
    toks = jnp.concatenate([pt, z, jnp.tile(y[:, : S - 1], (1, T + 1))], axis=1)
    seen = jnp.any(dense, axis=-1)[..., None]
    assert not bool(jnp.all(seen))  # the padded prompt slots are there

    def hidden(p, m):
        h = tr.apply(cfg, p, toks, positions, m, return_hidden=True, compute_logits=False)[2]
        return jnp.where(seen, h, 0.0)

    np.testing.assert_allclose(hidden(params, block), hidden(params, dense), atol=2e-5)
    gb, gd = (jax.grad(lambda p, m=m: jnp.sum(jnp.sin(hidden(p, m))))(params)
              for m in (block, dense))
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gd)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # the shared-prompt rows: the block mask without the prompt's queries
    rows = block.drop_main_queries(P)
    np.testing.assert_array_equal(np.asarray(rows.dense()), np.asarray(dense[:, P:, :]))


def test_suffix_of_one_token_equals_reward_next_token():
    """S = 1: the layout has no copies; log p(y | prefix i) = log_softmax at prefix i."""
    cfg = _cfg("llama")
    params = tr.init_params(cfg, jax.random.PRNGKey(3), std=0.4)
    pt, pm, z, lengths, _, _ = _batch()
    y = np.full((len(PROMPTS), 1), 7, np.int32)
    out = score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, np.ones_like(y, bool))
    rw = score_reward_prefixes(cfg, params, pt, pm, z, lengths, (7,))
    np.testing.assert_allclose(out, rw.log_pterm, atol=1e-5)


def _constrained_logp(logits, i, spec, bias):
    """numpy reference of the constrained policy at a prefix of length i."""
    x = np.asarray(logits, np.float64) + (0.0 if bias is None else np.asarray(bias, np.float64))
    is_term = np.isin(np.arange(x.shape[-1]), spec.term_ids)
    allowed = np.where(is_term, i >= spec.min_len, i < spec.max_len)
    x = np.where(allowed, x, -np.inf)
    return x - _lse(x)


@pytest.mark.parametrize("use_lora", [False, True])
def test_score_policy_matches_naive(use_lora):
    cfg = _cfg("gpt2")
    params = tr.init_params(cfg, jax.random.PRNGKey(4), std=0.4)
    adapters = _adapters(cfg, jax.random.PRNGKey(5)) if use_lora else None
    spec = PolicySpec(TERM, max_len=T, min_len=1)
    bias = np.zeros(V, np.float32)
    bias[3] = -np.inf  # disallowed (no row uses token 3 as a chosen token... except one below)
    bias[2] = 1.5
    pt, pm, z, lengths, _, _ = _batch()
    z = np.where(z == 3, 0, z)  # keep chosen tokens allowed
    zs = [[0 if t == 3 else t for t in zz] for zz in ZS]
    action = np.ones_like(z, bool)
    action[0, 1] = False  # a tool-spliced position
    out = score_policy(
        cfg, params, pt, pm, z, lengths, spec, logit_bias=bias, adapters=adapters, action_mask=action
    )
    prefixes = [(b, i) for b in range(len(PROMPTS)) for i in range(len(zs[b]) + 1)]
    logits = _naive_next_logits(
        cfg, params, [PROMPTS[b] + zs[b][:i] for b, i in prefixes], adapters=adapters
    )
    want_pf = np.zeros((len(PROMPTS), T))
    want_pt = np.zeros((len(PROMPTS), T + 1))
    for r, (b, i) in enumerate(prefixes):
        lp = _constrained_logp(logits[r], i, spec, bias)
        want_pt[b, i] = _lse(lp[list(TERM)])
        if i < len(zs[b]) and action[b, i]:
            want_pf[b, i] = lp[zs[b][i]]
    got_pt = np.asarray(out.log_pterm)
    # log q(⊤) at prefix 0 < min_len is "-inf" (a huge finite negative); elsewhere finite.
    assert np.all(got_pt[:, 0] < -1e20)
    np.testing.assert_allclose(got_pt[:, 1:], want_pt[:, 1:], atol=1e-5)
    np.testing.assert_allclose(out.log_pf, want_pf, atol=1e-5)
    assert out.log_pf[0, 1] == 0.0
    if use_lora:  # the adapters really change the policy
        base = score_policy(cfg, params, pt, pm, z, lengths, spec, logit_bias=bias, action_mask=action)
        assert np.max(np.abs(np.asarray(base.log_pf) - np.asarray(out.log_pf))) > 1e-2
    # The row with n = T must terminate at prefix T: log q(⊤) = 0 there.
    np.testing.assert_allclose(got_pt[2, T], 0.0, atol=1e-6)
    # prompt_hidden: the final-normed hidden state at each prompt's last token.
    _, hid = tr.forward(cfg, params, pt, pm, return_hidden=True, adapters=adapters)
    np.testing.assert_allclose(out.prompt_hidden, np.asarray(hid)[:, -1], atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    cfg = _cfg("llama")
    params = tr.init_params(cfg, jax.random.PRNGKey(0))
    pt, pm, z, lengths, y, ym = _batch()
    with pytest.raises(ValueError, match="lengths must be"):
        score_reward_prefixes(cfg, params, pt, pm, z, lengths[:2], TERM)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_reward_prefixes(cfg, params, pt, pm, z, lengths, (V,))
    with pytest.raises(ValueError, match="logit_bias"):
        score_policy(cfg, params, pt, pm, z, lengths, PolicySpec(TERM, T), logit_bias=np.zeros(3))
    with pytest.raises(ValueError, match="suffix_tokens"):
        score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y[:, 0], ym)
    with pytest.raises(ValueError, match="min_len"):
        PolicySpec(TERM, max_len=2, min_len=3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_final_infill_reward_equals_the_packed_prefix_reward_at_n(family):
    """The one-forward whole-trajectory infilling reward (evaluation) equals the packed
    every-prefix reward at each row's length, with and without a penalty bias."""
    from gfn_jax.tasks.infill import final_infill_log_reward, infill_log_reward

    cfg = _cfg(family)
    params = tr.init_params(cfg, jax.random.PRNGKey(5), std=0.4)
    pt, pm, z, lengths, y, ym = _batch()
    bias = np.zeros(V, np.float32)
    bias[[3, 6]] = -2.0
    for b in (None, jnp.asarray(bias)):
        full = np.asarray(infill_log_reward(cfg, params, pt, pm, z, lengths, y, ym, (7,), b))
        want = full[np.arange(len(PROMPTS)), lengths]
        got = np.asarray(final_infill_log_reward(cfg, params, pt, pm, z, lengths, y, ym, (7,), b))
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert np.ptp(got) > 1e-2
