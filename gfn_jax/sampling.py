"""Jitted trajectory sampling from the constrained policy q(Z | X) with a behaviour policy.

:func:`sample` prefills the (left-padded) prompts once, repeats the KV cache ``num_samples``
times (under a mesh, each device takes its own rows: :func:`_prompt_rows`), splits weights and cache into one array per layer
(:func:`~gfn_jax.models.transformer.decode_layout`; not with ``ModelConfig.decode_layers
= "scanned"``, which keeps them stacked and copies no weight) and decodes with ``lax.while_loop`` over
:func:`gfn_jax.models.transformer.decode_step` (static shapes, early exit once every row has
terminated; each token drawn by exact inverse-CDF sampling, :func:`draw`). Tokens are drawn from a
*behaviour* distribution (temperature, top-k, top-p, epsilon-uniform mixing, an additive
behaviour bias), but the returned ``log_pf`` / ``log_pterm`` are always those of the
untempered policy q (model + ``logit_bias`` + :class:`~gfn_jax.logprobs.PolicySpec`), computed
with the same :mod:`gfn_jax.logprobs` functions as :func:`gfn_jax.scoring.score_policy`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Protocol, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.logprobs import (
    DISALLOWED,
    NEG_INF,
    PolicySpec,
    check_bias,
    check_prompts,
    check_spec,
    constrain_logits,
    gather_logprobs,
    policy_logprobs,
    term_id_mask,
)
from gfn_jax.models.adapters import as_adapters
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import (
    FM_MARK,
    KV_AXES,
    KVCache,
    activation_sharding,
    check_length,
    constrain,
    current_activation_sharding,
    decode_layout,
    decode_step,
    decode_weights,
    default_feature_major,
    param_axes,
    prefill,
)

__all__ = ["DecodeWeights", "SampleOutput", "Tool", "behaviour_logprobs", "cache_decode_weights",
           "draw", "inverse_cdf", "sample"]

# Incremented each time the sampler is traced (tests use it to check nothing retraces).
_TRACES = {"sample": 0}


class Tool(Protocol):
    """A jittable, hashable hook evaluated before each sampling step.

    ``__call__(tokens [N, T], lengths [N], t) -> (force [N] bool, forced_token [N] int)``:
    where ``force`` is True the token is spliced in instead of sampled (it cannot terminate
    and must not be a termination id).
    """

    def __call__(
        self, tokens: jax.Array, lengths: jax.Array, t: jax.Array
    ) -> Tuple[jax.Array, jax.Array]: ...


@flax.struct.dataclass
class SampleOutput:
    """Sampled trajectories (N = B * num_samples rows, rows of one prompt contiguous).

    Attributes:
      tokens: int32 [N, T] generated tokens (termination excluded), ``pad_id`` after the end.
      lengths: int32 [N] number of generated tokens n (0..T).
      log_pf: float32 [N, T] log q(z_t | X z_<t) under the untempered policy; 0 after the end
        and at tool-spliced positions.
      log_pterm: float32 [N, T+1] log q(⊤ | prefix i) for i = 0..n (also at prefixes followed
        by a tool-spliced token); 0 beyond n.
      action_mask: bool [N, T] True where the policy chose the token.
      prompt_index: int32 [N] index of the prompt each row continues.
      beh_log_pf, beh_log_pterm: the same as ``log_pf`` / ``log_pterm`` under the behaviour
        that actually drew the sample (temperature, top-k/top-p, epsilon, behaviour bias):
        the "old" log-probs of importance-weighted objectives such as PPO.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_pf: jax.Array
    log_pterm: jax.Array
    action_mask: jax.Array
    prompt_index: jax.Array
    beh_log_pf: jax.Array
    beh_log_pterm: jax.Array


_feature_major_weights = jax.jit(functools.partial(decode_weights, feature_major=True))


class DecodeWeights:
    """Weights laid out once for the sampler's decode loop, kept across calls.

    On a CPU backend the sampler runs the decode loop's projections feature-major ([out, in]
    matrices, :func:`~gfn_jax.models.transformer.decode_layout`), which costs a transposed copy
    of every layer weight on each call (about 130 ms for SmolLM2-135M on 2 cores) and so only
    pays off for loops of :data:`~gfn_jax.models.transformer.FEATURE_MAJOR_MIN_STEPS` or more.
    Made once from weights that do not change (a LoRA run's frozen base) and passed to
    :func:`sample` (``decode_weights=``; ``Policy.decode_weights``; the Trainer keeps one when
    ``model.cache_decode_weights``), it spares every call that copy, at the price of one more
    copy of the layer weights in memory. It is used only with the very arrays it was made
    from (checked by identity), and only by calls that decode feature-major; any other call
    lays its weights out itself, as without it.
    """

    def __init__(self, params: Any) -> None:
        self._source = tuple(jax.tree.leaves(params))
        # only the layers are copied: the embedding, final norm (...) stay the caller's arrays
        laid = _feature_major_weights({"layers": params["layers"]})
        self.weights = dict(params, **laid)

    def made_from(self, params: Any) -> bool:
        """Whether these are ``params``' weights (the same arrays, not equal copies)."""
        leaves = jax.tree.leaves(params)
        return len(leaves) == len(self._source) and all(
            a is b for a, b in zip(leaves, self._source))


def kept_weights(decode_weights: Optional[DecodeWeights], params: Any) -> Optional[Any]:
    """``decode_weights.weights`` when they were made from ``params``, else None (the
    decoder then lays ``params`` out itself)."""
    if decode_weights is not None and decode_weights.made_from(params):
        return decode_weights.weights
    return None


def cache_decode_weights(params: Any) -> Optional[DecodeWeights]:
    """A :class:`DecodeWeights` of ``params`` where the sampler can decode feature-major (a
    CPU backend, or ``GFN_JAX_DECODE_FEATURE_MAJOR=1``); None elsewhere, where it would
    only hold memory."""
    return DecodeWeights(params) if default_feature_major(1) else None


def behaviour_logprobs(
    policy_logits: jax.Array,
    *,
    temperature: Any = 1.0,
    top_k: int = 0,
    top_p: Any = 1.0,
    epsilon: Any = 0.0,
    behaviour_bias: Optional[jax.Array] = None,
) -> jax.Array:
    """Log-probs ``[..., V]`` of the behaviour distribution built from the policy's logits.

    ``policy_logits`` are the constrained logits from :func:`~gfn_jax.logprobs.constrain_logits`.
    In order: ``x = policy_logits / temperature + behaviour_bias``; keep the ``top_k`` largest
    (``0`` = all; ties at the k-th value are kept); keep the smallest set of most likely tokens
    whose probability reaches ``top_p`` (``>= 1`` = all); renormalise; mix with probability
    ``epsilon`` the uniform distribution over the *allowed* tokens (those not disallowed by
    the policy or by ``behaviour_bias``; top-k/top-p do not restrict the uniform part).
    ``temperature``, ``top_p``, ``epsilon`` may be traced scalars; ``top_k`` is static.
    """
    pl = policy_logits.astype(jnp.float32)
    allowed = pl > DISALLOWED
    x = pl / jnp.asarray(temperature, jnp.float32)
    if behaviour_bias is not None:
        bb = jnp.maximum(jnp.asarray(behaviour_bias, jnp.float32), NEG_INF)
        allowed = allowed & (bb > DISALLOWED)
        x = x + bb
    x = jnp.where(allowed, x, NEG_INF)
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, NEG_INF)
    top_p = jnp.asarray(top_p, jnp.float32)

    def nucleus(x: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(x, axis=-1)
        sorted_logp = -jnp.sort(-logp, axis=-1)  # descending
        sorted_p = jnp.exp(sorted_logp)
        mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        keep_sorted = mass_before < top_p  # the first entry is always kept
        thresh = jnp.min(jnp.where(keep_sorted, sorted_logp, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logp >= thresh, x, NEG_INF)

    # The sort only runs when top_p < 1 (a traced scalar, so this is a runtime branch).
    x = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, x)
    logp = jax.nn.log_softmax(x, axis=-1)
    eps = jnp.asarray(epsilon, jnp.float32)
    n_allowed = jnp.maximum(jnp.sum(allowed, axis=-1, keepdims=True), 1).astype(jnp.float32)
    log_u = jnp.where(allowed, -jnp.log(n_allowed), NEG_INF)
    a = jnp.where(eps < 1.0, jnp.log1p(-jnp.where(eps < 1.0, eps, 0.0)) + logp, NEG_INF)
    b = jnp.where(eps > 0.0, jnp.log(jnp.where(eps > 0.0, eps, 1.0)) + log_u, NEG_INF)
    return jnp.logaddexp(a, b)


def draw(key: jax.Array, logp: jax.Array, chunk: int = 256) -> jax.Array:
    """One token per row from ``softmax(logp)`` (``logp [N, V]``, any normalisation): int32 [N].

    Exact inverse-CDF sampling with one uniform per row (:func:`inverse_cdf`), which costs a
    few passes over ``[N, V]`` where ``jax.random.categorical`` draws ``V`` Gumbel variates
    per row and takes an argmax (~25x less time for 16 rows of a 49k vocabulary on CPU)."""
    u = jax.random.uniform(key, logp.shape[:1], jnp.float32)
    return inverse_cdf(logp, u, chunk)


def inverse_cdf(logp: jax.Array, u: jax.Array, chunk: int = 256) -> jax.Array:
    """The token of each row whose cumulative-mass interval holds ``u * total`` (``u [N]`` in
    [0, 1)): int32 [N]. Two levels: ``u`` picks a chunk of ``chunk`` tokens by the chunks'
    cumulative mass, then a token inside it. Tokens of zero probability (``NEG_INF``
    logits) are never returned, whatever the rounding: the search is clipped to the last
    chunk, and the last token, of positive mass."""
    N, V = logp.shape
    x = logp.astype(jnp.float32)
    p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    pad = (-V) % chunk
    if pad:
        p = jnp.pad(p, ((0, 0), (0, pad)))
    pc = p.reshape(N, -1, chunk)
    C = pc.shape[1]
    mass = pc.sum(-1)  # [N, C]
    cum = jnp.cumsum(mass, axis=-1)
    target = jnp.asarray(u, jnp.float32) * cum[:, -1]
    last_chunk = C - 1 - jnp.argmax((mass > 0)[:, ::-1], axis=-1)
    j = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last_chunk)
    before = jnp.take_along_axis(cum - mass, j[:, None], axis=-1)[:, 0]
    row = jnp.take_along_axis(pc, j[:, None, None], axis=1)[:, 0]  # [N, chunk]
    row_cum = jnp.cumsum(row, axis=-1)
    last = chunk - 1 - jnp.argmax((row > 0)[:, ::-1], axis=-1)
    i = jnp.minimum(jnp.sum(row_cum <= (target - before)[:, None], axis=-1), last)
    return (j * chunk + i).astype(jnp.int32)


#: :func:`_sample_jit`'s static arguments.
SAMPLE_STATIC_ARGNAMES = ("cfg", "spec", "num_samples", "top_k", "tool", "shard")


def _rows_over_batch_axes(cache: KVCache) -> KVCache:
    """The repeated cache with its rows on the mesh's batch axes (keys and values by
    :data:`~gfn_jax.models.transformer.KV_AXES`, behind the layer axis when stacked)."""
    def one(a: jax.Array, axis: int) -> jax.Array:
        if a.ndim - axis == len(KV_AXES):
            return constrain(a, (None,) * axis + KV_AXES)
        return constrain(a, (None,) * axis + ("batch",) + (None,) * (a.ndim - axis - 1))

    return cache.map_rows(one)


_ROWS_BY = "auto"  # "repeat" | "gather": for benchmarks/sampler_row_traffic.py only


def _prompt_rows(cache: KVCache, logits: jax.Array, num_samples: int,
                 rows: int) -> Tuple[KVCache, jax.Array]:
    """The prompts' cache and last logits (B rows) as the sampler's ``rows`` rows, split
    over the mesh's batch axes: row i samples prompt (i mod N) // num_samples, N = B x
    num_samples; the rows past N (padding to a multiple of the batch axes) repeat the first
    ones. Without padding each prompt's rows are repeated where the prompt is (local when
    the prompts split like the rows, or are on every device). With padding, the row blocks
    of the devices no longer line up with the prompts, and repeat-then-pad made the SPMD
    partitioner move row-split caches between devices (158 MiB per device for a 1,000-row
    draw of SmolLM2-135M on 16 chips: docs/performance.md, stop 29); there each device
    gathers its own rows from the prompts' cache, held whole (B rows, not N)."""
    B = logits.shape[0]
    N = B * num_samples
    how = _ROWS_BY if _ROWS_BY != "auto" else ("repeat" if rows == N else "gather")
    if how == "repeat":
        def take(a: jax.Array, axis: int) -> jax.Array:
            a = jnp.repeat(a, num_samples, axis=axis)
            if rows == N:
                return a
            pad = jnp.take(a, jnp.arange(rows - N) % N, axis=axis)
            return jnp.concatenate([a, pad], axis=axis)
    else:
        row_prompt = _rows((jnp.arange(rows, dtype=jnp.int32) % N) // num_samples)

        def take(a: jax.Array, axis: int) -> jax.Array:
            return jnp.take(_replicated(a), row_prompt, axis=axis)

    return (_rows_over_batch_axes(cache.map_rows(take)),
            constrain(take(logits, 0), ("batch", "vocab")))


def _gathered_over_fsdp(cfg: ModelConfig, params: Any,
                        adapters: Optional[Any]) -> Tuple[Any, Optional[Any]]:
    """``params`` constrained to their shardings without the ``fsdp`` mesh axis (kept over
    ``tensor``) and LoRA ``adapters`` (small) to whole on every device, under the active
    :func:`activation_sharding`: gathered once before the decode loop instead of on every
    decode step (``ModelConfig.decode_gather_weights``)."""
    ctx = current_activation_sharding()
    if ctx is None or dict(ctx[0].shape).get("fsdp", 1) == 1 or FM_MARK in params:
        return params, adapters  # (feature-major decode weights: a CPU layout, no fsdp)
    mesh, rules = ctx
    axes = param_axes(cfg)
    if isinstance(params["layers"], (tuple, list)):  # the decode layout: one dict per layer
        per_layer = jax.tree.map(lambda a: tuple(a[1:]), axes["layers"],
                                 is_leaf=parallel._is_axes_leaf)
        axes = dict(axes, layers=tuple(per_layer for _ in params["layers"]))

    def drop(names: Any) -> Any:
        names = (names,) if isinstance(names, str) else tuple(names or ())
        return tuple(a for a in names if a != "fsdp") or None

    rules = tuple((name, drop(names)) for name, names in rules)
    params = jax.lax.with_sharding_constraint(
        params, parallel.tree_shardings(axes, params, mesh, rules))
    a = as_adapters(adapters)
    if a is not None:
        adapters = a.replace(tree=jax.tree.map(_replicated, a.tree))
    return params, adapters


def _rows(x: jax.Array) -> jax.Array:
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _replicated(x: jax.Array) -> jax.Array:
    return constrain(x, (None,) * x.ndim)


@functools.partial(jax.jit, static_argnames=SAMPLE_STATIC_ARGNAMES)
def _sample_jit(*arrays: Any, cfg: ModelConfig, spec: PolicySpec, num_samples: int, top_k: int,
                tool: Optional[Tool], shard: Optional[Tuple[Any, Any]] = None) -> SampleOutput:
    """:func:`_sample_body` of ``arrays`` (its positional arguments), jitted; under ``shard``
    (the caller's mesh and rules) each draw's rows split over the mesh's batch axes."""
    _TRACES["sample"] += 1
    with activation_sharding(*shard) if shard is not None else contextlib.nullcontext():
        out = _sample_body(*arrays, cfg=cfg, spec=spec, num_samples=num_samples, top_k=top_k,
                           tool=tool, rows_multiple=parallel.batch_axes_size(*shard) if shard else 1)
        # every process gets every row back (a host reads them), gathered once at the end
        return jax.tree.map(_replicated, out)


def _sample_body(
    params: Any,
    rng: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    epsilon: jax.Array,
    behaviour_bias: Optional[jax.Array],
    logit_bias: Optional[jax.Array],
    adapters: Optional[Any],
    pad_id: jax.Array,
    laid_out: Optional[Any],
    *,
    cfg: ModelConfig,
    spec: PolicySpec,
    num_samples: int,
    top_k: int,
    tool: Optional[Tool],
    rows_multiple: int = 1,
) -> SampleOutput:
    B, P = prompt_tokens.shape
    T = spec.max_len
    N = B * num_samples
    # rows sampled: a multiple of the batch axes' size, so that they split evenly over the
    # mesh; the extra rows start done (they never hold the loop up) and are dropped
    M = N + (-N) % int(rows_multiple)
    logits_p, cache = prefill(cfg, params, prompt_tokens, prompt_mask, P + T, adapters=adapters,
                              last_only=True)
    cache, logits = _prompt_rows(cache, logits_p, num_samples, M)
    # one array per layer for the loop: no per-step weight slicing or whole-cache copies
    params, cache, adapters = decode_layout(params, cache, adapters, steps=T, laid_out=laid_out,
                                            layers=cfg.decode_layers)
    if cfg.decode_gather_weights:
        params, adapters = _gathered_over_fsdp(cfg, params, adapters)
    is_term_vocab = term_id_mask(cfg.vocab_size, spec.term_ids)

    def cond(c):
        t, done = c[0], c[5]
        return (t < T) & ~jnp.all(done)

    def body(c):
        t, logits, cache, tokens, lengths, done, log_pf, log_pterm, act, b_pf, b_pterm = c
        lp_tok, lp_term = policy_logprobs(logits, t, spec, logit_bias)
        log_pterm = log_pterm.at[:, t].set(jnp.where(done, 0.0, lp_term))
        beh = behaviour_logprobs(
            constrain_logits(logits, t, spec, logit_bias),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            epsilon=epsilon,
            behaviour_bias=behaviour_bias,
        )
        b_term = jax.nn.logsumexp(jnp.where(is_term_vocab[None, :], beh, NEG_INF), axis=-1)
        b_pterm = b_pterm.at[:, t].set(jnp.where(done, 0.0, b_term))
        tok = draw(jax.random.fold_in(rng, t), beh)
        if tool is not None:
            force, forced = tool(tokens, lengths, t)
            force = jnp.asarray(force, bool) & ~done
            tok = jnp.where(force, jnp.asarray(forced, jnp.int32), tok)
        else:
            force = jnp.zeros((M,), bool)
        ends = ~done & ~force & is_term_vocab[tok]
        emits = ~done & ~ends
        chosen = emits & ~force
        tokens = tokens.at[:, t].set(jnp.where(emits, tok, pad_id))
        log_pf = log_pf.at[:, t].set(jnp.where(chosen, gather_logprobs(lp_tok, tok), 0.0))
        b_pf = b_pf.at[:, t].set(jnp.where(chosen, gather_logprobs(beh, tok), 0.0))
        act = act.at[:, t].set(chosen)
        lengths = jnp.where(emits, t + 1, lengths)
        done = done | ends
        logits, cache = decode_step(
            cfg, params, cache, jnp.where(emits, tok, pad_id), adapters=adapters
        )
        return (t + 1, logits, cache, tokens, lengths, done, log_pf, log_pterm, act, b_pf,
                b_pterm)

    init = (
        jnp.zeros((), jnp.int32),
        logits,
        cache,
        *map(_rows, (
            jnp.full((M, T), pad_id, jnp.int32),
            jnp.zeros((M,), jnp.int32),
            jnp.arange(M) >= N,  # done
            jnp.zeros((M, T), jnp.float32),
            jnp.zeros((M, T + 1), jnp.float32),
            jnp.zeros((M, T), bool),
            jnp.zeros((M, T), jnp.float32),
            jnp.zeros((M, T + 1), jnp.float32),
        )),
    )
    k = int(cfg.decode_chunk)
    if k > 1:
        # chunks of k steps with one test of the condition each (a fixed-trip inner loop),
        # while k more steps fit; steps after every row is done change no output (a done row
        # writes pad, zero log-probs and its old length, and t stays <= T), so the samples
        # are those of the step-by-step loop below, which runs the remaining steps
        def chunk_cond(c):
            t, done = c[0], c[5]
            return (t + k <= T) & ~jnp.all(done)

        def chunk(c):
            return jax.lax.fori_loop(0, k, lambda _, c: body(c), c)

        init = jax.lax.while_loop(chunk_cond, chunk, init)
    (t, logits, _, tokens, lengths, done, log_pf, log_pterm, act, b_pf,
     b_pterm) = jax.lax.while_loop(cond, body, init)
    # Rows still running here have T tokens: the prefix of length T must terminate (under
    # the policy and under every behaviour, which only ever allows what the policy allows).
    _, lp_term = policy_logprobs(logits, t, spec, logit_bias)
    log_pterm = log_pterm.at[:, T].set(jnp.where(done, 0.0, lp_term))
    b_pterm = b_pterm.at[:, T].set(0.0)
    return SampleOutput(
        tokens=tokens[:N],
        lengths=lengths[:N],
        log_pf=log_pf[:N],
        log_pterm=log_pterm[:N],
        action_mask=act[:N],
        prompt_index=jnp.repeat(jnp.arange(B, dtype=jnp.int32), num_samples),
        beh_log_pf=b_pf[:N],
        beh_log_pterm=b_pterm[:N],
    )


def _check_scalar(name: str, value: Any, lo: float, hi: float, lo_open: bool) -> None:
    try:
        v = np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return  # traced inside an outer jit: cannot check
    if v.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    v = float(v)
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise ValueError(f"{name}={v} is out of range ({'(' if lo_open else '['}{lo}, {hi}])")


def sample(
    cfg: ModelConfig,
    params: Any,
    rng: jax.Array,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    spec: PolicySpec,
    *,
    num_samples: int = 1,
    temperature: Any = 1.0,
    top_k: int = 0,
    top_p: Any = 1.0,
    epsilon: Any = 0.0,
    behaviour_bias: Optional[jax.Array] = None,
    logit_bias: Optional[jax.Array] = None,
    adapters: Optional[Any] = None,
    tool: Optional[Tool] = None,
    pad_id: int = 0,
    decode_weights: Optional[DecodeWeights] = None,
) -> SampleOutput:
    """Sample ``num_samples`` trajectories per prompt; see :class:`SampleOutput`.

    Args:
      prompt_tokens, prompt_mask: left-padded prompts ``[B, P]`` (mask 1 real, 0 pad); every
        row needs at least one real token.
      spec: the policy's termination ids and min/max length (``T = spec.max_len``).
      temperature, top_k, top_p, epsilon, behaviour_bias: behaviour only (see
        :func:`behaviour_logprobs`); temperature/top_p/epsilon are traced (no recompile).
      logit_bias: ``[V]`` additive bias that is part of the policy q.
      adapters: optional LoRA adapters for the policy.
      tool: optional hashable :class:`Tool` (a jit static argument).
      pad_id: token written after each row's end.
      decode_weights: ``params`` laid out for decoding beforehand (:class:`DecodeWeights`);
        ignored when made from other arrays than ``params``.

    Deterministic given ``rng``; one jitted call keyed on cfg/spec/shapes/num_samples/top_k/tool.
    Under :func:`~gfn_jax.models.transformer.activation_sharding` (a mesh and its rules: the
    trainer's :class:`~gfn_jax.policy.Policy` samples inside it) the rows are split over the
    mesh's batch axes, each sampled on one device, not on every device; the samples are those
    drawn without the mesh up to float rounding (which can move a draw across a token
    boundary), and every process gets all of them back.
    """
    prompt_tokens, prompt_mask = check_prompts(prompt_tokens, prompt_mask)
    check_spec(spec, cfg.vocab_size)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    check_length(cfg, prompt_tokens.shape[1] + spec.max_len)
    _check_scalar("temperature", temperature, 0.0, float("inf"), True)
    _check_scalar("top_p", top_p, 0.0, 1.0, True)
    _check_scalar("epsilon", epsilon, 0.0, 1.0, False)
    return _sample_jit(
        params,
        rng,
        prompt_tokens,
        prompt_mask,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(epsilon, jnp.float32),
        check_bias("behaviour_bias", behaviour_bias, cfg.vocab_size),
        check_bias("logit_bias", logit_bias, cfg.vocab_size),
        adapters,
        jnp.asarray(pad_id, jnp.int32),
        kept_weights(decode_weights, params),
        cfg=cfg,
        spec=spec,
        num_samples=int(num_samples),
        top_k=int(top_k),
        tool=tool,
        shard=current_activation_sharding(),
    )
