"""LoRA adapters: init, targeting, axes, merge/export and gradients (tiny models)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gfn_jax.models import ModelConfig, forward, init_params, param_shapes, prefill, decode_step
from gfn_jax.models.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    init_lora,
    lora_axes,
    lora_trainable_mask,
    merge_lora,
    num_params,
    with_dropout,
)

CFGS = {
    "gpt2": ModelConfig("gpt2", vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16),
    "llama": ModelConfig(
        "llama", vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16,
        n_kv_heads=2, tie_embeddings=False,
    ),
    "gptj": ModelConfig(
        "gptj", vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, rotary_dim=4
    ),
}
# Extra non-layer targets per family so the top-level merge path is exercised too.
EXTRA = {"gpt2": ("embed/embedding",), "llama": ("lm_head/kernel",), "gptj": ("lm_head/kernel",)}

_fwd = jax.jit(forward, static_argnums=0)
_merge = jax.jit(merge_lora)


def _tokens(cfg, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(toks)
    mask[1, :2] = 0  # left padding on row 1
    return jnp.asarray(toks), jnp.asarray(mask)


def _nonzero(adapters, seed=1):
    """Adapters with random (non-zero) b so the adapted model differs from the base."""
    leaves, tdef = jax.tree_util.tree_flatten_with_path(adapters["tree"])
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        out.append(0.3 * rng.standard_normal(x.shape, np.float32) if path[-1].key == "b" else x)
    return {"scale": adapters["scale"], "tree": jax.tree_util.tree_unflatten(tdef, out)}


def _paths(tree):
    """'/'-joined paths of adapted kernels (the dicts holding 'a'/'b')."""
    out = []

    def walk(t, pre):
        if set(t) == {"a", "b"}:
            out.append("/".join(pre))
            return
        for k, v in t.items():
            walk(v, pre + [k])

    walk(tree, [])
    return sorted(out)


def _setup(fam):
    cfg = CFGS[fam]
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=DEFAULT_TARGETS + EXTRA[fam])
    ad = init_lora(cfg, params, lcfg, jax.random.PRNGKey(7))
    return cfg, params, lcfg, ad


def _value_and_grads(cfg, toks, mask):
    """Jitted (loss, logits), grads for the adapted model (w.r.t. adapters) and for a plain
    model (w.r.t. its params); one compile each per family."""
    wts = jax.random.normal(jax.random.PRNGKey(5), toks.shape + (cfg.vocab_size,))

    def loss(p, a):
        logits = forward(cfg, p, toks, mask, adapters=a)
        return jnp.sum(jax.nn.log_softmax(logits, -1) * wts), logits

    g_ad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))
    g_w = jax.jit(jax.value_and_grad(lambda p: loss(p, None), has_aux=True))
    return g_ad, g_w


@pytest.mark.parametrize("fam", list(CFGS))
def test_init_merge_and_chain_rule(fam):
    """B=0 init is exactly the base; merged export equals the adapted forward; adapter
    gradients equal the chain rule through the explicitly merged weight."""
    cfg, params, lcfg, ad0 = _setup(fam)
    toks, mask = _tokens(cfg, seed=3)
    g_ad, g_w = _value_and_grads(cfg, toks, mask)

    # --- init: a is Kaiming-uniform per layer, b = 0, scale = alpha / rank
    assert float(ad0["scale"]) == 2.0
    for leaf in jax.tree_util.tree_leaves(ad0["tree"]):
        assert leaf.dtype == jnp.float32
    a_q = np.asarray(ad0["tree"]["layers"]["attn"]["q"]["kernel"]["a"])
    assert np.all(np.abs(a_q) <= 1 / np.sqrt(cfg.d_model)) and np.std(a_q) > 0.05
    assert not np.allclose(a_q[0], a_q[1])  # independent per layer
    (_, base), _ = g_w(params)
    (_, zero), _ = g_ad(params, ad0)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(base))

    # --- merge: against an independent numpy reference W + s * (A @ B) reshaped
    ad = _nonzero(ad0)
    merged = _merge(params, ad)
    s = float(ad["scale"])
    for path in _paths(ad["tree"]):
        w, m, t = params, merged, ad["tree"]
        for k in path.split("/"):
            w, m, t = w[k], m[k], t[k]
        ref = np.asarray(w) + s * np.matmul(np.asarray(t["a"]), np.asarray(t["b"])).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(m), ref, rtol=1e-5, atol=1e-6, err_msg=path)
    # untouched leaves are the very same arrays
    assert merge_lora(params, ad)["final_norm"]["scale"] is params["final_norm"]["scale"]

    # --- exported (merged) model equals the adapted forward, which differs from the base
    (_, adapted), grads = g_ad(params, ad)
    (_, exported), gw = g_w(merged)
    adapted, exported = np.asarray(adapted), np.asarray(exported)
    assert np.max(np.abs(adapted - np.asarray(base))) > 1e-2
    np.testing.assert_allclose(adapted, exported, rtol=1e-5, atol=1e-5)

    # --- chain rule: dL/dA = s G B^T, dL/dB = s A^T G with G = dL/dW_merged
    for path in _paths(ad["tree"]):
        t, ga, gm = ad["tree"], grads["tree"], gw
        for k in path.split("/"):
            t, ga, gm = t[k], ga[k], gm[k]
        A, B = np.asarray(t["a"]), np.asarray(t["b"])
        G = np.asarray(gm).reshape(A.shape[:-1] + (B.shape[-1],))
        dA = s * np.matmul(G, np.swapaxes(B, -1, -2))
        dB = s * np.matmul(np.swapaxes(A, -1, -2), G)
        assert np.max(np.abs(dA)) > 1e-4 and np.max(np.abs(dB)) > 1e-4, path
        np.testing.assert_allclose(np.asarray(ga["a"]), dA, rtol=2e-4, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(np.asarray(ga["b"]), dB, rtol=2e-4, atol=1e-4, err_msg=path)


def test_only_adapters_train_and_scale_is_masked():
    cfg, params, lcfg, ad = _setup("llama")
    toks, mask = _tokens(cfg)

    def loss(a, p):
        return -jnp.mean(jax.nn.log_softmax(forward(cfg, p, toks, mask, adapters=a), -1)[..., 3])

    grad_fn = jax.jit(jax.grad(loss))
    grads = grad_fn(ad, params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ad)
    assert num_params(grads) == num_params(ad)
    # b starts at zero, so only b carries gradient at first
    gb = grads["tree"]["layers"]["mlp"]["up"]["kernel"]["b"]
    assert float(jnp.max(jnp.abs(gb))) > 0
    assert float(grads["scale"]) == 0.0  # the scale is a constant
    # weight decay would still move the scale: the mask freezes it
    tx = optax.adamw(0.1, weight_decay=0.5)
    opt = optax.multi_transform({True: tx, False: optax.set_to_zero()}, lora_trainable_mask(ad))
    state = opt.init(ad)
    p_before = jax.tree_util.tree_map(np.asarray, params)
    for _ in range(2):
        grads = grad_fn(ad, params)
        upd, state = opt.update(grads, state, ad)
        ad = optax.apply_updates(ad, upd)
    assert float(ad["scale"]) == lcfg.scale  # masked: scale is not trained
    assert float(jnp.max(jnp.abs(ad["tree"]["layers"]["mlp"]["up"]["kernel"]["b"]))) > 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_before, params)
    assert float(grad_fn(ad, params)["scale"]) == 0.0  # still none with b != 0
    unmasked = tx.update(grads, tx.init(ad), ad)[0]
    assert float(unmasked["scale"]) != 0.0  # what the mask protects against


def test_targets_regex_and_errors():
    cfg = CFGS["llama"]
    shapes = param_shapes(cfg)
    key = jax.random.PRNGKey(0)
    ad = init_lora(cfg, shapes, LoraConfig(targets=(r"layers/attn/(q|v)/kernel",)), key)
    assert _paths(ad["tree"]) == ["layers/attn/q/kernel", "layers/attn/v/kernel"]
    expect = {
        "llama": ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate", "mlp/up"],
        "gpt2": ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up"],
        "gptj": ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up"],
    }
    for fam, c in CFGS.items():
        got = _paths(init_lora(c, param_shapes(c), LoraConfig(), key)["tree"])
        assert got == [f"layers/{e}/kernel" for e in expect[fam]], fam
    with pytest.raises(ValueError, match=r"matches no parameter"):
        init_lora(cfg, shapes, LoraConfig(targets=(r"layers/attn/q",)), key)  # fullmatch
    with pytest.raises(ValueError, match=r"matches no parameter"):  # gpt2 has no gate
        init_lora(CFGS["gpt2"], param_shapes(CFGS["gpt2"]), LoraConfig(targets=(r"layers/mlp/gate/kernel",)), key)
    with pytest.raises(ValueError, match=r"biases and norm scales"):
        init_lora(cfg, shapes, LoraConfig(targets=(r"layers/attn_norm/scale",)), key)
    with pytest.raises(ValueError, match=r"biases and norm scales"):
        init_lora(CFGS["gpt2"], param_shapes(CFGS["gpt2"]), LoraConfig(targets=(r"layers/mlp/up/bias",)), key)
    with pytest.raises(ValueError, match=r"dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"invalid regex"):
        LoraConfig(targets=("layers/(",))
    with pytest.raises(TypeError, match=r"tuple"):
        LoraConfig(targets="layers/attn/q/kernel")
    with pytest.raises(ValueError, match=r"'scale' and 'tree'"):
        merge_lora(init_params(cfg, key), ad["tree"])


@pytest.mark.parametrize("fam", list(CFGS))
def test_axes_tree_matches_adapters(fam):
    cfg = CFGS[fam]
    lcfg = LoraConfig(rank=3, targets=DEFAULT_TARGETS + EXTRA[fam])
    ad = init_lora(cfg, param_shapes(cfg), lcfg, jax.random.PRNGKey(0))
    axes = lora_axes(cfg, lcfg)
    is_ax = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
    assert jax.tree_util.tree_structure(axes, is_leaf=is_ax) == jax.tree_util.tree_structure(ad)
    sizes = {
        "layers": cfg.n_layers, "embed": cfg.d_model, "lora": 3, "mlp": cfg.d_ff, "vocab": cfg.vocab_size,
        "heads_x_head_dim": cfg.n_heads * cfg.head_dim, "kv_heads_x_head_dim": cfg.n_kv_heads * cfg.head_dim,
    }
    flat_ax = jax.tree_util.tree_leaves(axes, is_leaf=is_ax)
    flat_ad = jax.tree_util.tree_leaves(ad)
    for ax, x in zip(flat_ax, flat_ad):
        assert tuple(sizes[a] for a in ax) == x.shape, (ax, x.shape)
    q = axes["tree"]["layers"]["attn"]["q"]["kernel"]
    o = axes["tree"]["layers"]["attn"]["o"]["kernel"]
    assert q == {"a": ("layers", "embed", "lora"), "b": ("layers", "lora", "heads_x_head_dim")}
    assert o == {"a": ("layers", "heads_x_head_dim", "lora"), "b": ("layers", "lora", "embed")}


def test_cached_decoding_with_adapters_matches_merged_model():
    """prefill/decode_step with adapters equal the same calls on the merged (exported)
    parameters (with zero adapters, so both share one compiled function)."""
    cfg, params, lcfg, ad0 = _setup("llama")
    ad = _nonzero(ad0)
    merged = _merge(params, ad)
    toks, mask = _tokens(cfg, seed=9)
    pre = jax.jit(prefill, static_argnums=(0, 4))
    dec = jax.jit(decode_step, static_argnums=0)
    P = 5
    valid = np.asarray(mask[:, :P], bool)  # logits at left-padding slots are meaningless
    outs = []
    for p, a in ((params, ad), (merged, ad0)):
        logits, cache = pre(cfg, p, toks[:, :P], mask[:, :P], 8, adapters=a)
        step, cache = dec(cfg, p, cache, toks[:, P], adapters=a)
        outs.append((np.asarray(logits)[valid], np.asarray(step)))
    (l1, s1), (l2, s2) = outs
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)
    base_logits, _ = pre(cfg, params, toks[:, :P], mask[:, :P], 8, adapters=ad0)
    assert np.max(np.abs(np.asarray(base_logits)[valid] - l1)) > 1e-2  # adapters matter


def test_num_params():
    cfg = CFGS["gpt2"]
    ad = init_lora(cfg, param_shapes(cfg), LoraConfig(rank=2, targets=(r"layers/mlp/up/kernel",)), jax.random.PRNGKey(0))
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    assert num_params(ad["tree"]) == L * (D * 2 + 2 * F)
    assert num_params(ad) == L * (D * 2 + 2 * F) + 1


@pytest.mark.parametrize("fam", list(CFGS))
def test_unmerged_dropout_path_at_rate_zero_equals_merged(fam):
    """The training-mode path x@W + s*drop(x)@A@B with nothing dropped equals the merged
    forward for every projection (q, k, v, o, gate, up, down)."""
    cfg, params, _, ad = _setup(fam)
    ad = _nonzero(ad)
    toks, mask = _tokens(cfg)
    merged = _fwd(cfg, params, toks, mask, adapters=ad)
    train_mode = dict(ad, dropout_rng=jax.random.PRNGKey(3), dropout_rate=jnp.float32(0.0))
    unmerged = _fwd(cfg, params, toks, mask, adapters=train_mode)
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=2e-5, rtol=1e-5)


def test_dropout_delta_matches_numpy_and_is_keyed():
    """One projection's adapter delta equals numpy with the same Bernoulli mask; the whole
    forward is deterministic in the key, differs across keys, and gradients are finite."""
    from gfn_jax.models.transformer import _LORA_IDS, _lora_delta

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    key, rate, scale = jax.random.PRNGKey(11), 0.3, 1.5
    tree = {"mlp": {"up": {"kernel": {"a": a, "b": b}}}}
    got = _lora_delta((tree, scale, rate, key), "mlp", "up", x, 1)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, _LORA_IDS["up"]), 1 - rate, x.shape))
    want = (np.where(keep, np.asarray(x) / (1 - rate), 0) @ np.asarray(a)) @ np.asarray(b) * scale
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert 0.5 < keep.mean() < 0.9

    cfg, params, _, ad = _setup("llama")
    ad = _nonzero(ad)
    toks, mask = _tokens(cfg)
    f = jax.jit(lambda a, k: forward(cfg, params, toks, mask, adapters=with_dropout(a, 0.5, k)))
    l1, l2 = f(ad, jax.random.PRNGKey(1)), f(ad, jax.random.PRNGKey(1))
    l3 = f(ad, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    assert float(jnp.max(jnp.abs(l1 - l3))) > 1e-3
    g = jax.grad(lambda a: jnp.sum(f(a, jax.random.PRNGKey(1)) ** 2))(ad)
    leaves = jax.tree_util.tree_leaves(g["tree"])
    assert all(np.isfinite(np.asarray(v)).all() for v in leaves)
    assert any(float(jnp.abs(v).max()) > 0 for v in leaves)
    assert with_dropout(ad, 0.0, jax.random.PRNGKey(1)) is ad


def test_adapters_unmerged_for_few_tokens_merged_for_many():
    """Per kernel, the cheaper form is chosen: a decode step (few tokens) keeps adapters
    unmerged (x@W + s(x@A)@B), a long forward merges them; both give the merged model's
    logits."""
    from gfn_jax.models.transformer import split_adapters_for_tokens

    cfg, params, _, ad = _setup("llama")
    ad = _nonzero(ad)
    layer = jax.tree_util.tree_map(lambda x: x[0], ad["tree"]["layers"])
    merged, unmerged = split_adapters_for_tokens(layer, 1)
    assert not merged and set(unmerged) == {"attn", "mlp"}
    merged, unmerged = split_adapters_for_tokens(layer, 10_000)
    assert not unmerged and set(merged["attn"]) == {"q", "k", "v", "o"}
    # q is 32 -> 32 (rank r): unmerged below 32*32 / 64 = 16 tokens, merged from 16
    r = layer["attn"]["q"]["kernel"]["a"].shape[-1]
    assert "q" in split_adapters_for_tokens(layer, 15)[1]["attn"]
    assert "q" in split_adapters_for_tokens(layer, 16)[0]["attn"]
    assert r < 16
    full = _merge(params, ad)
    for n in (1, 16):  # 1 token: all unmerged; 16: attention merged, MLP (32 -> 48) not
        toks = jnp.asarray(np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n)), jnp.int32)
        mask = jnp.ones_like(toks)
        got = _fwd(cfg, params, toks, mask, adapters=ad)
        want = _fwd(cfg, full, toks, mask)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
