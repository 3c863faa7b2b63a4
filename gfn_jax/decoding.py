"""Decoding baselines on the constrained policy q(Z | X): beam search, diverse beam search,
greedy decoding, and pure / tempered / nucleus sampling.

Every decoder uses the same policy as :func:`gfn_jax.sampling.sample` and
:func:`gfn_jax.scoring.score_policy`: model logits (optionally with LoRA ``adapters``) plus an
optional ``logit_bias [V]``, constrained by a :class:`~gfn_jax.logprobs.PolicySpec`
(termination set ⊤, ``min_len``, ``max_len``). A result's ``scores`` are always the sequence
log-probability of ``Z⊤`` under the *untempered* policy,
``sum_t log q(z_t | X z_<t) + log q(⊤ | X Z)``, the quantity the scorer computes.

Beam search here (:func:`beam_search`, :func:`diverse_beam_search`) is one jitted
``lax.while_loop`` over at most ``spec.max_len`` steps with a static KV cache: the left-padded
prompts are prefilled once, the cache is repeated per beam and its rows are gathered by beam
parent at each step. Termination does not compete for beam slots: at every step each live beam
``X z_<t`` offers its terminated hypothesis ``z_<t ⊤`` to a finished pool (the ``num_return``
best per prompt, duplicates dropped), and the beams are the ``num_beams`` best *non-⊤*
extensions. At ``max_len`` termination is forced. The pool is ranked by
``score / (n + 1) ** length_penalty`` (``n`` tokens plus ⊤; ``length_penalty = 0`` ranks by the
log-probability itself). With ``num_beams >= num_return`` and at least the number of allowed
prefixes of every length below ``max_len``, every prefix is explored (prefixes of length
``max_len`` must terminate, so the best of them are the best such sequences) and the result is
the true ``num_return`` best sequences. The loop stops early once no live beam can still beat
the pool's worst entry (exact: log-probs only decrease as a prefix grows).

Tokens a bias pushes to or below :data:`~gfn_jax.logprobs.DISALLOWED` are never chosen (the same
rule as the sampler's behaviour policy).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from gfn_jax.logprobs import (
    DISALLOWED,
    PolicySpec,
    check_bias,
    check_prompts,
    check_spec,
    constrain_logits,
    policy_logprobs,
    term_id_mask,
)
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import (
    KVCache,
    check_length,
    decode_layout,
    decode_step,
    prefill,
)
from gfn_jax.sampling import DecodeWeights, SampleOutput, kept_weights, sample

__all__ = [
    "DecodeOutput",
    "beam_search",
    "diverse_beam_search",
    "greedy",
    "sample_pure",
    "sample_tempered",
    "sample_nucleus",
]

# Incremented each time a decoder is traced (tests use it to check nothing retraces).
_TRACES = {"beam": 0, "greedy": 0}


@flax.struct.dataclass
class DecodeOutput:
    """Decoded sequences, ``n`` per prompt.

    Attributes:
      tokens: int32 [B, n, T] generated tokens (⊤ excluded), ``pad_id`` after the end.
      lengths: int32 [B, n] number of generated tokens (0..T).
      scores: float32 [B, n] log q(Z⊤ | X) under the untempered policy. Beam searches sort
        each row best first (by the length-penalised rank) and mark empty slots (fewer than
        ``n`` distinct finished sequences exist) with ``-inf``, length 0 and pad tokens;
        samplers keep the sampling order.
      groups: int32 [B, n] diverse-beam group that found each sequence (0 for the other
        decoders, -1 for empty slots).
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    groups: jax.Array


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------
def _take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache restricted to (and reordered by) batch rows ``rows [N']``."""
    return cache.map_rows(lambda a, axis: jnp.take(a, rows, axis=axis))


def _allowed(logits: jax.Array, t: jax.Array, spec: PolicySpec, logit_bias) -> jax.Array:
    """Bool [..., V]: tokens the constrained policy may choose at prefix length ``t``."""
    return constrain_logits(logits, t, spec, logit_bias) > DISALLOWED


def _check_prompts(cfg: ModelConfig, prompt_tokens: Any, prompt_mask: Any, spec: PolicySpec):
    prompt_tokens, prompt_mask = check_prompts(prompt_tokens, prompt_mask)
    check_spec(spec, cfg.vocab_size)
    check_length(cfg, prompt_tokens.shape[1] + spec.max_len)
    return prompt_tokens, prompt_mask


# ---------------------------------------------------------------------------
# Beam search (plain = one group)
# ---------------------------------------------------------------------------
def _rank(scores: jax.Array, lengths: jax.Array, length_penalty: jax.Array) -> jax.Array:
    return scores / jnp.power((lengths + 1).astype(jnp.float32), length_penalty)


def _pool_add(pool, cand, length_penalty):
    """Merge candidate finished hypotheses into the pool (top-n by rank, no duplicates).

    ``pool`` / ``cand`` = (tokens [B, M, T], lengths [B, M], scores [B, M], groups [B, M]);
    invalid entries have score -inf.
    """
    p_tok, p_len, p_sc, p_grp = pool
    c_tok, c_len, c_sc, c_grp = cand
    n = p_sc.shape[1]
    C = c_sc.shape[1]

    def same(a_tok, a_len, b_tok, b_len):  # [B, A, T], [B, A] x [B, Bb, T] -> [B, A, Bb]
        eq = jnp.all(a_tok[:, :, None, :] == b_tok[:, None, :, :], axis=-1)
        return eq & (a_len[:, :, None] == b_len[:, None, :])

    c_ok = c_sc > -jnp.inf
    in_pool = jnp.any(same(c_tok, c_len, p_tok, p_len) & (p_sc > -jnp.inf)[:, None, :], axis=-1)
    earlier = jnp.tril(jnp.ones((C, C), bool), k=-1)  # [i, j]: j < i
    in_cand = jnp.any(same(c_tok, c_len, c_tok, c_len) & earlier[None] & c_ok[:, None, :], -1)
    c_sc = jnp.where(c_ok & ~in_pool & ~in_cand, c_sc, -jnp.inf)
    tok = jnp.concatenate([p_tok, c_tok], axis=1)
    ln = jnp.concatenate([p_len, c_len], axis=1)
    sc = jnp.concatenate([p_sc, c_sc], axis=1)
    grp = jnp.concatenate([p_grp, c_grp], axis=1)
    rank = jnp.where(sc > -jnp.inf, _rank(sc, ln, length_penalty), -jnp.inf)
    _, idx = jax.lax.top_k(rank, n)  # pool entries first: ties keep what is there
    take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
    return take(tok), take(ln), take(sc), take(grp)


@functools.partial(
    jax.jit, static_argnames=("cfg", "spec", "num_beams", "num_groups", "num_return")
)
def _beam_jit(
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    logit_bias: Optional[jax.Array],
    adapters: Optional[Any],
    length_penalty: jax.Array,
    diversity_strength: jax.Array,
    pad_id: jax.Array,
    laid_out: Optional[Any],
    *,
    cfg: ModelConfig,
    spec: PolicySpec,
    num_beams: int,
    num_groups: int,
    num_return: int,
) -> DecodeOutput:
    _TRACES["beam"] += 1
    B, P = prompt_tokens.shape
    T, K, G, n, V = spec.max_len, num_beams, num_groups, num_return, cfg.vocab_size
    Kg = K // G
    N = B * K
    logits_p, cache = prefill(cfg, params, prompt_tokens, prompt_mask, P + T, adapters=adapters,
                              last_only=True)
    cache = _take_rows(cache, jnp.repeat(jnp.arange(B), K))
    params, cache, adapters = decode_layout(params, cache, adapters, steps=T,  # per layer
                                            laid_out=laid_out, layers=cfg.decode_layers)
    logits = jnp.repeat(logits_p, K, axis=0)
    is_term = term_id_mask(V, spec.term_ids)
    neg = jnp.float32(-jnp.inf)
    beam_group = jnp.broadcast_to(jnp.repeat(jnp.arange(G, dtype=jnp.int32), Kg), (B, K))

    def finished(t, logits, tokens, true):
        """Terminated hypotheses ``z_<t ⊤`` of the live beams, as pool candidates."""
        _, lp_term = policy_logprobs(logits, t, spec, logit_bias)
        term_ok = jnp.any(_allowed(logits, t, spec, logit_bias) & is_term, axis=-1) | (t >= T)
        sc = jnp.where(term_ok.reshape(B, K), true + lp_term.reshape(B, K), neg)
        return tokens, jnp.full((B, K), t, jnp.int32), sc, beam_group

    def cond(c):
        t, _, _, _, true, _, pool = c
        worst = pool[2][:, -1]
        worst_rank = jnp.where(worst > -jnp.inf, _rank(worst, pool[1][:, -1], length_penalty),
                               neg)
        # No live beam can beat the pool's worst: future scores are <= the current one and
        # the rank's denominator is at most d_max over the reachable lengths t..T.
        d_max = jnp.maximum(
            jnp.power((t + 1).astype(jnp.float32), length_penalty),
            jnp.power(jnp.float32(T + 1), length_penalty),
        )
        bound = jnp.max(true, axis=1) / d_max
        return (t < T) & ~jnp.all(bound <= worst_rank)

    def body(c):
        t, logits, cache, tokens, true, search, pool = c
        pool = _pool_add(pool, finished(t, logits, tokens, true), length_penalty)
        lp_tok, _ = policy_logprobs(logits, t, spec, logit_bias)
        ok = _allowed(logits, t, spec, logit_bias) & ~is_term
        lp_tok = lp_tok.reshape(B, K, V)
        ok = ok.reshape(B, K, V)
        true_c = jnp.where(ok, true[:, :, None] + lp_tok, neg)  # dead beams stay -inf
        search_c = jnp.where(ok, search[:, :, None] + lp_tok, neg)
        counts = jnp.zeros((B, V), jnp.float32)  # tokens chosen by earlier groups at step t
        parents, toks, new_true, new_search = [], [], [], []
        for g in range(G):  # static unroll; G = 1 is plain beam search
            sl = slice(g * Kg, (g + 1) * Kg)
            s = search_c[:, sl] - diversity_strength * counts[:, None, :]
            s = jnp.where(true_c[:, sl] > -jnp.inf, s, neg).reshape(B, Kg * V)
            val, idx = jax.lax.top_k(s, Kg)
            live = val > -jnp.inf
            tv = jnp.take_along_axis(true_c[:, sl].reshape(B, Kg * V), idx, axis=1)
            tok = (idx % V).astype(jnp.int32)
            parents.append(g * Kg + idx // V)
            toks.append(tok)
            new_true.append(jnp.where(live, tv, neg))
            new_search.append(val)
            counts = counts + jnp.sum(jax.nn.one_hot(tok, V) * live[..., None], axis=1)
        parent = jnp.concatenate(parents, axis=1)
        tok = jnp.concatenate(toks, axis=1)
        true = jnp.concatenate(new_true, axis=1)
        search = jnp.concatenate(new_search, axis=1)
        live = true > -jnp.inf
        tokens = jnp.take_along_axis(tokens, parent[:, :, None], axis=1)
        tokens = tokens.at[:, :, t].set(jnp.where(live, tok, pad_id))
        rows = (jnp.arange(B)[:, None] * K + parent).reshape(N)
        cache = _take_rows(cache, rows)
        logits, cache = decode_step(cfg, params, cache, jnp.where(live, tok, pad_id).reshape(N),
                                    adapters=adapters)
        return t + 1, logits, cache, tokens, true, search, pool

    init_true = jnp.where(jnp.arange(K) % Kg == 0, 0.0, neg)  # one live beam per group
    init_true = jnp.broadcast_to(init_true, (B, K)).astype(jnp.float32)
    pool0 = (
        jnp.full((B, n, T), pad_id, jnp.int32),
        jnp.zeros((B, n), jnp.int32),
        jnp.full((B, n), neg),
        jnp.full((B, n), -1, jnp.int32),
    )
    init = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        jnp.full((B, K, T), pad_id, jnp.int32),
        init_true,
        init_true,
        pool0,
    )
    t, logits, _, tokens, true, _, pool = jax.lax.while_loop(cond, body, init)
    # The live beams' hypotheses at the final prefix length (forced ⊤ when t == max_len).
    tok, ln, sc, grp = _pool_add(pool, finished(t, logits, tokens, true), length_penalty)
    empty = ~(sc > -jnp.inf)
    return DecodeOutput(
        tokens=jnp.where(empty[..., None], pad_id, tok),
        lengths=jnp.where(empty, 0, ln),
        scores=sc,
        groups=jnp.where(empty, -1, grp),
    )


def _beam(cfg, params, prompt_tokens, prompt_mask, spec, *, num_beams, num_groups, num_return,
          logit_bias, adapters, length_penalty, diversity_strength, pad_id,
          decode_weights) -> DecodeOutput:
    prompt_tokens, prompt_mask = _check_prompts(cfg, prompt_tokens, prompt_mask, spec)
    num_beams, num_groups, num_return = int(num_beams), int(num_groups), int(num_return)
    if num_beams < 1 or num_return < 1 or num_groups < 1:
        raise ValueError(
            f"num_beams, num_groups and num_return must be >= 1; got {num_beams}, "
            f"{num_groups}, {num_return}"
        )
    if num_beams % num_groups:
        raise ValueError(f"num_beams={num_beams} is not divisible by num_groups={num_groups}")
    return _beam_jit(
        params,
        prompt_tokens,
        prompt_mask,
        check_bias("logit_bias", logit_bias, cfg.vocab_size),
        adapters,
        jnp.asarray(length_penalty, jnp.float32),
        jnp.asarray(diversity_strength, jnp.float32),
        jnp.asarray(pad_id, jnp.int32),
        kept_weights(decode_weights, params),
        cfg=cfg,
        spec=spec,
        num_beams=num_beams,
        num_groups=num_groups,
        num_return=num_return,
    )


def beam_search(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    num_beams: int,
    num_return: int,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    length_penalty: Any = 0.0,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """The ``num_return`` best finished sequences per prompt found by beam search.

    Args:
      prompt_tokens, prompt_mask: left-padded prompts ``[B, P]`` (mask 1 real, 0 pad).
      spec: termination ids and min/max length (``T = spec.max_len``).
      num_beams: live (unterminated) prefixes kept per prompt and step.
      num_return: size of the finished pool returned per prompt (sorted best first).
      logit_bias, adapters: part of the policy, as in :func:`gfn_jax.sampling.sample`.
      length_penalty: the pool ranks by ``score / (n + 1) ** length_penalty`` (traced).
      pad_id: token written after each sequence's end.
      decode_weights: ``params`` laid out for decoding beforehand, as in
        :func:`gfn_jax.sampling.sample` (kept across the calls of a loop over prompts).

    Returns a :class:`DecodeOutput` (``groups`` all 0). Exact when ``num_beams >= num_return``
    and ``num_beams`` is at least the number of allowed prefixes of each length below
    ``spec.max_len``. One jitted call keyed on cfg/spec/shapes/num_beams/num_return.
    """
    return _beam(cfg, params, prompt_tokens, prompt_mask, spec, num_beams=num_beams,
                 num_groups=1, num_return=num_return, logit_bias=logit_bias, adapters=adapters,
                 length_penalty=length_penalty, diversity_strength=0.0, pad_id=pad_id,
                 decode_weights=decode_weights)


def diverse_beam_search(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    num_beams: int,
    num_groups: int,
    num_return: int,
    diversity_strength: Any = 1.0,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    length_penalty: Any = 0.0,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """Diverse beam search (Vijayakumar et al., 2016) with a Hamming diversity penalty.

    The ``num_beams`` beams are split into ``num_groups`` groups of ``num_beams // num_groups``.
    At each step the groups extend their beams in order; group g selects its beams by its
    running search score plus ``log q(v)`` minus ``diversity_strength`` times the number of
    beams of groups ``< g`` that chose token ``v`` at this step (the penalty accumulates into
    the search score; termination is not penalised). All groups feed one finished pool,
    ranked by the *true* (length-penalised) log-probability; a sequence found by several
    groups is kept once, with the first group's id.

    Returns the ``num_return`` best overall per prompt; ``scores`` are true log q(Z⊤ | X) and
    ``groups`` the group ids. Other arguments as in :func:`beam_search`;
    ``diversity_strength`` is traced. With one group it is :func:`beam_search`.
    """
    return _beam(cfg, params, prompt_tokens, prompt_mask, spec, num_beams=num_beams,
                 num_groups=num_groups, num_return=num_return, logit_bias=logit_bias,
                 adapters=adapters, length_penalty=length_penalty,
                 diversity_strength=diversity_strength, pad_id=pad_id,
                 decode_weights=decode_weights)


# ---------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _greedy_jit(
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    logit_bias: Optional[jax.Array],
    adapters: Optional[Any],
    pad_id: jax.Array,
    laid_out: Optional[Any],
    *,
    cfg: ModelConfig,
    spec: PolicySpec,
) -> DecodeOutput:
    _TRACES["greedy"] += 1
    B, P = prompt_tokens.shape
    T = spec.max_len
    logits, cache = prefill(cfg, params, prompt_tokens, prompt_mask, P + T, adapters=adapters,
                            last_only=True)
    params, cache, adapters = decode_layout(params, cache, adapters, steps=T,  # per layer
                                            laid_out=laid_out, layers=cfg.decode_layers)
    is_term = term_id_mask(cfg.vocab_size, spec.term_ids)
    neg = jnp.float32(-jnp.inf)

    def step(t, logits):
        lp_tok, lp_term = policy_logprobs(logits, t, spec, logit_bias)
        allowed = _allowed(logits, t, spec, logit_bias)
        lp_tok = jnp.where(allowed & ~is_term, lp_tok, neg)
        term_ok = jnp.any(allowed & is_term, axis=-1) | (t >= T)
        tok = jnp.argmax(lp_tok, axis=-1).astype(jnp.int32)
        best = jnp.max(lp_tok, axis=-1)
        ends = term_ok & (jnp.where(term_ok, lp_term, neg) >= best)  # ⊤ wins ties
        return tok, best, ends, lp_term

    def cond(c):
        t, done = c[0], c[5]
        return (t < T) & ~jnp.all(done)

    def body(c):
        t, logits, cache, tokens, lengths, done, score = c
        tok, best, ends, lp_term = step(t, logits)
        ends = ~done & ends
        emits = ~done & ~ends
        score = score + jnp.where(ends, lp_term, 0.0) + jnp.where(emits, best, 0.0)
        tokens = tokens.at[:, t].set(jnp.where(emits, tok, pad_id))
        lengths = jnp.where(emits, t + 1, lengths)
        done = done | ends
        logits, cache = decode_step(cfg, params, cache, jnp.where(emits, tok, pad_id),
                                    adapters=adapters)
        return t + 1, logits, cache, tokens, lengths, done, score

    init = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        jnp.full((B, T), pad_id, jnp.int32),
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B,), bool),
        jnp.zeros((B,), jnp.float32),
    )
    t, logits, _, tokens, lengths, done, score = jax.lax.while_loop(cond, body, init)
    _, lp_term = policy_logprobs(logits, t, spec, logit_bias)  # forced ⊤ at max_len
    score = score + jnp.where(done, 0.0, lp_term)
    return DecodeOutput(
        tokens=tokens[:, None],
        lengths=lengths[:, None],
        scores=score[:, None],
        groups=jnp.zeros((B, 1), jnp.int32),
    )


def greedy(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """Greedy decoding: at each prefix take the most likely action of the constrained policy,
    where ⊤ is one action with probability q(⊤) (the sum over the termination ids; ⊤ wins a
    tie). Returns a :class:`DecodeOutput` with ``n = 1``; arguments as in
    :func:`beam_search`.
    """
    prompt_tokens, prompt_mask = _check_prompts(cfg, prompt_tokens, prompt_mask, spec)
    return _greedy_jit(
        params,
        prompt_tokens,
        prompt_mask,
        check_bias("logit_bias", logit_bias, cfg.vocab_size),
        adapters,
        jnp.asarray(pad_id, jnp.int32),
        kept_weights(decode_weights, params),
        cfg=cfg,
        spec=spec,
    )


# ---------------------------------------------------------------------------
# Sampling wrappers
# ---------------------------------------------------------------------------
def _from_samples(out: SampleOutput, batch: int) -> DecodeOutput:
    """[B * n] sampler rows -> [B, n] decode result with scores log q(Z⊤ | X)."""
    N, T = out.tokens.shape
    n = N // batch
    term = jnp.take_along_axis(out.log_pterm, out.lengths[:, None], axis=1)[:, 0]
    scores = jnp.sum(out.log_pf, axis=1) + term
    return DecodeOutput(
        tokens=out.tokens.reshape(batch, n, T),
        lengths=out.lengths.reshape(batch, n),
        scores=scores.reshape(batch, n),
        groups=jnp.zeros((batch, n), jnp.int32),
    )


def _sample(cfg, params, rng, prompt_tokens, prompt_mask, spec, num_samples, logit_bias,
            adapters, pad_id, decode_weights, **behaviour) -> DecodeOutput:
    out = sample(cfg, params, rng, prompt_tokens, prompt_mask, spec, num_samples=num_samples,
                 logit_bias=logit_bias, adapters=adapters, pad_id=pad_id,
                 decode_weights=decode_weights, **behaviour)
    return _from_samples(out, jnp.shape(prompt_tokens)[0])


def sample_pure(
    cfg: ModelConfig,
    params: Any,
    rng: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    num_samples: int = 1,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """``num_samples`` ancestral samples per prompt from the policy itself (sampling order)."""
    return _sample(cfg, params, rng, prompt_tokens, prompt_mask, spec, num_samples, logit_bias,
                   adapters, pad_id, decode_weights)


def sample_tempered(
    cfg: ModelConfig,
    params: Any,
    rng: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    temperature: Any,
    num_samples: int = 1,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """Samples from the policy's logits divided by ``temperature``; ``scores`` are log q
    under the untempered policy."""
    return _sample(cfg, params, rng, prompt_tokens, prompt_mask, spec, num_samples, logit_bias,
                   adapters, pad_id, decode_weights, temperature=temperature)


def sample_nucleus(
    cfg: ModelConfig,
    params: Any,
    rng: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    p: Any = 0.95,
    num_samples: int = 1,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> DecodeOutput:
    """Nucleus (top-p) samples: at each step the smallest set of most likely token ids whose
    probability reaches ``p`` (see :func:`gfn_jax.sampling.behaviour_logprobs`); ``scores``
    are log q under the unrestricted policy."""
    return _sample(cfg, params, rng, prompt_tokens, prompt_mask, spec, num_samples, logit_bias,
                   adapters, pad_id, decode_weights, top_p=p)
