"""Decoder-only transformer as pure functions of a parameter pytree.

Entry points:

* :func:`init_params` / :func:`param_axes` -- parameters and their logical axis names.
* :func:`forward` -- full-sequence logits for (left-)padded batches.
* :func:`apply` -- the general form: explicit positions, an explicit ``[B, T, S]``
  attention mask (used by one-pass suffix scoring) and an optional KV cache.
* :func:`init_cache`, :func:`prefill`, :func:`decode_step` -- static-shape KV-cache
  decoding, equal to the full forward; :func:`decode_layout` puts the weights and the cache
  into one array per layer for a decode loop (the layers then run unrolled).
* :func:`prompt_forward`, :func:`continuation_forward` -- run each distinct prompt once
  (every layer's keys/values, :class:`PromptKV`) and its continuations against it, equal
  to the full forward over ``[prompt | continuation]`` (the scorers' shared-prompt path).
* :func:`activation_sharding` / :func:`constrain` -- sharding constraints on the
  activations at block boundaries by logical names (``("batch", "length", "embed")``),
  the identity unless a mesh and rules table are active (the train step sets them).
* :func:`remat_policy` -- ``ModelConfig.remat_policy`` as a ``jax.checkpoint`` policy.

Every linear layer adds a bias when its parameter dict has one, so the same code serves
GPT-2 (biases everywhere), GPT-J (biased MLP and head) and Llama (no biases, or q/k/v
biases for Qwen-style checkpoints).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gfn_jax import parallel
from gfn_jax.models.config import REMAT_POLICIES, ModelConfig
from gfn_jax.models.adapters import FM_KERNEL, as_adapters, merge_tree

Params = Dict[str, Any]
NEG_INF = -1e30


# ---------------------------------------------------------------------------
# Activation sharding constraints (MaxText-style logical names)
# ---------------------------------------------------------------------------
#: Logical names of the activations constrained at block boundaries.
ACTIVATION_AXES: Tuple[str, str, str] = ("batch", "length", "embed")
LOGITS_AXES: Tuple[str, str, str] = ("batch", "length", "vocab")
#: Logical names of one layer's keys/values [B, T, K, Dh].
KV_AXES: Tuple[str, str, str, str] = ("batch", "length", "kv_heads", "head_dim")
#: The activations of shared prompts (:func:`prompt_forward`): fewer prompts than rows may not
#: split over the batch axes, and their features then stay whole rather than taking the
#: batch's mesh axes (which would put collectives around every matmul of the prompt).
PROMPT_AXES: Tuple[str, str, None] = ("batch", "length", None)

_SHARDING = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Any], rules: Optional[Sequence[Any]] = None) -> Iterator[None]:
    """Within this context (at trace time), :func:`constrain` pins activations to
    ``mesh`` by the logical-axis ``rules`` (default :data:`gfn_jax.parallel.DEFAULT_RULES`;
    the config's ``mesh.rules`` overrides apply when passed). ``mesh=None`` is a no-op.

    The scorers in :mod:`gfn_jax.scoring` make the active (mesh, rules) part of their jit
    cache key, so a program traced without the context is never reused inside it."""
    if mesh is None:
        yield
        return
    stack = getattr(_SHARDING, "stack", None)
    if stack is None:
        stack = _SHARDING.stack = []
    stack.append((mesh, tuple(parallel.DEFAULT_RULES if rules is None else rules)))
    try:
        yield
    finally:
        stack.pop()


def current_activation_sharding() -> Optional[Tuple[Any, Tuple[Any, ...]]]:
    """The active ``(mesh, rules)`` of :func:`activation_sharding`, or None."""
    stack = getattr(_SHARDING, "stack", None)
    return stack[-1] if stack else None


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical ``axes`` under the active
    :func:`activation_sharding` context; the identity outside one."""
    ctx = current_activation_sharding()
    if ctx is None:
        return x
    mesh, rules = ctx
    return parallel.with_logical_constraint(x, axes, rules, mesh)


# ---------------------------------------------------------------------------
# Rematerialisation
# ---------------------------------------------------------------------------
def remat_policy(name: str) -> Optional[Any]:
    """The ``jax.checkpoint`` policy for a name of :data:`REMAT_POLICIES`; None for
    ``"none"`` (no rematerialisation)."""
    cp = jax.checkpoint_policies
    table = {
        "none": None,
        "full": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": cp.save_only_these_names("q_proj", "k_proj", "v_proj"),
        "save_attn_out": cp.save_only_these_names("q_proj", "k_proj", "v_proj", "attn_out"),
        "save_mlp_hidden": cp.save_only_these_names("mlp_hidden"),
    }
    assert set(table) == set(REMAT_POLICIES)
    if name not in table:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {REMAT_POLICIES}")
    return table[name]


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------
def _layer_shapes(cfg: ModelConfig) -> Dict[str, Any]:
    """Per-layer parameter shapes (without the leading layers axis) and logical axes."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    norm_bias = cfg.family in ("gpt2", "gptj")
    out: Dict[str, Any] = {}

    def norm():
        n = {"scale": ((D,), ("embed",))}
        if norm_bias:
            n["bias"] = ((D,), ("embed",))
        return n

    out["attn_norm"] = norm()
    attn = {
        "q": {"kernel": ((D, H, Dh), ("embed", "heads", "head_dim"))},
        "k": {"kernel": ((D, K, Dh), ("embed", "kv_heads", "head_dim"))},
        "v": {"kernel": ((D, K, Dh), ("embed", "kv_heads", "head_dim"))},
        "o": {"kernel": ((H, Dh, D), ("heads", "head_dim", "embed"))},
    }
    if cfg.qkv_bias:
        attn["q"]["bias"] = ((H, Dh), ("heads", "head_dim"))
        attn["k"]["bias"] = ((K, Dh), ("kv_heads", "head_dim"))
        attn["v"]["bias"] = ((K, Dh), ("kv_heads", "head_dim"))
    if cfg.family == "gpt2":
        attn["o"]["bias"] = ((D,), ("embed",))
    out["attn"] = attn
    if cfg.family != "gptj":
        out["mlp_norm"] = norm()
    mlp = {
        "up": {"kernel": ((D, F), ("embed", "mlp"))},
        "down": {"kernel": ((F, D), ("mlp", "embed"))},
    }
    if cfg.family == "llama":
        mlp["gate"] = {"kernel": ((D, F), ("embed", "mlp"))}
    else:
        mlp["up"]["bias"] = ((F,), ("mlp",))
        mlp["down"]["bias"] = ((D,), ("embed",))
    out["mlp"] = mlp
    return out


def _spec(cfg: ModelConfig) -> Dict[str, Any]:
    """Full tree of (shape, logical_axes) leaves."""
    D, V = cfg.d_model, cfg.vocab_size
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
    layers = jax.tree_util.tree_map(
        lambda s: ((cfg.n_layers,) + s[0], ("layers",) + s[1]),
        _layer_shapes(cfg),
        is_leaf=is_leaf,
    )
    spec: Dict[str, Any] = {"embed": {"embedding": ((V, D), ("vocab", "embed"))}}
    if cfg.family == "gpt2":
        spec["pos_embed"] = {"embedding": ((cfg.max_seq_len, D), ("positions", "embed"))}
    spec["layers"] = layers
    spec["final_norm"] = {"scale": ((D,), ("embed",))}
    if cfg.family in ("gpt2", "gptj"):
        spec["final_norm"]["bias"] = ((D,), ("embed",))
    if not cfg.tie_embeddings:
        spec["lm_head"] = {"kernel": ((D, V), ("embed", "vocab"))}
        if cfg.family == "gptj":
            spec["lm_head"]["bias"] = ((V,), ("vocab",))
    return spec


def _is_spec_leaf(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_shapes(cfg: ModelConfig) -> Params:
    """Tree of ``jax.ShapeDtypeStruct`` for the parameters (no allocation)."""
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s[0], cfg.params_dtype), _spec(cfg), is_leaf=_is_spec_leaf
    )


def param_axes(cfg: ModelConfig) -> Params:
    """Tree of logical axis-name tuples, one per parameter leaf."""
    return jax.tree_util.tree_map(lambda s: s[1], _spec(cfg), is_leaf=_is_spec_leaf)


def init_params(cfg: ModelConfig, rng: jax.Array, std: float = 0.02,
                out_shardings: Any = None) -> Params:
    """Random parameters: N(0, std) kernels/embeddings, unit norm scales, zero biases.

    One jitted program draws every leaf (eagerly, each distinct leaf shape would compile a
    program of its own). ``out_shardings`` (a tree of shardings like the params): each
    device draws only its shards, so none holds the whole model; the values are those of
    the unsharded draw (JAX's partitionable threefry)."""
    spec = _spec(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)

    def draw(rng: jax.Array) -> Params:
        keys = jax.random.split(rng, len(leaves))
        out = []
        for (path, (shape, _)), key in zip(leaves, keys):
            name = jax.tree_util.keystr(path)
            if "scale" in name:
                x = jnp.ones(shape, cfg.params_dtype)
            elif "bias" in name:
                x = jnp.zeros(shape, cfg.params_dtype)
            else:
                x = (std * jax.random.normal(key, shape, jnp.float32)).astype(cfg.params_dtype)
            out.append(x)
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(draw, out_shardings=out_shardings)(rng)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------
def _norm(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if cfg.family == "llama":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        return (p["scale"].astype(jnp.float32) * y).astype(x.dtype)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + cfg.norm_eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unsupported activation {name!r}")


def _w(p: Params, name: str, dtype: Any) -> jax.Array:
    return p[name].astype(dtype)


def _feature_major_product(wt: jax.Array, x: jax.Array, n_in: int,
                           out_shape: Tuple[int, ...]) -> jax.Array:
    """``x``'s last ``n_in`` axes times the [out, in] matrix ``wt`` -> ``[..., *out_shape]``,
    as ``(W @ x.T).T`` with the product kept apart from the transpose
    (``optimization_barrier``): XLA:CPU's kernel for a few rows times a weight runs faster in
    that form (``docs/performance.md``); fused with the transpose, it picks the slower one."""
    wt = wt.astype(x.dtype)
    lead = x.shape[: x.ndim - n_in]
    y = jax.lax.optimization_barrier(wt @ x.reshape(-1, wt.shape[1]).T)
    return y.T.reshape(lead + tuple(out_shape))


def _project(p: Params, x: jax.Array, n_in: int, out_shape: Tuple[int, ...], eq: str) -> jax.Array:
    """``x``'s last ``n_in`` axes times the projection ``p`` -> ``[..., *out_shape]``:
    ``p["kernel"]`` with the einsum ``eq``, or a feature-major kernel (``p[FM_KERNEL]``,
    [out, in], from :func:`decode_layout` on CPU) with :func:`_feature_major_product`."""
    if FM_KERNEL in p:
        return _feature_major_product(p[FM_KERNEL], x, n_in, out_shape)
    return jnp.einsum(eq, x, _w(p, "kernel", x.dtype))


def _rope_llama(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF Llama rotary (rotate_half). x: [B, T, N, Dh], positions: [B, T]."""
    dh = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : dh // 2], xf[..., dh // 2 :]
    rot = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


def _rope_gptj(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """GPT-J rotary: interleaved pairs on the first ``rotary_dim`` dims of each head."""
    rd = rotary_dim
    inv = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, rd/2]
    cos = jnp.repeat(jnp.cos(ang), 2, axis=-1)[:, :, None, :]
    sin = jnp.repeat(jnp.sin(ang), 2, axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    xr, xp = xf[..., :rd], xf[..., rd:]
    even, odd = xr[..., 0::2], xr[..., 1::2]
    rot = jnp.stack([-odd, even], axis=-1).reshape(xr.shape)
    xr = xr * cos + rot * sin
    return jnp.concatenate([xr, xp], -1).astype(x.dtype)


def _rope(cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    if cfg.family == "llama":
        return _rope_llama(x, positions, cfg.rope_theta)
    if cfg.family == "gptj":
        return _rope_gptj(x, positions, cfg.rotary_dim, cfg.rope_theta)
    return x


# Unmerged LoRA path (used when adapter dropout is on): (tree, scale, rate, rng) per layer.
_LORA_IDS = {"q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "up": 5, "down": 6}


def _lora_delta(lora, group: str, name: str, x: jax.Array, n_in: int) -> Optional[jax.Array]:
    """``scale * dropout(x) @ a @ b`` for adapter ``group/name/kernel`` (None if absent);
    ``x``'s last ``n_in`` axes are the kernel's input features. Output [..., n_out].
    ``lora`` is ``(tree, scale, rate, rng)``; ``rng`` None means no dropout."""
    if lora is None:
        return None
    tree, scale, rate, rng = lora
    ad = tree.get(group, {}).get(name, {}).get("kernel")
    if ad is None:
        return None
    dt = x.dtype
    xin = x.reshape(x.shape[: x.ndim - n_in] + (-1,))
    if rng is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, _LORA_IDS[name]), 1.0 - rate,
                                    xin.shape)
        xin = jnp.where(keep, xin / (1.0 - rate), 0.0)
    xin = xin.astype(dt)
    scale = jax.lax.stop_gradient(jnp.asarray(scale, dt))  # a constant, as in merge_kernel
    return (xin @ ad["a"].astype(dt)) @ ad["b"].astype(dt) * scale


@flax.struct.dataclass
class CopyBlockMask:
    """Attention mask of a packed sequence ``[main | C copies of Sc tokens]`` in which every
    copy attends to the context keys (the keys before the copies: a shared prompt's, then the
    main part's) and, causally, to itself only: the one-pass suffix layout of
    :func:`gfn_jax.scoring.suffix_layout`. :func:`apply` and :func:`continuation_forward` take
    it wherever they take a dense mask; the attention then scores the blocks that can be
    non-zero, O(C·Sc·(Kc + Sc)) instead of O((M + C·Sc)²) dense scores.

    ``main``: bool [B, M, Kc], the M main queries over the Kc context keys (Kc = shared-prompt
    keys + M); ``copy_ctx``: bool [B, C, Kc], copy c's queries over the context keys (the same
    for each of its Sc positions); ``copy_own``: bool [B, Sc, Sc], query j of any copy over
    key i of the same copy."""

    main: jax.Array
    copy_ctx: jax.Array
    copy_own: jax.Array

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The shape of the equivalent dense mask, [B, queries, keys]."""
        B, M, Kc = self.main.shape
        n = self.copy_ctx.shape[1] * self.copy_own.shape[1]
        return (B, M + n, Kc + n)

    def drop_main_queries(self, n: int) -> "CopyBlockMask":
        """The mask without the first ``n`` main queries (their keys stay context keys): the
        rows a continuation forward computes when those queries are a shared prompt."""
        return self.replace(main=self.main[:, n:])

    def dense(self) -> jax.Array:
        """The equivalent dense bool mask [B, M + C·Sc, Kc + C·Sc] (for tests and references)."""
        B, M, Kc = self.main.shape
        C, Sc = self.copy_ctx.shape[1], self.copy_own.shape[1]
        n = C * Sc
        top = jnp.concatenate([self.main, jnp.zeros((B, M, n), bool)], axis=2)
        ctx = jnp.repeat(self.copy_ctx, Sc, axis=1)  # [B, n, Kc]
        same = jnp.repeat(jnp.eye(C, dtype=bool), Sc, axis=0)  # [n, C]: query's copy
        own = (same[None, :, :, None]
               & jnp.tile(self.copy_own, (1, C, 1))[:, :, None, :])  # [B, n, C, Sc]
        return jnp.concatenate([top, jnp.concatenate([ctx, own.reshape(B, n, n)], axis=2)],
                               axis=1)


def _copy_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: CopyBlockMask,
                          n_kv: int) -> jax.Array:
    """Attention under a :class:`CopyBlockMask`: every query against the context keys in one
    batched product per kv head, each copy's queries against its own Sc keys elementwise, one
    softmax over both. ``q`` [B, T, H, Dh], ``k``/``v`` [B, Kc + C·Sc, K, Dh] -> [B, T, H, Dh];
    equals the dense attention under ``mask.dense()`` wherever a query has a visible key."""
    B, T, H, Dh = q.shape
    K, G = n_kv, H // n_kv
    _, M, Kc = mask.main.shape
    C, Sc = mask.copy_ctx.shape[1], mask.copy_own.shape[1]
    if T != M + C * Sc or k.shape[1] != Kc + C * Sc:
        raise ValueError(f"a CopyBlockMask of shape {mask.shape} does not fit {T} queries "
                         f"and {k.shape[1]} keys")
    dt = q.dtype
    scale = 1.0 / math.sqrt(Dh)
    qh = q.reshape(B, T, K, G, Dh).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, Dh]
    kc, vc = (a[:, :Kc].transpose(0, 2, 1, 3) for a in (k, v))  # [B, K, Kc, Dh]
    s_ctx = jnp.einsum("bkmd,bksd->bkms", qh.reshape(B, K, T * G, Dh), kc,
                       preferred_element_type=jnp.float32).reshape(B, K, T, G, Kc) * scale
    ctx_mask = jnp.concatenate([mask.main, jnp.repeat(mask.copy_ctx, Sc, axis=1)], axis=1)
    s_ctx = jnp.where(ctx_mask[:, None, :, None, :], s_ctx, NEG_INF)
    # each copy's own keys: [B, K, C, Sc(query j), G, Sc(key i)], a small elementwise product
    qo = qh[:, :, M:].reshape(B, K, C, Sc, G, Dh)
    ko, vo = (a[:, Kc:].reshape(B, C, Sc, K, Dh).transpose(0, 3, 1, 2, 4) for a in (k, v))
    f32 = jnp.float32
    s_own = jnp.sum(qo.astype(f32)[:, :, :, :, :, None, :] * ko.astype(f32)[:, :, :, None, None],
                    axis=-1) * scale
    s_own = jnp.where(mask.copy_own[:, None, None, :, None, :], s_own, NEG_INF)
    s_own = s_own.reshape(B, K, C * Sc, G, Sc)
    s_own = jnp.concatenate([jnp.full((B, K, M, G, Sc), NEG_INF, s_own.dtype), s_own], axis=2)
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_own], axis=-1), axis=-1).astype(dt)
    p_ctx = probs[..., :Kc].reshape(B, K, T * G, Kc)
    out = jnp.einsum("bkms,bksd->bkmd", p_ctx, vc).reshape(B, K, T, G, Dh)
    p_own = probs[:, :, M:, :, Kc:].reshape(B, K, C, Sc, G, Sc)
    o_own = jnp.sum(p_own.astype(f32)[..., None] * vo.astype(f32)[:, :, :, None, None],
                    axis=-2).astype(dt)
    out = out + jnp.concatenate(
        [jnp.zeros((B, K, M, G, Dh), out.dtype), o_own.reshape(B, K, C * Sc, G, Dh)], axis=2)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


def _attention(
    cfg: ModelConfig,
    p: Params,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    kv: Optional[Tuple[jax.Array, jax.Array]],
    index: Optional[jax.Array],
    lora: Any = None,
    prefix: Optional[Tuple[jax.Array, jax.Array]] = None,
    collect: bool = False,
) -> Tuple[jax.Array, Optional[Tuple[jax.Array, jax.Array]]]:
    """Self-attention. With a cache ``kv`` the new keys/values are written at ``index`` and
    the whole cache is attended; with ``prefix`` ([B, Tp, K, Dh] keys/values of a shared
    prompt) the keys are ``[prefix | own]``; ``collect`` returns the own (rotated) k/v."""
    dt = x.dtype
    H, Kh, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = _project(p["q"], x, 1, (H, Dh), "btd,dhk->bthk")
    k = _project(p["k"], x, 1, (Kh, Dh), "btd,dhk->bthk")
    v = _project(p["v"], x, 1, (Kh, Dh), "btd,dhk->bthk")
    dq, dk, dv = (_lora_delta(lora, "attn", nm, x, 1) for nm in ("q", "k", "v"))
    q = q if dq is None else q + dq.reshape(q.shape)
    k = k if dk is None else k + dk.reshape(k.shape)
    v = v if dv is None else v + dv.reshape(v.shape)
    if "bias" in p["q"]:
        q = q + p["q"]["bias"].astype(dt)
        k = k + p["k"]["bias"].astype(dt)
        v = v + p["v"]["bias"].astype(dt)
    q = checkpoint_name(q, "q_proj")
    k = checkpoint_name(k, "k_proj")
    v = checkpoint_name(v, "v_proj")
    q = _rope(cfg, q, positions)
    k = _rope(cfg, k, positions)
    new_kv = None
    if kv is not None and len(kv) == 3:
        # the stacked [L, B, S, K, Dh] cache carried through the layer scan: write this
        # layer's new keys/values in place, then read the layer back
        ck, cv, layer = kv
        zero = jnp.zeros((), jnp.int32)
        at = (layer.astype(jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], at)
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], at)
        new_kv = (ck, cv)
        k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(dt)
        v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(dt)
    elif kv is not None:
        ck, cv = kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        new_kv = (ck, cv)
        k, v = ck.astype(dt), cv.astype(dt)
    elif collect:
        new_kv = (k, v)
    if prefix is not None:
        k = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
        v = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
    B, T, H, Dh = q.shape
    K = cfg.n_kv_heads
    G = H // K
    if isinstance(mask, CopyBlockMask):
        if kv is not None or collect:
            raise ValueError("a CopyBlockMask is for scoring passes (no cache, no collected k/v)")
        out = _copy_block_attention(q, k, v, mask, K)
    else:
        q = q.reshape(B, T, K, G, Dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(Dh)
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, Dh)
    out = checkpoint_name(out, "attn_out")
    d_o = _lora_delta(lora, "attn", "o", out, 2)
    out = _project(p["o"], out, 2, (cfg.d_model,), "bthk,hkd->btd")
    if d_o is not None:
        out = out + d_o
    if "bias" in p["o"]:
        out = out + p["o"]["bias"].astype(dt)
    return out, new_kv


def _mlp(cfg: ModelConfig, p: Params, x: jax.Array, lora: Any = None) -> jax.Array:
    dt = x.dtype

    def plus(y, name, inp):
        d = _lora_delta(lora, "mlp", name, inp, 1)
        return y if d is None else y + d

    F, D = cfg.d_ff, cfg.d_model
    up = plus(_project(p["up"], x, 1, (F,), "...d,df->...f"), "up", x)
    if "bias" in p["up"]:
        up = up + p["up"]["bias"].astype(dt)
    if "gate" in p:
        h = _act(cfg.activation, plus(_project(p["gate"], x, 1, (F,), "...d,df->...f"), "gate", x)) * up
    else:
        h = _act(cfg.activation, up)
    h = checkpoint_name(h, "mlp_hidden")
    out = plus(_project(p["down"], h, 1, (D,), "...f,fd->...d"), "down", h)
    if "bias" in p["down"]:
        out = out + p["down"]["bias"].astype(dt)
    return out


def _block(cfg, p, x, positions, mask, kv, index, lora=None, prefix=None, collect=False):
    h = _norm(cfg, p["attn_norm"], x)
    a, new_kv = _attention(cfg, p["attn"], h, positions, mask, kv, index, lora, prefix, collect)
    if cfg.family == "gptj":
        return x + a + _mlp(cfg, p["mlp"], h, lora), new_kv
    x = x + a
    return x + _mlp(cfg, p["mlp"], _norm(cfg, p["mlp_norm"], x), lora), new_kv


# ---------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
    """Static-shape cache. ``k``/``v``: [L, B, S, K, Dh], or in the decode layout (see
    :func:`decode_layout`) tuples of L arrays [B, S, K, Dh]; ``valid``: [B, S] key mask;
    ``index``: next slot to write (shared by all rows); ``next_pos``: [B] next position id."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def per_layer(self) -> bool:
        """True in the decode layout (one k/v array per layer)."""
        return isinstance(self.k, (tuple, list))

    def map_rows(self, fn) -> "KVCache":
        """Apply ``fn(array, axis)`` to every per-row array (k/v on their batch axis, ``valid``
        and ``next_pos`` on axis 0), in either layout: repeat or gather rows."""
        kv_axis = 0 if self.per_layer else 1
        k = jax.tree.map(lambda a: fn(a, kv_axis), self.k)
        v = jax.tree.map(lambda a: fn(a, kv_axis), self.v)
        return self.replace(k=k, v=v, valid=fn(self.valid, 0), next_pos=fn(self.next_pos, 0))


def _unstack(tree: Any, n: int) -> Tuple[Any, ...]:
    return tuple(jax.tree.map(lambda a: a[i], tree) for i in range(n))


_FM_PROJECTIONS = (("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1), ("attn", "o", 2),
                   ("mlp", "up", 1), ("mlp", "gate", 1), ("mlp", "down", 1))


def _feature_major_layer(lp: Params) -> Params:
    """One layer's projection kernels as [out, in] matrices (:data:`FM_KERNEL`)."""
    lp = dict(lp)
    for group, name, n_in in _FM_PROJECTIONS:
        if group not in lp or name not in lp[group] or "kernel" not in lp[group][name]:
            continue
        w = lp[group][name]["kernel"]
        k_in = math.prod(w.shape[:n_in])
        sub = {k: v for k, v in lp[group][name].items() if k != "kernel"}
        sub[FM_KERNEL] = w.reshape(k_in, -1).T
        lp[group] = dict(lp[group], **{name: sub})
    return lp


#: Key (an empty sub-tree) that :func:`decode_layout` adds to params stored feature-major.
FM_MARK = "decode_feature_major"

#: Most rows for which :func:`decode_layout` stores the projections feature-major by default.
FEATURE_MAJOR_MAX_ROWS = 64
#: Fewest decode steps for which it does: the transposed copy is made once per call (about
#: 130 ms for SmolLM2-135M on the 2-core CPU) and each 16-row step saves 14-28 ms, so a
#: 5-step sampler was ~6% slower with it and a 20-step one 11-18% faster.
FEATURE_MAJOR_MIN_STEPS = 10


_TARGET_BACKEND = threading.local()


def target_backend() -> str:
    """The platform the programs traced now are for: ``jax.default_backend()``, or the one
    :func:`for_backend` names (a plan compiled for devices this process does not run on,
    e.g. a TPU slice planned on a CPU host)."""
    return getattr(_TARGET_BACKEND, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def for_backend(platform: Optional[str]) -> Iterator[None]:
    """Trace for ``platform`` (``"cpu" | "gpu" | "tpu"``; None: no change) inside the block:
    the choices made by backend (:func:`default_feature_major`) follow it. The choice is not
    part of JAX's trace cache: a process that traced the same function and shapes for another
    platform before reuses that trace."""
    prev = getattr(_TARGET_BACKEND, "platform", None)
    _TARGET_BACKEND.platform = platform or prev
    try:
        yield
    finally:
        _TARGET_BACKEND.platform = prev


def default_feature_major(rows: int, steps: Optional[int] = None) -> bool:
    """Whether :func:`decode_layout` stores the projections feature-major by default: on a
    CPU backend, for at most :data:`FEATURE_MAJOR_MAX_ROWS` rows and (when the number of
    decode steps is known) at least :data:`FEATURE_MAJOR_MIN_STEPS` steps
    (``GFN_JAX_DECODE_FEATURE_MAJOR=0/1`` overrides). ``steps=None``: the transposed copy is
    not made per call (weights from :func:`decode_weights`), so the loop's length does not
    matter."""
    env = os.environ.get("GFN_JAX_DECODE_FEATURE_MAJOR")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return (target_backend() == "cpu" and rows <= FEATURE_MAJOR_MAX_ROWS
            and (steps is None or steps >= FEATURE_MAJOR_MIN_STEPS))


def decode_weights(params: Params, feature_major: bool = True) -> Params:
    """The weight half of :func:`decode_layout`: ``params`` with ``"layers"`` split into a
    tuple of L layer dicts and, with ``feature_major``, every layer projection stored as an
    [out, in] matrix (a transposed copy) plus the :data:`FM_MARK` key. Made once outside a
    sampler (``gfn_jax.sampling.DecodeWeights``) it spares each call the copy."""
    if isinstance(params["layers"], (tuple, list)):
        raise ValueError("params are already in the decode layout")
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    params = dict(params, layers=_unstack(params["layers"], n))
    if feature_major:
        params["layers"] = tuple(_feature_major_layer(lp) for lp in params["layers"])
        params[FM_MARK] = {}  # no leaves: tells unembed to use a tied head feature-major
    return params


def decode_layout(
    params: Params, cache: KVCache, adapters: Optional[Params] = None,
    feature_major: Optional[bool] = None, steps: Optional[int] = None,
    laid_out: Optional[Params] = None,
    layers: str = "unrolled",
) -> Tuple[Params, KVCache, Optional[Params]]:
    """Params, cache and adapters with every per-layer stack split into one array per layer.

    ``layers="scanned"`` (``ModelConfig.decode_layers``) returns them unchanged: the decode
    loop then runs the layers under ``lax.scan`` over the stacked weights and writes the
    stacked cache in place, with no copy of the weights (the split below is one, held
    through the loop: as many bytes again as the layer weights).

    ``params["layers"]`` (and the adapters' ``"layers"`` tree) become tuples of L layer
    dicts and the cache's k/v tuples of L arrays; :func:`apply` / :func:`decode_step` then
    run the layers unrolled instead of under ``lax.scan``. Call it once before a decode
    loop (inside the same jitted program): a scanned decode step slices every layer's weights
    out of the stacks at each step; unrolled, each weight is read in place and each layer's
    cache is updated in place. On CPU the unrolled loop is the faster one (SmolLM2-135M, 16
    rows x 20 steps: 1.41-1.45 s against 1.70 s scanned, ``docs/performance.md``). Results
    are identical to the stacked layout.

    ``feature_major`` (default :func:`default_feature_major`: on CPU, for at most
    :data:`FEATURE_MAJOR_MAX_ROWS` rows and, given the loop's ``steps``, at least
    :data:`FEATURE_MAJOR_MIN_STEPS` of them) also stores every layer projection as an [out, in]
    matrix (:data:`~gfn_jax.models.adapters.FM_KERNEL`, a transposed copy made here) and
    runs it, and a tied vocabulary projection, as ``(W @ x.T).T``: XLA:CPU multiplies a few
    rows by a weight faster in that form (a 16-row SmolLM2-135M decode step 79.5 -> 51.0 ms,
    ``docs/performance.md``). The results then differ from the stacked layout by rounding
    only. ``laid_out``: ``decode_weights(params)`` made beforehand; used instead of a fresh
    copy when the layout is feature-major (the default rule then ignores ``steps``)."""
    if layers == "scanned":
        return params, cache, adapters
    if layers != "unrolled":
        raise ValueError(f"layers must be 'unrolled' or 'scanned', got {layers!r}")
    if feature_major is None:
        feature_major = default_feature_major(cache.valid.shape[0],
                                              None if laid_out is not None else steps)
    if feature_major and laid_out is not None:
        if FM_MARK not in laid_out:
            raise ValueError("laid_out must come from decode_weights(params, feature_major=True)")
        params = laid_out
    else:
        params = decode_weights(params, feature_major)
    n = len(params["layers"])
    if not cache.per_layer:
        cache = cache.replace(k=_unstack(cache.k, n), v=_unstack(cache.v, n))
    a = as_adapters(adapters)
    if a is not None and "layers" in a.tree:
        adapters = a.replace(tree=dict(a.tree, layers=_unstack(a.tree["layers"], n)))
    return params, cache, adapters


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_len`` slots per row."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


# ---------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------
def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t may attend key s iff s <= t and key s is a real token."""
    T = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def _embed(cfg: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array):
    dt = cfg.compute_dtype
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(dt)
    if cfg.family == "gpt2":
        x = x + jnp.take(params["pos_embed"]["embedding"], positions, axis=0).astype(dt)
    return x


def head_params(cfg: ModelConfig, params: Params) -> Params:
    """The sub-tree :func:`unembed` reads (the tied embedding or ``lm_head``), so a chunked
    vocabulary projection can take exactly these weights as an argument."""
    if cfg.tie_embeddings:
        return {"embed": {"embedding": params["embed"]["embedding"]}}
    return {"lm_head": params["lm_head"]}


def unembed(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
    dt = hidden.dtype
    if cfg.tie_embeddings and FM_MARK in params:  # the embedding [V, D] is [out, in] already
        logits = _feature_major_product(params["embed"]["embedding"], hidden, 1,
                                        (cfg.vocab_size,))
    elif cfg.tie_embeddings:
        logits = hidden @ params["embed"]["embedding"].astype(dt).T
    else:
        logits = hidden @ params["lm_head"]["kernel"].astype(dt)
        if "bias" in params["lm_head"]:
            logits = logits + params["lm_head"]["bias"].astype(dt)
    return logits.astype(jnp.float32)


def apply(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: Optional[KVCache] = None,
    *,
    return_hidden: bool = False,
    compute_logits: bool = True,
    adapters: Optional[Params] = None,
):
    """General forward.

    Args:
      tokens: int [B, T].
      positions: int [B, T] position ids.
      mask: bool [B, T, S]; S = T without a cache, the cache length with one. With a
        cache, ``tokens`` are written at slots ``cache.index .. cache.index + T``.
      cache: optional :class:`KVCache` (returned updated, ``index`` advanced by T).
      return_hidden: also return the final-normed hidden states [B, T, D].
      compute_logits: set False to skip the vocabulary projection (returns None logits).
      adapters: optional LoRA adapters ``{"scale": s, "tree": {...}}`` (see
        :mod:`gfn_jax.models.lora`); per-layer adapters are merged inside the layer scan
        so only one layer's merged weights exist at a time. None = base model. With
        ``"dropout_rng"`` (a PRNG key) and ``"dropout_rate"`` entries, per-layer adapters
        stay unmerged and dropout is applied to their input (training mode).

    Returns ``(logits, cache)`` or ``(logits, cache, hidden)``; logits are float32.
    """
    kv_xs = None if cache is None else (cache.k, cache.v)
    index = None if cache is None else cache.index
    hidden, new_kv, params = _layers(cfg, params, tokens, positions, mask, adapters,
                                     cache_kv=kv_xs, index=index)
    logits = unembed(cfg, params, hidden) if compute_logits else None
    new_cache = None
    if cache is not None:
        T = tokens.shape[1]
        new_cache = cache.replace(k=new_kv[0], v=new_kv[1], index=cache.index + T)
    if return_hidden:
        return logits, new_cache, hidden
    return logits, new_cache


def split_adapters_for_tokens(tree: Params, n_tokens: int) -> Tuple[Params, Params]:
    """Split a layer's adapter tree into (kernels to merge, kernels to keep unmerged) for a
    call over ``n_tokens`` tokens, whichever form costs fewer FLOPs per kernel.

    Merging ``W + s·A·B`` costs ``n_in·r·n_out`` multiply-adds (and writes a whole kernel);
    the unmerged ``x·W + s·(x·A)·B`` costs ``n_tokens·r·(n_in + n_out)``. A decode step
    (a few tokens) keeps every adapter unmerged; a training forward merges them."""
    merged: Dict[str, Any] = {}
    unmerged: Dict[str, Any] = {}
    for group, sub in tree.items():
        for name, leaf in sub.items():
            ad = leaf.get("kernel") if isinstance(leaf, dict) else None
            if ad is None or set(ad) != {"a", "b"}:
                merged.setdefault(group, {})[name] = leaf
                continue
            n_in = math.prod(ad["a"].shape[:-1])
            n_out = math.prod(ad["b"].shape[1:])
            dest = unmerged if n_tokens * (n_in + n_out) < n_in * n_out else merged
            dest.setdefault(group, {})[name] = leaf
    return merged, unmerged


def _layers(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    adapters: Optional[Params],
    *,
    cache_kv: Optional[Tuple[jax.Array, jax.Array]] = None,
    index: Optional[jax.Array] = None,
    prefix_kv: Optional[Tuple[jax.Array, jax.Array]] = None,
    collect_kv: bool = False,
    act_axes: Sequence[Optional[str]] = ACTIVATION_AXES,
) -> Tuple[jax.Array, Any, Params]:
    """Embedding, the layer scan and the final norm shared by every forward.

    ``cache_kv``: per-layer cache buffers written at ``index``; ``prefix_kv``: per-layer
    keys/values [L, G, Tp, K, Dh] of G shared prompts, row b using prompt b // (B / G);
    ``collect_kv``: also return each layer's own k/v; ``act_axes``: logical names of the
    block-boundary activations. Returns (final-normed hidden [B, T, D], per-layer k/v or
    None, params with the top-level adapters merged)."""
    layer_adapters = None
    layer_rngs = None
    scale = rate = None
    adapters = as_adapters(adapters)
    if adapters is not None:
        scale = adapters.scale
        top = {k: v for k, v in adapters.tree.items() if k != "layers"}
        params = merge_tree(params, top, scale)
        layer_adapters = adapters.tree.get("layers")
        if adapters.dropout_rng is not None and layer_adapters is not None:
            # adapter dropout: keep the adapter path unmerged, x@W + s*drop(x)@A@B
            rate = adapters.dropout_rate
            layer_rngs = jax.random.split(adapters.dropout_rng, cfg.n_layers)
    x = constrain(_embed(cfg, params, tokens, positions), act_axes)
    layers = params["layers"]
    reps = 0 if prefix_kv is None else tokens.shape[0] // prefix_kv[0].shape[1]
    n_tokens = tokens.shape[0] * tokens.shape[1]

    def body(carry, xs):
        h = carry
        lp, la, kv, pkv, lrng = xs
        lora = None
        if la is not None and lrng is None:
            merged, unmerged = split_adapters_for_tokens(la, n_tokens)
            lp = merge_tree(lp, merged, scale)
            if unmerged:
                lora = (unmerged, scale, 0.0, None)
        elif la is not None:
            lora = (la, scale, rate, lrng)
        if pkv is not None:  # each shared prompt's k/v, once per row of its group
            pkv = tuple(constrain(jnp.repeat(a, reps, axis=0), KV_AXES) for a in pkv)
        h, new_kv = _block(cfg, lp, h, positions, mask, kv, index, lora, pkv, collect_kv)
        return constrain(h, act_axes), new_kv

    policy_name = cfg.effective_remat_policy
    if policy_name != "none":
        body = jax.checkpoint(body, policy=remat_policy(policy_name), prevent_cse=False)
    if not isinstance(layers, (tuple, list)) and cache_kv is None:
        x, new_kv = jax.lax.scan(body, x, (layers, layer_adapters, None, prefix_kv, layer_rngs))
    elif not isinstance(layers, (tuple, list)):
        # the stacked cache rides in the carry and each layer writes only its new slots into
        # it (in place), rather than the scan rebuilding the whole cache as its output
        def cached(carry, xs):
            h, ck, cv = carry
            lp, la, layer, pkv, lrng = xs
            h, (ck, cv) = body(h, (lp, la, (ck, cv, layer), pkv, lrng))
            return (h, ck, cv), None

        n = jax.tree.leaves(layers)[0].shape[0]
        (x, ck, cv), _ = jax.lax.scan(cached, (x,) + tuple(cache_kv), (
            layers, layer_adapters, jnp.arange(n, dtype=jnp.int32), prefix_kv, layer_rngs))
        new_kv = (ck, cv)
    else:  # the decode layout (decode_layout): one weight array per layer, unrolled
        if layer_adapters is not None and not isinstance(layer_adapters, (tuple, list)):
            layer_adapters = _unstack(layer_adapters, len(layers))
        per_layer_cache = cache_kv is not None and isinstance(cache_kv[0], (tuple, list))
        outs = []
        for i, lp in enumerate(layers):
            x, out = body(x, (
                lp,
                None if layer_adapters is None else layer_adapters[i],
                None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i]),
                None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i]),
                None if layer_rngs is None else layer_rngs[i],
            ))
            outs.append(out)
        new_kv = None
        if outs and outs[0] is not None:
            ks, vs = tuple(o[0] for o in outs), tuple(o[1] for o in outs)
            new_kv = (ks, vs) if per_layer_cache else (jnp.stack(ks), jnp.stack(vs))
    hidden = constrain(_norm(cfg, params["final_norm"], x), act_axes)
    return hidden, new_kv, params


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    attention_mask: Optional[jax.Array] = None,
    *,
    return_hidden: bool = False,
    adapters: Optional[Params] = None,
):
    """Logits [B, T, V] (float32) for a (left-)padded batch.

    ``attention_mask`` is 1 for real tokens and 0 for padding; positions restart at 0 on
    each row's first real token, so a left-padded row gives the same logits as unpadded.
    With ``return_hidden`` returns ``(logits, hidden)``.
    """
    tokens = jnp.asarray(tokens)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    check_length(cfg, tokens.shape[-1])
    positions = positions_from_mask(attention_mask)
    mask = causal_mask(attention_mask)
    out = apply(
        cfg, params, tokens, positions, mask, None, return_hidden=return_hidden, adapters=adapters
    )
    if return_hidden:
        return out[0], out[2]
    return out[0]


def check_length(cfg: ModelConfig, length: int) -> None:
    """Raise a clear error when a sequence does not fit the model's context."""
    if length > cfg.max_seq_len:
        raise ValueError(
            f"sequence of {length} tokens is longer than the model's context "
            f"(max_seq_len={cfg.max_seq_len})"
        )


def prefill(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    max_len: int,
    cache_dtype: Any = None,
    adapters: Optional[Params] = None,
    last_only: bool = False,
) -> Tuple[jax.Array, KVCache]:
    """Run the (left-padded) prompt through the model, filling a fresh cache of
    ``max_len`` slots. Returns (logits [B, P, V], cache), or logits [B, V] of the last
    prompt position only with ``last_only`` (what a sampler needs; saves B*P*V floats)."""
    B, P = tokens.shape
    check_length(cfg, P)
    check_length(cfg, max_len)
    if P > max_len:
        raise ValueError(f"prompt of {P} tokens does not fit a cache of max_len={max_len} slots")
    cache = init_cache(cfg, B, max_len, cache_dtype)
    am = attention_mask.astype(bool)
    valid = cache.valid.at[:, :P].set(am)
    positions = positions_from_mask(attention_mask)
    causal = jnp.arange(max_len)[None, :] <= jnp.arange(P)[:, None]  # [P, S]
    mask = causal[None] & valid[:, None, :]
    cache = cache.replace(valid=valid)
    if last_only:
        _, cache, hidden = apply(cfg, params, tokens, positions, mask, cache, adapters=adapters,
                                 return_hidden=True, compute_logits=False)
        logits = unembed(cfg, params if adapters is None else _merged_top(params, adapters),
                         hidden[:, -1])
    else:
        logits, cache = apply(cfg, params, tokens, positions, mask, cache, adapters=adapters)
    return logits, cache.replace(next_pos=jnp.sum(am, axis=-1).astype(jnp.int32))


def _merged_top(params: Params, adapters: Params) -> Params:
    """Params with the top-level (non-layer) adapters merged, as ``apply`` does."""
    if adapters is None:
        return params
    a = as_adapters(adapters)
    top = {k: v for k, v in a.tree.items() if k != "layers"}
    return merge_tree(params, top, a.scale)


def decode_step(
    cfg: ModelConfig,
    params: Params,
    cache: KVCache,
    token: jax.Array,
    adapters: Optional[Params] = None,
) -> Tuple[jax.Array, KVCache]:
    """Append one token per row ([B]) and return (logits [B, V], cache)."""
    idx = cache.index
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, jnp.ones((cache.valid.shape[0], 1), bool), idx, axis=1
    )
    positions = cache.next_pos[:, None]
    mask = valid[:, None, :]
    cache = cache.replace(valid=valid)
    logits, cache = apply(cfg, params, token[:, None], positions, mask, cache, adapters=adapters)
    return logits[:, 0], cache.replace(next_pos=cache.next_pos + 1)


# ---------------------------------------------------------------------------
# Shared prompts: one forward per distinct prompt, continuations against its keys/values
# ---------------------------------------------------------------------------
@flax.struct.dataclass
class PromptKV:
    """Keys/values of G (left-padded) prompts for :func:`continuation_forward`.

    ``k``/``v``: [L, G, Tp, K, Dh] every layer's keys (after rotary) and values, in the
    compute dtype; ``valid``: bool [G, Tp] real prompt tokens; ``next_pos``: int32 [G] the
    position id of the first continuation token; ``last_hidden``: [G, D] the final-normed
    hidden state at the last prompt slot (it predicts the first continuation token)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_pos: jax.Array
    last_hidden: jax.Array

    @property
    def num_prompts(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[2]


def prompt_forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    adapters: Optional[Params] = None,
) -> PromptKV:
    """Run G left-padded prompts ``tokens [G, Tp]`` once and keep every layer's keys/values.

    Pure and differentiable: gradients reach ``params`` / ``adapters`` through the returned
    keys, values and last hidden state. Positions come from the mask, as in :func:`forward`.
    """
    G, Tp = tokens.shape
    check_length(cfg, Tp)
    am = attention_mask.astype(bool)
    hidden, kv, _ = _layers(cfg, params, tokens, positions_from_mask(am), causal_mask(am),
                            adapters, collect_kv=True, act_axes=PROMPT_AXES)
    k, v = (constrain(a, ("layers",) + KV_AXES) for a in kv)
    return PromptKV(k=k, v=v, valid=am, next_pos=jnp.sum(am, axis=-1).astype(jnp.int32),
                    last_hidden=constrain(hidden[:, -1], ("batch", None)))


def continuation_mask(prompt_mask: jax.Array, token_mask: jax.Array) -> jax.Array:
    """[B, T, Tp + T] mask of :func:`continuation_forward`: every real prompt key (``prompt_mask``
    [B, Tp], each row's own prompt's mask), then causal over the row's real tokens
    (``token_mask`` [B, T])."""
    B, T = token_mask.shape
    pm = jnp.broadcast_to(prompt_mask.astype(bool)[:, None, :], (B, T, prompt_mask.shape[1]))
    return jnp.concatenate([pm, causal_mask(token_mask)], axis=-1)


def continuation_forward(
    cfg: ModelConfig,
    params: Params,
    prompt: PromptKV,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    *,
    adapters: Optional[Params] = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] of ``tokens [B, T]`` continuing shared prompts.

    Rows are prompt-major: B = G * R and row b continues prompt ``b // R`` of ``prompt``
    (:func:`prompt_forward`), whose keys/values are broadcast to its R rows inside each
    layer (so the gradient of a prompt is the sum over its rows). ``positions [B, T]``
    (usually ``prompt.next_pos`` onwards); ``mask [B, T, Tp + T]`` over keys
    ``[prompt | own tokens]`` (:func:`continuation_mask`, or any block mask such as the
    packed suffix layout). Equals :func:`apply` over ``[prompt | tokens]`` at the last T
    positions, computing the prompt once instead of R times.
    """
    B, T = tokens.shape
    G, Tp = prompt.num_prompts, prompt.length
    if G < 1 or B % G:
        raise ValueError(f"{B} continuation rows do not split into groups of the {G} prompts")
    if mask.shape != (B, T, Tp + T):
        raise ValueError(f"mask must be [B={B}, T={T}, Tp+T={Tp + T}], got {mask.shape}")
    # no check_length(Tp + T) here: a packed layout (the suffix scorer's [Z | Y copies]) has
    # more columns than positions; callers check the largest position they build
    hidden, _, _ = _layers(cfg, params, tokens, positions, mask, adapters,
                           prefix_kv=(prompt.k, prompt.v))
    return hidden
