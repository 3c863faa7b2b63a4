"""One-pass scoring of trajectories: policy log-probs and all-prefix reward terms.

Batch layout (same as :class:`gfn_jax.sampling.SampleOutput`): prompts ``X`` left-padded
``prompt_tokens [B, P]`` / ``prompt_mask [B, P]``; trajectories right-padded ``tokens [B, T]``
with ``lengths [B]``. Prefix ``i`` (0..n) is ``X z_0 .. z_{i-1}``; its next-token distribution
is read at sequence position ``P - 1 + i`` of the concatenation ``[X | Z]``.

Each public function is ONE jitted forward pass (no Python loops over rows or prefixes).

Shared prompts: when the rows come in consecutive groups of K with the same prompt (the train
step's ``samples_per_prompt`` samples of each prompt, prompt-major; see :func:`prompt_groups`
and the ``group_size`` arguments), each group's prompt runs once
(:func:`gfn_jax.models.transformer.prompt_forward`) and its K continuations attend to its
keys/values (:func:`~gfn_jax.models.transformer.continuation_forward`): the same scores, the
prompt's cost paid once per group. Under a differentiated caller the prompt's gradient is the
sum over its K rows.

The vocabulary log-softmax runs in chunks of positions (``ModelConfig.logits_chunk``; see
:func:`gfn_jax.logprobs.chunked_position_logprobs`): with a large vocabulary the float32
``[B, N, V]`` logits never exist at once, in the forward or the backward pass. When one chunk
covers every position the plain (unchunked) computation runs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.logprobs import (
    PolicySpec,
    check_bias,
    check_spec,
    chunked_position_logprobs,
    gather_logprobs,
    logits_chunk_size,
    masked_cumsum,
    policy_logprobs,
    state_mask,
    term_logprob,
    token_mask,
)
from gfn_jax.models.adapters import as_adapters
from gfn_jax.models.config import AUTO_LOGITS_CHUNK_BYTES, ModelConfig
from gfn_jax.models.transformer import (
    CopyBlockMask,
    _merged_top,
    activation_sharding,
    apply,
    causal_mask,
    check_length,
    constrain,
    continuation_forward,
    continuation_mask,
    current_activation_sharding,
    head_params,
    positions_from_mask,
    prompt_forward,
    unembed,
)

__all__ = [
    "PolicyScores",
    "RewardScores",
    "prompt_groups",
    "current_prompt_groups",
    "score_policy",
    "score_reward_prefixes",
    "score_suffix_prefixes",
    "suffix_block_mask",
    "suffix_layout",
]


@flax.struct.dataclass
class PolicyScores:
    """``log_pf [B, T]``, ``log_pterm [B, T+1]`` (as in SampleOutput), ``prompt_hidden [B, D]``
    (float32 final-normed hidden state at the prompt's last token)."""

    log_pf: jax.Array
    log_pterm: jax.Array
    prompt_hidden: jax.Array


@flax.struct.dataclass
class RewardScores:
    """``log_pz [B, T+1]`` = log p(z_<i | X) (cumulative, 0 at i = 0) and ``log_pterm [B, T+1]``
    = log p(⊤ | X z_<i), for prefixes i = 0..n; 0 beyond n. ``log_pz + log_pterm`` is
    log p(z_<i ⊤ | X) for every prefix at once."""

    log_pz: jax.Array
    log_pterm: jax.Array


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _sharding_scope(shard: Optional[Tuple[Any, Any]]):
    """Re-enter the caller's activation-sharding context inside a jitted body (``shard`` is
    a static argument, so it is part of the jit cache key)."""
    return activation_sharding(*shard) if shard is not None else contextlib.nullcontext()


def _chunk(cfg: ModelConfig, batch: int, positions: int) -> int:
    """Positions per vocabulary chunk for ``positions`` scored positions of ``batch`` rows."""
    return logits_chunk_size(cfg.logits_chunk, batch, positions, cfg.vocab_size,
                             AUTO_LOGITS_CHUNK_BYTES)


def _logits_fn(cfg: ModelConfig):
    return lambda head, h: unembed(cfg, head, h)


def _check_batch(
    cfg: ModelConfig, prompt_tokens: Any, prompt_mask: Any, tokens: Any, lengths: Any
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask)
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f"prompt_tokens and prompt_mask must both be [B, P]; got {prompt_tokens.shape} "
            f"and {prompt_mask.shape}"
        )
    B, P = prompt_tokens.shape
    if P < 1:
        raise ValueError("prompts must have at least one token (P >= 1)")
    if tokens.ndim != 2 or tokens.shape[0] != B:
        raise ValueError(f"tokens must be [B={B}, T], got {tokens.shape}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B={B}], got {lengths.shape}")
    check_length(cfg, P + tokens.shape[1])
    return prompt_tokens, prompt_mask.astype(bool), tokens, lengths


def _prefix_hidden(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    adapters: Optional[Any],
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Forward over ``[X | Z]``. Returns (hidden [B, P+T, D], am [B, P+T], safe tokens [B, T])."""
    T = tokens.shape[1]
    zmask = token_mask(lengths, T)
    tokens = jnp.where(zmask, tokens, 0)  # pads may be any id (even negative)
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1)
    am = jnp.concatenate([prompt_mask, zmask], axis=1)
    _, _, hidden = apply(
        cfg,
        params,
        seq,
        positions_from_mask(am),
        causal_mask(am),
        None,
        return_hidden=True,
        compute_logits=False,
        adapters=adapters,
    )
    return hidden, am, tokens


# ---------------------------------------------------------------------------
# Shared prompts
# ---------------------------------------------------------------------------
_GROUPS = threading.local()


@contextlib.contextmanager
def prompt_groups(group_size: int) -> Iterator[None]:
    """Within this context (at trace time) the scorers take their rows to come in consecutive
    groups of ``group_size`` rows with the same prompt (tokens and mask), e.g. the
    ``samples_per_prompt`` samples of each prompt in prompt-major order, and run each group's
    prompt once when ``ModelConfig.share_prompt`` is on. A batch whose size is not a multiple
    of ``group_size`` is scored row by row. The train step enters it from
    ``TrainBatch.group_size``. Rows of a group with different prompts make the scores NaN
    (so the step's non-finite guard skips the update) rather than silently wrong."""
    if int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    stack = getattr(_GROUPS, "stack", None)
    if stack is None:
        stack = _GROUPS.stack = []
    stack.append(int(group_size))
    try:
        yield
    finally:
        stack.pop()


def current_prompt_groups() -> int:
    """The active :func:`prompt_groups` size (1 outside one)."""
    stack = getattr(_GROUPS, "stack", None)
    return stack[-1] if stack else 1


def _batch_shards(size: int) -> int:
    """Devices a dimension of ``size`` rows is split over under the active activation
    sharding (the ``batch`` rule, dropping mesh axes that do not divide it); 1 without one."""
    ctx = current_activation_sharding()
    if ctx is None:
        return 1
    mesh, rules = ctx
    spec = parallel.logical_to_pspec(("batch",), rules, mesh, (size,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _num_groups(cfg: ModelConfig, batch: int, tokens: int, group_size: Optional[int]) -> int:
    """How many shared prompts G to run (0 = the row-by-row path) for ``batch`` rows.

    ``group_size`` None follows ``cfg.share_prompt`` and :func:`prompt_groups`. Under a mesh,
    prompts the batch axes cannot split are computed on every device; sharing is skipped
    when that makes more prompts per device than there are rows per device."""
    if group_size is None:
        group_size = current_prompt_groups() if cfg.share_prompt else 1
    K = int(group_size)
    if K <= 1 or batch % K or tokens < 1:
        return 0
    G = batch // K
    if G * _batch_shards(batch) > batch * _batch_shards(G):
        return 0
    return G


def _check_group_size(group_size: Optional[int], prompt_tokens: jax.Array,
                      prompt_mask: jax.Array) -> Optional[int]:
    """Validate an explicit ``group_size``; with concrete arrays, check the grouping too."""
    if group_size is None:
        return None
    K = int(group_size)
    B = prompt_tokens.shape[0]
    if K < 1 or B % K:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch of {B} rows")
    if K == 1 or any(isinstance(x, jax.core.Tracer) for x in (prompt_tokens, prompt_mask)):
        return K
    if not all(getattr(x, "is_fully_addressable", True) for x in (prompt_tokens, prompt_mask)):
        return K
    m = np.asarray(prompt_mask).astype(bool).reshape(B // K, K, -1)
    t = np.where(m, np.asarray(prompt_tokens).reshape(B // K, K, -1), 0)
    if not ((m == m[:, :1]).all() and (t == t[:, :1]).all()):
        raise ValueError(f"group_size={K}: the rows of a group of {K} consecutive rows do not "
                         "all have the same prompt (tokens and mask)")
    return K


def _group_heads(prompt_tokens: jax.Array, prompt_mask: jax.Array,
                 groups: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [G, P], mask [G, P]) of each group's first row and a scalar bool: every row of
    each group has that prompt."""
    B, P = prompt_tokens.shape
    m = prompt_mask.reshape(groups, B // groups, P)
    t = prompt_tokens.reshape(groups, B // groups, P)
    tm = jnp.where(m, t, 0)
    ok = jnp.all(m == m[:, :1]) & jnp.all(tm == tm[:, :1])
    return t[:, 0], m[:, 0], ok


def _poison(ok: Optional[jax.Array], tree: Any) -> Any:
    """``tree`` where the grouping held, NaN everywhere otherwise."""
    if ok is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.where(ok, x, jnp.nan), tree)


def _prompt_dropout(adapters: Optional[Any]) -> Optional[Any]:
    """The adapters for a shared prompt: with LoRA dropout, a key of its own (the prompt's
    masks, shared by the rows of its group, independent of the continuations' masks)."""
    ad = as_adapters(adapters)
    if ad is None or ad.dropout_rng is None:
        return adapters
    return ad.replace(dropout_rng=jax.random.fold_in(ad.dropout_rng, 0x5EED))


def _shared_prefix_hidden(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    groups: int,
    adapters: Optional[Any],
    positions: jax.Array,
    mask: jax.Array,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Each group's prompt once, then ``tokens [B, Tc]`` against it (``positions [B, Tc]``,
    ``mask [B, Tc, P + Tc]``). Returns (hidden [B, 1 + Tc, D] at sequence positions
    P-1 .. P-1+Tc of ``[X | tokens]``, i.e. the prompt's last slot then the continuation;
    the prompt's last hidden state [B, D]; the grouping check)."""
    B = tokens.shape[0]
    heads, head_mask, ok = _group_heads(prompt_tokens, prompt_mask, groups)
    # The forward reads ``ok`` (a failed check poisons every output anyway): the check's
    # collective then runs before the layer scans on every device. Left independent of
    # them, XLA:CPU's runtime may start it inside the scans on some devices only, and a
    # sharded step on several CPU devices deadlocks (docs/reliability.md).
    heads = jnp.where(ok, heads, 0)
    prompt = prompt_forward(cfg, params, heads, head_mask, adapters=_prompt_dropout(adapters))
    cont = continuation_forward(cfg, params, prompt, tokens, positions, mask, adapters=adapters)
    last = constrain(jnp.repeat(prompt.last_hidden, B // groups, axis=0), ("batch", None))
    return jnp.concatenate([last[:, None].astype(cont.dtype), cont], axis=1), last, ok


def _prefix_states(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    adapters: Optional[Any],
    groups: int,
) -> Tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
    """Hidden states of prefixes 0..T [B, T+1, D], the prompt's last hidden state [B, D],
    the safe tokens [B, T] and the grouping check (None on the row-by-row path)."""
    P = prompt_tokens.shape[1]
    if not groups:
        hidden, _, tokens = _prefix_hidden(
            cfg, params, prompt_tokens, prompt_mask, tokens, lengths, adapters)
        return hidden[:, P - 1:], hidden[:, P - 1], tokens, None
    T = tokens.shape[1]
    zmask = token_mask(lengths, T)
    tokens = jnp.where(zmask, tokens, 0)
    positions = positions_from_mask(jnp.concatenate([prompt_mask, zmask], axis=1))[:, P:]
    hid, last, ok = _shared_prefix_hidden(
        cfg, params, prompt_tokens, prompt_mask, tokens, groups, adapters, positions,
        continuation_mask(prompt_mask, zmask))
    return hid, last, tokens, ok


# ---------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "spec", "shard", "groups"))
def _score_policy_jit(
    params, prompt_tokens, prompt_mask, tokens, lengths, logit_bias, adapters, action_mask, *,
    cfg, spec, shard=None, groups=0,
) -> PolicyScores:
    with _sharding_scope(shard):
        return _score_policy_body(params, prompt_tokens, prompt_mask, tokens, lengths,
                                  logit_bias, adapters, action_mask, cfg, spec, groups)


def _score_policy_body(params, prompt_tokens, prompt_mask, tokens, lengths, logit_bias,
                       adapters, action_mask, cfg, spec, groups=0) -> PolicyScores:
    B, P = prompt_tokens.shape
    T = tokens.shape[1]
    # hid [B, T+1, D]: prefixes 0..T; groups > 0: each group's prompt computed once
    hid, prompt_hidden, tokens, ok = _prefix_states(
        cfg, params, prompt_tokens, prompt_mask, tokens, lengths, adapters, groups)
    top = _merged_top(params, adapters)  # adapters on the head/embedding, as apply uses
    chunk = _chunk(cfg, B, T + 1)
    tmask = token_mask(lengths, T)
    if action_mask is not None:
        tmask = tmask & action_mask.astype(bool)
    if chunk >= T + 1:
        logits = unembed(cfg, top, hid)  # [B, T+1, V]
        lp_tok, lp_term = policy_logprobs(logits, jnp.arange(T + 1)[None, :], spec, logit_bias)
        tok_lp = gather_logprobs(lp_tok[:, :T], tokens)
    else:
        targets = jnp.concatenate([tokens, jnp.zeros((B, 1), tokens.dtype)], axis=1)
        tok_lp, lp_term = chunked_position_logprobs(
            _logits_fn(cfg), head_params(cfg, top), hid, targets, chunk,
            prefix_len=jnp.arange(T + 1), spec=spec, logit_bias=logit_bias,
            constrain_fn=constrain)
        tok_lp = tok_lp[:, :T]
    log_pf = jnp.where(tmask, tok_lp, 0.0)
    log_pterm = jnp.where(state_mask(lengths, T), lp_term, 0.0)
    return _poison(ok, PolicyScores(
        log_pf=log_pf, log_pterm=log_pterm, prompt_hidden=prompt_hidden.astype(jnp.float32)))


def score_policy(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    spec: PolicySpec,
    *,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    action_mask: Optional[jax.Array] = None,
    group_size: Optional[int] = None,
) -> PolicyScores:
    """Per-step log q(z_t | X z_<t) and log q(⊤ | X z_<i) of the constrained policy, one pass.

    ``log_pf`` is 0 after each row's end and where ``action_mask`` is False (tool-spliced
    tokens); ``log_pterm`` is 0 beyond n. Matches :func:`gfn_jax.sampling.sample`'s outputs.
    ``group_size`` K: rows come in consecutive groups of K with the same prompt, each prompt
    is run once (None: :func:`prompt_groups` and ``cfg.share_prompt`` decide; 1: per row).
    """
    prompt_tokens, prompt_mask, tokens, lengths = _check_batch(
        cfg, prompt_tokens, prompt_mask, tokens, lengths
    )
    group_size = _check_group_size(group_size, prompt_tokens, prompt_mask)
    check_spec(spec, cfg.vocab_size)
    logit_bias = check_bias("logit_bias", logit_bias, cfg.vocab_size)
    if action_mask is not None:
        action_mask = jnp.asarray(action_mask, bool)
        if action_mask.shape != tokens.shape:
            raise ValueError(f"action_mask must be {tokens.shape}, got {action_mask.shape}")
    return _score_policy_jit(
        params, prompt_tokens, prompt_mask, tokens, lengths, logit_bias, adapters, action_mask,
        cfg=cfg, spec=spec, shard=current_activation_sharding(),
        groups=_num_groups(cfg, tokens.shape[0], tokens.shape[1], group_size),
    )


# ---------------------------------------------------------------------------
# Reward: every prefix terminated
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "term_ids", "shard", "groups"))
def _score_reward_jit(
    params, prompt_tokens, prompt_mask, tokens, lengths, adapters, logit_bias, *, cfg, term_ids,
    shard=None, groups=0,
) -> RewardScores:
    with _sharding_scope(shard):
        return _score_reward_body(params, prompt_tokens, prompt_mask, tokens, lengths, adapters,
                                  logit_bias, cfg, term_ids, groups)


def _score_reward_body(params, prompt_tokens, prompt_mask, tokens, lengths, adapters,
                       logit_bias, cfg, term_ids, groups=0) -> RewardScores:
    B, P = prompt_tokens.shape
    T = tokens.shape[1]
    hid, _, tokens, ok = _prefix_states(  # [B, T+1, D]
        cfg, params, prompt_tokens, prompt_mask, tokens, lengths, adapters, groups)
    top = _merged_top(params, adapters)
    chunk = _chunk(cfg, B, T + 1)
    if chunk >= T + 1:
        logits = unembed(cfg, top, hid)  # [B, T+1, V]
        if logit_bias is not None:
            logits = logits + logit_bias
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok_lp = gather_logprobs(logp[:, :T], tokens)
        lp_term = term_logprob(logp, term_ids)
    else:
        targets = jnp.concatenate([tokens, jnp.zeros((B, 1), tokens.dtype)], axis=1)
        tok_lp, lp_term = chunked_position_logprobs(
            _logits_fn(cfg), head_params(cfg, top), hid, targets, chunk, term_ids=term_ids,
            logit_bias=logit_bias, constrain_fn=constrain)
        tok_lp = tok_lp[:, :T]
    cum = masked_cumsum(tok_lp, token_mask(lengths, T), axis=-1)
    log_pz = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum], axis=1)
    smask = state_mask(lengths, T)
    return _poison(ok, RewardScores(
        log_pz=jnp.where(smask, log_pz, 0.0),
        log_pterm=jnp.where(smask, lp_term, 0.0),
    ))


def _term_tuple(cfg: ModelConfig, term_ids: Sequence[int]) -> Tuple[int, ...]:
    ids = tuple(int(t) for t in (term_ids if not isinstance(term_ids, int) else (term_ids,)))
    if not ids:
        raise ValueError("term_ids must name at least one termination token id")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"termination ids {bad} are outside the vocabulary (size {cfg.vocab_size})")
    return ids


def score_reward_prefixes(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    term_ids: Sequence[int],
    *,
    adapters: Optional[Any] = None,
    logit_bias: Optional[jax.Array] = None,
    group_size: Optional[int] = None,
) -> RewardScores:
    """Unconstrained model log p(z_<i | X) and log p(⊤ | X z_<i) for all prefixes, one pass.

    With ``logit_bias [V]`` the model is the penalised, renormalised LM
    ``p~(v | s) = softmax(logits(s) + logit_bias)[v]`` (e.g. a task's reward penalty).
    ``group_size``: as in :func:`score_policy` (each group's prompt run once)."""
    prompt_tokens, prompt_mask, tokens, lengths = _check_batch(
        cfg, prompt_tokens, prompt_mask, tokens, lengths
    )
    group_size = _check_group_size(group_size, prompt_tokens, prompt_mask)
    logit_bias = check_bias("logit_bias", logit_bias, cfg.vocab_size)
    return _score_reward_jit(
        params, prompt_tokens, prompt_mask, tokens, lengths, adapters, logit_bias,
        cfg=cfg, term_ids=_term_tuple(cfg, term_ids), shard=current_activation_sharding(),
        groups=_num_groups(cfg, tokens.shape[0], tokens.shape[1], group_size),
    )


# ---------------------------------------------------------------------------
# Reward: every prefix followed by a fixed suffix Y
# ---------------------------------------------------------------------------
def suffix_layout(
    prompt_mask: jax.Array, lengths: jax.Array, suffix_mask: jax.Array, T: int
) -> Tuple[jax.Array, jax.Array, np.ndarray]:
    """Positions [B, L], attention mask [B, L, L] and predictor indices [T+1, S] of the
    one-pass layout ``[X | Z | Y'_0 | ... | Y'_T]``.

    ``Y'_c`` holds the suffix inputs ``y_0 .. y_{S-2}`` (the last suffix token is never an
    input). Copy c attends to the real prompt tokens, to ``z_k`` for ``k < min(c, n)`` and
    causally to its own real tokens; its positions continue from ``|X| + c``. The logits for
    ``y_j`` of copy c are read at ``idx[c, j]``: the last token of prefix c for ``j = 0``,
    copy c's input ``y_{j-1}`` otherwise.
    """
    B, P = prompt_mask.shape
    S = suffix_mask.shape[1]
    C, Sc = T + 1, S - 1
    Lm = P + T
    L = Lm + C * Sc
    pm = prompt_mask.astype(bool)
    zmask = token_mask(lengths, T)
    am = jnp.concatenate([pm, zmask], axis=1)  # [B, Lm]

    # Static per-position attributes.
    seg = np.concatenate([np.full(Lm, -1), np.repeat(np.arange(C), Sc)])  # copy id, -1 = main
    within = np.concatenate([np.arange(Lm), np.tile(np.arange(Sc), C)])
    is_main = seg < 0
    zk = np.where((np.arange(L) >= P) & is_main, np.arange(L) - P, -1)  # Z index of key, or -1
    q_seg, k_seg = seg[:, None], seg[None, :]
    main_main = is_main[:, None] & is_main[None, :] & (np.arange(L)[None, :] <= np.arange(L)[:, None])
    copy_prompt = (~is_main)[:, None] & (np.arange(L) < P)[None, :]
    copy_z = (~is_main)[:, None] & (zk[None, :] >= 0) & (zk[None, :] < q_seg)
    copy_copy = (~is_main)[:, None] & (q_seg == k_seg) & (within[None, :] <= within[:, None])

    # Per-row key validity.
    pad_main = jnp.zeros((B, C * Sc), bool)
    key_main_valid = jnp.concatenate([am, pad_main], axis=1)  # [B, L]
    sfx_valid = jnp.tile(suffix_mask[:, :Sc].astype(bool), (1, C)) if Sc > 0 else pad_main
    key_copy_valid = jnp.concatenate([jnp.zeros((B, Lm), bool), sfx_valid], axis=1)
    mask = (
        (jnp.asarray(main_main | copy_prompt | copy_z)[None] & key_main_valid[:, None, :])
        | (jnp.asarray(copy_copy)[None] & key_copy_valid[:, None, :])
    )

    plen = jnp.sum(pm, axis=1).astype(jnp.int32)  # [B]
    copy_pos = plen[:, None] + jnp.asarray(seg[Lm:] + within[Lm:], jnp.int32)[None, :]
    positions = jnp.concatenate([positions_from_mask(am), copy_pos], axis=1)

    idx = np.zeros((C, S), np.int32)
    idx[:, 0] = P - 1 + np.arange(C)
    if Sc > 0:
        idx[:, 1:] = Lm + np.arange(C)[:, None] * Sc + np.arange(Sc)[None, :]
    return positions, mask, idx


def suffix_block_mask(
    prompt_mask: jax.Array, lengths: jax.Array, suffix_mask: jax.Array, T: int
) -> CopyBlockMask:
    """:func:`suffix_layout`'s attention mask in block form (a
    :class:`~gfn_jax.models.transformer.CopyBlockMask`; ``.dense()`` equals the layout's
    mask): the main part ``[X | Z]`` causal over its real tokens; copy c over the real prompt
    tokens and ``z_k`` for ``k < c``; within a copy, causal over its real suffix tokens.
    Needs ``S >= 2`` (a copy of at least one token)."""
    B, P = prompt_mask.shape
    Sc = suffix_mask.shape[1] - 1
    if Sc < 1:
        raise ValueError("suffix_block_mask needs suffixes of at least 2 slots")
    C, Lm = T + 1, P + T
    am = jnp.concatenate([prompt_mask.astype(bool), token_mask(lengths, T)], axis=1)  # [B, Lm]
    pos = np.arange(Lm)
    main = jnp.asarray(pos[None, :] <= pos[:, None])[None] & am[:, None, :]
    # copy c sees the prompt and z_k for k < c
    sees = (pos[None, :] < P) | (pos[None, :] - P < np.arange(C)[:, None])  # [C, Lm]
    copy_ctx = jnp.asarray(sees)[None] & am[:, None, :]
    within = np.arange(Sc)
    own = (jnp.asarray(within[None, :] <= within[:, None])[None]
           & suffix_mask[:, None, :Sc].astype(bool))
    return CopyBlockMask(main=main, copy_ctx=copy_ctx, copy_own=own)


@functools.partial(jax.jit, static_argnames=("cfg", "shard", "groups"))
def _score_suffix_jit(
    params, prompt_tokens, prompt_mask, tokens, lengths, suffix_tokens, suffix_mask, adapters, *,
    cfg, shard=None, groups=0,
) -> jax.Array:
    with _sharding_scope(shard):
        return _score_suffix_body(params, prompt_tokens, prompt_mask, tokens, lengths,
                                  suffix_tokens, suffix_mask, adapters, cfg, groups)


def _score_suffix_body(params, prompt_tokens, prompt_mask, tokens, lengths, suffix_tokens,
                       suffix_mask, adapters, cfg, groups=0) -> jax.Array:
    B, P = prompt_tokens.shape
    T = tokens.shape[1]
    S = suffix_tokens.shape[1]
    C = T + 1
    smask = suffix_mask.astype(bool)
    suffix_tokens = jnp.where(smask, suffix_tokens, 0)
    tokens = jnp.where(token_mask(lengths, T), tokens, 0)
    positions, mask, idx = suffix_layout(prompt_mask, lengths, smask, T)
    if S > 1:  # the same mask in blocks: the copies' attention costs O(C·S·(P+T+S)), not O((C·S)²)
        mask = suffix_block_mask(prompt_mask, lengths, smask, T)
    cont = jnp.concatenate([tokens, jnp.tile(suffix_tokens[:, : S - 1], (1, C))], axis=1)
    ok = None
    if groups:  # X once per group; [Z | Y'_0 .. Y'_T] of every row against it
        rows = (mask.drop_main_queries(P) if isinstance(mask, CopyBlockMask)
                else mask[:, P:, :])
        hidden, _, ok = _shared_prefix_hidden(
            cfg, params, prompt_tokens, prompt_mask, cont, groups, adapters,
            positions[:, P:], rows)
        idx = idx - (P - 1)  # hidden starts at sequence position P - 1
    else:
        _, _, hidden = apply(
            cfg, params, jnp.concatenate([prompt_tokens, cont], axis=1), positions, mask, None,
            return_hidden=True, compute_logits=False, adapters=adapters,
        )
    top = _merged_top(params, adapters)
    targets = jnp.broadcast_to(suffix_tokens[:, None, :], (B, C, S))
    chunk = _chunk(cfg, B, C * S)
    if chunk >= C * S:
        logits = unembed(cfg, top, hidden[:, idx])  # [B, C, S, V]
        lp = gather_logprobs(jax.nn.log_softmax(logits, axis=-1), targets)
    else:
        hid = hidden[:, idx.reshape(-1)]  # [B, C*S, D]
        lp, _ = chunked_position_logprobs(
            _logits_fn(cfg), head_params(cfg, top), hid, targets.reshape(B, C * S), chunk,
            constrain_fn=constrain)
        lp = lp.reshape(B, C, S)
    total = jnp.sum(jnp.where(smask[:, None, :], lp, 0.0), axis=-1)  # [B, C]
    return _poison(ok, jnp.where(state_mask(lengths, T), total, 0.0))


def score_suffix_prefixes(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    tokens: jax.Array,
    lengths: jax.Array,
    suffix_tokens: jax.Array,
    suffix_mask: jax.Array,
    *,
    adapters: Optional[Any] = None,
    group_size: Optional[int] = None,
) -> jax.Array:
    """log p(Y | X z_<i) for every prefix i = 0..n, ``[B, T+1]`` (0 beyond n), in ONE pass.

    The sequence ``[X | Z | Y_0 | ... | Y_T]`` (about ``P + T + (T+1)(S-1)`` tokens) is run once
    with the block mask of :func:`suffix_layout`; ``Y`` is right-padded by ``suffix_mask``.
    ``group_size``: as in :func:`score_policy`; X then runs once per group and
    ``[Z | Y_0 | ... | Y_T]`` of each row against it (Y may differ between the rows).
    """
    prompt_tokens, prompt_mask, tokens, lengths = _check_batch(
        cfg, prompt_tokens, prompt_mask, tokens, lengths
    )
    group_size = _check_group_size(group_size, prompt_tokens, prompt_mask)
    suffix_tokens = jnp.asarray(suffix_tokens, jnp.int32)
    suffix_mask = jnp.asarray(suffix_mask)
    B = prompt_tokens.shape[0]
    if suffix_tokens.ndim != 2 or suffix_tokens.shape[0] != B or suffix_mask.shape != suffix_tokens.shape:
        raise ValueError(
            f"suffix_tokens and suffix_mask must both be [B={B}, S]; got {suffix_tokens.shape} "
            f"and {suffix_mask.shape}"
        )
    if suffix_tokens.shape[1] < 1:
        raise ValueError("the suffix must have at least one slot (S >= 1)")
    check_length(cfg, prompt_tokens.shape[1] + tokens.shape[1] + suffix_tokens.shape[1])
    return _score_suffix_jit(
        params, prompt_tokens, prompt_mask, tokens, lengths, suffix_tokens,
        suffix_mask.astype(bool), adapters, cfg=cfg, shard=current_activation_sharding(),
        groups=_num_groups(cfg, tokens.shape[0], tokens.shape[1] + suffix_tokens.shape[1] - 1,
                           group_size),
    )
