"""Registered training objectives: what each one needs, and its loss.

The maths lives in :mod:`gfn_jax.objectives` (pure functions of per-step arrays); this module
turns each objective into an :class:`Objective` value that the generic train step composes:

* what the step must compute for it (:class:`Needs`: the reward of every prefix, a frozen
  reference policy's log-probs, a learned log Z head);
* how trajectories are scored (``balance``: every prefix is a terminable state, scored with
  the unconstrained termination probability, as the modified SubTB / DB need);
* where its batches come from and which behaviours it accepts (``batch_source``,
  ``on_policy``, ``uses_behaviour_logprobs``), checked at config validation;
* an optional ``prepare`` step run once per rollout (e.g. PPO's advantages against the
  behaviour that drew the samples), several ``epochs`` of minibatch updates per rollout, and
  an optional ``after_rollout`` hook for adaptive coefficients.

Adding an objective is one :func:`register_objective` call; nothing in the trainer changes::

    def my_loss(x: LossInputs):
        lq = objectives.sequence_logprob(x.scores.log_pf, x.scores.log_pterm,
                                         x.batch.lengths, x.batch.action_mask)
        return -jnp.mean(lq * x.log_r_final), {}

    register_objective(Objective(name="mine", loss=my_loss))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from gfn_jax import objectives as obj
from gfn_jax.batch import TrainBatch
from gfn_jax.scoring import PolicyScores

Array = jax.Array
Aux = Dict[str, Array]
Options = Mapping[str, Any]

__all__ = [
    "Needs",
    "LossInputs",
    "Objective",
    "register_objective",
    "get_objective",
    "objective_names",
    "final_values",
    "action_logprobs",
]

BEHAVIOURS = ("on_policy", "tempered", "epsilon", "replay")


@dataclasses.dataclass(frozen=True)
class Needs:
    """What the step computes for a loss (or a prepare function).

    reward: log R of every prefix with the reward model (tempered and raw).
    reference: the frozen reference policy's log-probs of the batch (the base model with
      adapters off, or the initial weights under full fine-tuning).
    log_z: a learned log Z head (scalar or prompt-conditional), trained with its own rate.
    """

    reward: bool = True
    reference: bool = False
    log_z: bool = False


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Everything a registered loss may read, inside the jitted step.

    Attributes:
      batch: the :class:`~gfn_jax.batch.TrainBatch` (device arrays; ``batch.extras`` holds
        the outputs of the objective's ``prepare``).
      scores: the policy's log q(z_t | ·) [B, T] and log q(⊤ | ·) [B, T+1] (with gradient).
      state_mask: bool [B, T+1] prefixes that are terminable states of the balance.
      log_r, log_r_raw: [B, T+1] log R of every prefix, divided by the reward temperature /
        untempered (None unless ``needs.reward``).
      ref: the reference policy's scores (None unless ``needs.reference``).
      log_z: [B] learned log Z (None unless ``needs.log_z``).
      hyper: traced scalars set by the host each step (``temperature``, ``kl_coef``).
      num_groups: number of prompts (group ids are ``batch.prompt_index``).
      options: the ``objective`` config section (static).
    """

    batch: TrainBatch
    scores: PolicyScores
    state_mask: Array
    log_r: Optional[Array]
    log_r_raw: Optional[Array]
    ref: Optional[PolicyScores]
    log_z: Optional[Array]
    hyper: Mapping[str, Array]
    num_groups: int
    options: Options

    @property
    def log_r_final(self) -> Array:
        """Tempered log R(Z ⊤) of each complete trajectory [B]."""
        return final_values(self.log_r, self.batch.lengths)

    @property
    def log_q(self) -> Array:
        """log q(Z ⊤ | X) per row [B] (with gradient); tool tokens excluded."""
        return obj.sequence_logprob(self.scores.log_pf, self.scores.log_pterm,
                                    self.batch.lengths, self.batch.action_mask)


LossFn = Callable[[LossInputs], Tuple[Array, Aux]]
PrepareFn = Callable[[LossInputs], Tuple[Dict[str, Array], Aux]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective as the trainer sees it.

    Attributes:
      name: the value of ``config.objective.name``.
      loss: ``LossInputs -> (loss, aux)``; aux values are logged (float32 scalars).
      needs: what the loss needs (a :class:`Needs`, or a function of the objective options).
      balance: score every prefix as a terminable state (min_len ignored when scoring, so the
        first tokens take part in the balance); False scores under the policy's own spec.
      batch_source: ``"policy"`` (the behaviour mix: on-policy, tempered, epsilon, replay) or
        ``"data"`` (the task's target sequences; see :meth:`gfn_jax.tasks.base.Task.targets`),
        or a function of the options choosing one of these.
      on_policy: the estimator is only valid on the current policy's samples: replay is
        rejected at validation, and tempered / epsilon behaviours too unless
        ``uses_behaviour_logprobs``.
      uses_behaviour_logprobs: the loss reads ``batch.beh_log_pf`` (importance ratios), so
        tempered / epsilon batches are valid (replay rows have no behaviour log-probs).
      prepare: optional ``LossInputs -> (per-row arrays, aux)`` run once per rollout with the
        pre-update policy; its arrays land in ``batch.extras`` for the update steps.
      prepare_needs: what ``prepare`` needs.
      epochs, minibatches: update epochs per rollout and minibatches per epoch (ints or
        functions of the options).
      after_rollout: optional host hook ``(hyper, rollout_metrics, options) -> hyper`` (e.g.
        an adaptive KL coefficient); ``hyper`` values are saved in checkpoints.
      validate: optional host check ``(config) -> None`` raising ``ValueError`` with a message
        that names config keys.
      description: one line for ``--help`` and errors.
    """

    name: str
    loss: LossFn
    needs: Any = Needs()
    balance: bool = False
    batch_source: Any = "policy"
    on_policy: bool = False
    uses_behaviour_logprobs: bool = False
    prepare: Optional[PrepareFn] = None
    prepare_needs: Any = Needs()
    epochs: Any = 1
    minibatches: Any = 1
    after_rollout: Optional[Callable[[Dict[str, float], Dict[str, float], Options],
                                     Dict[str, float]]] = None
    validate: Optional[Callable[[Any], None]] = None
    description: str = ""

    def _resolve(self, value: Any, options: Options) -> Any:
        return value(options) if callable(value) else value

    def needs_for(self, options: Options) -> Needs:
        """The loss's :class:`Needs` under these options."""
        return self._resolve(self.needs, options)

    def prepare_needs_for(self, options: Options) -> Needs:
        return self._resolve(self.prepare_needs, options)

    def source_for(self, options: Options) -> str:
        """``"policy"`` or ``"data"``."""
        return self._resolve(self.batch_source, options)

    def epochs_for(self, options: Options) -> int:
        return int(self._resolve(self.epochs, options))

    def minibatches_for(self, options: Options) -> int:
        return int(self._resolve(self.minibatches, options))

    def any_needs(self, options: Options) -> Needs:
        """Union of the loss's and prepare's needs (what must be built at start-up)."""
        a, b = self.needs_for(options), self.prepare_needs_for(options)
        if self.prepare is None:
            return a
        return Needs(reward=a.reward or b.reward, reference=a.reference or b.reference,
                     log_z=a.log_z or b.log_z)


_REGISTRY: Dict[str, Objective] = {}


def register_objective(objective: Objective, *, overwrite: bool = False) -> Objective:
    """Register ``objective`` under ``objective.name`` (used by ``config.objective.name``)."""
    if not objective.name or not isinstance(objective.name, str):
        raise ValueError("an objective needs a non-empty string name")
    if objective.name in _REGISTRY and not overwrite:
        raise ValueError(f"objective {objective.name!r} is already registered "
                         "(pass overwrite=True to replace it)")
    _REGISTRY[objective.name] = objective
    return objective


def unregister_objective(name: str) -> None:
    """Remove a registered objective (tests)."""
    _REGISTRY.pop(name, None)


def objective_names() -> Tuple[str, ...]:
    """Names of every registered objective, sorted."""
    return tuple(sorted(_REGISTRY))


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; a clear error with close matches otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"objective.name={name!r} is not a registered objective{hint}; "
                         f"registered: {', '.join(objective_names())}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------- helpers
def final_values(x: Array, lengths: Array) -> Array:
    """x[b, lengths[b]] for x [B, T+1]."""
    return jnp.take_along_axis(x, lengths[:, None], axis=1)[:, 0]


def action_logprobs(log_pf: Array, log_pterm: Array, lengths: Array,
                    action_mask: Array) -> Tuple[Array, Array]:
    """Per-action log-probs of (z_1..z_n, ⊤) as [B, T+1] and the mask of real actions
    (policy-chosen tokens t < n, and the termination at n; tool splices excluded)."""
    B, T = log_pf.shape
    i = jnp.arange(T + 1)[None, :]
    n = lengths[:, None]
    act = jnp.concatenate([jnp.asarray(action_mask, bool), jnp.zeros((B, 1), bool)], 1)
    steps = jnp.concatenate([log_pf, jnp.zeros((B, 1), log_pf.dtype)], 1)
    out = jnp.where((i < n) & act, steps, 0.0)
    out = jnp.where(i == n, log_pterm, out)
    return out.astype(jnp.float32), ((i < n) & act) | (i == n)


def _opt(options: Options, key: str, default: Any) -> Any:
    try:
        return options[key] if key in options else default
    except TypeError:
        return default


# ---------------------------------------------------------------------------- GFlowNets
def _subtb(x: LossInputs) -> Tuple[Array, Aux]:
    return obj.subtb_loss(x.scores.log_pf, x.scores.log_pterm, x.log_r, x.state_mask,
                          lamb=float(_opt(x.options, "subtb_lambda", 1.0)))


def _db(x: LossInputs) -> Tuple[Array, Aux]:
    return obj.db_loss(x.scores.log_pf, x.scores.log_pterm, x.log_r, x.state_mask)


def _tb(x: LossInputs) -> Tuple[Array, Aux]:
    return obj.tb_loss(x.scores.log_pf, x.scores.log_pterm, x.log_r, x.batch.lengths, x.log_z,
                       action_mask=x.batch.action_mask)


def _validate_tb(config: Any) -> None:
    if config.objective.log_z not in ("scalar", "conditional"):
        raise ValueError(f"objective.log_z must be 'scalar' or 'conditional', "
                         f"got {config.objective.log_z!r}")


# ---------------------------------------------------------------------------- SFT
def _sft(x: LossInputs) -> Tuple[Array, Aux]:
    return obj.sft_loss(x.scores.log_pf, x.scores.log_pterm, x.batch.lengths,
                        x.batch.action_mask, weight=x.batch.weight)


def _sft_source(options: Options) -> str:
    src = _opt(options, "sft_source", "data")
    return "data" if src == "data" else "policy"


def _validate_sft(config: Any) -> None:
    src = config.objective.sft_source
    if src not in ("data", "policy"):
        raise ValueError(f"objective.sft_source must be 'data' (the task's target sequences) "
                         f"or 'policy' (the behaviour mix / replay), got {src!r}")


# ---------------------------------------------------------------------------- RL
def _kl_needs(options: Options) -> Needs:
    return Needs(reward=True, reference=float(_opt(options, "kl_coef", 0.0)) != 0.0
                 or float(_opt(options, "kl_target", 0.0)) > 0.0)


def _shaped_rewards(x: LossInputs, log_q_seq: Array) -> Tuple[Array, Array]:
    """(log R(Z) − β·(log q(Z) − log p_ref(Z)), the sequence KL estimate) per row; no
    gradient. The score-function gradient of this reward is that of
    E_q[log R] − β·KL(q ‖ p_ref), whose optimum is q* ∝ p_ref · R^(1/β)."""
    log_r = final_values(x.log_r, x.batch.lengths)
    if x.ref is None:
        return jax.lax.stop_gradient(log_r), jnp.zeros_like(log_r)
    lref = obj.sequence_logprob(x.ref.log_pf, x.ref.log_pterm, x.batch.lengths,
                                x.batch.action_mask)
    kl = jax.lax.stop_gradient(log_q_seq - lref)
    return jax.lax.stop_gradient(log_r - x.hyper["kl_coef"] * kl), kl


def _advantages(x: LossInputs, reward: Array) -> Array:
    return obj.group_advantages(reward, x.batch.prompt_index, x.num_groups,
                                baseline=str(_opt(x.options, "baseline", "loo")),
                                scale_by_std=bool(_opt(x.options, "scale_by_std", False)))


def _reinforce(x: LossInputs) -> Tuple[Array, Aux]:
    lq = x.log_q
    reward, kl = _shaped_rewards(x, jax.lax.stop_gradient(lq))
    adv = _advantages(x, reward)
    loss = -jnp.mean(adv * lq)
    return loss, {"reward_mean": jnp.mean(reward), "adv_abs_mean": jnp.mean(jnp.abs(adv)),
                  "kl_mean": jnp.mean(kl), "kl_coef": x.hyper["kl_coef"]}


def _ppo_prepare(x: LossInputs) -> Tuple[Dict[str, Array], Aux]:
    """Once per rollout, with the pre-update policy: shaped rewards (KL to the reference
    with the policy that drew the rollout, untempered) and group advantages."""
    lq_old = x.log_q  # the current (pre-update) policy = the untempered sampling policy
    reward, kl = _shaped_rewards(x, jax.lax.stop_gradient(lq_old))
    adv = _advantages(x, reward)
    return ({"advantage": adv, "log_r_final": final_values(x.log_r_raw, x.batch.lengths)},
            {"reward_mean": jnp.mean(reward), "kl_mean": jnp.mean(kl),
             "adv_abs_mean": jnp.mean(jnp.abs(adv))})


def _ppo(x: LossInputs) -> Tuple[Array, Aux]:
    b = x.batch
    new, mask = action_logprobs(x.scores.log_pf, x.scores.log_pterm, b.lengths, b.action_mask)
    old, _ = action_logprobs(b.beh_log_pf, b.beh_log_pterm, b.lengths, b.action_mask)
    loss, aux = obj.ppo_loss(new, old, None, b.extras["advantage"], mask,
                             clip_eps=float(_opt(x.options, "ppo_clip", 0.2)), kl_coef=0.0)
    aux = {k: v for k, v in aux.items() if k not in ("kl_ref", "loss")}
    return loss, aux


def _adaptive_kl(hyper: Dict[str, float], metrics: Dict[str, float],
                 options: Options) -> Dict[str, float]:
    """Proportional controller on β: β ← β·exp(rate·clip(KL/target − 1, −0.2, 0.2))."""
    target = float(_opt(options, "kl_target", 0.0))
    if target <= 0 or "kl_mean" not in metrics or not math.isfinite(metrics["kl_mean"]):
        return hyper
    err = min(max(metrics["kl_mean"] / target - 1.0, -0.2), 0.2)
    rate = float(_opt(options, "kl_adapt_rate", 1.0))
    return dict(hyper, kl_coef=float(hyper["kl_coef"] * math.exp(rate * err)))


def _validate_rl(config: Any) -> None:
    o = config.objective
    if o.kl_coef < 0:
        raise ValueError(f"objective.kl_coef must be >= 0, got {o.kl_coef}")
    if o.baseline not in ("loo", "mean", "none"):
        raise ValueError(f"objective.baseline must be 'loo', 'mean' or 'none', got {o.baseline!r}")
    if o.kl_target < 0:
        raise ValueError(f"objective.kl_target must be >= 0 (0 = fixed kl_coef), got {o.kl_target}")
    if o.kl_target > 0 and o.kl_coef <= 0:
        raise ValueError("objective.kl_target > 0 (adaptive KL) needs an initial "
                         "objective.kl_coef > 0")
    if config.train.samples_per_prompt < 2 and o.baseline == "loo":
        raise ValueError("the leave-one-out baseline needs train.samples_per_prompt >= 2")


def _validate_ppo(config: Any) -> None:
    _validate_rl(config)
    o = config.objective
    if o.ppo_epochs < 1 or o.ppo_minibatches < 1:
        raise ValueError(f"objective.ppo_epochs and objective.ppo_minibatches must be >= 1, "
                         f"got {o.ppo_epochs} and {o.ppo_minibatches}")
    if not 0 < o.ppo_clip < 1:
        raise ValueError(f"objective.ppo_clip must be in (0, 1), got {o.ppo_clip}")
    rows = config.train.prompts_per_batch * config.train.samples_per_prompt
    if rows % o.ppo_minibatches:
        raise ValueError(f"a rollout of {rows} rows (train.prompts_per_batch x "
                         f"train.samples_per_prompt) does not split into "
                         f"objective.ppo_minibatches={o.ppo_minibatches} equal minibatches")


def _register_builtin() -> None:
    register_objective(Objective(
        name="subtb", loss=_subtb, balance=True,
        description="modified subtrajectory balance: every prefix may terminate, no log Z"))
    register_objective(Objective(
        name="db", loss=_db, balance=True,
        description="modified detailed balance (consecutive prefixes)"))
    register_objective(Objective(
        name="tb", loss=_tb, needs=Needs(reward=True, log_z=True), validate=_validate_tb,
        description="trajectory balance with a learned (scalar or prompt-conditional) log Z"))
    register_objective(Objective(
        name="sft", loss=_sft, needs=Needs(reward=False), batch_source=_sft_source,
        validate=_validate_sft,
        description="maximum likelihood on the task's target sequences (or on samples)"))
    register_objective(Objective(
        name="reinforce", loss=_reinforce, needs=_kl_needs, on_policy=True,
        validate=_validate_rl, after_rollout=_adaptive_kl,
        description="REINFORCE with a group baseline and a KL penalty to the reference"))
    register_objective(Objective(
        name="ppo", loss=_ppo, needs=Needs(reward=False), on_policy=True,
        uses_behaviour_logprobs=True, prepare=_ppo_prepare, prepare_needs=_kl_needs,
        epochs=lambda o: o["ppo_epochs"], minibatches=lambda o: o["ppo_minibatches"],
        after_rollout=_adaptive_kl, validate=_validate_ppo,
        description="PPO: clipped ratio to the behaviour's log-probs, several epochs of "
                    "minibatch updates per rollout, KL penalty to the reference"))


_register_builtin()
