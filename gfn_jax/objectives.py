"""GFlowNet objectives (SubTB / TB / DB) and reward-maximising baselines (SFT, REINFORCE, PPO).

All objectives are pure, jit-able functions of per-step arrays produced by the scorer and
return ``(loss, aux)`` where ``aux`` is a dict of float32 scalars for logging.

Conventions (B trajectories, at most T generated tokens each, termination token ⊤ excluded):

* ``log_pf [B, T]``: log q(z_t | s_t) of the action taken at step t (0 for deterministic,
  tool-spliced steps). Only entries between the first and last state that takes part in
  the objective are read.
* ``log_pterm [B, T+1]``: log q(⊤ | s_i) for the prefix states s_i, i = 0..T.
* ``log_r [B, T+1]``: log R(s_i ⊤) for every prefix, already divided by the temperature.
* ``lengths [B]``: n, the number of generated tokens (0 <= n <= T).
* ``state_mask [B, T+1]`` bool: which prefix states take part in the balance
  (default :func:`default_state_mask`: 0 <= i <= n).

Entries outside the masks may hold anything, including ``-inf`` and ``NaN``: every input is
sanitised with ``jnp.where`` *before* any arithmetic, so both the loss and its gradients stay
finite. Entries inside the masks must be finite (exclude states whose log R or log q(⊤|s) is
``-inf`` through ``state_mask``).

The backward policy is deterministic (generation is a tree), so log P_B = 0 and the flow of
a terminable state is log F(s_i) = log R(s_i ⊤) - log q(⊤ | s_i).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Aux = Dict[str, Array]
LossAndAux = Tuple[Array, Aux]

__all__ = [
    "default_state_mask",
    "action_mask_from_lengths",
    "log_flows",
    "subtb_loss",
    "db_loss",
    "tb_loss",
    "sft_loss",
    "group_advantages",
    "reinforce_loss",
    "ppo_loss",
    "sequence_logprob",
    "LogZ",
    "init_log_z",
    "apply_log_z",
]


# ----------------------------------------------------------------------------- helpers


def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0; gradient-safe (den never reaches the divide as 0)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _masked_mean(x: Array, mask: Array) -> Array:
    """Mean of ``x`` over ``mask`` (0 if the mask is empty); ``x`` outside the mask is ignored."""
    x = jnp.where(mask, x, 0.0)
    return _safe_div(jnp.sum(x), jnp.sum(mask).astype(jnp.float32))


def _check_rank(name: str, x: Array, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def _check_steps(log_pf: Array, other: Array, other_name: str) -> Tuple[int, int]:
    """Validate ``log_pf [B, T]`` against a ``[B, T+1]`` array; return (B, T)."""
    _check_rank("log_pf", log_pf, 2)
    _check_rank(other_name, other, 2)
    b, t = log_pf.shape
    if other.shape != (b, t + 1):
        raise ValueError(
            f"{other_name} must have shape [B, T+1] = {(b, t + 1)} to match log_pf {log_pf.shape}, "
            f"got {other.shape}"
        )
    return b, t


def _check_lengths(lengths: Array, b: int) -> Array:
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape [B] = {(b,)}, got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    return lengths


def default_state_mask(lengths: Array, max_len: int, min_len: int = 0) -> Array:
    """bool [B, max_len+1]: states s_i with ``min_len <= i <= lengths`` take part in the balance."""
    i = jnp.arange(max_len + 1)[None, :]
    n = jnp.asarray(lengths)[:, None]
    return (i >= min_len) & (i <= n)


def action_mask_from_lengths(lengths: Array, max_len: int) -> Array:
    """bool [B, max_len]: step t is a generated token iff ``t < lengths``."""
    return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def _terminal_select(x: Array, lengths: Array) -> Array:
    """x[b, lengths[b]] for x [B, T+1], via a masked sum so other entries may be NaN."""
    onehot = jnp.arange(x.shape[1])[None, :] == lengths[:, None]
    return jnp.sum(jnp.where(onehot, x, 0.0), axis=1)


def _seq_logprob(
    log_pf: Array, log_pterm: Array, lengths: Array, action_mask: Optional[Array]
) -> Tuple[Array, Array]:
    """log q(Z ⊤ | X) per row = sum of actions (t < n, in action_mask) + log q(⊤ | s_n).

    Returns (log-prob [B], number of predicted tokens incl. ⊤ [B]).
    """
    b, t = _check_steps(log_pf, log_pterm, "log_pterm")
    lengths = _check_lengths(lengths, b)
    act = action_mask_from_lengths(lengths, t)
    if action_mask is not None:
        if jnp.shape(action_mask) != (b, t):
            raise ValueError(f"action_mask must have shape [B, T] = {(b, t)}, got {jnp.shape(action_mask)}")
        act = act & jnp.asarray(action_mask, bool)
    lp = jnp.sum(jnp.where(act, _f32(log_pf), 0.0), axis=1) + _terminal_select(_f32(log_pterm), lengths)
    return lp, jnp.sum(act, axis=1).astype(jnp.float32) + 1.0


def sequence_logprob(
    log_pf: Array, log_pterm: Array, lengths: Array, action_mask: Optional[Array] = None
) -> Array:
    """log q(Z ⊤ | X) per row [B]: the policy's actions (t < n, in ``action_mask``) plus the
    termination at s_n. Tool-spliced tokens (``action_mask`` False) carry no log-prob."""
    return _seq_logprob(log_pf, log_pterm, lengths, action_mask)[0]


# ----------------------------------------------------------------------------- flows


def log_flows(log_pterm: Array, log_r: Array, state_mask: Array) -> Array:
    """log F(s_i) = log R(s_i ⊤) - log q(⊤ | s_i) on ``state_mask`` (0 elsewhere), float32 [B, T+1]."""
    return jnp.where(state_mask, _f32(log_r), 0.0) - jnp.where(state_mask, _f32(log_pterm), 0.0)


def _potentials(
    log_pf: Array, log_pterm: Array, log_r: Array, state_mask: Array
) -> Tuple[Array, Array, Array]:
    """Sanitise inputs and return (d, valid, log_f), with d_i = log F(s_i) - sum_{t<i} log_pf_t.

    For i < j: residual(i, j) = log F(s_i) + sum_{t=i}^{j-1} log_pf_t - log F(s_j) = d_i - d_j.
    log_pf is read only for first_valid <= t < last_valid (per row); elsewhere it is zeroed,
    which only changes d at invalid states. d is centred per row (residuals are
    shift-invariant), which keeps the O(T) sums well conditioned.
    """
    b, t = _check_steps(log_pf, log_pterm, "log_pterm")
    if jnp.shape(log_r) != (b, t + 1):
        raise ValueError(f"log_r must have shape [B, T+1] = {(b, t + 1)}, got {jnp.shape(log_r)}")
    if jnp.shape(state_mask) != (b, t + 1):
        raise ValueError(f"state_mask must have shape [B, T+1] = {(b, t + 1)}, got {jnp.shape(state_mask)}")
    valid = jnp.asarray(state_mask, bool)
    idx = jnp.arange(t + 1)
    first = jnp.min(jnp.where(valid, idx[None, :], t + 1), axis=1)
    last = jnp.max(jnp.where(valid, idx[None, :], -1), axis=1)
    steps = jnp.arange(t)[None, :]
    used = (steps >= first[:, None]) & (steps < last[:, None])
    pf = jnp.where(used, _f32(log_pf), 0.0)
    cum = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), jnp.cumsum(pf, axis=1)], axis=1)
    log_f = log_flows(log_pterm, log_r, valid)
    d = jnp.where(valid, log_f - cum, 0.0)
    m = jnp.sum(valid, axis=1).astype(jnp.float32)
    d_mean = _safe_div(jnp.sum(d, axis=1), m)
    d = jnp.where(valid, d - d_mean[:, None], 0.0)
    return d, valid, log_f


def _flow_aux(d: Array, valid: Array, log_f: Array) -> Aux:
    """Diagnostics shared by SubTB and DB: consecutive-state residuals and flows."""
    # residual between consecutive *valid* states (skipping excluded ones): d_prev - d_j.
    idx = jnp.arange(valid.shape[1])

    def step(carry, xs):
        prev_d, seen = carry
        d_j, v_j = xs
        res = jnp.where(v_j & seen, prev_d - d_j, 0.0)
        has = v_j & seen
        return (jnp.where(v_j, d_j, prev_d), seen | v_j), (res, has)

    b = d.shape[0]
    _, (res, has) = jax.lax.scan(step, (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool)), (d.T, valid.T))
    res, has = res.T, has.T
    first = jnp.min(jnp.where(valid, idx[None, :], valid.shape[1]), axis=1)
    row_has = jnp.any(valid, axis=1)
    log_f_first = _terminal_select(log_f, jnp.minimum(first, valid.shape[1] - 1))
    return {
        "residual_mean": _masked_mean(res, has),
        "residual_abs_mean": _masked_mean(jnp.abs(res), has),
        "log_f_mean": _masked_mean(log_f, valid),
        "log_f_first_mean": _masked_mean(log_f_first, row_has),
        "num_states": jnp.sum(valid).astype(jnp.float32),
    }


# ----------------------------------------------------------------------------- SubTB


def _decayed_moments(d: Array, valid: Array, lamb: Union[float, Array]) -> Tuple[Array, Array, Array]:
    """Exclusive, λ-decayed weighted moments of d over earlier valid states.

    For each j returns (A_j, mu_j, M2_j) with weights w_ij = λ^(j-i-1) over valid i < j:
    A_j = sum w_ij, mu_j = sum w_ij d_i / A_j, M2_j = sum w_ij (d_i - mu_j)^2. Computed by an
    associative scan with a Chan-style merge (no cancellation, O(T) memory, O(log T) depth).
    """
    lamb = jnp.asarray(lamb, jnp.float32)
    a = valid.astype(jnp.float32)
    mu = jnp.where(valid, d, 0.0)
    m2 = jnp.zeros_like(d)
    p = jnp.broadcast_to(lamb, d.shape)

    def merge(left, right):
        a_l, mu_l, m2_l, p_l = left
        a_r, mu_r, m2_r, p_r = right
        w_l = a_l * p_r  # left weights decay by λ^(length of right segment)
        a_new = w_l + a_r
        mu_new = _safe_div(w_l * mu_l + a_r * mu_r, a_new)
        m2_new = m2_l * p_r + m2_r + _safe_div(w_l * a_r, a_new) * (mu_l - mu_r) ** 2
        return a_new, mu_new, m2_new, p_l * p_r

    a_in, mu_in, m2_in, _ = jax.lax.associative_scan(merge, (a, mu, m2, p), axis=1)
    shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731
    return shift(a_in), shift(mu_in), shift(m2_in)


def subtb_loss(
    log_pf: Array,
    log_pterm: Array,
    log_r: Array,
    state_mask: Array,
    lamb: Union[float, Array] = 1.0,
) -> LossAndAux:
    """Modified subtrajectory balance where every prefix may terminate (Hu et al., 2024).

    For every pair of states i < j in ``state_mask`` (same row)::

        residual(i, j) = log F(s_i) + sum_{t=i}^{j-1} log_pf_t - log F(s_j)
        loss = sum_{b, i<j} λ^(j-i-1) residual^2 / sum_{b, i<j} λ^(j-i-1)

    λ counts *positions*: the weight of a pair is λ^(j-i-1) with j - i the number of
    tokens between the two states, whether or not the states between them are in the mask.
    Masking a state therefore only removes the pairs that involve it and never re-weights
    the others (λ = 0 gives detailed balance on consecutive positions, see :func:`db_loss`).

    Cost is O(B·T): λ = 1 (a Python number) uses the closed form
    sum_{i<j} (d_i - d_j)^2 = m · sum_i (d_i - mean d)^2; any other λ (float or traced
    array, λ >= 0) uses a λ-decayed weighted-variance associative scan. No [T, T] pair array
    is built. With no valid pair the loss is 0.

    Returns (loss, aux) with aux: ``loss``, ``pair_weight`` (the normaliser),
    ``residual_mean`` / ``residual_abs_mean`` (between consecutive valid states),
    ``log_f_mean``, ``log_f_first_mean`` (log F of each row's first valid state, which is
    the log Z estimate when s_0 is valid), ``num_states``.
    """
    if isinstance(lamb, (int, float)) and lamb < 0:
        raise ValueError(f"subtb lamb must be >= 0, got {lamb}")
    d, valid, log_f = _potentials(log_pf, log_pterm, log_r, state_mask)
    if isinstance(lamb, (int, float)) and float(lamb) == 1.0:
        m = jnp.sum(valid, axis=1).astype(jnp.float32)
        # d is already centred over the valid states of each row.
        num = jnp.sum(m * jnp.sum(jnp.where(valid, d * d, 0.0), axis=1))
        den = jnp.sum(m * (m - 1.0) / 2.0)
    else:
        a, mu, m2 = _decayed_moments(d, valid, lamb)
        per_j = m2 + a * (mu - d) ** 2  # = sum_{i<j} λ^(j-i-1) (d_i - d_j)^2
        num = jnp.sum(jnp.where(valid, per_j, 0.0))
        den = jnp.sum(jnp.where(valid, a, 0.0))
    loss = _safe_div(num, den)
    aux = {"loss": loss, "pair_weight": den, **_flow_aux(d, valid, log_f)}
    return loss, aux


def db_loss(log_pf: Array, log_pterm: Array, log_r: Array, state_mask: Array) -> LossAndAux:
    """Modified detailed balance: mean over consecutive pairs (i, i+1), both in ``state_mask``,
    of (log F(s_i) + log_pf_i - log F(s_{i+1}))^2. Equal to :func:`subtb_loss` with λ = 0."""
    d, valid, log_f = _potentials(log_pf, log_pterm, log_r, state_mask)
    pair = valid[:, :-1] & valid[:, 1:]
    res = jnp.where(pair, d[:, :-1] - d[:, 1:], 0.0)
    loss = _masked_mean(res * res, pair)
    aux = {"loss": loss, "pair_weight": jnp.sum(pair).astype(jnp.float32), **_flow_aux(d, valid, log_f)}
    return loss, aux


# ----------------------------------------------------------------------------- TB


def tb_loss(
    log_pf: Array,
    log_pterm: Array,
    log_r: Array,
    lengths: Array,
    log_z: Array,
    action_mask: Optional[Array] = None,
) -> LossAndAux:
    """Trajectory balance with a learned log Z ([B] per prompt, or a scalar).

    residual_b = log Z_b + sum_{t<n} log_pf_t + log q(⊤ | s_n) - log R(s_n ⊤); loss = mean_b residual^2.
    ``action_mask`` (optional, [B, T]) further restricts which steps count (they should be
    0 anyway for deterministic steps). Aux: ``loss``, ``residual_mean``, ``residual_abs_mean``,
    ``log_z_mean``, ``log_r_mean``, ``log_pf_seq_mean`` (log q(Z⊤|X)).
    """
    b, _ = _check_steps(log_pf, log_r, "log_r")
    lengths = _check_lengths(lengths, b)
    log_z = _f32(log_z)
    if log_z.shape not in ((), (b,)):
        raise ValueError(f"log_z must be a scalar or have shape [B] = {(b,)}, got {log_z.shape}")
    lq, _ = _seq_logprob(log_pf, log_pterm, lengths, action_mask)
    lr = _terminal_select(_f32(log_r), lengths)
    res = log_z + lq - lr
    loss = jnp.mean(res * res)
    aux = {
        "loss": loss,
        "residual_mean": jnp.mean(res),
        "residual_abs_mean": jnp.mean(jnp.abs(res)),
        "log_z_mean": jnp.mean(jnp.broadcast_to(log_z, (b,))),
        "log_r_mean": jnp.mean(lr),
        "log_pf_seq_mean": jnp.mean(lq),
    }
    return loss, aux


# ----------------------------------------------------------------------------- baselines


def sft_loss(
    log_pf: Array,
    log_pterm: Array,
    lengths: Array,
    action_mask: Optional[Array] = None,
    weight: Optional[Array] = None,
) -> LossAndAux:
    """Negative log-likelihood of given sequences including their termination ⊤.

    Per-token mean over the batch: -(sum of log q over counted actions + log q(⊤|s_n)) divided
    by the total number of counted tokens (actions with t < n in ``action_mask``, plus one ⊤
    per row). ``weight [B]`` (optional) weighs each row's tokens in both sums. Aux: ``loss``,
    ``nll_seq_mean`` (per-sequence NLL), ``num_tokens``.
    """
    lq, ntok = _seq_logprob(log_pf, log_pterm, lengths, action_mask)
    w = jnp.ones_like(lq) if weight is None else _f32(weight)
    total = jnp.sum(w * ntok)
    loss = -_safe_div(jnp.sum(w * lq), total)
    return loss, {"loss": loss, "nll_seq_mean": -jnp.mean(lq), "num_tokens": jnp.sum(ntok)}


def group_advantages(
    rewards: Array,
    group_ids: Array,
    num_groups: int,
    baseline: str = "loo",
    scale_by_std: bool = False,
    eps: float = 1e-6,
) -> Array:
    """Per-prompt baselined advantages [B] (no gradient flows through them).

    ``baseline``: ``"loo"`` (leave-one-out: r_b - mean of the *other* members of the group,
    = k/(k-1) (r_b - mean)), ``"mean"`` (r_b - group mean, includes r_b itself, so biased by
    a factor (k-1)/k in expectation), or ``"none"`` (raw rewards). A group with one member
    gets advantage 0 under ``loo`` and ``mean``. ``scale_by_std`` divides by the group's
    (population) standard deviation + eps, as in GRPO. ``group_ids`` are ints in
    [0, num_groups).
    """
    rewards = jax.lax.stop_gradient(_f32(rewards))
    _check_rank("rewards", rewards, 1)
    gid = jnp.asarray(group_ids)
    if gid.shape != rewards.shape:
        raise ValueError(f"group_ids must have the shape of rewards {rewards.shape}, got {gid.shape}")
    if baseline not in ("loo", "mean", "none"):
        raise ValueError(f"baseline must be 'loo', 'mean' or 'none', got {baseline!r}")
    count = jax.ops.segment_sum(jnp.ones_like(rewards), gid, num_segments=num_groups)[gid]
    total = jax.ops.segment_sum(rewards, gid, num_segments=num_groups)[gid]
    mean = total / count
    if baseline == "loo":
        adv = jnp.where(count > 1, (rewards - mean) * count / jnp.maximum(count - 1.0, 1.0), 0.0)
    elif baseline == "mean":
        adv = rewards - mean
    else:
        adv = rewards
    if scale_by_std:
        sq = jax.ops.segment_sum((rewards - mean) ** 2, gid, num_segments=num_groups)[gid]
        adv = adv / (jnp.sqrt(sq / count) + eps)
    return adv


def reinforce_loss(
    log_pf: Array,
    log_pterm: Array,
    lengths: Array,
    log_r_final: Array,
    group_ids: Array,
    num_groups: int,
    *,
    baseline: str = "loo",
    scale_by_std: bool = False,
    action_mask: Optional[Array] = None,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    ref_log_pf: Optional[Array] = None,
    ref_log_pterm: Optional[Array] = None,
) -> LossAndAux:
    """REINFORCE on whole sequences with a per-prompt baseline (reward-maximising).

    reward_b = log_r_final_b - kl_coef · (log q(Z⊤) - log p_ref(Z⊤)) - entropy_coef · log q(Z⊤)
    (the shaping terms are stop-gradient: their score-function gradients are those of
    -kl_coef·KL(q || p_ref) + entropy_coef·H(q)); adv = :func:`group_advantages` (default
    leave-one-out); loss = -mean_b adv_b · log q(Z_b ⊤ | X_b). Aux: ``loss``, ``reward_mean``,
    ``log_r_mean``, ``adv_abs_mean``, ``log_q_mean``, ``kl_mean`` (sequence-level estimate,
    0 without a reference), ``entropy_est`` (= -mean log q).
    """
    lq, _ = _seq_logprob(log_pf, log_pterm, lengths, action_mask)
    b = lq.shape[0]
    log_r_final = _f32(log_r_final)
    if log_r_final.shape != (b,):
        raise ValueError(f"log_r_final must have shape [B] = {(b,)}, got {log_r_final.shape}")
    lq_sg = jax.lax.stop_gradient(lq)
    kl = jnp.zeros_like(lq)
    if kl_coef != 0.0 or ref_log_pf is not None:
        if ref_log_pf is None or ref_log_pterm is None:
            raise ValueError("kl_coef != 0 needs ref_log_pf and ref_log_pterm")
        lref, _ = _seq_logprob(ref_log_pf, ref_log_pterm, lengths, action_mask)
        kl = lq_sg - jax.lax.stop_gradient(lref)
    reward = log_r_final - kl_coef * kl - entropy_coef * lq_sg
    adv = group_advantages(reward, group_ids, num_groups, baseline, scale_by_std)
    loss = -jnp.mean(adv * lq)
    aux = {
        "loss": loss,
        "reward_mean": jnp.mean(reward),
        "log_r_mean": jnp.mean(log_r_final),
        "adv_abs_mean": jnp.mean(jnp.abs(adv)),
        "log_q_mean": jnp.mean(lq_sg),
        "kl_mean": jnp.mean(kl),
        "entropy_est": -jnp.mean(lq_sg),
    }
    return loss, aux


def ppo_loss(
    logp_new: Array,
    logp_old: Array,
    logp_ref: Optional[Array],
    advantages: Array,
    mask: Array,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> LossAndAux:
    """PPO clipped surrogate with a per-token KL penalty to the reference (base) model.

    Per-token arrays [B, L] (e.g. L = T+1: actions then ⊤); ``advantages`` is [B, L] or a
    per-sequence [B]. With r = exp(logp_new - logp_old)::

        loss = -mean_mask min(r·A, clip(r, 1-ε, 1+ε)·A) + kl_coef · mean_mask kl_t

    kl_t = exp(ref - new) - (ref - new) - 1 (``"k3"``, non-negative, unbiased for
    KL(q_new || p_ref) on samples from q_new) or new - ref (``"k1"``). ``logp_old`` and
    ``advantages`` get no gradient. Means are over all masked tokens of the batch. Aux:
    ``loss``, ``policy_loss``, ``kl_ref``, ``clip_frac``, ``approx_kl_old``, ``ratio_mean``.
    """
    _check_rank("logp_new", logp_new, 2)
    shape = logp_new.shape
    for name, x in (("logp_old", logp_old), ("mask", mask)):
        if jnp.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of logp_new {shape}, got {jnp.shape(x)}")
    if kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
    mask = jnp.asarray(mask, bool)
    adv = jax.lax.stop_gradient(_f32(advantages))
    if adv.shape == shape[:1]:
        adv = adv[:, None]
    elif adv.shape != shape:
        raise ValueError(f"advantages must be [B] or [B, L] = {shape}, got {adv.shape}")
    adv = jnp.where(mask, adv, 0.0)
    new = jnp.where(mask, _f32(logp_new), 0.0)
    old = jax.lax.stop_gradient(jnp.where(mask, _f32(logp_old), 0.0))
    log_ratio = new - old
    ratio = jnp.exp(log_ratio)
    surr = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    policy_loss = -_masked_mean(surr, mask)
    kl_ref = jnp.zeros((), jnp.float32)
    if logp_ref is not None:
        if jnp.shape(logp_ref) != shape:
            raise ValueError(f"logp_ref must have the shape of logp_new {shape}, got {jnp.shape(logp_ref)}")
        ref = jax.lax.stop_gradient(jnp.where(mask, _f32(logp_ref), 0.0))
        delta = ref - new
        kl_tok = jnp.exp(delta) - delta - 1.0 if kl_estimator == "k3" else -delta
        kl_ref = _masked_mean(kl_tok, mask)
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs logp_ref")
    loss = policy_loss + kl_coef * kl_ref
    clipped = jnp.abs(ratio - 1.0) > clip_eps
    aux = {
        "loss": loss,
        "policy_loss": policy_loss,
        "kl_ref": kl_ref,
        "clip_frac": _masked_mean(clipped.astype(jnp.float32), mask),
        "approx_kl_old": _masked_mean(jax.lax.stop_gradient((ratio - 1.0) - log_ratio), mask),
        "ratio_mean": _masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, aux


# ----------------------------------------------------------------------------- log Z heads


def init_log_z(
    kind: str, d_model: int = 0, rng: Optional[Array] = None, hidden: int = 64, init_value: float = 0.0
) -> Dict[str, Array]:
    """Parameters of a log Z head.

    ``kind="scalar"``: ``{"log_z": ()}`` initialised to ``init_value``.
    ``kind="mlp"``: prompt-conditional head on the prompt's final hidden state [B, D]:
    RMS-normalise (no parameters) -> Dense(hidden) -> GELU -> Dense(1) + bias. The output
    layer starts at zero weights and bias ``init_value``, so the head initially returns
    ``init_value`` for every prompt.
    """
    if kind == "scalar":
        return {"log_z": jnp.asarray(init_value, jnp.float32)}
    if kind == "mlp":
        if d_model <= 0 or hidden <= 0:
            raise ValueError(f"mlp log Z head needs d_model > 0 and hidden > 0, got {d_model}, {hidden}")
        if rng is None:
            raise ValueError("mlp log Z head needs an rng key")
        w1 = jax.random.normal(rng, (d_model, hidden), jnp.float32) / jnp.sqrt(float(d_model))
        return {
            "w1": w1,
            "b1": jnp.zeros((hidden,), jnp.float32),
            "w2": jnp.zeros((hidden,), jnp.float32),
            "b2": jnp.asarray(init_value, jnp.float32),
        }
    raise ValueError(f"log Z head kind must be 'scalar' or 'mlp', got {kind!r}")


def apply_log_z(params: Dict[str, Array], prompt_hidden: Optional[Array] = None) -> Array:
    """log Z per prompt [B] (float32); the scalar head broadcasts to [B] (or returns a scalar
    when ``prompt_hidden`` is None). ``prompt_hidden`` [B, D]: hidden state at each prompt's
    last token."""
    if "log_z" in params:
        z = _f32(params["log_z"])
        if prompt_hidden is None:
            return z
        return jnp.broadcast_to(z, jnp.shape(prompt_hidden)[:1])
    if prompt_hidden is None:
        raise ValueError("the mlp log Z head needs prompt_hidden [B, D]")
    h = _f32(prompt_hidden)
    if h.ndim != 2 or h.shape[1] != params["w1"].shape[0]:
        raise ValueError(f"prompt_hidden must be [B, {params['w1'].shape[0]}], got {h.shape}")
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    x = jax.nn.gelu(h @ params["w1"] + params["b1"])
    return x @ params["w2"] + params["b2"]


@dataclasses.dataclass(frozen=True)
class LogZ:
    """Configuration of a log Z head: ``kind`` is ``"scalar"`` or ``"mlp"``."""

    kind: str = "scalar"
    d_model: int = 0
    hidden: int = 64
    init_value: float = 0.0

    def init(self, rng: Optional[Array] = None) -> Dict[str, Array]:
        """Fresh parameters (see :func:`init_log_z`)."""
        return init_log_z(self.kind, self.d_model, rng, self.hidden, self.init_value)

    def apply(self, params: Dict[str, Array], prompt_hidden: Optional[Array] = None) -> Array:
        """log Z [B] (see :func:`apply_log_z`)."""
        return apply_log_z(params, prompt_hidden)
