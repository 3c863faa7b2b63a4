"""Replay buffer: top-K retention, dedup, tempered sampling, serialisation, validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from gfn_jax.replay import ReplayBuffer, collate, edit_distance_lower_bounds, edit_distances


def _lev(a, b):
    """Naive O(n*m) Levenshtein reference (pure Python)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def test_edit_distances_match_naive_reference():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.integers(0, 4, size=rng.integers(0, 12))
        others = [rng.integers(0, 4, size=rng.integers(0, 12)) for _ in range(7)]
        got = edit_distances(a, others)
        assert list(got) == [_lev(list(a), list(o)) for o in others]
        lb = edit_distance_lower_bounds(a, others)
        assert np.all(lb <= got) and np.all(lb >= np.abs(len(a) - np.array([len(o) for o in others])))
    assert edit_distance_lower_bounds(np.array([1, 1, 2]), [np.array([2, 1, 1]), np.array([3, 3])]).tolist() == [0, 3]
    # size the brief asks for: K=100 rows of length 128 stays fast
    a = rng.integers(0, 50, size=128)
    others = [rng.integers(0, 50, size=128) for _ in range(100)]
    d = edit_distances(a, others)
    assert d[:3].tolist() == [_lev(list(a), list(o)) for o in others[:3]]


def test_top_k_matches_brute_force():
    rng = np.random.default_rng(1)
    K = 5
    buf = ReplayBuffer(K, seed=0)
    pool = [rng.integers(0, 3, size=rng.integers(1, 4)) for _ in range(60)]
    value = {}  # deterministic log R per distinct sequence (distinct values: no ties)
    seen = {}
    for i in range(300):
        key = "ab"[i % 2]
        seq = pool[rng.integers(len(pool))]
        t = tuple(int(x) for x in seq)
        lr = value.setdefault(t, float(rng.normal()) + 1e-9 * len(value))
        buf.add(key, seq, lr)
        seen.setdefault(key, {})[t] = lr
    for key in "ab":
        ref = sorted(seen[key].items(), key=lambda kv: -kv[1])[:K]
        got = [(tuple(e.tokens.tolist()), e.log_r) for e in buf.entries(key)]
        assert got == ref
        assert buf.size(key) == K
    assert len(buf) == 2 * K and buf.keys() == ["a", "b"]
    st = buf.stats("a")
    ref_a = [v for _, v in sorted(seen["a"].items(), key=lambda kv: -kv[1])[:K]]
    assert st["count"] == K and st["best_log_r"] == max(ref_a)
    assert st["mean_log_r"] == pytest.approx(np.mean(ref_a))
    assert buf.stats()["count"] == 2 * K and buf.stats()["num_keys"] == 2
    assert np.isnan(buf.stats("zzz")["best_log_r"]) and buf.size("zzz") == 0


def test_exact_and_near_duplicate_rules():
    buf = ReplayBuffer(10)
    assert buf.add("p", [1, 2, 3], -1.0)
    assert not buf.add("p", np.array([1, 2, 3], np.int64), -1.0)  # exact duplicate
    assert not buf.add("p", [1, 2, 3], -2.0)
    assert buf.add("p", [1, 2, 3], -0.5)  # same tokens, higher log R: replaces
    assert buf.size("p") == 1 and buf.entries("p")[0].log_r == -0.5
    assert buf.add("p", [1, 2, 4], -3.0)  # dedup_fraction=0: near-duplicates are fine
    assert buf.add("q", [1, 2, 3], -9.0)  # keys are independent


def test_near_duplicate_rules_exact():
    nb = ReplayBuffer(10, dedup_fraction=0.3)
    base = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # threshold 0.3 * 10 = 3
    far = [1, 2, 3, 4, 5, 6, 0, 0, 0, 10]  # distance 3 from base: not a near-duplicate
    assert nb.add("p", base, 0.0)
    assert not nb.add("p", [1, 2, 3, 4, 5, 6, 7, 0, 0, 10], -1.0)  # distance 2 < 3, worse
    assert not nb.add("p", [1, 2, 3, 4, 5, 6, 7, 0, 0, 10], 0.0)  # tie: keep the stored one
    assert nb.add("p", far, -1.0)
    assert not nb.add("p", base[:-1], -0.1)  # deletion (distance 1), worse than base
    # better than both neighbours (base at distance 1, far at distance 3 -> only base is near)
    better = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert nb.add("p", better, 1.0)
    got = {tuple(e.tokens.tolist()): e.log_r for e in nb.entries("p")}
    assert got == {tuple(better): 1.0, tuple(far): -1.0}
    # a newcomer that beats two stored near-duplicates replaces both
    mid = [1, 2, 3, 4, 5, 6, 0, 0, 9, 11]  # distance 2 from better, 2 from far
    assert nb.add("p", mid, 2.0)
    assert [tuple(e.tokens.tolist()) for e in nb.entries("p")] == [tuple(mid)]
    # the threshold uses the longer of the two lengths: 0.25 * max(10, 8) = 2.5 > 2, while
    # 0.25 * min(10, 8) = 2 would not make them near-duplicates
    long = list(range(1, 11))
    short = ReplayBuffer(10, dedup_fraction=0.25)
    assert short.add("p", long, 0.0)
    assert not short.add("p", long[:8], -1.0)
    assert short.add("p", long[:7], -1.0)  # distance 3 >= 2.5: kept
    assert short.size("p") == 2


def test_near_duplicates_against_brute_force():
    """Every stored pair is far apart and the set equals a brute-force greedy reference."""
    rng = np.random.default_rng(3)
    frac, K = 0.4, 6
    buf = ReplayBuffer(K, dedup_fraction=frac)
    ref = []  # list of (tuple, log_r), sorted descending
    for i in range(200):
        seq = rng.integers(0, 3, size=rng.integers(2, 7))
        lr = float(rng.normal()) + 1e-9 * i
        buf.add("p", seq, lr)
        t = tuple(int(x) for x in seq)
        near = [r for r in ref if r[0] == t or _lev(r[0], t) < frac * max(len(r[0]), len(t))]
        if near and max(r[1] for r in near) >= lr:
            continue
        ref = [r for r in ref if r not in near] + [(t, lr)]
        ref = sorted(ref, key=lambda r: -r[1])[:K]
    got = [(tuple(e.tokens.tolist()), e.log_r) for e in buf.entries("p")]
    assert got == ref
    for i, (a, _) in enumerate(got):
        for b, _ in got[i + 1 :]:
            assert _lev(a, b) >= frac * max(len(a), len(b))


def test_tempered_sampling_frequencies_chi_square():
    buf = ReplayBuffer(8, seed=123)
    log_rs = np.array([0.0, -0.5, -1.0, -2.0, 0.7])
    for i, lr in enumerate(log_rs):
        buf.add("p", [i, i + 1], lr)
    order = [int(e.tokens[0]) for e in buf.entries("p")]  # entries are best-first
    n = 20000
    for T in (1.0, 0.5, 3.0):
        idx = buf.sample_indices("p", n, temperature=T)
        counts = np.bincount([order[i] for i in idx], minlength=5)
        p = np.exp(log_rs / T) / np.exp(log_rs / T).sum()
        assert sps.chisquare(counts, n * p).pvalue > 1e-3, T
        # the test can fail: the same counts are far from a wrong temperature
        q = np.exp(log_rs / (2 * T)) / np.exp(log_rs / (2 * T)).sum()
        assert sps.chisquare(counts, n * q).pvalue < 1e-6
    counts = np.bincount([order[i] for i in buf.sample_indices("p", n)], minlength=5)
    assert sps.chisquare(counts, np.full(5, n / 5)).pvalue > 1e-3
    # sample() returns the entries the indices point at
    ents = buf.sample("p", 3, temperature=1.0)
    assert all(e.log_r in set(log_rs.tolist()) for e in ents)


def test_sampling_without_replacement_and_errors():
    buf = ReplayBuffer(8, seed=0)
    for i in range(4):
        buf.add("p", [i], float(-10 * i))  # extreme weights (exp underflow at small T)
    for T in (None, 1.0, 1e-3):
        idx = buf.sample_indices("p", 4, temperature=T, replace=False)
        assert sorted(idx.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"without replacement.*only 4"):
        buf.sample("p", 5, replace=False)
    with pytest.raises(KeyError, match=r"no trajectories for prompt 'nope'"):
        buf.sample("nope", 1)
    with pytest.raises(ValueError, match=r"temperature"):
        buf.sample("p", 1, temperature=0.0)
    # seeded and deterministic
    a, b = ReplayBuffer(8, seed=5), ReplayBuffer(8, seed=5)
    for x in (a, b):
        x.seed("p", [[1], [2], [3]], [0.0, -1.0, -2.0])
    assert a.sample_indices("p", 50, 1.0).tolist() == b.sample_indices("p", 50, 1.0).tolist()


def test_save_load_round_trip_continues_sampling(tmp_path):
    buf = ReplayBuffer(4, dedup_fraction=0.2, seed=11)
    rng = np.random.default_rng(0)
    for i in range(30):
        n = int(rng.integers(0, 6))
        buf.add(
            f"k{i % 3}",
            rng.integers(0, 9, size=n),
            float(rng.normal()),
            arrays={"action_mask": rng.random(n) < 0.5, "prefix_log_r": rng.normal(size=n + 1).astype(np.float32)},
            extras={"step": i, "src": "onpolicy"},
        )
    buf.add("seeded", [5, 5, 5], 3.0)  # a row without per-step arrays
    buf.sample_indices("k0", 7, 1.0)  # advance the generator before saving
    path = str(tmp_path / "replay.npz")
    buf.save(path)
    for other in (ReplayBuffer.load(path), ReplayBuffer.from_state_dict(buf.state_dict())):
        assert other.keys() == buf.keys() and len(other) == len(buf)
        assert other.capacity == 4 and other.dedup_fraction == 0.2
        for k in buf.keys():
            for e, f in zip(buf.entries(k), other.entries(k)):
                assert e.tokens.dtype == f.tokens.dtype == np.int32
                np.testing.assert_array_equal(e.tokens, f.tokens)
                assert e.log_r == f.log_r and e.extras == f.extras
                assert set(e.arrays) == set(f.arrays)
                for name in e.arrays:
                    assert e.arrays[name].dtype == f.arrays[name].dtype
                    np.testing.assert_array_equal(e.arrays[name], f.arrays[name])
    other = ReplayBuffer.load(path)
    for k, T in (("k1", 0.7), ("k0", None), ("k2", 2.0)):
        assert buf.sample_indices(k, 25, T).tolist() == other.sample_indices(k, 25, T).tolist()
    # and later insertions keep agreeing (array specs restored)
    assert buf.add("k0", [1, 2], 9.0, arrays={"action_mask": [True, False]}) == other.add(
        "k0", [1, 2], 9.0, arrays={"action_mask": [True, False]}
    )
    with pytest.raises(ValueError, match=r"action_mask"):
        other.add("k0", [1, 2, 3], 9.0, arrays={"action_mask": np.zeros(3, np.int64)})


def test_malformed_rows_raise_clear_errors():
    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match=r"log_r must be finite"):
        buf.add("p", [1, 2], float("nan"))
    with pytest.raises(ValueError, match=r"log_r must be finite"):
        buf.add("p", [1, 2], float("inf"))
    with pytest.raises(TypeError, match=r"log_r must be a real scalar"):
        buf.add("p", [1, 2], np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"integer dtype"):
        buf.add("p", np.array([1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match=r"1-D"):
        buf.add("p", np.zeros((2, 2), np.int32), 0.0)
    with pytest.raises(ValueError, match=r"token ids must lie"):
        buf.add("p", [-1, 2], 0.0)
    with pytest.raises(ValueError, match=r"'action_mask'.*first axis"):
        buf.add("p", [1, 2], 0.0, arrays={"action_mask": [True, False, True, True]})
    with pytest.raises(TypeError, match=r"JSON"):
        buf.add("p", [1, 2], 0.0, extras={"x": object()})
    with pytest.raises(TypeError, match=r"prompt_key must be a str"):
        buf.add(3, [1, 2], 0.0)
    with pytest.raises(ValueError, match=r"2 sequences, 2 prompt keys and 1 log_rs"):
        buf.add_batch("p", [[1], [2]], [0.0])
    with pytest.raises(ValueError, match=r"capacity"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match=r"dedup_fraction"):
        ReplayBuffer(3, dedup_fraction=1.5)
    assert len(buf) == 0  # nothing half-inserted


def test_add_batch_padded_and_collate():
    buf = ReplayBuffer(4)
    seqs = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]], np.int32)
    plr = np.arange(15, dtype=np.float32).reshape(3, 5)
    am = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
    stored = buf.add_batch(["a", "a", "b"], seqs, [0.0, 1.0, 2.0], arrays={"prefix_log_r": plr, "action_mask": am}, lengths=[3, 2, 1])
    assert stored.tolist() == [True, True, True]
    e = buf.entries("a")
    assert e[0].tokens.tolist() == [4, 5] and e[0].arrays["prefix_log_r"].tolist() == [5, 6, 7]
    assert e[1].tokens.tolist() == [1, 2, 3] and e[1].arrays["action_mask"].tolist() == [True, False, True]
    batch = collate(e, width=4, pad_id=9)
    assert batch["tokens"].tolist() == [[4, 5, 9, 9], [1, 2, 3, 9]]
    assert batch["lengths"].tolist() == [2, 3] and batch["log_r"].tolist() == [1.0, 0.0]
    assert batch["prefix_log_r"].shape == (2, 5)
    assert batch["prefix_log_r"][1].tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match=r"shorter than the longest"):
        collate(e, width=2)
