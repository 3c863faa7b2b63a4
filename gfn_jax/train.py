"""Training: train state, the jitted sharded step, exploration, and the loop.

One step, as data (see ``docs/architecture.md``):

1. host picks prompts and a behaviour (on-policy, tempered, epsilon-uniform, replay);
2. the jitted sampler draws trajectories (or replay supplies stored ones);
3. the jitted, sharded train step scores the policy over [X | Z] in one pass (log q of every
   token and of termination at every prefix), computes log R of every prefix with the base
   model (adapters off), tempers it, evaluates the objective and applies the update;
4. host feeds replay, writes metrics, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gfn_jax import objectives as obj
from gfn_jax import parallel
from gfn_jax.checkpoint import Checkpointer, PreemptionHandler
from gfn_jax.logprobs import PolicySpec
from gfn_jax.metrics import MetricsWriter, plot_metrics
from gfn_jax.models import lora as lora_lib
from gfn_jax.models import registry
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import init_params, param_axes, param_shapes
from gfn_jax.replay import ReplayBuffer
from gfn_jax.sampling import sample as sample_fn
from gfn_jax.scoring import score_policy
from gfn_jax.tasks import make_task
from gfn_jax.tasks.base import Task

if TYPE_CHECKING:  # ml_collections is only needed to build configs, not to import the library
    import ml_collections

Params = Any
OBJECTIVES = ("subtb", "tb", "db", "sft", "reinforce", "ppo")
BEHAVIOURS = ("on_policy", "tempered", "epsilon", "replay")


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss is NaN/inf and ``train.on_nan == 'stop'``."""


@flax.struct.dataclass
class TrainState:
    """Everything the step updates. ``trainable`` is the LoRA adapter tree or the full
    parameters; ``log_z`` holds learned log Z parameters (empty unless TB)."""

    step: jax.Array
    trainable: Params
    log_z: Params
    opt_state: Any
    rng: jax.Array


# ---------------------------------------------------------------------------
# Schedules and optimizer
# ---------------------------------------------------------------------------
def learning_rate_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warm-up then constant / cosine / linear decay."""
    warm = int(c.warmup_steps)
    decay_steps = max(total_steps - warm, 1)
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


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with clipping and schedules; log Z gets its own learning rate; gradient
    accumulation via ``optax.MultiSteps``."""
    c = config.optim
    sched = learning_rate_schedule(c, config.train.steps)

    def adamw(lr):
        return optax.chain(
            optax.clip_by_global_norm(c.clip_norm) if c.clip_norm > 0 else optax.identity(),
            optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay),
        )

    tx = optax.multi_transform(
        {"model": adamw(sched), "log_z": optax.adam(config.objective.log_z_lr)},
        {"trainable": "model", "log_z": "log_z"},
    )
    if config.train.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.train.grad_accum)
    return tx


def reward_temperature(config: ml_collections.ConfigDict, step: int) -> float:
    """Linear anneal of the reward temperature from ``start`` to ``end`` over ``horizon``."""
    r = config.reward
    frac = min(max(step / max(r.temp_horizon, 1), 0.0), 1.0)
    return float(r.temp_start + frac * (r.temp_end - r.temp_start))


# ---------------------------------------------------------------------------
# Pure per-batch maths (used inside the jitted step)
# ---------------------------------------------------------------------------
def state_mask_from(lengths: jax.Array, action_mask: jax.Array, min_len: int) -> jax.Array:
    """[B, T+1] prefixes that are terminable states: i <= n, i >= min_len, and not inside a
    tool splice (the token that follows prefix i, if any, is a policy action)."""
    B, T = action_mask.shape
    i = jnp.arange(T + 1)[None, :]
    n = lengths[:, None]
    next_is_action = jnp.concatenate([action_mask.astype(bool), jnp.ones((B, 1), bool)], 1)
    return (i <= n) & (i >= min_len) & (next_is_action | (i == n))


def final_values(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """x[b, lengths[b]] for x [B, T+1]."""
    return jnp.take_along_axis(x, lengths[:, None], axis=1)[:, 0]


def sequence_logprobs(log_pf: jax.Array, log_pterm: jax.Array, lengths: jax.Array):
    """Per-action log-probs of (z_1..z_n, ⊤) as [B, T+1] plus its mask."""
    B, T = log_pf.shape
    i = jnp.arange(T + 1)[None, :]
    steps = jnp.concatenate([log_pf, jnp.zeros((B, 1), log_pf.dtype)], 1)
    out = jnp.where(i < lengths[:, None], steps, 0.0)
    out = jnp.where(i == lengths[:, None], log_pterm, out)
    return out, i <= lengths[:, None]


# ---------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    """A host-side batch (numpy)."""

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    action_mask: np.ndarray
    prompt_index: np.ndarray
    old_log_pf: np.ndarray
    old_log_pterm: np.ndarray
    behaviour: str

    def arrays(self) -> Dict[str, np.ndarray]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_mask": self.prompt_mask,
            "tokens": self.tokens,
            "lengths": self.lengths,
            "action_mask": self.action_mask,
            "prompt_index": self.prompt_index,
            "old_log_pf": self.old_log_pf,
            "old_log_pterm": self.old_log_pterm,
        }


def load_model(config: ml_collections.ConfigDict, task: Task):
    """The model named by ``config.model`` (``spec='random'`` builds one from
    ``config.model.random`` with the task's tokenizer)."""
    m = config.model
    if m.spec == "random":
        tok = task.build_tokenizer()
        kw = dict(m.random.to_dict())
        if tok is not None and not kw.get("vocab_size"):
            kw["vocab_size"] = tok.vocab_size
        cfg = ModelConfig(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **kw)
        params = init_params(cfg, jax.random.PRNGKey(m.init_seed), std=m.init_std)
        return cfg, params, tok
    model = registry.load(m.spec, dtype=m.param_dtype)
    cfg = model.config.replace(dtype=m.dtype, remat=m.remat)
    tok = model.tokenizer or task.build_tokenizer()
    if tok is None:
        raise ValueError(f"model {m.spec!r} has no tokenizer and the task supplies none")
    return cfg, model.params, tok


class Trainer:
    """Builds everything from a config and runs the GFlowNet fine-tuning loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 restore: bool = True, devices: Optional[List[Any]] = None) -> None:
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        parallel.initialize_distributed()
        self.mesh = parallel.make_mesh(parallel.MeshConfig(**config.mesh.to_dict()), devices)
        self.rules = parallel.DEFAULT_RULES

        self.task = make_task(config.task)
        self.model_cfg, base_params, self.tokenizer = load_model(config, self.task)
        self.task.setup(self.model_cfg, self.tokenizer)
        self.spec: PolicySpec = self.task.policy_spec()
        # Balance objectives score every prefix as a terminable state, including those
        # shorter than min_len, with the *unconstrained* termination probability: sampling
        # conditions on length >= min_len (renormalising without ⊤), which then draws from
        # the target restricted to those lengths. Without this the first min_len tokens
        # would appear in no residual and stay untrained.
        self.balance_spec = dataclasses.replace(self.spec, min_len=0)
        bias = self.task.policy_logit_bias()
        self.logit_bias = None if bias is None else jnp.asarray(bias, jnp.float32)
        self.tool = self.task.tool()
        self.prompts: List[str] = list(self.task.train_prompts())
        self.prompt_ids = [self._encode_prompt(p) for p in self.prompts]
        self.prompt_len = int(config.data.max_prompt_len) or max(len(p) for p in self.prompt_ids)
        self.prompt_len = max(self.prompt_len, max(len(p) for p in self.prompt_ids))
        if self.prompt_len + self.spec.max_len > self.model_cfg.max_seq_len:
            raise ValueError(
                f"prompt ({self.prompt_len} tokens) + max_len ({self.spec.max_len}) exceeds the "
                f"model's context of {self.model_cfg.max_seq_len} tokens"
            )

        # --- parameters and their shardings --------------------------------
        axes = param_axes(self.model_cfg)
        shapes = param_shapes(self.model_cfg)
        self.base_shardings = parallel.tree_shardings(axes, shapes, self.mesh, self.rules)
        base_params = parallel.shard_params(base_params, self.base_shardings)
        self.use_lora = bool(config.lora.enabled)
        rng = jax.random.PRNGKey(config.seed)
        rng, k_lora, k_logz = jax.random.split(rng, 3)
        if self.use_lora:
            self.lora_cfg = lora_lib.LoraConfig(
                rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                targets=tuple(config.lora.targets))
            adapters = lora_lib.init_lora(self.model_cfg, base_params, self.lora_cfg, k_lora)
            # the scale alpha/r is a constant, not a trainable leaf
            self.lora_scale = float(self.lora_cfg.scale)
            trainable = adapters["tree"]
            t_axes = lora_lib.lora_axes(self.model_cfg, self.lora_cfg)["tree"]
            t_shapes = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
            t_shard = parallel.tree_shardings(t_axes, t_shapes, self.mesh, self.rules)
            trainable = parallel.shard_params(trainable, t_shard)
            self.base_params = base_params
        else:
            trainable = base_params
            needs_base = self.task.needs_reward_model() or config.objective.name == "ppo"
            # the reward / reference model is the frozen initial model: keep one copy
            self.base_params = jax.tree_util.tree_map(jnp.copy, base_params) if needs_base else None
        self.log_z_kind = config.objective.log_z if config.objective.name == "tb" else "none"
        log_z = {}
        if self.log_z_kind != "none":
            log_z = obj.init_log_z({"scalar": "scalar", "conditional": "mlp"}[self.log_z_kind],
                                   self.model_cfg.d_model, k_logz,
                                   init_value=config.objective.log_z_init)
        log_z = jax.device_put(log_z, parallel.replicated(self.mesh))

        self.tx = build_optimizer(config)
        opt_state = jax.jit(self.tx.init)({"trainable": trainable, "log_z": log_z})
        # leaves that follow a parameter keep its sharding; the rest (counters, scalar
        # moments) are replicated over the mesh so every state leaf lives on the mesh
        mesh_devices = set(self.mesh.devices.flat)
        opt_state = jax.tree_util.tree_map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
            and x.sharding.device_set == mesh_devices else jax.device_put(x, parallel.replicated(self.mesh)),
            opt_state)
        rep = parallel.replicated(self.mesh)
        self.state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), rep), trainable=trainable,
            log_z=log_z, opt_state=opt_state,
            rng=jax.device_put(jax.random.key_data(rng) if _is_typed_key(rng) else rng, rep))
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)

        if config.replay.sampling not in ("uniform", "reward"):
            raise ValueError(f"replay.sampling must be 'uniform' or 'reward', "
                             f"got {config.replay.sampling!r}")
        self.replay = ReplayBuffer(capacity=config.replay.capacity,
                                   dedup_fraction=config.replay.dedup_fraction, seed=config.seed)
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints)
        self.start_step = 0
        if restore and self.ckpt.latest_step() is not None:
            self._restore()
        self._step_fn = None
        # tasks that score evaluation samples under the reward model (continuation, infill)
        if self.base_params is not None:
            self.task.bind_reward_params(self.base_params)

    # ------------------------------------------------------------------ utils
    def _encode_prompt(self, text: str) -> List[int]:
        ids = self.task.encode_prompt(text)
        limit = int(self.config.data.max_prompt_len)
        if limit and len(ids) > limit:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds data.max_prompt_len={limit}: {text[:80]!r}")
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        return ids

    def pad_prompts(self, ids: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """Left-pad prompts to ``self.prompt_len``."""
        P = self.prompt_len
        toks = np.full((len(ids), P), self.tokenizer.pad_id or 0, np.int32)
        mask = np.zeros((len(ids), P), np.int32)
        for r, seq in enumerate(ids):
            toks[r, P - len(seq):] = seq
            mask[r, P - len(seq):] = 1
        return toks, mask

    @property
    def policy_params(self) -> Tuple[Params, Optional[Params]]:
        """(params, adapters) for the current policy."""
        if self.use_lora:
            return self.base_params, self.adapters(self.state.trainable)
        return self.state.trainable, None

    def adapters(self, tree: Params) -> Params:
        """The adapter dict the model functions take, from the trainable adapter tree."""
        return {"scale": jnp.float32(self.lora_scale), "tree": tree}

    def _restore(self) -> None:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.state, self.state_shardings)
        state, meta, replay = self.ckpt.restore(abstract_state=abstract)
        self.state = state
        if replay is not None:
            self.replay = ReplayBuffer.from_state_dict(replay)
        self.start_step = int(meta.get("step", int(state.step)))

    # --------------------------------------------------------------- sampling
    def draw(self, rng: jax.Array, prompt_rows: List[int], num_samples: int,
             behaviour: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Sample ``num_samples`` trajectories for each prompt index in ``prompt_rows``."""
        toks, mask = self.pad_prompts([self.prompt_ids[i] for i in prompt_rows])
        params, adapters = self.policy_params
        out = sample_fn(
            self.model_cfg, params, rng, jnp.asarray(toks), jnp.asarray(mask), self.spec,
            num_samples=num_samples, temperature=behaviour.get("temperature", 1.0),
            top_k=int(self.config.explore.top_k), top_p=float(self.config.explore.top_p),
            epsilon=behaviour.get("epsilon", 0.0), logit_bias=self.logit_bias,
            adapters=adapters, tool=self.tool, pad_id=self.tokenizer.pad_id or 0)
        out = _to_host(out)
        rows = np.repeat(np.asarray(prompt_rows), num_samples)
        return {
            "prompt_tokens": np.repeat(toks, num_samples, 0),
            "prompt_mask": np.repeat(mask, num_samples, 0),
            "tokens": np.asarray(out.tokens, np.int32),
            "lengths": np.asarray(out.lengths, np.int32),
            "action_mask": np.asarray(out.action_mask, bool),
            "prompt_index": rows.astype(np.int32),
            "old_log_pf": np.asarray(out.log_pf, np.float32),
            "old_log_pterm": np.asarray(out.log_pterm, np.float32),
        }

    def choose_behaviour(self, step: int) -> Dict[str, Any]:
        """Host-side, stateless (seeded by step) choice of the batch's behaviour policy."""
        e = self.config.explore
        rng = np.random.default_rng([self.config.seed, step, 17])
        probs = np.array([e.p_on_policy, e.p_tempered, e.p_epsilon, e.p_replay], np.float64)
        if not self.replay_ready():
            probs[3] = 0.0
        if probs.sum() <= 0:
            probs[0] = 1.0
        kind = BEHAVIOURS[int(rng.choice(4, p=probs / probs.sum()))]
        out: Dict[str, Any] = {"kind": kind, "temperature": 1.0, "epsilon": 0.0}
        if kind == "tempered":
            out["temperature"] = float(rng.uniform(e.temp_min, e.temp_max))
        elif kind == "epsilon":
            out["epsilon"] = float(e.epsilon)
        return out

    def replay_ready(self) -> bool:
        need = self.config.train.samples_per_prompt
        return len(self.replay) > 0 and all(
            self.replay.size(str(i)) >= min(need, self.config.replay.min_size)
            for i in range(len(self.prompts)))

    def make_batch(self, step: int) -> Tuple[Dict[str, np.ndarray], str]:
        """Prompts for this step (stateless given step) and trajectories from the chosen
        behaviour."""
        tc = self.config.train
        rng = np.random.default_rng([self.config.seed, step, 3])
        P = tc.prompts_per_batch
        rows = list(rng.choice(len(self.prompts), size=P, replace=len(self.prompts) < P))
        beh = self.choose_behaviour(step)
        if beh["kind"] == "replay":
            batch = self.replay_batch(rows, tc.samples_per_prompt)
            if batch is not None:
                return batch, "replay"
            beh = {"kind": "on_policy", "temperature": 1.0, "epsilon": 0.0}
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
        return self.draw(key, rows, tc.samples_per_prompt, beh), beh["kind"]

    def replay_batch(self, rows: List[int], k: int) -> Optional[Dict[str, np.ndarray]]:
        T = self.spec.max_len
        toks, lens, amask, prow = [], [], [], []
        temp = None
        if self.config.replay.sampling == "reward":
            temp = reward_temperature(self.config, int(self.state.step))
        for r in rows:
            if self.replay.size(str(r)) == 0:
                return None
            entries = self.replay.sample(str(r), k, temperature=temp)
            for e in entries:
                z = np.asarray(e.tokens, np.int32)
                row = np.full(T, self.tokenizer.pad_id or 0, np.int32)
                row[: len(z)] = z
                am = np.zeros(T, bool)
                am[: len(z)] = e.arrays.get("action_mask", np.ones(len(z), bool))
                toks.append(row), lens.append(len(z)), amask.append(am), prow.append(r)
        pt, pm = self.pad_prompts([self.prompt_ids[i] for i in prow])
        B = len(prow)
        return {
            "prompt_tokens": pt, "prompt_mask": pm, "tokens": np.stack(toks),
            "lengths": np.asarray(lens, np.int32), "action_mask": np.stack(amask),
            "prompt_index": np.asarray(prow, np.int32),
            "old_log_pf": np.zeros((B, T), np.float32),
            "old_log_pterm": np.zeros((B, T + 1), np.float32),
        }

    # -------------------------------------------------------------- the step
    def loss_fn(self, trainable: Params, log_z_params: Params, base_params: Optional[Params],
                batch: Dict[str, jax.Array], temperature: jax.Array,
                rng: Optional[jax.Array] = None):
        """Scalar loss and aux metrics for one batch (pure; traced inside the step)."""
        c = self.config.objective
        if self.use_lora:
            params = base_params
            adapters = lora_lib.with_dropout(self.adapters(trainable), self.lora_cfg.dropout, rng)
        else:
            params, adapters = trainable, None
        balance = c.name in ("subtb", "db")
        spec = self.balance_spec if balance else self.spec
        scores = score_policy(
            self.model_cfg, params, batch["prompt_tokens"], batch["prompt_mask"],
            batch["tokens"], batch["lengths"], spec, logit_bias=self.logit_bias,
            adapters=adapters, action_mask=batch["action_mask"])
        log_r_raw = jax.lax.stop_gradient(
            self.task.log_reward(self.model_cfg, base_params, batch).astype(jnp.float32))
        log_r = log_r_raw / temperature
        lengths = batch["lengths"]
        smask = state_mask_from(lengths, batch["action_mask"], spec.min_len)
        aux: Dict[str, jax.Array] = {}
        name = c.name
        if name == "subtb":
            loss, aux = obj.subtb_loss(scores.log_pf, scores.log_pterm, log_r, smask,
                                       lamb=c.subtb_lambda)
        elif name == "db":
            loss, aux = obj.db_loss(scores.log_pf, scores.log_pterm, log_r, smask)
        elif name == "tb":
            log_z = obj.apply_log_z(log_z_params, jax.lax.stop_gradient(scores.prompt_hidden))
            loss, aux = obj.tb_loss(scores.log_pf, scores.log_pterm, log_r, lengths, log_z)
        elif name == "sft":
            loss, aux = obj.sft_loss(scores.log_pf, scores.log_pterm, lengths,
                                     batch["action_mask"])
        elif name == "reinforce":
            loss, aux = obj.reinforce_loss(
                scores.log_pf, scores.log_pterm, lengths, final_values(log_r, lengths),
                batch["prompt_index"], len(self.prompts))
        elif name == "ppo":
            new, m = sequence_logprobs(scores.log_pf, scores.log_pterm, lengths)
            old, _ = sequence_logprobs(batch["old_log_pf"], batch["old_log_pterm"], lengths)
            ref_scores = score_policy(
                self.model_cfg, base_params, batch["prompt_tokens"], batch["prompt_mask"],
                batch["tokens"], lengths, self.spec, logit_bias=self.logit_bias,
                adapters=None, action_mask=batch["action_mask"])
            ref, _ = sequence_logprobs(ref_scores.log_pf, ref_scores.log_pterm, lengths)
            adv = obj.group_advantages(final_values(log_r, lengths), batch["prompt_index"],
                                       len(self.prompts))
            loss, aux = obj.ppo_loss(new, old, jax.lax.stop_gradient(ref), adv[:, None]
                                     * jnp.ones_like(new), m, clip_eps=c.ppo_clip,
                                     kl_coef=c.kl_coef)
        else:  # validated earlier
            raise ValueError(name)
        seq_lp, _ = sequence_logprobs(scores.log_pf, scores.log_pterm, lengths)
        metrics = {
            "log_r": jnp.mean(final_values(log_r_raw, lengths)),
            "log_q": jnp.mean(jnp.sum(seq_lp, -1)),
            "length": jnp.mean(lengths.astype(jnp.float32)),
        }
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return loss, (metrics, final_values(log_r_raw, lengths))

    def _build_step(self):
        tx = self.tx

        def step(state: TrainState, base_params, batch, temperature):
            rng = jax.random.fold_in(state.rng, state.step)  # e.g. LoRA dropout masks

            def f(tp):
                return self.loss_fn(tp["trainable"], tp["log_z"], base_params, batch, temperature,
                                    rng)

            tp = {"trainable": state.trainable, "log_z": state.log_z}
            (loss, (metrics, log_r_final)), grads = jax.value_and_grad(f, has_aux=True)(tp)
            gnorm = optax.tree.norm(grads)
            updates, new_opt = tx.update(grads, state.opt_state, tp)
            new_tp = optax.apply_updates(tp, updates)
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            # never let a non-finite step touch the state (checkpoints stay clean)
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda a, b: jnp.where(ok, a, b), new, old)
            new_tp = keep(new_tp, tp)
            new_opt = keep(new_opt, state.opt_state)
            new_state = state.replace(
                step=state.step + 1, trainable=new_tp["trainable"], log_z=new_tp["log_z"],
                opt_state=new_opt)
            metrics = dict(metrics, loss=loss, grad_norm=gnorm, finite=ok.astype(jnp.float32))
            if self.log_z_kind == "scalar":
                metrics["log_z"] = jnp.asarray(
                    jax.tree_util.tree_leaves(new_tp["log_z"])[0], jnp.float32).reshape(-1)[0]
            return new_state, metrics, log_r_final

        rep = parallel.replicated(self.mesh)
        bsh = lambda nd: parallel.batch_sharding(self.mesh, nd)
        batch_sh = {k: bsh(v) for k, v in {
            "prompt_tokens": 2, "prompt_mask": 2, "tokens": 2, "lengths": 1, "action_mask": 2,
            "prompt_index": 1, "old_log_pf": 2, "old_log_pterm": 2}.items()}
        base_sh = None if self.base_params is None else jax.tree_util.tree_map(
            lambda x: x.sharding, self.base_params)
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, base_sh, batch_sh, rep),
            out_shardings=(self.state_shardings, rep, bsh(1)),
            donate_argnums=(0,),
        )

    def train_step(self, batch: Dict[str, np.ndarray], temperature: float):
        """Run one jitted step on a host batch; returns (metrics dict, log R final)."""
        if self._step_fn is None:
            self._step_fn = self._build_step()
        B = batch["tokens"].shape[0]
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if B % n_dev:
            raise ValueError(f"batch of {B} rows is not divisible by data*fsdp={n_dev}")
        if jax.process_count() > 1:
            # every host built the same global batch (seeded by step); each feeds its rows
            rows = parallel.process_batch_slice(self.mesh, B)
            arrays = parallel.global_batch_from_local(
                {k: np.asarray(v)[rows] for k, v in batch.items()}, self.mesh)
        else:
            arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        self.state, metrics, log_r_final = self._step_fn(
            self.state, self.base_params, arrays, jnp.float32(temperature))
        return _to_host(metrics), np.asarray(_to_host(log_r_final))

    # ---------------------------------------------------------------- loop
    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "config": self.config.to_dict(),
                "reward_temperature": reward_temperature(self.config, step)}
        self.ckpt.save(step, self.state, meta=_jsonable(meta),
                       replay=self.replay.state_dict(), force=force)

    def add_to_replay(self, batch: Dict[str, np.ndarray], log_r_final: np.ndarray) -> None:
        if self.config.explore.p_replay <= 0 and not self.config.replay.always_fill:
            return
        for r in range(len(log_r_final)):
            if not np.isfinite(log_r_final[r]):
                continue  # an impossible trajectory is never replayed
            n = int(batch["lengths"][r])
            self.replay.add(str(int(batch["prompt_index"][r])), batch["tokens"][r, :n],
                            float(log_r_final[r]),
                            arrays={"action_mask": batch["action_mask"][r, :n]})

    def run(self, progress: bool = True, until: Optional[int] = None) -> Dict[str, Any]:
        """The training loop: returns the final summary dict. ``until`` stops early (with a
        checkpoint) after that many steps, as a preemption would."""
        from tqdm.auto import tqdm

        tc = self.config.train
        writer = MetricsWriter(self.workdir, resume_step=self.start_step - 1)
        if jax.process_index() == 0:  # one writer on a shared workdir
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(_jsonable(self.config.to_dict()), f, indent=2)
        summary: Dict[str, Any] = {"start_step": self.start_step}
        t_start = time.time()
        tokens_seen = 0
        last: Dict[str, float] = {}
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps,
                   disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
        step = self.start_step
        with PreemptionHandler() as preempt:
            for step in bar:
                t0 = time.time()
                batch, kind = self.make_batch(step)
                t_sample = time.time() - t0
                temp = reward_temperature(self.config, step)
                metrics, log_r_final = self.train_step(batch, temp)
                dt = time.time() - t0
                n_tok = int(batch["tokens"].shape[0] * (batch["tokens"].shape[1]
                                                        + batch["prompt_tokens"].shape[1]))
                tokens_seen += n_tok
                metrics = {k: float(v) for k, v in metrics.items()}
                if not metrics["finite"]:
                    msg = (f"non-finite loss ({metrics['loss']}) or gradient "
                           f"({metrics['grad_norm']}) at step {step}; the update was skipped")
                    writer.write(step, {"nonfinite": 1.0})
                    if tc.on_nan == "stop":
                        writer.close()
                        raise NonFiniteLossError(msg + " and training stops (train.on_nan='stop')")
                    print("warning:", msg)
                self.add_to_replay(batch, log_r_final)
                metrics.update(reward_temperature=temp, step_time=dt, sample_time=t_sample,
                               tokens_per_s=n_tok / max(dt, 1e-9),
                               behaviour=float(BEHAVIOURS.index(kind)),
                               replay_size=float(len(self.replay)))
                last = metrics
                if step % tc.log_every == 0 or step == tc.steps - 1:
                    writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3g}", logR=f"{metrics['log_r']:.3g}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                done = step + 1
                if tc.ckpt_every and done % tc.ckpt_every == 0:
                    self.save(done)
                if preempt.should_stop(done) or (until is not None and done >= until):
                    self.save(done, force=True)
                    self.ckpt.wait()
                    summary["preempted_at"] = done
                    print(f"stopping early: saved checkpoint at step {done}")
                    break
            else:
                done = tc.steps
                if done > self.start_step:
                    self.save(done, force=True)
        self.ckpt.wait()
        summary.update(
            steps=int(self.state.step), wall_time_s=time.time() - t_start,
            tokens_per_s=tokens_seen / max(time.time() - t_start, 1e-9),
            final_metrics=last)
        writer.write_summary(_jsonable(summary))
        writer.close()
        try:
            if jax.process_index() == 0:  # only process 0 has the metrics; one writer
                plot_metrics(self.workdir)
        except Exception as e:  # plots are a convenience, never fatal
            print("warning: could not plot metrics:", e)
        return summary

    # ------------------------------------------------------------ evaluation
    def generate(self, num: int, prompt: Optional[str] = None, temperature: float = 1.0,
                 batch_size: int = 0, seed: int = 0) -> List[Dict[str, Any]]:
        """Draw ``num`` samples (from ``prompt`` or cycling through the task's eval prompts)
        from the current policy; returns dicts with prompt, text, tokens, log_q."""
        prompts = [prompt] if prompt is not None else list(self.task.eval_prompts())
        ids = [self._encode_prompt(p) for p in prompts]
        bs = batch_size or int(self.config.eval.batch_size)
        out: List[Dict[str, Any]] = []
        key = jax.random.PRNGKey(seed)
        saved_prompt_ids = self.prompt_ids
        self.prompt_ids = ids
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc="sampling", unit="seq", dynamic_ncols=True,
                   disable=num < 2 * bs or jax.process_index() != 0)
        try:
            c = 0
            while len(out) < num:
                key, sub = jax.random.split(key)
                pi = c % len(ids)
                k = min(bs, num - len(out))
                d = self.draw(sub, [pi], k, {"temperature": temperature})
                lp, _ = jax.device_get(sequence_logprobs(
                    jnp.asarray(d["old_log_pf"]), jnp.asarray(d["old_log_pterm"]),
                    jnp.asarray(d["lengths"])))
                for r in range(k):
                    n = int(d["lengths"][r])
                    toks = d["tokens"][r, :n].tolist()
                    out.append({"prompt": prompts[pi], "text": self.tokenizer.decode(toks),
                                "tokens": toks, "log_q": float(np.sum(lp[r]))})
                bar.update(k)
                c += 1
        finally:
            bar.close()
            self.prompt_ids = saved_prompt_ids
        return out


def _to_host(tree: Any) -> Any:
    """Fetch a tree of (possibly multi-host sharded) arrays as numpy on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _is_typed_key(k: jax.Array) -> bool:
    return jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for bad config values (unknown keys are caught by config_flags)."""
    o = config.objective
    if o.name not in OBJECTIVES:
        raise ValueError(f"objective.name must be one of {OBJECTIVES}, got {o.name!r}")
    if o.name == "tb" and o.log_z not in ("scalar", "conditional"):
        raise ValueError(f"objective.log_z must be 'scalar' or 'conditional', got {o.log_z!r}")
    e = config.explore
    ps = [e.p_on_policy, e.p_tempered, e.p_epsilon, e.p_replay]
    if any(p < 0 for p in ps) or sum(ps) <= 0:
        raise ValueError(f"explore probabilities must be >= 0 with a positive sum, got {ps}")
    if config.train.on_nan not in ("stop", "skip"):
        raise ValueError(f"train.on_nan must be 'stop' or 'skip', got {config.train.on_nan!r}")
    if config.train.steps < 0 or config.train.prompts_per_batch < 1 \
            or config.train.samples_per_prompt < 1:
        raise ValueError("train.steps >= 0, train.prompts_per_batch >= 1 and "
                         "train.samples_per_prompt >= 1 are required")
    if config.reward.temp_start <= 0 or config.reward.temp_end <= 0:
        raise ValueError("reward temperatures must be positive")
