"""Self-consistency of the transformer: KV-cache decoding, padding, adapters, dtypes.

(Parity with the PyTorch ``transformers`` models lives in ``tests/test_hf.py``.)
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.models import (
    ModelConfig,
    decode_layout,
    decode_step,
    forward,
    init_params,
    prefill,
)
from gfn_jax.models.lora import merge_tree

V = 61
CONFIGS = {
    "gpt2": ModelConfig("gpt2", V, 32, 2, 4, 64, 16),
    "llama": ModelConfig("llama", V, 32, 2, 4, 48, 16, n_kv_heads=2, tie_embeddings=False),
    "gptj": ModelConfig("gptj", V, 32, 2, 4, 64, 16, rotary_dim=4),
}

# Left-padded prompts of lengths 6, 2, 2 (the last two differ), then N teacher-forced tokens.
P, N = 6, 4
_rs = np.random.RandomState(0)
PROMPT = _rs.randint(0, V, size=(3, P))
PROMPT_MASK = np.array([[1] * 6, [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])
GEN = _rs.randint(0, V, size=(3, N))
FULL = np.concatenate([PROMPT, GEN], axis=1)
FULL_MASK = np.concatenate([PROMPT_MASK, np.ones((3, N), int)], axis=1)

# One compile per (config, shapes).
_forward = jax.jit(forward, static_argnums=0)
_prefill = jax.jit(prefill, static_argnums=(0, 4))
_decode = jax.jit(decode_step, static_argnums=0)


@pytest.fixture(scope="module")
def models() -> Dict[str, Tuple[ModelConfig, dict, jax.Array]]:
    """(config, params, full-batch logits) per family; params from init_params(std=0.2)."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        # rbg keys compile much faster than threefry on CPU; values are irrelevant here.
        params = init_params(cfg, jax.random.key(i, impl="unsafe_rbg"), std=0.2)
        out[name] = (cfg, params, _forward(cfg, params, FULL, FULL_MASK))
    return out


def _real(x: jax.Array, mask: np.ndarray) -> np.ndarray:
    return np.asarray(x)[mask.astype(bool)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_not_flat(models, name):
    _, _, logits = models[name]
    assert float(jnp.std(logits, axis=-1).min()) > 0.2
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_forward(models, name):
    cfg, params, full = models[name]
    logits, cache = _prefill(cfg, params, PROMPT, PROMPT_MASK, P + N)
    err = np.abs(_real(logits, PROMPT_MASK) - _real(full[:, :P], PROMPT_MASK)).max()
    assert err <= 1e-5, err
    for j in range(N):
        step_logits, cache = _decode(cfg, params, cache, GEN[:, j])
        np.testing.assert_allclose(step_logits, full[:, P + j], atol=1e-5, rtol=0)
    assert int(cache.index) == P + N
    np.testing.assert_array_equal(cache.next_pos, FULL_MASK.sum(-1))
    # the sampler's variant: logits of the last prompt position only, same cache
    last, cache2 = prefill(cfg, params, PROMPT, PROMPT_MASK, P + N, last_only=True)
    np.testing.assert_allclose(last, full[:, P - 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache2.k, _prefill(cfg, params, PROMPT, PROMPT_MASK, P + N)[1].k,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padding_is_invisible(models, name):
    cfg, params, full = models[name]
    # Rows 1 and 2 have 6 real tokens each after 4 pads; run them unpadded.
    rows = FULL[1:, 4:]
    unpadded = _forward(cfg, params, rows, np.ones_like(rows))
    np.testing.assert_allclose(full[1:, 4:], unpadded, atol=1e-5, rtol=0)
    # Changing what sits under the padding changes nothing at the real positions.
    junk = np.where(FULL_MASK == 1, FULL, (FULL + 7) % V)
    np.testing.assert_allclose(
        _real(_forward(cfg, params, junk, FULL_MASK), FULL_MASK), _real(full, FULL_MASK), atol=1e-6
    )


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_feature_major_layout_merges_adapters_for_many_rows(models, name):
    """With many rows a decode step merges the adapters into the kernels (fewer FLOPs than
    x·A·B); in the feature-major layout they merge into the [out, in] kernels: same logits
    as the plain layout. Few rows keep them unmerged (the test above)."""
    from gfn_jax.models.transformer import split_adapters_for_tokens

    cfg, params, _ = models[name]
    adapters = _adapters(cfg, seed=7)
    rows = 33
    merged, _ = split_adapters_for_tokens(
        jax.tree.map(lambda a: a[0], adapters["tree"]["layers"]), rows)
    assert merged, "the shapes no longer make a decode step of 33 rows merge"
    prompt, mask = np.tile(PROMPT, (11, 1)), np.tile(PROMPT_MASK, (11, 1))

    @jax.jit
    def run(params, adapters):
        _, cache = prefill(cfg, params, prompt, mask, P + N, adapters=adapters)
        outs = []
        for fm in (False, True):
            lp, c, la = decode_layout(params, cache, adapters, feature_major=fm)
            lg = []
            for j in range(N):
                g, c = decode_step(cfg, lp, c, np.tile(GEN, (11, 1))[:, j], adapters=la)
                lg.append(g)
            outs.append(jnp.stack(lg, 1))
        return outs

    plain, fm = run(params, adapters)
    np.testing.assert_allclose(fm, plain, atol=1e-5, rtol=0)
    assert float(jnp.abs(plain - run(params, None)[0]).max()) > 0.1  # the adapters matter


def test_feature_major_default_follows_backend_rows_and_environment(monkeypatch):
    from gfn_jax.models import transformer as tf

    monkeypatch.delenv("GFN_JAX_DECODE_FEATURE_MAJOR", raising=False)
    cpu = jax.default_backend() == "cpu"
    assert tf.default_feature_major(16) is cpu
    assert tf.default_feature_major(16, steps=tf.FEATURE_MAJOR_MIN_STEPS) is cpu
    assert tf.default_feature_major(16, steps=tf.FEATURE_MAJOR_MIN_STEPS - 1) is False
    assert tf.default_feature_major(tf.FEATURE_MAJOR_MAX_ROWS + 1) is False
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "0")
    assert tf.default_feature_major(16) is False
    monkeypatch.setenv("GFN_JAX_DECODE_FEATURE_MAJOR", "1")
    assert tf.default_feature_major(10_000) is True


def _adapters(cfg: ModelConfig, seed: int, rank: int = 3) -> dict:
    """Random (non-zero b) adapters on q, v, o, mlp down, and the head/embedding."""
    rs = np.random.RandomState(seed)
    L, D, H, K, Dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def ab(n_in, n_out, lead=(L,)):
        return {
            "a": jnp.asarray(rs.normal(0, 0.3, lead + (n_in, rank)), jnp.float32),
            "b": jnp.asarray(rs.normal(0, 0.3, lead + (rank, n_out)), jnp.float32),
        }

    tree = {
        "layers": {
            "attn": {
                "q": {"kernel": ab(D, H * Dh)},
                "v": {"kernel": ab(D, K * Dh)},
                "o": {"kernel": ab(H * Dh, D)},
            },
            "mlp": {"down": {"kernel": ab(cfg.d_ff, D)}},
        }
    }
    if cfg.tie_embeddings:
        tree["embed"] = {"embedding": ab(V, D, lead=())}
    else:
        tree["lm_head"] = {"kernel": ab(D, V, lead=())}
    return {"scale": jnp.float32(0.5), "tree": tree}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapters_equal_merged(models, name):
    cfg, params, full = models[name]
    adapters = _adapters(cfg, seed=3)
    merged = merge_tree(params, adapters["tree"], adapters["scale"])
    # Independent check of one merged leaf with numpy: W + s * (A @ B) reshaped.
    ad = adapters["tree"]["layers"]["attn"]["o"]["kernel"]
    w = np.asarray(params["layers"]["attn"]["o"]["kernel"])
    delta = np.einsum("lir,lro->lio", np.asarray(ad["a"]), np.asarray(ad["b"])).reshape(w.shape)
    np.testing.assert_allclose(merged["layers"]["attn"]["o"]["kernel"], w + 0.5 * delta, atol=1e-6)

    with_adapters = forward(cfg, params, FULL, FULL_MASK, adapters=adapters)
    on_merged = _forward(cfg, merged, FULL, FULL_MASK)
    np.testing.assert_allclose(
        _real(with_adapters, FULL_MASK), _real(on_merged, FULL_MASK), atol=1e-5, rtol=0
    )
    assert np.abs(_real(on_merged, FULL_MASK) - _real(full, FULL_MASK)).max() > 0.1


@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_layout_matches_forward_and_stacked_cache(models, name, feature_major):
    """One array per layer (the decoders' layout): unrolled decode steps give the full
    forward's logits, with and without LoRA adapters, and the same cache as the stacked
    (scanned) layout; also with the projections stored feature-major (CPU's default for
    few rows), which only changes the rounding."""
    from gfn_jax.models.adapters import FM_KERNEL
    from gfn_jax.models.transformer import FM_MARK

    tol = 1e-5 if feature_major else 1e-6
    cfg, params, full = models[name]
    adapters = _adapters(cfg, seed=5)
    with_adapters = _forward(cfg, merge_tree(params, adapters["tree"], adapters["scale"]),
                             FULL, FULL_MASK)

    @jax.jit
    def run(params, adapters):
        _, cache = prefill(cfg, params, PROMPT, PROMPT_MASK, P + N, adapters=adapters)
        stacked = cache
        lp, cache, la = decode_layout(params, cache, adapters, feature_major=feature_major)
        assert cache.per_layer and len(cache.k) == cfg.n_layers
        assert isinstance(lp["layers"], tuple)
        q = lp["layers"][0]["attn"]["q"]
        assert (FM_KERNEL in q, "kernel" in q, FM_MARK in lp) == (
            feature_major, not feature_major, feature_major)
        out_s, out_l = [], []
        for j in range(N):
            lg, cache = decode_step(cfg, lp, cache, GEN[:, j], adapters=la)
            out_l.append(lg)
            lg, stacked = decode_step(cfg, params, stacked, GEN[:, j], adapters=adapters)
            out_s.append(lg)
        return jnp.stack(out_l, 1), jnp.stack(out_s, 1), cache, stacked

    for ad, ref in ((None, full), (adapters, with_adapters)):
        per_layer, scanned, cache, stacked = run(params, ad)
        np.testing.assert_allclose(per_layer, ref[:, P:], atol=1e-5, rtol=0)
        np.testing.assert_allclose(per_layer, scanned, atol=tol, rtol=0)
        np.testing.assert_allclose(jnp.stack(cache.k), stacked.k, atol=tol, rtol=0)
        np.testing.assert_allclose(jnp.stack(cache.v), stacked.v, atol=tol, rtol=0)
        np.testing.assert_array_equal(cache.valid, stacked.valid)
        assert int(cache.index) == int(stacked.index) == P + N
    # decode_layers="scanned" keeps the stacked weights and cache (decode_step above then
    # writes the cache in place); an unknown layout is refused
    c = _prefill(cfg, params, PROMPT, PROMPT_MASK, P + N)[1]
    same = decode_layout(params, c, adapters, layers="scanned")
    assert same[0] is params and same[1] is c and same[2] is adapters
    with pytest.raises(ValueError, match="unrolled"):
        decode_layout(params, c, layers="stacked")
    # a second conversion is refused rather than silently mis-sliced
    lp, c, _ = decode_layout(params, _prefill(cfg, params, PROMPT, PROMPT_MASK, P + N)[1])
    with pytest.raises(ValueError, match="already in the decode layout"):
        decode_layout(lp, c)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_too_long_raises(models, name):
    cfg, params, _ = models[name]
    too_long = np.zeros((1, cfg.max_seq_len + 1), np.int32)
    with pytest.raises(ValueError, match=r"17 tokens is longer than the model's context \(max_seq_len=16\)"):
        forward(cfg, params, too_long)
    with pytest.raises(ValueError, match="longer than the model's context"):
        prefill(cfg, params, too_long, np.ones_like(too_long), cfg.max_seq_len)
    with pytest.raises(ValueError, match="longer than the model's context"):
        prefill(cfg, params, PROMPT, PROMPT_MASK, cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="does not fit a cache of max_len=4"):
        prefill(cfg, params, PROMPT, PROMPT_MASK, 4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_close_to_float32(models, name):
    cfg, params, full = models[name]
    bf_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    logits = _forward(bf_cfg, bf_params, FULL, FULL_MASK)
    assert logits.dtype == jnp.float32  # logits are returned in float32
    got, ref = _real(logits, FULL_MASK), _real(full, FULL_MASK)
    assert np.isfinite(got).all()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 0.05 * scale, (np.abs(got - ref).max(), scale)
    # Same argmax on almost all positions.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="unsupported architecture family 'bert'"):
        ModelConfig("bert", V, 32, 2, 4, 64, 16)
    with pytest.raises(ValueError, match="unsupported architecture family 'mamba'"):
        CONFIGS["gpt2"].replace(family="mamba")
