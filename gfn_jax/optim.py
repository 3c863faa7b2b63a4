"""Optimizer and schedules, all counted in optimizer updates.

One *rollout* (a batch of trajectories) may give several optimizer updates (PPO's epochs x
minibatches) or a fraction of one (gradient accumulation over ``train.grad_accum`` calls).
The learning-rate schedule and the reward-temperature anneal both count optimizer updates,
so changing ``grad_accum`` or the number of epochs never stretches one against the other.
"""

from __future__ import annotations

from typing import Any

import optax

__all__ = [
    "updates_per_rollout",
    "total_updates",
    "learning_rate_schedule",
    "build_optimizer",
    "reward_temperature",
]


def updates_per_rollout(calls_per_rollout: int, grad_accum: int) -> float:
    """Optimizer updates made by one rollout of ``calls_per_rollout`` step calls."""
    return calls_per_rollout / max(int(grad_accum), 1)


def total_updates(steps: int, calls_per_rollout: int, grad_accum: int) -> int:
    """Optimizer updates in a run of ``steps`` rollouts."""
    return max(int(steps * calls_per_rollout) // max(int(grad_accum), 1), 1)


def learning_rate_schedule(c: Any, total: int) -> optax.Schedule:
    """Warm-up then constant / cosine / linear decay over ``total`` optimizer updates
    (``c`` is the ``optim`` config section)."""
    warm = int(c.warmup_steps)
    decay_steps = max(total - warm, 1)
    if c.schedule == "constant":
        decay = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        decay = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.get("end_lr_frac", 0.0))
    elif c.schedule == "linear":
        decay = optax.linear_schedule(c.lr, c.lr * c.get("end_lr_frac", 0.0), decay_steps)
    else:
        raise ValueError(f"optim.schedule must be constant, cosine or linear, got {c.schedule!r}")
    if warm <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warm), decay], [warm])


def build_optimizer(config: Any, total: int) -> optax.GradientTransformation:
    """AdamW with clipping and the schedule for the trainable tree; Adam with its own rate
    (``objective.log_z_lr``) for log Z; gradient accumulation via ``optax.MultiSteps``."""
    c = config.optim
    sched = learning_rate_schedule(c, total)
    model = optax.chain(
        optax.clip_by_global_norm(c.clip_norm) if c.clip_norm > 0 else optax.identity(),
        optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
    )
    tx = optax.multi_transform(
        {"model": model, "log_z": optax.adam(config.objective.log_z_lr)},
        {"trainable": "model", "log_z": "log_z"},
    )
    if config.train.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.train.grad_accum)
    return tx


def reward_temperature(config: Any, update: float) -> float:
    """Linear anneal of the reward temperature from ``reward.temp_start`` to
    ``reward.temp_end`` over ``reward.temp_horizon`` optimizer updates."""
    r = config.reward
    frac = min(max(update / max(r.temp_horizon, 1), 0.0), 1.0)
    return float(r.temp_start + frac * (r.temp_end - r.temp_start))
