"""Memory planning: chunked vocabulary log-softmax (values, gradients, compiled temporaries),
remat policies, activation sharding constraints, and the ahead-of-time step estimate."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax import memory, parallel
from gfn_jax.logprobs import PolicySpec, chunked_position_logprobs, logits_chunk_size
from gfn_jax.models import ModelConfig, forward, init_params
from gfn_jax.models import lora as lora_lib
from gfn_jax.models.transformer import activation_sharding, unembed
from gfn_jax.scoring import score_policy, score_reward_prefixes, score_suffix_prefixes

V = 97
CFG = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=64, max_seq_len=64, tie_embeddings=False, logits_chunk=-1)
TERM = (96, 95)
B, P, T, S = 3, 5, 7, 4


def _batch(seed=0):
    r = np.random.default_rng(seed)
    pt = r.integers(0, V, (B, P)).astype(np.int32)
    pm = np.ones((B, P), np.int32)
    pm[0, :2] = 0  # left padding
    z = r.integers(0, 95, (B, T)).astype(np.int32)
    n = np.array([T, 3, 0], np.int32)
    sfx = r.integers(0, V, (B, S)).astype(np.int32)
    sm = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    return pt, pm, z, n, sfx, sm


def _params(cfg=CFG, seed=0):
    return init_params(cfg, jax.random.PRNGKey(seed), std=0.2)


def _all_scores(cfg, params, adapters, bias, batch, w):
    """Policy, reward and suffix scores and the gradient of a random linear combination of
    all of them w.r.t. the base parameters and the LoRA adapters."""
    pt, pm, z, n, sfx, sm = batch
    spec = PolicySpec(term_ids=TERM, max_len=T, min_len=1)

    def outs(p, a):
        pol = score_policy(cfg, p, pt, pm, z, n, spec, logit_bias=bias, adapters=a)
        rew = score_reward_prefixes(cfg, p, pt, pm, z, n, TERM[:1], logit_bias=bias, adapters=a)
        suf = score_suffix_prefixes(cfg, p, pt, pm, z, n, sfx, sm, adapters=a)
        # prefix 0 cannot terminate (min_len 1): log q(⊤) = NEG_INF there, no gradient
        pterm = jnp.where(jnp.arange(T + 1) >= 1, pol.log_pterm, 0.0)
        return pol.log_pf, pterm, rew.log_pz, rew.log_pterm, suf

    def scalar(p, a):
        return sum(jnp.sum(wi * o) for wi, o in zip(w, outs(p, a)))

    return _run_fast(lambda p, a: (outs(p, a), jax.grad(scalar, argnums=(0, 1))(p, a)),
                     params, adapters)


def _run_fast(f, *args):
    """jit + run with LLVM optimisation off (the CPU compile dominates these tests)."""
    return jax.jit(f).lower(*args).compile(memory.FAST_CPU_COMPILE)(*args)


def test_chunked_scoring_equals_unchunked_values_and_gradients():
    batch = _batch()
    params = _params()
    lcfg = lora_lib.LoraConfig(rank=4, targets=(r"layers/attn/(q|v)/kernel", "lm_head/kernel"))
    adapters = lora_lib.init_lora(CFG, params, lcfg, jax.random.PRNGKey(1))
    # b != 0 so the adapters change the scores (head adapter included)
    adapters["tree"] = jax.tree_util.tree_map(lambda x: x + 0.1, adapters["tree"])
    bias = jnp.asarray(np.random.default_rng(2).normal(size=V), jnp.float32)
    r = np.random.default_rng(3)
    shapes = [(B, T), (B, T + 1), (B, T + 1), (B, T + 1), (B, T + 1)]
    w = [jnp.asarray(r.normal(size=s), jnp.float32) for s in shapes]

    ref_out, ref_grad = _all_scores(CFG, params, adapters, bias, batch, w)
    # 3 does not divide T+1 = 8 nor (T+1)*S = 32: padded last chunk
    chunk_out, chunk_grad = _all_scores(CFG.replace(logits_chunk=3), params, adapters, bias,
                                        batch, w)
    for a, b in zip(ref_out, chunk_out):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    leaves_ref = jax.tree_util.tree_leaves_with_path(ref_grad)
    leaves_chunk = jax.tree_util.tree_leaves(chunk_grad)
    assert len(leaves_ref) == len(leaves_chunk)
    for (path, a), b in zip(leaves_ref, leaves_chunk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # the head and its adapter receive gradient (the chunked path reaches them)
    g_params, g_ad = chunk_grad
    assert float(jnp.abs(g_params["lm_head"]["kernel"]).max()) > 1e-3
    assert float(jnp.abs(g_ad["tree"]["lm_head"]["kernel"]["b"]).max()) > 1e-3

    # independent reference for the chunked policy: full logits of the adapted model
    pt, pm, z, n, _, _ = batch
    merged = lora_lib.merge_lora(params, adapters)
    seq = np.concatenate([pt, np.where(np.arange(T)[None] < n[:, None], z, 0)], 1)
    am = np.concatenate([pm, (np.arange(T)[None] < n[:, None]).astype(np.int32)], 1)
    logits = np.asarray(forward(CFG, merged, seq, am), np.float64)[:, P - 1:] + np.asarray(bias)
    logits[:, :1, list(TERM)] = -np.inf  # prefix 0 < min_len: ⊤ disallowed
    logits[:, T, :] = np.where(np.isin(np.arange(V), TERM), logits[:, T, :], -np.inf)
    lse = np.logaddexp.reduce(logits, axis=-1)
    lp_tok = np.take_along_axis(logits[:, :T], seq[:, P:, None], -1)[..., 0] - lse[:, :T]
    lp_term = np.logaddexp.reduce(logits[..., list(TERM)], axis=-1) - lse
    valid = np.arange(T)[None] < n[:, None]
    np.testing.assert_allclose(np.asarray(chunk_out[0]), np.where(valid, lp_tok, 0), atol=1e-4)
    states = np.arange(1, T + 1)[None] <= n[:, None]
    np.testing.assert_allclose(np.asarray(chunk_out[1])[:, 1:],
                               np.where(states, lp_term[:, 1:], 0), atol=1e-4)


def test_chunk_size_rule():
    assert logits_chunk_size(-1, 64, 33, 128256, 2**28) == 33
    assert logits_chunk_size(5, 64, 33, 128256, 2**28) == 5
    assert logits_chunk_size(50, 64, 33, 128256, 2**28) == 33
    # auto: at most 2**28 bytes per chunk -> at most 8 positions -> 5 chunks of 7
    c = logits_chunk_size(0, 64, 33, 128256, 2**28)
    assert c == 7 and 64 * c * 128256 * 4 <= 2**28
    assert logits_chunk_size(0, 2, 33, 100, 2**28) == 33  # small: one chunk
    with pytest.raises(ValueError, match="logits_chunk"):
        ModelConfig(family="llama", vocab_size=8, d_model=8, n_layers=1, n_heads=1, d_ff=8,
                    max_seq_len=8, logits_chunk=-2)


def test_chunked_temporaries_smaller_for_large_vocab():
    """Compiled forward+backward of the chunked log-probs never holds [B, N, V] float32."""
    Bq, N, D, Vq = 4, 128, 16, 32768
    head = {"lm_head": {"kernel": jnp.zeros((D, Vq), jnp.float32)}}
    cfg = ModelConfig(family="llama", vocab_size=Vq, d_model=D, n_layers=1, n_heads=1, d_ff=8,
                      max_seq_len=64, tie_embeddings=False)
    spec = PolicySpec(term_ids=(Vq - 1,), max_len=N - 1)
    h = jax.ShapeDtypeStruct((Bq, N, D), jnp.float32)
    tgt = jax.ShapeDtypeStruct((Bq, N), jnp.int32)

    def temp(chunk):
        def loss(head, h, tgt):
            tok, term = chunked_position_logprobs(
                lambda hp, x: unembed(cfg, hp, x), head, h, tgt, chunk,
                prefix_len=jnp.arange(N), spec=spec)
            return jnp.sum(tok) + jnp.sum(term)

        c = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(head, h, tgt).compile(
            memory.FAST_CPU_COMPILE)
        return c.memory_analysis().temp_size_in_bytes

    full_logits = Bq * N * Vq * 4  # 64 MiB
    unchunked, chunked = temp(N), temp(4)  # a chunk's logits: 2 MiB
    assert unchunked >= full_logits, (unchunked, full_logits)
    assert chunked < full_logits / 4, (chunked, full_logits)
    assert chunked * 4 < unchunked


def _lm_loss(cfg, params, tokens):
    logits = forward(cfg, params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def test_remat_policies_same_loss_and_grads():
    cfg = CFG
    params = _params(cfg, 4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, V, (2, 12)), jnp.int32)
    ref_l, ref_g = _run_fast(jax.value_and_grad(lambda p: _lm_loss(cfg, p, tokens)), params)
    reprs = {"full": "nothing_saveable", "dots_saveable": "DotsSaveable(only_if_no_batch_dims=False",
             "dots_with_no_batch_dims_saveable": "DotsSaveable(only_if_no_batch_dims=True",
             "save_qkv_proj": "q_proj", "save_attn_out": "attn_out",
             "save_mlp_hidden": "mlp_hidden"}
    assert "remat2" not in str(jax.make_jaxpr(lambda p: _lm_loss(cfg, p, tokens))(params))
    for name, rep in reprs.items():
        c = cfg.replace(remat_policy=name)
        jaxpr = str(jax.make_jaxpr(lambda p: _lm_loss(c, p, tokens))(params))
        pol = re.findall(r"policy=(.*)", jaxpr)
        assert pol and rep.lower() in pol[0].lower(), (name, pol)
    for name in ("full", "save_attn_out"):  # numerics: a sample (compiles)
        c = cfg.replace(remat_policy=name)
        l, g = _run_fast(jax.value_and_grad(lambda p: _lm_loss(c, p, tokens)), params)
        np.testing.assert_allclose(float(l), float(ref_l), atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(ref_g), jax.tree_util.tree_leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # remat=True keeps meaning "full"
    assert cfg.replace(remat=True).effective_remat_policy == "full"
    assert cfg.replace(remat=True, remat_policy="dots_saveable").effective_remat_policy \
        == "dots_saveable"
    with pytest.raises(ValueError, match="remat_policy"):
        cfg.replace(remat_policy="sometimes")


def test_remat_full_saves_activation_memory():
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=64, n_layers=4, n_heads=4,
                      n_kv_heads=2, d_ff=256, max_seq_len=128)
    p = param_shapes_of(cfg)
    tok = jax.ShapeDtypeStruct((8, 128), jnp.int32)

    def temp(c):
        f = jax.jit(jax.grad(lambda p, t: _lm_loss(c, p, t)))
        return f.lower(p, tok).compile(memory.FAST_CPU_COMPILE).memory_analysis().temp_size_in_bytes

    none, full = temp(cfg), temp(cfg.replace(remat_policy="full"))
    assert full < 0.7 * none, (full, none)


def param_shapes_of(cfg):
    from gfn_jax.models import param_shapes
    return param_shapes(cfg)


def test_activation_constraints_in_hlo_and_results_unchanged():
    devices = jax.devices()
    assert len(devices) == 8, "conftest forces 8 host devices"
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4), devices)
    cfg = CFG.replace(logits_chunk=4)
    params = _params(cfg)
    pt, pm, z, n, _, _ = _batch()
    rows = np.arange(8) % B  # 8 rows: divisible by data*fsdp
    pt, pm, z, n = pt[rows], pm[rows], z[rows], n[rows]
    spec = PolicySpec(term_ids=TERM, max_len=T)

    def fn():  # a new function per trace: jit caches traces by function
        def f(p):
            s = score_policy(cfg, p, pt, pm, z, n, spec)
            return s.log_pf, s.log_pterm
        return f

    plain_txt = jax.jit(fn()).lower(params).as_text()
    with activation_sharding(mesh, parallel.DEFAULT_RULES):
        txt = jax.jit(fn()).lower(params).as_text()
        sharded = _run_fast(fn(), params)
    plain = _run_fast(fn(), params)
    pat = re.compile(r"sharding_constraint|@Sharding")
    assert not pat.search(plain_txt)
    # embedding, each scanned block (one body), final norm, chunk input logits
    assert len(pat.findall(txt)) >= 3, len(pat.findall(txt))
    # the batch axis is constrained over data x fsdp
    assert re.search(r'\{\s*"data"\s*,\s*"fsdp"\s*\}|devices=\[8,1,1\]', txt)
    for a, b in zip(plain, sharded):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # overriding the rules table changes the constraint: batch over data only
    rules = parallel.merge_rules({"batch": "data"})
    with activation_sharding(mesh, rules):
        txt2 = jax.jit(fn()).lower(params).as_text()
    assert txt2 != txt


def _tiny_lora_cfg():
    return ModelConfig(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=False)


def _shard_bytes(tree, shardings):
    return sum(int(np.prod(sh.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree_util.tree_leaves(tree),
                                jax.tree_util.tree_leaves(shardings)))


def test_estimate_one_and_eight_devices_and_check_fits():
    from gfn_jax.defaults import default_config
    from gfn_jax.models import param_axes, param_shapes

    cfg = _tiny_lora_cfg()
    config = default_config()
    config.lora.rank = 4
    est = {}
    for name, devs, mc in (("one", jax.devices()[:1], parallel.MeshConfig()),
                           ("eight", jax.devices(), parallel.MeshConfig(data=1, fsdp=8))):
        mesh = parallel.make_mesh(mc, devs)
        e = memory.estimate_step_memory(cfg, batch_size=8, prompt_len=8, traj_len=6, mesh=mesh,
                                        config=config, term_ids=(255,))
        est[name] = (e, mesh)
        assert e.num_devices == len(devs)
        assert e.temp_bytes > 0 and e.total_bytes > e.argument_bytes
        # arguments = base weights + adapters + 2 Adam moments + batch + small scalars,
        # per device under the mesh's shardings (counted independently of XLA)
        shapes = param_shapes(cfg)
        w = _shard_bytes(shapes, parallel.tree_shardings(param_axes(cfg), shapes, mesh))
        lc = lora_lib.LoraConfig(rank=4, targets=tuple(config.lora.targets))
        t_shapes = jax.eval_shape(
            lambda: lora_lib.init_lora(cfg, shapes, lc, jax.random.PRNGKey(0))["tree"])
        t_sh = parallel.tree_shardings(lora_lib.lora_axes(cfg, lc)["tree"], t_shapes, mesh)
        a = _shard_bytes(t_shapes, t_sh)
        b = _shard_bytes(memory.abstract_batch(8, 8, 6), jax.tree_util.tree_map(
            lambda _: parallel.batch_sharding(mesh, 1), memory.abstract_batch(8, 8, 6)))
        # (jit drops batch fields the objective does not read, so the batch is an upper bound)
        assert w + 3 * a <= e.argument_bytes <= w + 3 * a + b + 4096, (name, e.argument_bytes)
        assert e.alias_bytes >= 3 * a  # adapters and moments written in place (donated)
    one, eight = est["one"][0], est["eight"][0]
    assert eight.argument_bytes < one.argument_bytes / 3  # weights and state sharded 8 ways

    memory.check_fits(one, one.total_bytes * 2)  # fits: no error
    memory.check_fits(one, None)  # unknown device memory: no check
    with pytest.raises(memory.DoesNotFitError) as err:
        memory.check_fits(one, one.total_bytes / 2)
    msg = str(err.value)
    for knob in memory.FIT_KNOBS:
        assert knob in msg, knob
    assert "now 4" in msg  # lora.rank's current value


def test_estimate_plans_the_shared_prompt_program_the_trainer_runs():
    """With K samples of one long prompt, the planned step runs the prompt once per group
    (as the trainer's step does), which needs less temporary memory than row by row; the
    config-level estimate picks the grouping the trainer will use (none for PPO, whose
    shuffled minibatches are ungrouped)."""
    from gfn_jax.defaults import default_config

    cfg = _tiny_lora_cfg().replace(d_model=64, d_ff=128)
    config = default_config()
    config.lora.rank = 4
    mesh = parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1])
    kw = dict(batch_size=16, prompt_len=48, traj_len=4, mesh=mesh, config=config,
              term_ids=(255,))
    rows = memory.estimate_step_memory(cfg, group_size=1, **kw)
    shared = memory.estimate_step_memory(cfg, group_size=16, **kw)
    off = memory.estimate_step_memory(cfg.replace(share_prompt=False), group_size=16, **kw)
    assert shared.temp_bytes < 0.7 * rows.temp_bytes, (shared.temp_bytes, rows.temp_bytes)
    assert off.temp_bytes == rows.temp_bytes  # share_prompt off: the row-by-row program
    assert shared.knobs["model.share_prompt"] and not rows.knobs["model.share_prompt"]
    with pytest.raises(ValueError, match="group_size=3"):
        memory.estimate_step_memory(cfg, group_size=3, **kw)

    config.task.max_len = 4
    config.train.prompts_per_batch, config.train.samples_per_prompt = 2, 8
    e = memory.estimate_from_config(config, cfg, 48, devices=jax.devices()[:1],
                                    term_ids=(255,))
    assert e.knobs["model.share_prompt"] is True
    assert e.temp_bytes < rows.temp_bytes
    config.objective.name = "ppo"
    e = memory.estimate_from_config(config, cfg, 48, devices=jax.devices()[:1],
                                    term_ids=(255,))
    assert e.knobs["model.share_prompt"] is False


def _sampler_cfg(**kw):
    # layer weights (1.0 MiB in float32) far larger than the KV cache and logits below
    return ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4,
                       n_kv_heads=2, d_ff=256, max_seq_len=64, tie_embeddings=False, **kw)


def test_sampler_estimate_counts_the_kv_cache_and_the_decode_layout_copy(monkeypatch):
    """The sampler's compiled memory against closed forms: its arguments are the weights (and
    adapters); its temporaries hold the KV cache of every row (2 L rows (P + T) K Dh floats);
    the unrolled decode layout adds a copy of the layer weights, which "scanned" does not
    make; weights laid out beforehand are an argument instead of a temporary."""
    from gfn_jax.models import param_shapes

    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg = _sampler_cfg()
    mesh = parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1])
    kw = dict(prompts=2, num_samples=8, prompt_len=16, traj_len=8, mesh=mesh, term_ids=(255,))
    shapes = param_shapes(cfg)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    weights, layers = nbytes(shapes), nbytes(shapes["layers"])
    kv = 2 * cfg.n_layers * 16 * (16 + 8) * cfg.n_kv_heads * cfg.head_dim * 4
    unrolled = memory.estimate_sampler_memory(cfg, **kw)
    scanned = memory.estimate_sampler_memory(cfg.replace(decode_layers="scanned"), **kw)
    for e in (unrolled, scanned):
        assert weights <= e.argument_bytes <= weights + 4096
        assert e.temp_bytes >= kv
        assert e.knobs["sampler.rows"] == 16
    # scanned: the cache, logits and one layer's weights sliced per scan step (L = 4 here)
    assert scanned.temp_bytes < kv + layers / 2, (scanned.temp_bytes, kv, layers)
    assert unrolled.temp_bytes - scanned.temp_bytes >= 0.7 * layers
    assert (unrolled.knobs["model.decode_layers"], scanned.knobs["model.decode_layers"]) == (
        "unrolled", "scanned")
    # twice the rows: the cache (not the weights' copy) doubles
    wide = memory.estimate_sampler_memory(cfg.replace(decode_layers="scanned"),
                                          **dict(kw, num_samples=16))
    assert wide.temp_bytes >= scanned.temp_bytes + kv * 0.95
    # weights laid out once (feature-major, as a LoRA run keeps them on CPU): an argument
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")
    per_call = memory.estimate_sampler_memory(cfg, **kw)
    kept = memory.estimate_sampler_memory(cfg, kept_decode_weights=True, **kw)
    assert kept.argument_bytes - per_call.argument_bytes >= layers
    assert per_call.temp_bytes - kept.temp_bytes >= 0.95 * layers
    # LoRA adapters are arguments too
    lc = lora_lib.LoraConfig(rank=4, targets=("layers/attn/(q|v)/kernel",))
    with_lora = memory.estimate_sampler_memory(cfg.replace(decode_layers="scanned"), lora=lc,
                                               **kw)
    adapters = nbytes(jax.eval_shape(lambda: lora_lib.init_lora(
        cfg, shapes, lc, jax.random.PRNGKey(0))["tree"]))
    assert with_lora.argument_bytes - scanned.argument_bytes >= adapters


def _sampler_run_config():
    """A run config for the plans of _sampler_cfg's model: LoRA r=4, 8 tokens, 2 x 4 rows."""
    from gfn_jax.defaults import default_config

    config = default_config()
    config.lora.rank = 4
    config.task.max_len = 8
    config.train.prompts_per_batch, config.train.samples_per_prompt = 2, 4
    return config


def test_run_plan_takes_the_larger_phase_and_names_the_sampling_knobs(monkeypatch):
    """plan_from_config plans the sampler for the larger of the training and evaluation
    draws; the run's peak is the larger of the step and sampling phases; a plan whose
    sampling phase does not fit names the sampler's knobs, the largest saving first, and one
    whose step does not fit names the step's."""
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg, config = _sampler_cfg(), _sampler_run_config()
    config.eval.num_samples, config.eval.batch_size = 0, 500
    devs = jax.devices()[:1]
    plan = memory.plan_from_config(config, cfg, 16, devices=devs, term_ids=(255,))
    assert plan.sampler.knobs["sampler.rows"] == 8
    assert plan.sampler.knobs["sampler.rows_from"].startswith("train.prompts_per_batch")
    assert plan.kept_bytes == 0  # no feature-major decoding here: nothing kept
    assert plan.total_bytes == max(plan.step_bytes, plan.sampling_bytes)
    assert plan.sampling_bytes >= plan.step.argument_bytes + plan.sampler.temp_bytes
    with pytest.raises(memory.DoesNotFitError, match="the train step needs"):
        memory.check_fits(plan, plan.step_bytes / 2)  # the step is the larger phase here
    config.eval.num_samples = 400  # an evaluation draw of 400 rows of one prompt is larger
    plan = memory.plan_from_config(config, cfg, 16, devices=devs, term_ids=(255,))
    assert plan.sampler.knobs["sampler.rows"] == 400
    assert plan.sampler.knobs["sampler.rows_from"] == "eval.batch_size"
    assert plan.sampling_bytes > plan.step_bytes
    assert "peak per device" in plan.summary() and "(sampling)" in plan.summary()
    with pytest.raises(memory.DoesNotFitError) as err:
        memory.check_fits(plan, plan.step_bytes / 0.9 + 1)  # the step fits, sampling does not
    msg = str(err.value)
    assert msg.startswith("sampling needs")
    knobs = [line for line in msg.splitlines() if line.startswith("  - ")]
    # 400 rows' KV cache (9.8 MB) saves more than dropping the 1.0 MiB per-layer copy
    assert "400 now" in knobs[0] and "model.decode_layers='scanned'" in knobs[1]
    assert any("task.max_len (now 8)" in k for k in knobs)
    memory.check_fits(plan, plan.total_bytes / 0.9 + 1)  # fits: no error
    scanned = memory.plan_from_config(config, cfg.replace(decode_layers="scanned"), 16,
                                      devices=devs, term_ids=(255,))
    assert plan.sampling_bytes - scanned.sampling_bytes >= 0.7 * plan.layer_weight_bytes
    assert "decode_layers" not in str(_fit_error(scanned, scanned.step_bytes / 0.9 + 1))
    # where the sampler decodes feature-major (CPU's default for few rows), a LoRA run keeps
    # the laid-out layer weights through the run: counted in both phases, and named
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")
    kept = memory.plan_from_config(config, cfg, 16, devices=devs, term_ids=(255,))
    assert kept.kept_bytes == kept.layer_weight_bytes > 0  # made for the 8-row training draws
    assert kept.step_bytes == kept.step.total_bytes + kept.kept_bytes
    assert kept.sampling_bytes > kept.step_bytes  # the 400-row evaluation draw still dominates
    assert "model.cache_decode_weights=False" in str(_fit_error(kept, kept.step_bytes / 0.9 + 1))
    config.model.cache_decode_weights = False
    assert memory.plan_from_config(config, cfg, 16, devices=devs, term_ids=(255,)).kept_bytes == 0
    config.model.cache_decode_weights = True
    assert memory.plan_from_config(config, cfg.replace(decode_layers="scanned"), 16,
                                   devices=devs, term_ids=(255,)).kept_bytes == 0


def test_plan_of_weights_gathered_for_decoding_names_the_knob(monkeypatch):
    """With ``model.decode_gather_weights`` on an fsdp=8 mesh the sampling phase holds the
    gathered weights: its plan is larger than the per-step-gather plan's, shows no gather per
    decode step, and a plan that does not fit names the knob to turn off."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    cfg, config = _sampler_cfg(), _sampler_run_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.eval.num_samples, config.eval.batch_size = 400, 500  # sampling the larger phase
    devs = jax.devices()[:8]
    each = memory.plan_from_config(config, cfg, 16, devices=devs, term_ids=(255,))
    once = memory.plan_from_config(config, cfg.replace(decode_gather_weights=True), 16,
                                   devices=devs, term_ids=(255,))
    assert once.sampler.knobs["model.decode_gather_weights"] is True
    assert each.sampler.comms.per_iteration_device_bytes.get("all-gather", 0) > 0
    assert "all-gather" not in once.sampler.comms.per_iteration_device_bytes
    assert once.sampler.temp_bytes > each.sampler.temp_bytes
    assert once.sampling_bytes > once.step_bytes and "per decode step" in once.summary()
    msg = str(_fit_error(once, once.step_bytes / 0.9 + 1))
    assert msg.startswith("sampling needs") and "model.decode_gather_weights=False" in msg
    assert "decode_gather_weights" not in str(_fit_error(each, each.total_bytes / 0.9 - 1))


def _fit_error(plan, device_bytes):
    with pytest.raises(memory.DoesNotFitError) as err:
        memory.check_fits(plan, device_bytes)
    return err.value


def test_step_estimate_holds_a_separate_reward_model():
    """With reward.model the trainer holds a second model beside the policy's base and
    computes the reward with it: the planned step's arguments grow by exactly its weights
    (LoRA: base + reward; full fine-tuning without a reference: the reward model only)."""
    from gfn_jax.defaults import default_config
    from gfn_jax.models import param_shapes

    cfg = _tiny_lora_cfg()
    reward_cfg = cfg.replace(d_model=48, d_ff=96, n_layers=3)  # same vocabulary
    nbytes = lambda c: sum(x.size * x.dtype.itemsize  # noqa: E731
                           for x in jax.tree.leaves(param_shapes(c)))
    mesh = parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1])
    for lora in (True, False):
        config = default_config()
        config.lora.enabled, config.lora.rank = lora, 4
        kw = dict(batch_size=8, prompt_len=8, traj_len=6, mesh=mesh, config=config,
                  term_ids=(255,))
        alone = memory.estimate_step_memory(cfg, **kw)
        with_rm = memory.estimate_step_memory(cfg, reward_model_cfg=reward_cfg, **kw)
        grew = with_rm.argument_bytes - alone.argument_bytes
        if lora:
            assert grew == nbytes(reward_cfg), (grew, nbytes(reward_cfg))
        else:  # the frozen copy of the base (the default reward) is replaced by the reward model
            assert grew == nbytes(reward_cfg) - nbytes(cfg), (grew, nbytes(reward_cfg))
