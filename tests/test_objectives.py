"""Objectives vs independent references: explicit loops (numpy, float64), an O(T^2) pair
reference, an exactly solvable tree where the optimal policy is known, and closed forms."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import objectives as obj

B, T = 6, 7
LAMBDAS = [1.0, 0.9, 0.5, 0.0]


# ----------------------------------------------------------------------------- data


def make_batch(seed: int, b: int = B, t: int = T, drop: float = 0.3):
    """Random ragged batch; every entry the objectives must not read is NaN or -inf."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0], lengths[1] = 0, t
    log_pf = rng.normal(-1.5, 1.0, size=(b, t))
    log_pterm = rng.normal(-2.0, 1.0, size=(b, t + 1))
    log_r = rng.normal(-5.0, 3.0, size=(b, t + 1))
    idx = np.arange(t + 1)
    mask = (idx[None, :] <= lengths[:, None]) & (rng.random((b, t + 1)) > drop)
    mask[2] = idx <= lengths[2]  # one row with the default mask
    fill = lambda shape: np.where(rng.random(shape) < 0.5, np.nan, -np.inf)  # noqa: E731
    log_pterm = np.where(mask, log_pterm, fill(log_pterm.shape))
    log_r = np.where(mask, log_r, fill(log_r.shape))
    # log_pf is read between the first and last valid state of each row only.
    used = np.zeros((b, t), bool)
    for r in range(b):
        v = np.nonzero(mask[r])[0]
        if len(v):
            used[r, v[0] : v[-1]] = True
    log_pf = np.where(used, log_pf, fill(log_pf.shape))
    return log_pf, log_pterm, log_r, mask, lengths


def ref_subtb(log_pf, log_pterm, log_r, mask, lamb):
    """Explicit loops over pairs i < j of valid states."""
    num = den = 0.0
    b, t1 = mask.shape
    for r in range(b):
        for i in range(t1):
            for j in range(i + 1, t1):
                if not (mask[r, i] and mask[r, j]):
                    continue
                w = lamb ** (j - i - 1)
                res = (log_r[r, i] - log_pterm[r, i]) + sum(log_pf[r, i:j]) - (log_r[r, j] - log_pterm[r, j])
                num += w * res * res
                den += w
    return num / den if den > 0 else 0.0


def subtb_loss_pairs(log_pf, log_pterm, log_r, mask, lamb):
    """O(T^2) JAX reference: materialise every pair (i, j) and weight lamb^(j-i-1)."""
    b, t = log_pf.shape
    mask = jnp.asarray(mask)
    # step t is used iff some valid state i <= t and some valid state j > t.
    before = jnp.cumsum(mask[:, :-1], axis=1) > 0
    after = jnp.flip(jnp.cumsum(jnp.flip(mask[:, 1:], 1), axis=1), 1) > 0
    pf = jnp.where(before & after, log_pf, 0.0)
    s = jnp.concatenate([jnp.zeros((b, 1)), jnp.cumsum(pf, 1)], 1)
    log_f = jnp.where(mask, log_r, 0.0) - jnp.where(mask, log_pterm, 0.0)
    res = (log_f - s)[:, :, None] - (log_f - s)[:, None, :]  # [B, i, j]
    i = jnp.arange(t + 1)
    gap = i[None, :] - i[:, None]
    pair = (gap > 0)[None] & mask[:, :, None] & mask[:, None, :]
    w = jnp.where(gap > 0, jnp.asarray(lamb, jnp.float32) ** jnp.maximum(gap - 1, 0), 0.0)[None]
    num = jnp.sum(jnp.where(pair, w * res**2, 0.0))
    den = jnp.sum(jnp.where(pair, w, 0.0))
    return num / den


def ref_db(log_pf, log_pterm, log_r, mask):
    res = []
    for r in range(mask.shape[0]):
        for i in range(mask.shape[1] - 1):
            if mask[r, i] and mask[r, i + 1]:
                res.append(log_r[r, i] - log_pterm[r, i] + log_pf[r, i] - log_r[r, i + 1] + log_pterm[r, i + 1])
    return float(np.mean(np.square(res)))


def ref_seq_logprob(log_pf, log_pterm, lengths, action_mask=None):
    out = []
    for r, n in enumerate(lengths):
        s = sum(log_pf[r, t] for t in range(n) if action_mask is None or action_mask[r, t])
        out.append(s + log_pterm[r, n])
    return np.array(out)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


# Jitted once per shape (eager op-by-op dispatch of the scans is slow on CPU).
_subtb = jax.jit(obj.subtb_loss)  # traced lamb: the associative-scan path, also at λ=1
_subtb1 = jax.jit(lambda a, b, c, m: obj.subtb_loss(a, b, c, m, 1.0))  # python 1.0: closed form
_db = jax.jit(obj.db_loss)
_tb = jax.jit(obj.tb_loss)
_subtb_grad = jax.jit(jax.grad(lambda a, b, c, m, l: obj.subtb_loss(a, b, c, m, l)[0], argnums=(0, 1, 2)))
_subtb1_grad = jax.jit(jax.grad(lambda a, b, c, m: obj.subtb_loss(a, b, c, m, 1.0)[0], argnums=(0, 1, 2)))
_pairs_grad = jax.jit(jax.grad(subtb_loss_pairs, argnums=(0, 1, 2)))


def subtb(log_pf, log_pterm, log_r, mask, lamb):
    """Closed form for lamb == 1.0, scan path otherwise."""
    if lamb == 1.0:
        return _subtb1(log_pf, log_pterm, log_r, mask)
    return _subtb(log_pf, log_pterm, log_r, mask, jnp.float32(lamb))


# ----------------------------------------------------------------------------- SubTB / DB


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lamb", LAMBDAS)
def test_subtb_matches_pair_loops(seed, lamb):
    log_pf, log_pterm, log_r, mask, _ = make_batch(seed)
    want = ref_subtb(log_pf, log_pterm, log_r, mask, lamb)
    # python-float lamb (closed form at 1.0) and traced lamb (scan path) both match.
    got, aux = subtb(log_pf, log_pterm, log_r, mask, lamb)
    got_traced, _ = _subtb(log_pf, log_pterm, log_r, mask, jnp.float32(lamb))
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    np.testing.assert_allclose(float(got_traced), want, rtol=2e-5)
    assert all_finite(aux)
    assert float(aux["loss"]) == float(got)


@pytest.mark.parametrize("lamb", LAMBDAS)
def test_subtb_grads_match_pair_reference_and_are_finite(lamb):
    log_pf, log_pterm, log_r, mask, _ = make_batch(3)
    g = _subtb_grad(log_pf, log_pterm, log_r, mask, jnp.float32(lamb))
    g_ref = _pairs_grad(log_pf, log_pterm, log_r, mask, jnp.float32(lamb))
    np.testing.assert_allclose(
        float(subtb_loss_pairs(log_pf, log_pterm, log_r, mask, lamb)),
        ref_subtb(log_pf, log_pterm, log_r, mask, lamb),
        rtol=1e-5,
    )
    assert all_finite(g)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
    # nothing flows into masked-out entries
    assert np.all(np.asarray(g[1])[~mask] == 0) and np.all(np.asarray(g[2])[~mask] == 0)
    # the python-float closed form at λ=1 has the same gradient
    if lamb == 1.0:
        g1 = _subtb1_grad(log_pf, log_pterm, log_r, mask)
        for a, r in zip(g1, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_subtb_large_offsets_are_well_conditioned():
    """Flows around -1e3 with small residuals: centring + Welford merge keep float32 accurate."""
    log_pf, log_pterm, log_r, mask, _ = make_batch(4, drop=0.0)
    rng = np.random.default_rng(0)
    small = 1e-1 * rng.normal(size=log_pf.shape)
    # log_r chosen so that residuals between consecutive states are `small`.
    log_r = np.full(log_pterm.shape, -1000.0) + log_pterm
    log_r[:, 1:] += np.cumsum(np.nan_to_num(log_pf, nan=0.0, neginf=0.0) + small, 1)
    log_r = np.where(mask, log_r, np.nan)
    f32 = lambda x: x.astype(np.float32).astype(np.float64)  # noqa: E731  (reference sees the same inputs)
    for lamb in (1.0, 0.3):
        want = ref_subtb(f32(log_pf), f32(log_pterm), f32(log_r), mask, lamb)
        got = float(_subtb(log_pf, log_pterm, log_r, mask, jnp.float32(lamb))[0])
        np.testing.assert_allclose(got, want, rtol=1e-2)


def test_subtb_lambda_counts_positions_not_valid_states():
    """Masking a state removes its pairs only: weights of the others stay λ^(j-i-1)."""
    log_pf = np.array([[0.1, -0.4, 0.3]])
    log_pterm = np.array([[-1.0, -0.5, -2.0, -0.1]])
    log_r = np.array([[0.2, -1.0, 0.7, 0.0]])
    mask = np.array([[True, False, True, True]])
    lamb = 0.5
    d = lambda i, j: (log_r[0, i] - log_pterm[0, i]) + log_pf[0, i:j].sum() - (log_r[0, j] - log_pterm[0, j])  # noqa
    # pairs (0,2): λ^1, (0,3): λ^2, (2,3): λ^0
    want = (lamb * d(0, 2) ** 2 + lamb**2 * d(0, 3) ** 2 + d(2, 3) ** 2) / (lamb + lamb**2 + 1)
    got, aux = subtb(log_pf, log_pterm, log_r, mask, lamb)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["pair_weight"]), lamb + lamb**2 + 1, rtol=1e-6)
    # consecutive-valid-state residual diagnostics: pairs (0,2) and (2,3)
    np.testing.assert_allclose(float(aux["residual_mean"]), (d(0, 2) + d(2, 3)) / 2, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_db_matches_loops_and_subtb_lambda0(seed):
    log_pf, log_pterm, log_r, mask, _ = make_batch(seed)
    loss, aux = _db(log_pf, log_pterm, log_r, mask)
    np.testing.assert_allclose(float(loss), ref_db(log_pf, log_pterm, log_r, mask), rtol=2e-5)
    np.testing.assert_allclose(float(loss), float(subtb(log_pf, log_pterm, log_r, mask, 0.0)[0]), rtol=2e-5)
    g = jax.jit(jax.grad(lambda a, b, c: obj.db_loss(a, b, c, mask)[0], argnums=(0, 1, 2)))(log_pf, log_pterm, log_r)
    assert all_finite(g) and all_finite(aux)


def test_subtb_empty_and_single_state_rows_give_zero():
    log_pf = np.full((B, T), np.nan)  # same shapes as make_batch: reuses the compiled functions
    log_pterm = np.zeros((B, T + 1))
    log_r = np.full((B, T + 1), -np.inf)
    mask = np.zeros((B, T + 1), bool)
    mask[1, 3] = True
    log_r[1, 3] = -2.0
    for lamb in (1.0, 0.5):
        loss, aux = subtb(log_pf, log_pterm, log_r, mask, lamb)
        assert float(loss) == 0.0 and all_finite(aux)
    assert all_finite(_subtb_grad(log_pf, log_pterm, log_r, mask, jnp.float32(0.5)))
    assert all_finite(_subtb1_grad(log_pf, log_pterm, log_r, mask))


def _walk_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for s in subs:
                if hasattr(s, "eqns"):  # Jaxpr
                    yield from _walk_avals(s)
                elif hasattr(getattr(s, "jaxpr", None), "eqns"):  # ClosedJaxpr
                    yield from _walk_avals(s.jaxpr)


@pytest.mark.parametrize("lamb", [1.0, 0.7])
def test_subtb_builds_no_pair_matrix(lamb):
    b, t = 3, 40  # T+1 = 41
    args = (jnp.zeros((b, t)), jnp.zeros((b, t + 1)), jnp.zeros((b, t + 1)), jnp.ones((b, t + 1), bool))
    f = lambda a, p, r, m: obj.subtb_loss(a, p, r, m, lamb)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
    sizes = [int(np.prod(getattr(a, "shape", ()))) for a in _walk_avals(jaxpr.jaxpr)]
    assert max(sizes) < (t + 1) ** 2, max(sizes)
    # the reference does build one, so the check can fail
    jaxpr_ref = jax.make_jaxpr(lambda a, p, r, m: subtb_loss_pairs(a, p, r, m, lamb))(*args)
    assert max(int(np.prod(getattr(a, "shape", ()))) for a in _walk_avals(jaxpr_ref.jaxpr)) >= (t + 1) ** 2


# ----------------------------------------------------------------------------- exact optimum


def _tree_problem(seed: int, vocab: int = 2, depth: int = 3):
    """All sequences over `vocab` tokens up to `depth`, arbitrary log R, exact optimal policy."""
    rng = np.random.default_rng(seed)
    nodes = [()]
    for n in range(1, depth + 1):
        nodes += list(itertools.product(range(vocab), repeat=n))
    log_r = {s: rng.normal(0.0, 2.0) for s in nodes}
    flow = {}
    for s in sorted(nodes, key=len, reverse=True):  # F(s) = R(s⊤) + sum_children F(child)
        flow[s] = math.exp(log_r[s]) + (sum(flow[s + (a,)] for a in range(vocab)) if len(s) < depth else 0.0)
    pterm = {s: math.exp(log_r[s]) / flow[s] for s in nodes}
    pf = {(s, a): flow[s + (a,)] / flow[s] for s in nodes if len(s) < depth for a in range(vocab)}
    return nodes, log_r, flow, pterm, pf


def _tree_arrays(nodes, log_r, pterm, pf, depth=3):
    b = len(nodes)
    lpf = np.full((b, depth), np.nan)
    lpt = np.full((b, depth + 1), -np.inf)
    lr = np.full((b, depth + 1), np.nan)
    lengths = np.array([len(z) for z in nodes])
    for r, z in enumerate(nodes):
        for i in range(len(z) + 1):
            s = z[:i]
            lpt[r, i] = math.log(pterm[s])
            lr[r, i] = log_r[s]
            if i < len(z):
                lpf[r, i] = math.log(pf[(s, z[i])])
    return lpf, lpt, lr, lengths


def test_exact_optimum_zero_loss_and_perturbation_positive():
    nodes, log_r, flow, pterm, pf = _tree_problem(0)
    lpf, lpt, lr, lengths = _tree_arrays(nodes, log_r, pterm, pf)
    log_z = math.log(flow[()])
    # sanity of the construction: q*(z⊤) = R(z⊤)/Z over all terminal sequences (exact enumeration)
    q = np.exp(ref_seq_logprob(lpf, lpt, lengths))
    np.testing.assert_allclose(q, np.exp([log_r[z] for z in nodes]) / flow[()], rtol=1e-10)
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-10)

    mask = np.asarray(obj.default_state_mask(lengths, 3))
    for m in (mask, mask & (np.arange(4) >= 1)[None, :]):
        for lamb in (1.0, 0.5, 0.0):
            loss, aux = subtb(lpf, lpt, lr, m, lamb)
            assert float(loss) < 1e-9 and abs(float(aux["residual_abs_mean"])) < 1e-4
        assert float(_db(lpf, lpt, lr, m)[0]) < 1e-9
    # every pair residual is ~0 in the loop reference (float64)
    assert ref_subtb(lpf, lpt, lr, mask, 1.0) < 1e-20
    # log F(s_0) estimates log Z
    _, aux = subtb(lpf, lpt, lr, mask, 1.0)
    np.testing.assert_allclose(float(aux["log_f_first_mean"]), log_z, rtol=1e-5)
    tb, aux = _tb(lpf, lpt, lr, lengths, log_z)
    assert float(tb) < 1e-9 and abs(float(aux["residual_mean"])) < 1e-4
    assert float(_tb(lpf, lpt, lr, lengths, log_z + 0.5)[0]) == pytest.approx(0.25, rel=1e-4)
    # gradient of SubTB vanishes at the optimum
    g = _subtb_grad(lpf, lpt, lr, mask, jnp.float32(0.5))
    assert max(float(jnp.max(jnp.abs(x))) for x in g) < 1e-4

    # perturb the policy at node (0,): a different normalised distribution over {⊤, 0, 1}
    s = (0,)
    probs = np.array([pterm[s], pf[(s, 0)], pf[(s, 1)]])
    new = probs * np.array([2.0, 0.5, 1.0])
    new /= new.sum()
    pterm2, pf2 = dict(pterm), dict(pf)
    pterm2[s], pf2[(s, 0)], pf2[(s, 1)] = new
    lpf2, lpt2, _, _ = _tree_arrays(nodes, log_r, pterm2, pf2)
    np.testing.assert_allclose(np.exp(ref_seq_logprob(lpf2, lpt2, lengths)).sum(), 1.0, rtol=1e-10)
    for lamb in (1.0, 0.5, 0.0):
        assert float(subtb(lpf2, lpt2, lr, mask, lamb)[0]) > 1e-3
    assert float(_db(lpf2, lpt2, lr, mask)[0]) > 1e-3
    assert float(_tb(lpf2, lpt2, lr, lengths, log_z)[0]) > 1e-3


# ----------------------------------------------------------------------------- TB


@pytest.mark.parametrize("per_row", [False, True])
def test_tb_matches_loops_and_grad(per_row):
    log_pf, log_pterm, log_r, _, lengths = make_batch(5, drop=0.0)
    # TB reads log_pf[t < n], log_pterm[n], log_r[n] only: poison everything else.
    idx = np.arange(T + 1)
    log_pf = np.where(np.arange(T)[None] < lengths[:, None], np.nan_to_num(log_pf, nan=-1.0), np.nan)
    log_pterm = np.where(idx[None] == lengths[:, None], np.nan_to_num(log_pterm, nan=-1.0, neginf=-1.0), np.nan)
    log_r = np.where(idx[None] == lengths[:, None], np.nan_to_num(log_r, nan=-3.0, neginf=-3.0), -np.inf)
    log_z = np.linspace(-1, 1, B) if per_row else np.float64(0.7)
    res = log_z + ref_seq_logprob(log_pf, log_pterm, lengths) - log_r[np.arange(B), lengths]
    loss, aux = _tb(log_pf, log_pterm, log_r, lengths, log_z)
    np.testing.assert_allclose(float(loss), np.mean(res**2), rtol=1e-5)
    np.testing.assert_allclose(float(aux["residual_mean"]), np.mean(res), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda a, b, c, z: obj.tb_loss(a, b, c, lengths, z)[0], argnums=(0, 1, 2, 3)))(
        log_pf, log_pterm, log_r, jnp.asarray(log_z, jnp.float32)
    )
    assert all_finite(g)
    gz = np.asarray(g[3])
    np.testing.assert_allclose(gz, 2 * res / B if per_row else np.sum(2 * res / B), rtol=1e-4)


# ----------------------------------------------------------------------------- baselines


def test_sft_matches_loops():
    log_pf, log_pterm, _, _, lengths = make_batch(6, drop=0.0)
    log_pf = np.where(np.arange(T)[None] < lengths[:, None], np.nan_to_num(log_pf, nan=-1.0), np.nan)
    log_pterm = np.nan_to_num(log_pterm, nan=-1.0, neginf=-1.0)
    act = np.random.default_rng(0).random((B, T)) > 0.2
    lq = ref_seq_logprob(log_pf, log_pterm, lengths, act)
    ntok = sum(act[r, : lengths[r]].sum() + 1 for r in range(B))
    loss, aux = obj.sft_loss(log_pf, log_pterm, lengths, act)
    np.testing.assert_allclose(float(loss), -lq.sum() / ntok, rtol=1e-5)
    assert float(aux["num_tokens"]) == ntok
    g = np.asarray(jax.grad(lambda a: obj.sft_loss(a, log_pterm, lengths, act)[0])(log_pf))
    counted = act & (np.arange(T)[None] < lengths[:, None])
    np.testing.assert_allclose(g, np.where(counted, -1.0 / ntok, 0.0), rtol=1e-5)
    # no action mask: all t < n count
    loss2, _ = obj.sft_loss(log_pf, log_pterm, lengths)
    lq2 = ref_seq_logprob(log_pf, log_pterm, lengths)
    np.testing.assert_allclose(float(loss2), -lq2.sum() / (lengths.sum() + B), rtol=1e-5)


def ref_group_adv(r, gid, baseline, std):
    out = np.zeros_like(r)
    for b in range(len(r)):
        same = [k for k in range(len(r)) if gid[k] == gid[b]]
        others = [k for k in same if k != b]
        if baseline == "loo":
            out[b] = r[b] - np.mean(r[others]) if others else 0.0
        elif baseline == "mean":
            out[b] = r[b] - np.mean(r[same])
        else:
            out[b] = r[b]
        if std:
            out[b] /= np.std(r[same]) + 1e-6
    return out


@pytest.mark.parametrize("baseline", ["loo", "mean", "none"])
@pytest.mark.parametrize("std", [False, True])
def test_group_advantages_match_loops(baseline, std):
    rng = np.random.default_rng(1)
    r = rng.normal(size=9)
    gid = np.array([0, 0, 0, 2, 2, 1, 1, 1, 3])  # group 3 is a singleton
    got = obj.group_advantages(r, gid, 4, baseline, std)
    np.testing.assert_allclose(np.asarray(got), ref_group_adv(r, gid, baseline, std), rtol=1e-5, atol=1e-6)


def test_reinforce_matches_loops_and_score_function_grad():
    log_pf, log_pterm, log_r, _, lengths = make_batch(7, drop=0.0)
    log_pf = np.where(np.arange(T)[None] < lengths[:, None], np.nan_to_num(log_pf, nan=-1.0), np.nan)
    log_pterm = np.nan_to_num(log_pterm, nan=-1.0, neginf=-1.0)
    ref_pf = log_pf + 0.3
    ref_pt = log_pterm - 0.2
    r_final = np.random.default_rng(2).normal(size=B)
    gid = np.array([0, 0, 0, 1, 1, 1])
    for kl_coef, ent in ((0.0, 0.0), (0.1, 0.05)):
        lq = ref_seq_logprob(log_pf, log_pterm, lengths)
        lref = ref_seq_logprob(ref_pf, ref_pt, lengths)
        reward = r_final - kl_coef * (lq - lref) - ent * lq
        adv = ref_group_adv(reward, gid, "loo", False)
        kw = dict(kl_coef=kl_coef, entropy_coef=ent, ref_log_pf=ref_pf, ref_log_pterm=ref_pt)
        f = lambda a, b: obj.reinforce_loss(a, b, lengths, r_final, gid, 2, **kw)  # noqa: E731
        (loss, aux), (ga, gb) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(log_pf, log_pterm)
        np.testing.assert_allclose(float(loss), -np.mean(adv * lq), rtol=1e-5)
        np.testing.assert_allclose(float(aux["kl_mean"]), np.mean(lq - lref), rtol=1e-5)
        act = np.arange(T)[None] < lengths[:, None]
        np.testing.assert_allclose(np.asarray(ga), np.where(act, -adv[:, None] / B, 0.0), rtol=1e-4, atol=1e-7)
        term = np.arange(T + 1)[None] == lengths[:, None]
        np.testing.assert_allclose(np.asarray(gb), np.where(term, -adv[:, None] / B, 0.0), rtol=1e-4, atol=1e-7)


def test_ppo_reduces_to_minus_mean_advantage_and_clips():
    rng = np.random.default_rng(3)
    shape = (4, 5)
    mask = rng.random(shape) > 0.3
    logp = np.where(mask, rng.normal(-1.0, 0.5, shape), np.nan)
    adv = rng.normal(size=shape)
    loss, aux = obj.ppo_loss(logp, logp, None, adv, mask)
    np.testing.assert_allclose(float(loss), -adv[mask].mean(), rtol=1e-5)
    assert float(aux["clip_frac"]) == 0.0
    # per-sequence advantages broadcast over tokens
    adv_b = rng.normal(size=4)
    loss_b, _ = obj.ppo_loss(logp, logp, None, adv_b, mask)
    np.testing.assert_allclose(float(loss_b), -np.broadcast_to(adv_b[:, None], shape)[mask].mean(), rtol=1e-5)

    # gradient: inside the trust region d/dnew = -A·ratio/N; outside on the clipped side: 0
    eps = 0.2
    shift = np.array([[0.5, -0.5, 0.05, -0.05, 0.5]] * 4)  # log ratio
    a = np.array([[1.0, -1.0, 1.0, -1.0, -1.0]] * 4)
    full = np.ones(shape, bool)
    old = np.zeros(shape)
    g = np.asarray(jax.grad(lambda x: obj.ppo_loss(x, old, None, a, full, eps)[0])(jnp.asarray(shift, jnp.float32)))
    ratio = np.exp(shift)
    n = full.sum()
    np.testing.assert_allclose(g[:, 0], 0.0)  # A>0, ratio>1+ε: clipped, no grad
    np.testing.assert_allclose(g[:, 1], 0.0)  # A<0, ratio<1-ε: clipped, no grad
    np.testing.assert_allclose(g[:, 2], -a[:, 2] * ratio[:, 2] / n, rtol=1e-5)
    np.testing.assert_allclose(g[:, 3], -a[:, 3] * ratio[:, 3] / n, rtol=1e-5)
    np.testing.assert_allclose(g[:, 4], -a[:, 4] * ratio[:, 4] / n, rtol=1e-5)  # A<0, ratio>1+ε: unclipped
    # value vs a numpy reference of the clipped surrogate
    surr = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    np.testing.assert_allclose(float(obj.ppo_loss(shift, old, None, a, full, eps)[0]), -surr.mean(), rtol=1e-5)


@pytest.mark.parametrize("est", ["k3", "k1"])
def test_ppo_kl_penalty(est):
    rng = np.random.default_rng(4)
    shape = (3, 6)
    mask = rng.random(shape) > 0.25
    new = np.where(mask, rng.normal(-1.0, 0.5, shape), -np.inf)
    ref = np.where(mask, rng.normal(-1.0, 0.5, shape), np.nan)
    adv = np.zeros(shape)
    coef = 0.3
    d = (ref - new)[mask]
    kl = np.exp(d) - d - 1 if est == "k3" else -d
    loss, aux = jax.jit(obj.ppo_loss, static_argnames=("kl_estimator",))(
        new, new, ref, adv, mask, 0.2, coef, kl_estimator=est
    )
    np.testing.assert_allclose(float(loss), coef * kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl_ref"]), kl.mean(), rtol=1e-5)
    g = np.asarray(jax.grad(lambda x: obj.ppo_loss(x, new, ref, adv, mask, 0.2, coef, est)[0])(new))
    dg = -np.exp(d) + 1 if est == "k3" else np.ones_like(d)
    np.testing.assert_allclose(g[mask], coef * dg / mask.sum(), rtol=1e-4, atol=1e-7)
    assert np.all(g[~mask] == 0)


# ----------------------------------------------------------------------------- log Z heads


def test_log_z_heads():
    p = obj.init_log_z("scalar", init_value=1.5)
    assert float(obj.apply_log_z(p)) == 1.5
    np.testing.assert_array_equal(np.asarray(obj.apply_log_z(p, jnp.zeros((3, 8)))), [1.5] * 3)

    head = obj.LogZ("mlp", d_model=8, hidden=16, init_value=-2.0)
    params = head.init(jax.random.PRNGKey(0))
    h = np.random.default_rng(5).normal(size=(3, 8)) * 4.0
    np.testing.assert_allclose(np.asarray(head.apply(params, h)), [-2.0] * 3)
    params = dict(params, w2=jax.random.normal(jax.random.PRNGKey(1), (16,)))
    got = np.asarray(jax.jit(obj.apply_log_z)(params, h))
    # numpy reference: RMS norm -> dense -> tanh-GELU -> dense
    x = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + 1e-6)
    x = x @ np.asarray(params["w1"]) + np.asarray(params["b1"])
    x = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(got, x @ np.asarray(params["w2"]) + float(params["b2"]), rtol=1e-4, atol=1e-5)
    # gradient reaches every leaf through TB
    log_pf, log_pterm, log_r, _, lengths = make_batch(8, b=3, drop=0.0)
    g = jax.jit(jax.grad(lambda p: obj.tb_loss(log_pf, log_pterm, log_r, lengths, obj.apply_log_z(p, h))[0]))(params)
    assert all(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree_util.tree_leaves(g))
    with pytest.raises(ValueError, match="kind"):
        obj.init_log_z("bogus", 8, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prompt_hidden"):
        obj.apply_log_z(params, np.zeros((3, 4)))


def test_bad_shapes_raise_clear_errors():
    log_pf, log_pterm, log_r, mask, lengths = make_batch(0)
    with pytest.raises(ValueError, match="log_pterm"):
        obj.subtb_loss(log_pf, log_pterm[:, :-1], log_r, mask)
    with pytest.raises(ValueError, match="state_mask"):
        obj.subtb_loss(log_pf, log_pterm, log_r, mask[:, :-1])
    with pytest.raises(ValueError, match="lamb"):
        obj.subtb_loss(log_pf, log_pterm, log_r, mask, -0.5)
    with pytest.raises(ValueError, match="log_z"):
        obj.tb_loss(log_pf, log_pterm, log_r, lengths, np.zeros(B + 1))
    with pytest.raises(ValueError, match="lengths"):
        obj.sft_loss(log_pf, log_pterm, lengths.astype(np.float32))
    with pytest.raises(ValueError, match="baseline"):
        obj.group_advantages(np.zeros(3), np.zeros(3, int), 1, "median")
    with pytest.raises(ValueError, match="logp_ref"):
        obj.ppo_loss(log_pf, log_pf, None, np.zeros(B), np.ones_like(log_pf, bool), kl_coef=0.1)
