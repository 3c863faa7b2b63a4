"""Shared log-probability maths for the policy q(Z | X) and the reward LM.

Pure, jit-friendly functions used by both :mod:`gfn_jax.sampling` and
:mod:`gfn_jax.scoring`, so the sampler and the scorer cannot drift apart.

Conventions
-----------
* A *prefix* of length ``i`` is the state ``X z_0 .. z_{i-1}``; its next-token logits come
  from the model position of its last token.
* Termination ``⊤`` is a *set* of token ids; ``log q(⊤ | s)`` is the logsumexp of their
  log-probs.
* The policy q is the model distribution plus an optional additive ``logit_bias [V]``,
  constrained by a :class:`PolicySpec`: at prefixes shorter than ``min_len`` every ⊤ id is
  disallowed; at the prefix of length ``max_len`` every non-⊤ id is disallowed.
* Disallowed entries are set (with ``jnp.where``) to the finite :data:`NEG_INF`, so rows never
  turn into NaN; ``-inf`` in a user bias is clamped to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

__all__ = [
    "NEG_INF",
    "DISALLOWED",
    "PolicySpec",
    "check_spec",
    "check_bias",
    "check_prompts",
    "term_id_mask",
    "constrain_logits",
    "policy_logprobs",
    "term_logprob",
    "gather_logprobs",
    "token_logprobs",
    "masked_cumsum",
    "token_mask",
    "state_mask",
    "logits_chunk_size",
    "chunked_position_logprobs",
]

NEG_INF = -1e30
"""Finite stand-in for -inf used for disallowed tokens."""

DISALLOWED = -1e8
"""Logits (after adding a bias) at or below this are treated as disallowed tokens."""


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Static description of the constrained policy (hashable; a valid jit static arg).

    Attributes:
      term_ids: token ids that terminate a trajectory (⊤); at least one.
      max_len: the prefix of this many generated tokens must terminate.
      min_len: prefixes shorter than this cannot terminate.
    """

    term_ids: Tuple[int, ...]
    max_len: int
    min_len: int = 0

    def __post_init__(self) -> None:
        ids = tuple(int(t) for t in self.term_ids)
        object.__setattr__(self, "term_ids", ids)
        if not ids:
            raise ValueError("PolicySpec.term_ids must name at least one termination token id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"PolicySpec.term_ids has duplicates: {ids}")
        if any(t < 0 for t in ids):
            raise ValueError(f"PolicySpec.term_ids must be non-negative token ids, got {ids}")
        if self.max_len < 0:
            raise ValueError(f"PolicySpec.max_len must be >= 0, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(
                f"PolicySpec.min_len must be in [0, max_len={self.max_len}], got {self.min_len}"
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a termination id does not fit the vocabulary."""
        bad = [t for t in self.term_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"termination ids {bad} are outside the vocabulary (size {vocab_size})")


def check_spec(spec: Any, vocab_size: int) -> None:
    """Raise unless ``spec`` is a :class:`PolicySpec` whose termination ids fit the vocab."""
    if not isinstance(spec, PolicySpec):
        raise TypeError(f"spec must be a PolicySpec, got {type(spec).__name__}")
    spec.check_vocab(vocab_size)


def check_prompts(prompt_tokens: Any, prompt_mask: Any) -> Tuple[jax.Array, jax.Array]:
    """Left-padded prompts as int32 ``[B, P]`` arrays, with a clear error for a bad shape or an
    empty prompt axis (shared by the sampler and the decoders)."""
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f"prompt_tokens and prompt_mask must both be [B, P]; got {prompt_tokens.shape} "
            f"and {prompt_mask.shape}"
        )
    if prompt_tokens.shape[1] < 1:
        raise ValueError("prompts must have at least one token (P >= 1)")
    return prompt_tokens, prompt_mask


def check_bias(name: str, bias: Optional[jax.Array], vocab_size: int) -> Optional[jax.Array]:
    """A ``[V]`` float32 logit bias (or None); raises naming ``name`` on a wrong shape."""
    if bias is None:
        return None
    bias = jnp.asarray(bias, jnp.float32)
    if bias.shape != (vocab_size,):
        raise ValueError(f"{name} must have shape [vocab_size={vocab_size}], got {bias.shape}")
    return bias


def term_id_mask(vocab_size: int, term_ids: Sequence[int]) -> jax.Array:
    """Bool ``[V]``: True at the termination ids."""
    return jnp.zeros((vocab_size,), bool).at[jnp.asarray(tuple(term_ids), jnp.int32)].set(True)


def constrain_logits(
    logits: jax.Array,
    prefix_len: jax.Array,
    spec: PolicySpec,
    logit_bias: Optional[jax.Array] = None,
) -> jax.Array:
    """The policy's (unnormalised) float32 logits ``[..., V]`` at prefixes of length ``prefix_len``.

    Adds ``logit_bias`` and masks, via ``jnp.where``: ⊤ ids where ``prefix_len < min_len``,
    non-⊤ ids where ``prefix_len >= max_len``. ``prefix_len`` broadcasts to ``logits.shape[:-1]``.
    Disallowed entries equal :data:`NEG_INF` (never ``-inf``).
    """
    x = logits.astype(jnp.float32)
    if logit_bias is not None:
        x = x + jnp.asarray(logit_bias, jnp.float32)
    x = jnp.maximum(x, NEG_INF)  # clamps -inf from a bias; NaN-free downstream
    is_term = term_id_mask(x.shape[-1], spec.term_ids)
    plen = jnp.asarray(prefix_len)[..., None]
    allowed = jnp.where(is_term, plen >= spec.min_len, plen < spec.max_len)
    return jnp.where(allowed, x, NEG_INF)


def term_logprob(logp: jax.Array, term_ids: Sequence[int]) -> jax.Array:
    """``logsumexp`` of ``logp[..., term_ids]``: the log-probability of ⊤."""
    return jax.nn.logsumexp(logp[..., jnp.asarray(tuple(term_ids), jnp.int32)], axis=-1)


def policy_logprobs(
    logits: jax.Array,
    prefix_len: jax.Array,
    spec: PolicySpec,
    logit_bias: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array]:
    """Log-probs of the constrained policy at prefixes of length ``prefix_len``.

    Returns ``(logp_tok [..., V], logp_term [...])``: float32 log q of each non-⊤ token (⊤ ids
    set to :data:`NEG_INF`) and log q(⊤) = logsumexp over the ⊤ ids.
    """
    logp = jax.nn.log_softmax(constrain_logits(logits, prefix_len, spec, logit_bias), axis=-1)
    logp_term = term_logprob(logp, spec.term_ids)
    is_term = term_id_mask(logp.shape[-1], spec.term_ids)
    return jnp.where(is_term, NEG_INF, logp), logp_term


def gather_logprobs(logp: jax.Array, tokens: jax.Array) -> jax.Array:
    """``logp[..., tokens]`` elementwise: ``logp [..., V]``, ``tokens [...]`` -> ``[...]``."""
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 ``log_softmax(logits)`` taken at ``tokens``: ``[..., V]``, ``[...]`` -> ``[...]``."""
    return gather_logprobs(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tokens)


def masked_cumsum(
    x: jax.Array, mask: jax.Array, axis: int = -1, exclusive: bool = False
) -> jax.Array:
    """Cumulative sum of ``x`` where ``mask`` (zeros elsewhere, via ``jnp.where``).

    With ``exclusive`` element k is the sum of elements ``< k`` (the first is 0).
    """
    v = jnp.where(mask, x, jnp.zeros_like(x))
    c = jnp.cumsum(v, axis=axis)
    return c - v if exclusive else c


def token_mask(lengths: jax.Array, num_tokens: int) -> jax.Array:
    """Bool ``[B, T]``: True for the real tokens ``t < lengths``."""
    return jnp.arange(num_tokens)[None, :] < jnp.asarray(lengths)[:, None]


def state_mask(lengths: jax.Array, num_tokens: int) -> jax.Array:
    """Bool ``[B, T + 1]``: True for the prefixes ``i <= lengths`` (i = 0..T)."""
    return jnp.arange(num_tokens + 1)[None, :] <= jnp.asarray(lengths)[:, None]


# ---------------------------------------------------------------------------
# Vocabulary log-softmax in chunks of positions
# ---------------------------------------------------------------------------
def logits_chunk_size(setting: int, batch: int, positions: int, vocab: int,
                      budget_bytes: int) -> int:
    """Positions per chunk for :func:`chunked_position_logprobs`.

    ``setting``: -1 = never chunk (all ``positions``), k > 0 = k positions, 0 = auto: the
    fewest chunks whose float32 logits ``[batch, chunk, vocab]`` take at most
    ``budget_bytes`` each, then the smallest chunk with that many chunks (least padding).
    """
    positions = max(int(positions), 1)
    if setting == -1:
        return positions
    if setting > 0:
        return min(int(setting), positions)
    per_pos = max(int(batch), 1) * int(vocab) * 4
    cmax = max(int(budget_bytes) // per_pos, 1)
    n_chunks = -(-positions // cmax)
    return -(-positions // n_chunks)


def chunked_position_logprobs(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    head: Any,
    hidden: jax.Array,
    targets: jax.Array,
    chunk: int,
    *,
    prefix_len: Optional[jax.Array] = None,
    spec: Optional[PolicySpec] = None,
    term_ids: Optional[Sequence[int]] = None,
    logit_bias: Optional[jax.Array] = None,
    constrain_fn: Optional[Callable[[jax.Array, Tuple[str, ...]], jax.Array]] = None,
) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Per-position log-probs without materialising ``[B, N, V]`` logits.

    For ``hidden [B, N, D]`` the positions are split into chunks of ``chunk``; each chunk
    computes ``logits_fn(head, hidden_chunk)`` (float32 ``[B, chunk, V]``) and reduces it to
    ``[B, chunk]`` quantities, under ``jax.checkpoint`` inside ``lax.map``: neither the
    forward nor the backward pass keeps more than one chunk's logits.

    With ``spec`` (the policy): the logits are :func:`constrain_logits` at ``prefix_len``
    (``[N]`` or ``[B, N]``) with ``logit_bias``; returns ``(log q(targets), log q(⊤))``,
    equal to :func:`policy_logprobs` gathered at ``targets`` (⊤ ids give :data:`NEG_INF`).
    Without ``spec`` (a plain LM, plus ``logit_bias`` if given): ``(log p(targets),
    log p(⊤) or None)``, ⊤ = ``term_ids`` when given.
    """
    B, N, _ = hidden.shape
    chunk = max(1, min(int(chunk), N))
    n_chunks = -(-N // chunk)
    Np = n_chunks * chunk
    tids = tuple(spec.term_ids) if spec is not None else (
        tuple(term_ids) if term_ids is not None else None)
    want_term = tids is not None
    plen = jnp.zeros((B, N), jnp.int32) if prefix_len is None else jnp.broadcast_to(
        jnp.asarray(prefix_len, jnp.int32), (B, N))
    targets = jnp.asarray(targets, jnp.int32)
    cons = constrain_fn or (lambda x, _axes: x)

    def stats(head, bias, h, tgt, pl):
        x = cons(logits_fn(head, h).astype(jnp.float32), ("batch", "length", "vocab"))
        V = x.shape[-1]
        if spec is not None:
            x = constrain_logits(x, pl, spec, bias)
        elif bias is not None:
            x = x + bias
        lse = jax.nn.logsumexp(x, axis=-1)
        tok = gather_logprobs(x, tgt) - lse
        if spec is not None:
            tok = jnp.where(term_id_mask(V, tids)[tgt], NEG_INF, tok)
        if not want_term:
            return tok, jnp.zeros_like(tok)
        term = jax.nn.logsumexp(x[..., jnp.asarray(tids, jnp.int32)], axis=-1) - lse
        return tok, term

    stats_ckpt = jax.checkpoint(stats, prevent_cse=False)

    def split(a):  # [B, N, ...] -> [n_chunks, B, chunk, ...]
        pad = [(0, 0), (0, Np - N)] + [(0, 0)] * (a.ndim - 2)
        a = jnp.pad(a, pad)
        a = a.reshape((B, n_chunks, chunk) + a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    xs = (split(hidden), split(targets), split(plen))
    tok, term = jax.lax.map(lambda c: stats_ckpt(head, logit_bias, *c), xs)

    def merge(a):  # [n_chunks, B, chunk] -> [B, N]
        return jnp.moveaxis(a, 0, 1).reshape(B, Np)[:, :N]

    return merge(tok), (merge(term) if want_term else None)
