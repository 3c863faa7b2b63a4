"""Shared-prompt scoring: each group's prompt runs once and its K samples attend to its
keys/values. Scores, LoRA gradients, the reward prefixes, the packed suffix scorer and a
train step equal the row-by-row path (float32, left-padded prompts, K > 1), on one device
and sharded over 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import scoring
from gfn_jax.batch import TrainBatch, concat_batches
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models import transformer as tr
from gfn_jax.models.registry import tiny_config
from gfn_jax.models.transformer import activation_sharding
from gfn_jax.parallel import MeshConfig, make_mesh
from gfn_jax.scoring import (prompt_groups, score_policy, score_reward_prefixes,
                             score_suffix_prefixes)

V = 40
TERM = (7, 9)
G, K, P, T, S = 2, 3, 6, 5, 4
PROMPTS = [[3, 1, 4, 1], [2, 6]]  # left-padded to P, different lengths per group
TOL = dict(atol=1e-5, rtol=1e-5)


def _cfg(family="llama", **kw):
    return tiny_config(family, vocab_size=V, d_model=32, n_heads=4, d_ff=64, max_seq_len=64,
                       **({"n_kv_heads": 2} if family == "llama" else {}), **kw)


def _batch(seed=0):
    """G prompts x K samples (prompt-major): lengths 0..T, pad ids that are not 0."""
    rng = np.random.default_rng(seed)
    B = G * K
    pt = np.full((G, P), 5, np.int32)
    pm = np.zeros((G, P), np.int32)
    for g, p in enumerate(PROMPTS):
        pt[g, P - len(p):], pm[g, P - len(p):] = p, 1
    pt, pm = np.repeat(pt, K, 0), np.repeat(pm, K, 0)
    lengths = np.array([0, 2, T, 1, 3, T], np.int32)
    z = rng.integers(0, V, (B, T)).astype(np.int32)
    z = np.where(np.isin(z, TERM), 0, z)
    z = np.where(np.arange(T)[None] < lengths[:, None], z, 11)
    y = rng.integers(0, V, (B, S)).astype(np.int32)  # a different suffix per row
    ym = np.arange(S)[None] < np.array([4, 1, 2, 3, 4, 2])[:, None]
    return pt, pm, z, lengths, y, ym


def _params(cfg, seed=1):
    return tr.init_params(cfg, jax.random.PRNGKey(seed), std=0.1)


def _lora(cfg, params, seed=2, rank=4):
    lcfg = lora_lib.LoraConfig(rank=rank, alpha=8.0, targets=(
        r"layers/attn/(q|k|v|o)/kernel", r"layers/mlp/(up|down)/kernel"))
    ad = lora_lib.init_lora(cfg, params, lcfg, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))

    def nonzero(path, x):  # b = 0 at init: make the adapters matter
        name = jax.tree_util.keystr(path)
        return 0.2 * jax.random.normal(next(keys), x.shape) if name.endswith("['b']") else x

    return jax.tree_util.tree_map_with_path(nonzero, ad["tree"]), float(ad["scale"])


def _adapters(tree, scale):
    return lora_lib.Adapters(tree=tree, scale=jnp.float32(scale))


@pytest.fixture
def prompt_calls(monkeypatch):
    """The shapes of the prompt batches :func:`prompt_forward` is traced with (jit caches
    cleared first, so every scorer is traced again)."""
    calls = []
    real = scoring.prompt_forward
    monkeypatch.setattr(scoring, "prompt_forward",
                        lambda *a, **k: calls.append(tuple(a[3].shape)) or real(*a, **k))
    jax.clear_caches()
    yield calls
    jax.clear_caches()


def _close(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


def _close_grads(a, b, tol=1e-5):
    """max |a - b| <= tol x the largest |b| (at least 1): float32 sums over K rows in
    another order differ by rounding relative to the gradient's scale."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    scale = max(1.0, max(float(np.max(np.abs(np.asarray(y)))) for y in lb))
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))
    assert diff <= tol * scale, (diff, scale)


# ---------------------------------------------------------------------------
# The model functions
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_prompt_then_continuation_equals_full_forward(family):
    cfg = _cfg(family)
    params = _params(cfg)
    pt, pm, z, lengths, _, _ = _batch()
    zm = np.arange(T)[None] < lengths[:, None]
    am = np.concatenate([pm, zm], 1)
    _, _, full = tr.apply(cfg, params, np.concatenate([pt, z], 1), tr.positions_from_mask(am),
                          tr.causal_mask(am), None, return_hidden=True, compute_logits=False)
    prompt = tr.prompt_forward(cfg, params, pt[::K], pm[::K])
    assert prompt.k.shape == (cfg.n_layers, G, P, cfg.n_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(prompt.next_pos, [len(p) for p in PROMPTS])
    cont = tr.continuation_forward(cfg, params, prompt, z, tr.positions_from_mask(am)[:, P:],
                                   tr.continuation_mask(pm, zm))
    np.testing.assert_allclose(np.asarray(cont)[zm], np.asarray(full)[:, P:][zm], **TOL)
    np.testing.assert_allclose(np.repeat(prompt.last_hidden, K, 0), np.asarray(full)[:, P - 1],
                               **TOL)
    with pytest.raises(ValueError, match="do not split into groups"):
        tr.continuation_forward(cfg, params, prompt, z[:5], tr.positions_from_mask(am)[:5, P:],
                                tr.continuation_mask(pm[:5], zm[:5]))


# ---------------------------------------------------------------------------
# The scorers: shared == row by row
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("family,variant", [("llama", "plain"), ("llama", "chunked+remat"),
                                            ("gpt2", "plain")])
def test_policy_scores_and_lora_grads_equal(family, variant):
    extra = {"logits_chunk": 2, "remat_policy": "full"} if variant != "plain" else {}
    cfg = _cfg(family, **extra)
    params = _params(cfg)
    tree, scale = _lora(cfg, params)
    pt, pm, z, lengths, _, _ = _batch()
    spec = PolicySpec(TERM, max_len=T, min_len=1)
    bias = np.zeros(V, np.float32)
    bias[3], bias[2] = -1.0, 1.5
    action = np.ones_like(z, bool)
    action[1, 1] = False  # a tool-spliced token

    def scores(tree, k):
        return score_policy(cfg, params, pt, pm, z, lengths, spec, logit_bias=bias,
                            adapters=_adapters(tree, scale), action_mask=action, group_size=k)

    one, shared = scores(tree, 1), scores(tree, K)
    _close(shared, one)
    assert np.all(np.isfinite(np.asarray(shared.log_pf)))

    w = np.random.default_rng(3).normal(size=(G * K, T + 1)).astype(np.float32)

    def loss(tree, k):  # a weighted sum touching every score and the prompt hidden state
        s = scores(tree, k)
        lpt = jnp.where(s.log_pterm > -1e20, s.log_pterm, 0.0)
        return (jnp.sum(w[:, :T] * s.log_pf) + jnp.sum(w * lpt)
                + jnp.sum(jnp.sin(s.prompt_hidden)))

    g1 = jax.jit(jax.grad(lambda t: loss(t, 1)))(tree)
    gk = jax.jit(jax.grad(lambda t: loss(t, K)))(tree)
    _close_grads(gk, g1)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g1)) > 1e-2
    # full fine-tuning: gradients w.r.t. every base parameter (prompt part included)
    gp1 = jax.grad(lambda p: jnp.sum(w[:, :T] * score_policy(
        cfg, p, pt, pm, z, lengths, spec, group_size=1).log_pf))(params)
    gpk = jax.grad(lambda p: jnp.sum(w[:, :T] * score_policy(
        cfg, p, pt, pm, z, lengths, spec, group_size=K).log_pf))(params)
    _close_grads(gpk, gp1)


def test_lora_dropout_runs_on_the_shared_path():
    """With adapter dropout the rows of a group share the prompt's masks (another draw than
    row by row): finite, deterministic given the key, and the gradient flows."""
    cfg = _cfg()
    params = _params(cfg)
    tree, scale = _lora(cfg, params)
    pt, pm, z, lengths, _, _ = _batch()
    spec = PolicySpec(TERM, max_len=T)

    def f(tree, key):
        ad = lora_lib.with_dropout(_adapters(tree, scale), 0.5, key)
        return jnp.sum(score_policy(cfg, params, pt, pm, z, lengths, spec, adapters=ad,
                                    group_size=K).log_pf)

    v1, g1 = jax.value_and_grad(f)(tree, jax.random.PRNGKey(7))
    v2, _ = jax.value_and_grad(f)(tree, jax.random.PRNGKey(7))
    v3, _ = jax.value_and_grad(f)(tree, jax.random.PRNGKey(8))
    assert np.isfinite(float(v1)) and float(v1) == float(v2) and float(v1) != float(v3)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g1))


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_reward_prefixes_and_suffix_scores_equal(family):
    cfg = _cfg(family, logits_chunk=3)
    params = _params(cfg)
    pt, pm, z, lengths, y, ym = _batch()
    bias = np.zeros(V, np.float32)
    bias[5] = -2.0
    r1 = score_reward_prefixes(cfg, params, pt, pm, z, lengths, TERM, logit_bias=bias,
                               group_size=1)
    rk = score_reward_prefixes(cfg, params, pt, pm, z, lengths, TERM, logit_bias=bias,
                               group_size=K)
    _close(rk, r1)
    s1 = score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym, group_size=1)
    sk = score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym, group_size=K)
    _close(sk, s1)
    assert np.all(np.isfinite(np.asarray(sk))) and np.abs(np.asarray(s1)).max() > 1.0
    # with adapters (a reward computed by a policy-like model) and an unchunked vocabulary
    cfg = cfg.replace(logits_chunk=-1)
    tree, scale = _lora(cfg, params)
    ad = _adapters(tree, scale)
    _close(score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym, adapters=ad,
                                 group_size=K),
           score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym, adapters=ad))


def test_reward_context_differs_from_policy_prompt():
    """A task may score under another context (reward_prompt_tokens, e.g. few-shot + X):
    the grouping holds for it too, and both prompts are shared in one traced function."""
    cfg = _cfg()
    params = _params(cfg)
    pt, pm, z, lengths, y, ym = _batch()
    ctx = np.concatenate([np.repeat([[8, 9, 10, 12, 13]], G * K, 0), pt], 1).astype(np.int32)
    cm = np.concatenate([np.ones((G * K, 5), np.int32), pm], 1)
    spec = PolicySpec(TERM, max_len=T)

    def both(params):
        q = score_policy(cfg, params, pt, pm, z, lengths, spec)
        r = score_reward_prefixes(cfg, params, ctx, cm, z, lengths, TERM)
        s = score_suffix_prefixes(cfg, params, ctx, cm, z, lengths, y, ym)
        return q, r, s

    want = jax.jit(lambda p: both(p))(params)
    with prompt_groups(K):  # a new function object: traced again, under the context
        got = jax.jit(lambda p: both(p))(params)
    _close(got, want)


def test_context_switch_and_fallbacks(prompt_calls):
    calls = prompt_calls
    cfg = _cfg()
    params = _params(cfg)
    pt, pm, z, lengths, _, _ = _batch()
    spec = PolicySpec(TERM, max_len=T)

    def run(c, **kw):
        calls.clear()
        out = score_policy(c, params, pt, pm, z, lengths, spec, **kw)
        return out, list(calls)

    base, n = run(cfg)
    assert n == []  # no context: row by row
    with prompt_groups(K):
        out, n = run(cfg)
        assert n == [(G, P)]
        _close(out, base)
        _, n = run(cfg.replace(share_prompt=False))
        assert n == []  # model.share_prompt=False: the context is ignored
        _, n = run(cfg, group_size=1)
        assert n == []  # an explicit group size wins
    with prompt_groups(4):  # 6 rows are not groups of 4: row by row
        _, n = run(cfg)
        assert n == []
    with pytest.raises(ValueError, match="group_size=4 must be >= 1 and divide"):
        score_policy(cfg, params, pt, pm, z, lengths, spec, group_size=4)
    bad = pt.copy()
    bad[1, -1] = 30  # row 1 is in prompt 0's group but has another prompt
    with pytest.raises(ValueError, match="do not all have the same prompt"):
        score_policy(cfg, params, bad, pm, z, lengths, spec, group_size=K)
    # inside a trace the grouping cannot be checked on the host: the scores become NaN
    with prompt_groups(K):
        out = jax.jit(lambda t: score_policy(cfg, params, t, pm, z, lengths, spec).log_pf)(bad)
        assert np.all(np.isnan(np.asarray(out)))
        pads = pt.copy()
        pads[1, 0] = 17  # a pad id (mask 0) may differ within a group
        out = jax.jit(lambda t: score_policy(cfg, params, t, pm, z, lengths, spec).log_pf)(pads)
        _close(out, base.log_pf)


def test_sharded_groups_decision():
    devs = jax.devices()
    cfg = _cfg()

    def groups(data, fsdp, tensor, B, k):
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                         devs[:data * fsdp * tensor])
        with activation_sharding(mesh), prompt_groups(k):
            return scoring._num_groups(cfg, B, T, None)

    assert groups(8, 1, 1, 16, 2) == 8  # 8 prompts, one per device
    assert groups(8, 1, 1, 16, 16) == 1  # one prompt on every device: 1 < 2 rows per device
    assert groups(2, 2, 2, 8, 4) == 2  # 2 prompts over `data`, rows over data x fsdp
    assert groups(8, 1, 1, 8, 4) == 0  # 2 unsplit prompts per device > 1 row per device
    with prompt_groups(K):
        assert scoring._num_groups(cfg, G * K, T, None) == G
        assert scoring._num_groups(cfg, G * K, 0, None) == 0


@pytest.mark.parametrize("mesh_shape,k", [((8, 1, 1), 2), ((2, 2, 2), 4), ((1, 8, 1), 16)])
def test_sharded_scores_equal_single_device(mesh_shape, k, prompt_calls):
    cfg = _cfg()
    params = _params(cfg)
    tree, scale = _lora(cfg, params)
    rng = np.random.default_rng(5)
    B = 16
    ng = B // k
    pt = np.repeat(rng.integers(0, V, (ng, P)), k, 0).astype(np.int32)
    pm = np.repeat((np.arange(P)[None] >= rng.integers(0, P - 1, (ng, 1))), k, 0).astype(np.int32)
    lengths = rng.integers(0, T + 1, B).astype(np.int32)
    z = rng.integers(0, 7, (B, T)).astype(np.int32)
    y = rng.integers(0, V, (B, S)).astype(np.int32)
    ym = np.ones((B, S), bool)
    spec = PolicySpec(TERM, max_len=T)

    def f(tree, pt, pm, z, lengths, y, ym):
        def loss(tree):
            q = score_policy(cfg, params, pt, pm, z, lengths, spec, adapters=_adapters(tree, scale))
            return jnp.sum(q.log_pf) + jnp.sum(q.log_pterm * 0.1), q
        (l, q), g = jax.value_and_grad(loss, has_aux=True)(tree)
        r = score_reward_prefixes(cfg, params, pt, pm, z, lengths, TERM)
        s = score_suffix_prefixes(cfg, params, pt, pm, z, lengths, y, ym)
        return l, q, g, r, s

    args = (tree, pt, pm, z, lengths, y, ym)
    want = jax.jit(lambda *a: f(*a))(*args)  # one device, row by row
    assert prompt_calls == []
    data, fsdp, tensor = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices())
    from gfn_jax.parallel import batch_sharding, replicated
    bsh = batch_sharding(mesh, 1)
    with activation_sharding(mesh), prompt_groups(k):
        assert scoring._num_groups(cfg, B, T, None) == ng
        got = jax.jit(lambda *a: f(*a), in_shardings=(replicated(mesh),) + (bsh,) * 6)(*args)
    assert len(prompt_calls) >= 3 and all(c == (ng, P) for c in prompt_calls)
    (l1, q1, g1, r1, s1), (l8, q8, g8, r8, s8) = want, got
    _close((q8, r8, s8), (q1, r1, s1))
    assert float(l8) == pytest.approx(float(l1), abs=1e-5, rel=1e-5)
    _close_grads(g8, g1)


# ---------------------------------------------------------------------------
# Batches and the train step
# ---------------------------------------------------------------------------
def test_batch_group_size_is_static_and_reset_by_take():
    pt, pm, z, lengths, _, _ = _batch()
    b = TrainBatch.build(pt, pm, z, lengths, np.ones_like(z, bool), np.repeat([0, 1], K),
                         group_size=K)
    assert b.group_size == K and jax.tree_util.tree_leaves(b)  # not a leaf
    assert b.map(np.asarray).group_size == K and b.with_extras({"a": lengths}).group_size == K
    assert b.take([0, 1, 2]).group_size == 1
    assert concat_batches([b, b]).group_size == K
    assert concat_batches([b, b.replace(group_size=1)]).group_size == 1
    with pytest.raises(ValueError, match="group_size=4"):
        TrainBatch.build(pt, pm, z, lengths, np.ones_like(z, bool), np.zeros(6), group_size=4)


def test_step_input_is_placed_by_the_step_like_to_device():
    """A host batch passed as numpy leaves to a jitted function with batch in_shardings lands
    sharded exactly as ``to_device`` places it; an indivisible batch names the knobs."""
    from gfn_jax import parallel

    pt, pm, z, lengths, _, _ = _batch()
    b = TrainBatch.build(pt, pm, z, lengths, np.ones_like(z, bool), np.repeat([0, 1], K),
                         group_size=K)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2), jax.devices()[:2])
    host = b.step_input(mesh)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host))
    bsh = parallel.batch_sharding(mesh, 1)
    f = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: a * 1, x), in_shardings=(bsh,))
    got, want = f(host), b.to_device(mesh)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (g.sharding, w.sharding)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    mesh4 = parallel.make_mesh(parallel.MeshConfig(data=4), jax.devices()[:4])
    for fn in (b.step_input, b.to_device):
        with pytest.raises(ValueError, match=r"6 rows is not divisible .* data\*fsdp = 4"):
            fn(mesh4)


def _infill_config(tmp_path, **over):
    import json
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = [{"text": "a dull and lifeless film", "label_text": "subjective"},
            {"text": "the story follows a young man", "label_text": "objective"},
            {"text": "wow", "label_text": "subjective"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    c = runpy.run_path(os.path.join(root, "configs", "infill_subj.py"))["get_config"]()
    c.model.spec = "tiny-llama"
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.train.steps = 2
    c.train.grad_accum = 1
    c.train.ckpt_every = 0
    c.explore.p_replay = 0.0
    c.eval.num_samples = 0
    c.task.update(dict(data_path=str(data), max_len=4))
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _two_steps(config, workdir, devices):
    from gfn_jax.train import Trainer

    tr_ = Trainer(config, workdir, restore=False, devices=devices)
    losses = []
    for step in range(2):
        batch, _ = tr_.make_batch(step)
        assert batch.group_size == config.train.samples_per_prompt
        metrics, log_r = tr_.train_step(batch, 1.0, step)
        assert metrics["finite"] == 1.0
        losses.append((metrics["loss"], np.asarray(log_r)))
    return losses, jax.device_get(tr_.state.trainable)


def test_train_step_shared_equals_unshared_and_shards(tmp_path, prompt_calls):
    """LoRA infilling (policy + reward prefixes + packed suffix scorer): model.share_prompt
    on equals off; on 8 devices (shared prompts split over `data`) equals one device."""
    calls = prompt_calls
    over = {"train.prompts_per_batch": 8, "train.samples_per_prompt": 2, "mesh.data": 1,
            "explore.p_tempered": 0.5}
    off, p_off = _two_steps(_infill_config(tmp_path, **over, **{"model.share_prompt": False}),
                            str(tmp_path / "off"), jax.devices()[:1])
    assert calls == []
    on, p_on = _two_steps(_infill_config(tmp_path, **over), str(tmp_path / "on"),
                          jax.devices()[:1])
    # policy, reward prefixes and suffix scorer, each traced once per step shape
    assert len(calls) >= 3 and all(s[0] == 8 for s in calls)
    for (l0, r0), (l1, r1) in zip(off, on):
        assert l1 == pytest.approx(l0, abs=1e-5, rel=1e-5)
        np.testing.assert_allclose(r1, r0, atol=1e-5, rtol=1e-5)
    _close(p_on, p_off)
    calls.clear()
    sh, p_sh = _two_steps(_infill_config(tmp_path, **{**over, "mesh.data": 8}),
                          str(tmp_path / "sharded"), jax.devices())
    assert len(calls) >= 3
    for (l0, r0), (l1, r1) in zip(off, sh):
        assert l1 == pytest.approx(l0, abs=1e-5, rel=1e-5)
        np.testing.assert_allclose(r1, r0, atol=1e-5, rtol=1e-5)
    _close(p_sh, p_off)


def test_benchmark_script_runs_and_agrees(tmp_path):
    """``benchmarks/bench_shared_prompt.py`` on the tiny preset: both paths agree in float32
    and the figures reach the JSON file."""
    import importlib.util
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_shared_prompt", os.path.join(root, "benchmarks", "bench_shared_prompt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--preset", "tiny", "--setting", "A", "--what", "step", "reward",
                    "--rounds", "1", "--warmup", "0", "--lora-rank", "4", "--memory",
                    "--json", str(tmp_path / "b.json")])
    c = out["settings"]["A"]["check"]
    assert c["loss"] < 1e-5 and c["log_pf"] < 1e-5 and c["grad"] <= 1e-5 * max(1, c["grad_max"])
    assert c["log_r"] < 1e-4  # sums of ~30 log-probs of ~-5.5 each
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["settings"]["A"]["step"]["speedup_median"] > 0
    assert set(saved["settings"]["A"]["reward"]["temp_bytes"]) == {"old", "new"}
