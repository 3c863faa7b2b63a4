"""The pure, module-level train step: (objective, policy forward, reward, shardings) -> jit.

:func:`make_train_step` builds one ``jax.jit`` with explicit in/out shardings and the state
donated. Inside it, for a :class:`~gfn_jax.batch.TrainBatch`:

1. the policy forward over [X | Z] (adapters on, LoRA dropout in training) gives log q of every
   action and of termination at every prefix, in one pass; when the batch comes in groups of
   samples of one prompt (``TrainBatch.group_size``) and ``model.share_prompt`` is on, every
   scorer in the step (policy, reward, reference) runs each prompt once per group;
2. what the registered objective declares it needs: log R of every prefix from the reward
   model (adapters off, or a separate reward checkpoint; divided by the reward temperature),
   the frozen reference policy's log-probs, a learned log Z;
3. the objective's loss; gradients reach only the trainable leaves; optax updates them; a
   non-finite loss or gradient leaves the state untouched (and is reported).

:func:`make_prepare` builds the once-per-rollout function of objectives such as PPO.
Nothing here reads a config file or touches the host: the trainer composes these pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gfn_jax import objectives as obj
from gfn_jax import parallel
from gfn_jax.batch import TrainBatch
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import activation_sharding
from gfn_jax.objective_registry import LossInputs, Needs, Objective, final_values
from gfn_jax.scoring import PolicyScores, prompt_groups, score_policy

Params = Any
RewardFn = Callable[[ModelConfig, Params, TrainBatch], jax.Array]

__all__ = [
    "TrainState",
    "StepSpec",
    "state_mask_from",
    "compute_inputs",
    "make_train_step",
    "make_prepare",
    "posterior_diagnostics",
]


@flax.struct.dataclass
class TrainState:
    """Everything the step updates. ``trainable`` is the LoRA adapter tree or the full
    parameters; ``log_z`` holds learned log Z parameters (empty unless the objective needs
    them); ``step`` counts step calls (micro-batches)."""

    step: jax.Array
    trainable: Params
    log_z: Params
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static description of a train step (everything but arrays).

    Attributes:
      model_cfg: the policy's (and reward's) architecture.
      objective: the registered :class:`~gfn_jax.objective_registry.Objective`.
      options: the ``objective`` config section as a plain dict.
      spec: the policy's :class:`~gfn_jax.logprobs.PolicySpec`.
      reward_fn: the task's ``log_reward(model_cfg, params, batch) -> [B, T+1]``.
      logit_bias: the policy's additive [V] bias (part of q), or None.
      use_lora: trainable = adapters over frozen ``frozen["base"]``; else the full params.
      lora_scale, lora_dropout: adapter scale alpha/r and training dropout rate.
      num_groups: number of prompts (group ids for baselines are prompt indices).
      reward_key, reference_key: which entry of the ``frozen`` dict holds the reward model /
        the reference policy (None when not needed).
      reward_model_cfg: architecture of a separate reward checkpoint (same tokenizer).
    """

    model_cfg: ModelConfig
    objective: Objective
    options: Mapping[str, Any]
    spec: PolicySpec
    reward_fn: RewardFn
    logit_bias: Optional[Any] = None
    use_lora: bool = True
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    num_groups: int = 1
    reward_key: Optional[str] = "base"
    reference_key: Optional[str] = "base"
    reward_model_cfg: Optional[ModelConfig] = None

    @property
    def balance_spec(self) -> PolicySpec:
        """Balance objectives score every prefix as a terminable state, including those
        shorter than min_len, with the *unconstrained* termination probability: sampling
        conditions on length >= min_len, which then draws from the target restricted to those
        lengths; without this the first min_len tokens would appear in no residual."""
        return dataclasses.replace(self.spec, min_len=0)

    def scoring_spec(self) -> PolicySpec:
        return self.balance_spec if self.objective.balance else self.spec

    def adapters(self, tree: Params) -> lora_lib.Adapters:
        """The adapters value the model functions take, from the trainable adapter tree."""
        return lora_lib.Adapters(tree=tree, scale=jnp.float32(self.lora_scale))

    def policy_params(self, trainable: Params, frozen: Mapping[str, Params],
                      rng: Optional[jax.Array] = None) -> Tuple[Params, Any]:
        """(params, adapters) of the policy; LoRA dropout when ``rng`` is given."""
        if self.use_lora:
            adapters = self.adapters(trainable)
            if rng is not None:
                adapters = lora_lib.with_dropout(adapters, self.lora_dropout, rng)
            return frozen["base"], adapters
        return trainable, None


def state_mask_from(lengths: jax.Array, action_mask: jax.Array, min_len: int) -> jax.Array:
    """[B, T+1] prefixes that are terminable states: i <= n, i >= min_len, and not inside a
    tool splice (the token that follows prefix i, if any, is a policy action)."""
    B, T = action_mask.shape
    i = jnp.arange(T + 1)[None, :]
    n = lengths[:, None]
    next_is_action = jnp.concatenate([action_mask.astype(bool), jnp.ones((B, 1), bool)], 1)
    return (i <= n) & (i >= min_len) & (next_is_action | (i == n))


def compute_inputs(ss: StepSpec, needs: Needs, trainable: Params, log_z_params: Params,
                   frozen: Mapping[str, Params], batch: TrainBatch,
                   hyper: Mapping[str, jax.Array], rng: Optional[jax.Array]) -> LossInputs:
    """The policy scores and whatever ``needs`` asks for, as :class:`LossInputs` (pure).

    Scorers (the task's reward included) run each group's prompt once when the batch is
    grouped and ``model_cfg.share_prompt`` is on (see :func:`gfn_jax.scoring.prompt_groups`);
    with LoRA dropout the rows of a group then share the prompt's dropout masks."""
    k = int(getattr(batch, "group_size", 1)) if ss.model_cfg.share_prompt else 1
    with prompt_groups(k):
        return _compute_inputs(ss, needs, trainable, log_z_params, frozen, batch, hyper, rng)


def _compute_inputs(ss: StepSpec, needs: Needs, trainable: Params, log_z_params: Params,
                    frozen: Mapping[str, Params], batch: TrainBatch,
                    hyper: Mapping[str, jax.Array], rng: Optional[jax.Array]) -> LossInputs:
    spec = ss.scoring_spec()
    params, adapters = ss.policy_params(trainable, frozen, rng)
    scores: PolicyScores = score_policy(
        ss.model_cfg, params, batch.prompt_tokens, batch.prompt_mask, batch.tokens,
        batch.lengths, spec, logit_bias=ss.logit_bias, adapters=adapters,
        action_mask=batch.action_mask)
    log_r = log_r_raw = ref = log_z = None
    if needs.reward:
        rparams = frozen.get(ss.reward_key) if ss.reward_key else None
        rcfg = ss.reward_model_cfg or ss.model_cfg
        log_r_raw = jax.lax.stop_gradient(ss.reward_fn(rcfg, rparams, batch).astype(jnp.float32))
        log_r = log_r_raw / hyper["temperature"]
    if needs.reference:
        if ss.reference_key is None:
            raise ValueError(f"objective {ss.objective.name!r} needs a reference policy")
        ref = jax.tree_util.tree_map(jax.lax.stop_gradient, score_policy(
            ss.model_cfg, frozen[ss.reference_key], batch.prompt_tokens, batch.prompt_mask,
            batch.tokens, batch.lengths, spec, logit_bias=ss.logit_bias, adapters=None,
            action_mask=batch.action_mask))
    if needs.log_z:
        log_z = obj.apply_log_z(log_z_params, jax.lax.stop_gradient(scores.prompt_hidden))
    smask = state_mask_from(batch.lengths, batch.action_mask, spec.min_len)
    return LossInputs(batch=batch, scores=scores, state_mask=smask, log_r=log_r,
                      log_r_raw=log_r_raw, ref=ref, log_z=log_z, hyper=hyper,
                      num_groups=ss.num_groups, options=ss.options)


def posterior_diagnostics(log_r: jax.Array, log_q_beh: jax.Array, group: jax.Array,
                          valid: jax.Array, num_groups: int) -> Dict[str, jax.Array]:
    """Importance-sampling diagnostics of the sampler against the target ∝ R, per prompt
    (group), averaged over the prompts present: ``iw_log_z`` = log-mean-exp of
    log R − log q_beh (a stochastic lower bound of log Z in expectation), ``iw_ess`` = the
    effective sample size fraction (Σw)² / (n Σw²) of those weights (1 when q ∝ R).
    ``valid`` rows only (rows with known behaviour log-probs)."""
    lw = jnp.where(valid, log_r - log_q_beh, -jnp.inf)
    n = jax.ops.segment_sum(valid.astype(jnp.float32), group, num_segments=num_groups)
    mx = jax.ops.segment_max(jnp.where(valid, lw, -1e30), group, num_segments=num_groups)
    w = jnp.where(valid, jnp.exp(lw - mx[group]), 0.0)
    s1 = jax.ops.segment_sum(w, group, num_segments=num_groups)
    s2 = jax.ops.segment_sum(w * w, group, num_segments=num_groups)
    present = n > 0
    safe_n = jnp.where(present, n, 1.0)
    log_z = jnp.where(present, mx + jnp.log(jnp.where(present, s1, 1.0)) - jnp.log(safe_n), 0.0)
    ess = jnp.where(present, s1 * s1 / (safe_n * jnp.where(present, s2, 1.0)), 0.0)
    k = jnp.maximum(jnp.sum(present), 1)
    return {"iw_log_z": jnp.sum(log_z) / k, "iw_ess": jnp.sum(ess) / k}


def _base_metrics(x: LossInputs) -> Tuple[Dict[str, jax.Array], Optional[Tuple[jax.Array, ...]]]:
    """The step's own metrics and the per-row inputs of ``posterior_diagnostics`` (None
    without rewards), which the caller reduces once the step's loops are done
    (``_late_diagnostics``)."""
    lengths = x.batch.lengths
    m = {"log_q": jnp.mean(jax.lax.stop_gradient(x.log_q)),
         "length": jnp.mean(lengths.astype(jnp.float32))}
    diag = None
    if x.log_r_raw is not None:
        lr = jax.lax.stop_gradient(final_values(x.log_r_raw, lengths))
        m["log_r"] = jnp.mean(lr)
        b = x.batch
        lq_beh = obj.sequence_logprob(b.beh_log_pf, b.beh_log_pterm, lengths, b.action_mask)
        valid = jnp.asarray(b.has_behaviour, bool) & jnp.isfinite(lr)
        diag = (lr, lq_beh, b.prompt_index, valid)
    return m, diag


def _late_diagnostics(diag: Optional[Tuple[jax.Array, ...]], ready: jax.Array,
                      num_groups: int) -> Dict[str, jax.Array]:
    """``posterior_diagnostics`` of ``diag`` over the rows that are valid while ``ready`` (a
    scalar bool computed from the step's results: its loss and gradients are finite) holds.
    Its per-prompt reductions need collectives that would otherwise depend on nothing the
    layer scans compute; XLA:CPU's runtime may then start them inside the scans on some
    devices only, and a sharded step on several CPU devices deadlocks
    (docs/reliability.md). Reading ``ready`` puts them after the scans on every device; an
    ``optimization_barrier`` did not (XLA removes it before the runtime orders anything).
    A step that is not ``ready`` is discarded anyway (its diagnostics read 0)."""
    if diag is None:
        return {}
    lr, lq_beh, group, valid = diag
    return posterior_diagnostics(lr, lq_beh, group, valid & ready, num_groups)


def _all_finite(tree: Any) -> jax.Array:
    """One scalar bool: every floating-point leaf of ``tree`` is finite."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def loss_fn(ss: StepSpec, trainable: Params, log_z_params: Params,
            frozen: Mapping[str, Params], batch: TrainBatch, hyper: Mapping[str, jax.Array],
            rng: Optional[jax.Array]):
    """Scalar loss and (metrics, final untempered log R [B]) for one batch (pure)."""
    needs = ss.objective.needs_for(ss.options)
    x = compute_inputs(ss, needs, trainable, log_z_params, frozen, batch, hyper, rng)
    loss, aux = ss.objective.loss(x)
    metrics, diag = _base_metrics(x)
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
    if x.log_r_raw is not None:
        log_r_final = final_values(x.log_r_raw, batch.lengths)
    else:
        log_r_final = batch.extras.get("log_r_final", jnp.zeros(batch.lengths.shape, jnp.float32))
    return loss, (metrics, log_r_final, diag)


def make_train_step(ss: StepSpec, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    state_shardings: Any, frozen_shardings: Any, batch_shardings: Any,
                    rules: Any = None):
    """``step(state, frozen, batch, hyper) -> (state, metrics, log_r_final [B])`` jitted with
    explicit in/out shardings; ``state`` is donated. Activations are constrained at block
    boundaries by the logical-axis ``rules`` (default ``parallel.DEFAULT_RULES``)."""
    log_z_scalar = ss.objective.needs_for(ss.options).log_z

    def step(state: TrainState, frozen, batch: TrainBatch, hyper):
        with activation_sharding(mesh, rules):
            return _step(state, frozen, batch, hyper)

    def _step(state: TrainState, frozen, batch: TrainBatch, hyper):
        rng = jax.random.fold_in(state.rng, state.step)  # e.g. LoRA dropout masks

        def f(tp):
            return loss_fn(ss, tp["trainable"], tp["log_z"], frozen, batch, hyper, rng)

        tp = {"trainable": state.trainable, "log_z": state.log_z}
        (loss, (metrics, log_r_final, diag)), grads = jax.value_and_grad(f, has_aux=True)(tp)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, tp)
        new_tp = optax.apply_updates(tp, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        metrics = dict(metrics, **_late_diagnostics(diag, ok, ss.num_groups))

        def keep(new, old):  # a non-finite step never touches the state
            return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1, trainable=keep(new_tp["trainable"], tp["trainable"]),
            log_z=keep(new_tp["log_z"], tp["log_z"]), opt_state=keep(new_opt, state.opt_state))
        metrics = dict(metrics, loss=loss, grad_norm=gnorm, finite=ok.astype(jnp.float32))
        leaves = jax.tree_util.tree_leaves(new_state.log_z)
        if log_z_scalar and len(leaves) == 1 and leaves[0].size == 1:
            metrics["log_z"] = jnp.asarray(leaves[0], jnp.float32).reshape(-1)[0]
        return new_state, metrics, log_r_final

    rep = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep, parallel.batch_sharding(mesh, 1)),
        donate_argnums=(0,),
    )


def make_prepare(ss: StepSpec, mesh: jax.sharding.Mesh, state_shardings: Any,
                 frozen_shardings: Any, batch_shardings: Any, rules: Any = None):
    """``prepare(state, frozen, batch, hyper) -> (extras, metrics)``: the objective's
    once-per-rollout function under the pre-update policy (no dropout), jitted."""
    if ss.objective.prepare is None:
        raise ValueError(f"objective {ss.objective.name!r} has no prepare function")
    needs = ss.objective.prepare_needs_for(ss.options)

    def prepare(state: TrainState, frozen, batch: TrainBatch, hyper):
        with activation_sharding(mesh, rules):
            return _prepare(state, frozen, batch, hyper)

    def _prepare(state: TrainState, frozen, batch: TrainBatch, hyper):
        x = compute_inputs(ss, needs, state.trainable, state.log_z, frozen, batch, hyper, None)
        extras, aux = ss.objective.prepare(x)
        metrics, diag = _base_metrics(x)
        metrics.update(_late_diagnostics(diag, _all_finite(extras), ss.num_groups))
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return extras, metrics

    rep = parallel.replicated(mesh)
    return jax.jit(
        prepare,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, rep),
        out_shardings=(parallel.batch_sharding(mesh, 1), rep),
    )


def host_hyper(temperature: float, kl_coef: float) -> Dict[str, np.ndarray]:
    """The traced scalar hyper-parameters of one step, as float32 host values."""
    return {"temperature": np.float32(temperature), "kl_coef": np.float32(kl_coef)}
