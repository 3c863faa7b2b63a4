"""Training: the composition root and the loop.

:class:`Trainer` builds the pieces from a config and runs them; it holds no maths:

* the task (:mod:`gfn_jax.tasks`), the model and its shardings (:mod:`gfn_jax.parallel`),
  LoRA adapters or full fine-tuning, the reward model (the base with adapters off, or a
  separate checkpoint), the registered objective (:mod:`gfn_jax.objective_registry`);
* the pure jitted step (:mod:`gfn_jax.step`) and, for objectives like PPO, the
  once-per-rollout ``prepare``;
* the host-side rollouts (:mod:`gfn_jax.rollout`): prompts, behaviour, replay, data batches;
  with ``data.source``, each step's prompts from a :class:`~gfn_jax.prompt_stream.PromptStream`
  (its position saved in every checkpoint);
* checkpoints, metrics, the loop (progress bar, preemption, non-finite steps).

One loop step is one rollout: a batch of trajectories, then the objective's epochs x
minibatches of updates. Schedules count optimizer updates (:mod:`gfn_jax.optim`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import objectives as obj
from gfn_jax import parallel
from gfn_jax.batch import TrainBatch
from gfn_jax.checkpoint import Checkpointer, PreemptionHandler
from gfn_jax.hostmem import malloc_setting, process_usage, usage_since
from gfn_jax.metrics import MetricsWriter, plot_metrics
from gfn_jax.models import lora as lora_lib
from gfn_jax.models import registry
from gfn_jax.models.adapters import Adapters
from gfn_jax.models.transformer import param_axes, param_shapes
from gfn_jax.objective_registry import final_values, get_objective
from gfn_jax.optim import build_optimizer, reward_temperature, total_updates
from gfn_jax.policy import (Policy, load_base_params, load_model_config, lora_config,
                            run_keeps_decode_weights)
from gfn_jax.profiling import StepProfiler, describe
from gfn_jax.prompt_stream import PromptStream
from gfn_jax.replay import ReplayBuffer
from gfn_jax.rollout import BEHAVIOURS, Rollouts
from gfn_jax.sampling import DecodeWeights, cache_decode_weights
from gfn_jax.step import (StepSpec, TrainState, host_hyper, make_prepare, make_train_step,
                          state_mask_from)
from gfn_jax.tasks import make_task

if TYPE_CHECKING:  # ml_collections is only needed to build configs, not to import the library
    import ml_collections

Params = Any

__all__ = ["Trainer", "TrainState", "NonFiniteLossError", "state_mask_from", "validate_config"]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check a whole config before anything is built (see
    :func:`gfn_jax.defaults.validate_config`)."""
    from gfn_jax.defaults import validate_config as _validate

    _validate(config)


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss is NaN/inf and ``train.on_nan == 'stop'``."""


class Trainer:
    """Builds everything from a config and runs the fine-tuning loop."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 restore: bool = True, devices: Optional[List[Any]] = None,
                 plan_only: bool = False) -> None:
        """``plan_only``: stop after the memory plan (``memory_estimate``, made whatever
        ``memory.estimate`` says), before any weight is read; such a Trainer cannot train
        (:func:`plan_run`)."""
        validate_config(config)
        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        parallel.initialize_distributed()
        from gfn_jax.defaults import mesh_rules, run_mesh

        self.mesh = run_mesh(config, devices)
        self.rules = mesh_rules(config)
        self.objective = get_objective(config.objective.name)
        self.options = dict(config.objective.to_dict())
        needs = self.objective.any_needs(self.options)
        self.source = self.objective.source_for(self.options)

        # --- task, model, policy constraints --------------------------------
        self.task = make_task(config.task, config.data.root)
        # the model's config and tokenizer only: its weights are read after the memory plan
        self.model_cfg, self.tokenizer = load_model_config(config, self.task)
        self.task.setup(self.model_cfg, self.tokenizer)
        self.spec = self.task.policy_spec()
        bias = self.task.policy_logit_bias()
        self.logit_bias = None if bias is None else jnp.asarray(bias, jnp.float32)
        self.tool = self.task.tool()
        # data.source: every step's prompts come from a per-host sharded stream instead
        self.prompt_stream: Optional[PromptStream] = None
        self.prompts: List[str] = []
        self.prompt_ids: List[List[int]] = []
        reward_prompts = None
        if config.data.source:
            self.prompt_stream = PromptStream.open(config, self.task)
            self.prompt_len = self._padded_len(int(config.data.max_prompt_len))
            need = self.prompt_len + int(self.spec.max_len) + self.prompt_stream.suffix_len
            if need > self.model_cfg.max_seq_len:
                raise ValueError(
                    f"data.max_prompt_len ({config.data.max_prompt_len}, padded to "
                    f"{self.prompt_len}) + task.max_len ({self.spec.max_len}) + the streamed "
                    f"suffix ({self.prompt_stream.suffix_len}) = {need} tokens exceeds the "
                    f"model's context of {self.model_cfg.max_seq_len}: lower "
                    f"data.max_prompt_len")
        else:
            self.prompts = list(self.task.train_prompts())
            self.prompt_ids = [self._encode(p, k, "prompt") for k, p in enumerate(self.prompts)]
            self.prompt_len = self._padded_len(max(len(p) for p in self.prompt_ids))
            reward_prompts = self.task.reward_prompts()
        if reward_prompts is None:
            self.reward_prompt_ids, self.reward_prompt_len = self.prompt_ids, self.prompt_len
        else:
            if len(reward_prompts) != len(self.prompts):
                raise ValueError(f"task {self.task.name!r} gave {len(reward_prompts)} reward "
                                 f"prompts for {len(self.prompts)} training prompts")
            self.reward_prompt_ids = [self._encode(p, k, "reward prompt", reward=True)
                                      for k, p in enumerate(reward_prompts)]
            self.reward_prompt_len = max(len(p) for p in self.reward_prompt_ids)

        # the memory plan, from shapes alone: a config that cannot fit is refused here,
        # before any weight is read or placed and before the optimizer state is made
        self.memory_estimate = self._plan_memory(devices, force=plan_only)
        if plan_only:
            return

        # --- parameters and their shardings ---------------------------------
        self.base_shardings = parallel.tree_shardings(
            param_axes(self.model_cfg), param_shapes(self.model_cfg), self.mesh, self.rules)
        # a loaded model stays in host memory until it is placed with its shardings, and a
        # random one is drawn shard by shard: no device holds the whole model on the way (a
        # model sharded over the mesh may not fit one device)
        base_params = load_base_params(config, self.model_cfg, host=True,
                                       shardings=lambda _: self.base_shardings)
        base_params = parallel.shard_params(base_params, self.base_shardings)
        self.use_lora = bool(config.lora.enabled)
        rng = jax.random.PRNGKey(config.seed)
        rng, k_lora, k_logz = jax.random.split(rng, 3)
        self.frozen: Dict[str, Params] = {}
        reward_model_cfg = None
        reward_key: Optional[str] = None
        uses_reward_model = needs.reward and self.task.needs_reward_model()
        if config.reward.model:
            rm = registry.load(config.reward.model, dtype=config.model.param_dtype, host=True)
            if rm.config.vocab_size != self.model_cfg.vocab_size:
                raise ValueError(f"reward.model={config.reward.model!r} has a vocabulary of "
                                 f"{rm.config.vocab_size} tokens, the policy "
                                 f"{self.model_cfg.vocab_size}: they must share a tokenizer")
            reward_model_cfg = rm.config.replace(dtype=config.model.dtype)
            sh = parallel.tree_shardings(param_axes(reward_model_cfg),
                                         param_shapes(reward_model_cfg), self.mesh, self.rules)
            self.frozen["reward"] = parallel.shard_params(rm.params, sh)
            reward_key = "reward"
        if self.use_lora:
            self.lora_cfg = lora_config(config)
            tree = lora_lib.init_lora(self.model_cfg, base_params, self.lora_cfg, k_lora)["tree"]
            t_axes = lora_lib.lora_axes(self.model_cfg, self.lora_cfg)["tree"]
            t_shapes = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
            trainable = parallel.shard_params(
                tree, parallel.tree_shardings(t_axes, t_shapes, self.mesh, self.rules))
            self.frozen["base"] = base_params  # policy base = reference = default reward
        else:
            self.lora_cfg = None
            trainable = base_params
            # the reward / reference model is the frozen initial model: keep one copy
            if needs.reference or (uses_reward_model and reward_key is None) \
                    or self.task_scores_eval():
                self.frozen["base"] = jax.tree_util.tree_map(jnp.copy, base_params)
        if reward_key is None and "base" in self.frozen:
            reward_key = "base"
        log_z = {}
        if needs.log_z:
            kind = {"scalar": "scalar", "conditional": "mlp"}[config.objective.log_z]
            log_z = obj.init_log_z(kind, self.model_cfg.d_model, k_logz,
                                   init_value=config.objective.log_z_init)
        rep = parallel.replicated(self.mesh)
        log_z = jax.device_put(log_z, rep)

        # --- optimizer and state ---------------------------------------------
        self.epochs = self.objective.epochs_for(self.options)
        self.minibatches = self.objective.minibatches_for(self.options)
        self.calls_per_rollout = self.epochs * self.minibatches
        self.total_updates = total_updates(config.train.steps, self.calls_per_rollout,
                                           config.train.grad_accum)
        self.tx = build_optimizer(config, self.total_updates)
        # every parameter-shaped leaf (Adam's moments, MultiSteps' accumulator) takes its
        # parameter's sharding (so mesh.fsdp shards the optimizer state too); counters are
        # replicated over the mesh
        from gfn_jax.memory import opt_state_shardings

        tp = {"trainable": trainable, "log_z": log_z}
        opt_state = jax.jit(self.tx.init,
                            out_shardings=opt_state_shardings(self.tx, tp, self.mesh))(tp)
        self.state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), rep), trainable=trainable,
            log_z=log_z, opt_state=opt_state,
            rng=jax.device_put(jax.random.key_data(rng) if _is_typed_key(rng) else rng, rep))
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)
        self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.frozen)
        self.hyper: Dict[str, float] = {"kl_coef": float(config.objective.kl_coef)}

        self.replay = ReplayBuffer(
            capacity=config.replay.capacity, seed=config.seed,
            dedup_fraction=config.replay.dedup_fraction if config.replay.near_dedup else 0.0)
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints)
        self.start_step = 0
        self.calls = 0
        self.replay_seeded: set = set()  # prompts whose data targets are in the buffer (lazy)
        self._final_log_r: Any = None  # the jitted seeding reward, built on first use
        if restore and self.ckpt.latest_step() is not None:
            self._restore()
        self.step_spec = StepSpec(
            model_cfg=self.model_cfg, objective=self.objective, options=self.options,
            spec=self.spec, reward_fn=self._task_reward, logit_bias=self.logit_bias,
            use_lora=self.use_lora,
            lora_scale=float(self.lora_cfg.scale) if self.lora_cfg else 1.0,
            lora_dropout=float(self.lora_cfg.dropout) if self.lora_cfg else 0.0,
            num_groups=(int(config.train.prompts_per_batch) if self.prompt_stream
                        else len(self.prompts)), reward_key=reward_key,
            reference_key="base" if "base" in self.frozen else None,
            reward_model_cfg=reward_model_cfg)
        self._step_fn = None
        self._prepare_fn = None
        # the LoRA base laid out for the sampler's decode loop once (CPU), made at first use
        # where the sampler's draws will use it (policy.run_keeps_decode_weights)
        self._decode_weights: Optional[DecodeWeights] = None
        self._keep_decode_weights = run_keeps_decode_weights(config, self.model_cfg)
        targets = None
        if self.source == "data" or config.replay.seed_from_data:
            targets = self.task.targets()
            if not targets:
                raise ValueError(f"task {self.task.name!r} supplied no target sequences")
        self.rollouts = Rollouts(config, self.prompt_ids, self.reward_prompt_ids,
                                 self.prompt_len, self.reward_prompt_len,
                                 self.tokenizer.pad_id or 0, self.replay, self.spec.max_len,
                                 targets)
        self._targets_by_prompt: Dict[int, List[Any]] = {}
        if config.replay.seed_from_data and config.replay.seed_lazily:
            # score a prompt's targets the first time a replay batch needs that prompt: a run
            # that sees 80 of 1,000 stories scores 80, not 1,000, before its first step
            for t in targets:
                self._targets_by_prompt.setdefault(int(t.prompt_index), []).append(t)
            self.rollouts.before_replay = self._seed_prompts
        elif config.replay.seed_from_data and self.start_step == 0 and len(self.replay) == 0:
            self.seed_replay(targets)
        # tasks that score evaluation samples under the reward model (continuation, infill)
        if reward_key is not None:
            self.task.bind_reward_params(self.frozen[reward_key])

    # ------------------------------------------------------------------ utils
    def take_stream_prompts(self) -> None:
        """The next step's streamed prompts (with their reward contexts and suffixes, where
        the task has them) become the rollouts' prompt table (``data.source`` only)."""
        assert self.prompt_stream is not None
        rows = self.prompt_stream.next_rows()
        self.rollouts.use_prompts(rows.prompts, rows.reward_prompts, rows.suffixes,
                                  self.prompt_stream.suffix_len)

    def _plan_memory(self, devices: Optional[List[Any]], force: bool = False) -> Any:
        """Compile the step and the sampler ahead of time on abstract shapes and check the
        run's per-device peak against the device (``memory.estimate``: auto = on
        accelerators only; ``force``: whatever it says)."""
        mc = self.config.memory
        if not force and (mc.estimate == "never"
                          or (mc.estimate == "auto" and jax.default_backend() == "cpu")):
            return None
        from gfn_jax import memory

        est = memory.plan_from_config(
            self.config, self.model_cfg, self.prompt_len, devices=devices,
            reward_prompt_len=self.reward_prompt_len, term_ids=self.spec.term_ids,
            logit_bias=self.logit_bias is not None, tool=self.tool,
            suffix_len=int(getattr(self.task, "suffix_len", 0) or 0))
        if jax.process_index() == 0:
            print(est.summary())
        limit = memory.memory_limit_bytes(mc.device_gb, self.mesh.devices.flat[0])
        memory.check_fits(est, limit, float(mc.headroom))
        return est

    def _task_reward(self, model_cfg: Any, params: Params, batch: TrainBatch) -> jax.Array:
        """The task's reward, looked up when the step is traced (not bound at start-up)."""
        return self.task.log_reward(model_cfg, params, batch)

    def task_scores_eval(self) -> bool:
        """Whether the task scores evaluation samples with the reward model."""
        return type(self.task).bind_reward_params is not _base_bind()

    def _encode(self, text: str, k: int, what: str, reward: bool = False) -> List[int]:
        ids = (self.task.encode_reward_prompt if reward else self.task.encode_prompt)(text)
        limit = int(self.config.data.max_prompt_len)
        if limit and len(ids) > limit and not reward:
            raise ValueError(f"{what} {k} has {len(ids)} tokens, more than "
                             f"data.max_prompt_len={limit}: {text[:80]!r}")
        if not ids:
            raise ValueError(f"{what} {k} ({text[:80]!r}) encodes to no tokens")
        return ids

    def _padded_len(self, longest: int) -> int:
        """The static prompt length: ``data.max_prompt_len``, else the longest prompt."""
        P = max(int(self.config.data.max_prompt_len) or longest, longest)
        if P + self.spec.max_len > self.model_cfg.max_seq_len:
            raise ValueError(
                f"prompts of {P} tokens + task.max_len ({self.spec.max_len}) exceed the "
                f"model's context of {self.model_cfg.max_seq_len} tokens; shorten the prompts "
                f"or lower task.max_len")
        return P

    @property
    def policy_params(self) -> Tuple[Params, Optional[Adapters]]:
        """(params, adapters) of the current policy."""
        if self.use_lora:
            return self.frozen["base"], self.step_spec.adapters(self.state.trainable)
        return self.state.trainable, None

    @property
    def policy(self) -> Policy:
        """The current policy as a :class:`~gfn_jax.policy.Policy` value."""
        params, adapters = self.policy_params
        # the task's spec, bias and tool were read once at start-up: no per-step rebuild
        policy = Policy(model_config=self.model_cfg, params=params, adapters=adapters,
                        spec=self.spec, tokenizer=self.tokenizer, logit_bias=self.logit_bias,
                        tool=self.tool, encode_prompt=self.task.encode_prompt,
                        decode_weights=self._decode_weights, shard=(self.mesh, self.rules))
        if self._keep_decode_weights and self._decode_weights is None:
            self._decode_weights = cache_decode_weights(params)
            policy = dataclasses.replace(policy, decode_weights=self._decode_weights)
        return policy

    def _restore(self) -> None:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.state, self.state_shardings)
        state, meta, replay = self.ckpt.restore(abstract_state=abstract)
        self.state = state
        if replay is not None:
            self.replay = ReplayBuffer.from_state_dict(replay)
        self.start_step = int(meta.get("step", int(state.step)))
        self.replay_seeded = {int(r) for r in meta.get("replay_seeded") or []}
        self.calls = int(jax.device_get(state.step))
        self.hyper.update({k: float(v) for k, v in (meta.get("hyper") or {}).items()})
        if self.prompt_stream is not None:
            why = self.prompt_stream.restore(meta.get("data_stream"))
            if why and jax.process_index() == 0:
                print(f"note: {why}")

    def updates_done(self) -> int:
        """Optimizer updates completed so far (step calls // grad_accum): every micro-batch of
        one accumulated update sees the same reward temperature, as it sees the same LR."""
        return self.calls // max(int(self.config.train.grad_accum), 1)

    def temperature(self) -> float:
        """The reward temperature now (anneals with optimizer updates)."""
        return reward_temperature(self.config, self.updates_done())

    # --------------------------------------------------------------- replay seeding
    def _seed_prompts(self, rows: Sequence[int]) -> int:
        """Lazy seeding: add the data targets of the prompts in ``rows`` not seeded yet."""
        new = [int(r) for r in dict.fromkeys(rows) if int(r) not in self.replay_seeded]
        targets = [t for r in new for t in self._targets_by_prompt.get(r, [])]
        self.replay_seeded.update(new)
        return self.seed_replay(targets, chunk=16) if targets else 0

    def _final_log_r_fn(self) -> Any:
        """The jitted untempered final log R of a batch of trajectories, built once (lazy
        seeding calls it again for every newly seen prompt: one compilation per shape)."""
        if self._final_log_r is None:
            ss = self.step_spec
            rkey = ss.reward_key
            rcfg = ss.reward_model_cfg or self.model_cfg
            reward_fn = self._task_reward

            @jax.jit
            def final_log_r(frozen, batch):
                params = frozen.get(rkey) if rkey else None
                return final_values(reward_fn(rcfg, params, batch).astype(jnp.float32),
                                    batch.lengths)

            self._final_log_r = final_log_r
        return self._final_log_r

    def seed_replay(self, targets: List[Any], chunk: int = 64) -> int:
        """Add the task's target trajectories, with their untempered log R, to the buffer."""
        final_log_r = self._final_log_r_fn()
        added = 0
        for s in range(0, len(targets), chunk):
            part = list(targets[s:s + chunk])
            n = len(part)
            part += [part[-1]] * (chunk - n)  # one static shape
            b = self.rollouts.trajectories([t.prompt_index for t in part],
                                           [t.tokens for t in part],
                                           [t.action_mask for t in part])
            # the rows split over the mesh (each device scores its share), read back whole
            leaves, tree = jax.tree_util.tree_flatten(b)
            placed = jax.tree_util.tree_unflatten(tree, parallel.split_rows(self.frozen, *leaves))
            lr = np.asarray(parallel.to_host(final_log_r(self.frozen, placed)))[:n]
            self.rollouts.add_to_replay(b.take(range(n)), lr)
            added += n
        return added

    # -------------------------------------------------------------- the step
    def _build(self) -> None:
        bsh = parallel.batch_sharding(self.mesh, 1, self.rules)
        self._step_fn = make_train_step(self.step_spec, self.tx, self.mesh,
                                        self.state_shardings, self.frozen_shardings, bsh,
                                        rules=self.rules)
        if self.objective.prepare is not None:
            self._prepare_fn = make_prepare(self.step_spec, self.mesh, self.state_shardings,
                                            self.frozen_shardings, bsh, rules=self.rules)

    def train_step(self, batch: TrainBatch, temperature: Optional[float] = None,
                   step: int = 0) -> Tuple[Dict[str, float], np.ndarray]:
        """One rollout's updates on a host batch: the objective's ``prepare`` (if any), then
        its epochs x minibatches of jitted steps. Returns (metrics, final untempered log R)."""
        if self._step_fn is None:
            self._build()
        temp = self.temperature() if temperature is None else float(temperature)
        hyper = host_hyper(temp, self.hyper["kl_coef"])
        pre_metrics: Dict[str, float] = {}
        log_r_final = None
        if self._prepare_fn is not None:
            extras, pm = self._prepare_fn(self.state, self.frozen,
                                          batch.step_input(self.mesh, self.rules), hyper)
            extras, pm = parallel.to_host((extras, pm))  # one fetch (one gather across processes)
            batch = batch.with_extras({k: np.asarray(v) for k, v in extras.items()})
            pre_metrics = {k: float(v) for k, v in pm.items()}
            log_r_final = np.asarray(extras.get("log_r_final"))
        B = batch.size
        M = self.minibatches
        if B % M:
            raise ValueError(f"a batch of {B} rows does not split into {M} minibatches")
        calls: List[Dict[str, float]] = []
        lrf_parts = []
        for e in range(self.epochs):
            order = (np.arange(B) if M == 1 and e == 0 else
                     np.random.default_rng([self.config.seed, step, 7, e]).permutation(B))
            for m in range(M):
                mb = batch if M == 1 and e == 0 else batch.take(order[m * B // M:(m + 1) * B // M])
                self.state, met, lrf = self._step_fn(self.state, self.frozen,
                                                     mb.step_input(self.mesh, self.rules), hyper)
                self.calls += 1
                calls.append(met)  # fetched once below: the calls stay queued back to back
                if e == 0 and M == 1:
                    lrf_parts.append(lrf)
        calls, lrf_parts = parallel.to_host((calls, lrf_parts))
        calls = [{k: float(v) for k, v in c.items()} for c in calls]
        lrf_parts = [np.asarray(x) for x in lrf_parts]
        metrics = {k: float(np.mean([c[k] for c in calls])) for k in calls[0]}
        metrics["finite"] = float(min(c["finite"] for c in calls))
        metrics["loss"] = float(np.mean([c["loss"] for c in calls]))
        for k, v in pre_metrics.items():
            metrics.setdefault(k, v)
        if log_r_final is None:
            log_r_final = lrf_parts[0] if lrf_parts else np.zeros(B, np.float32)
        if self.objective.after_rollout is not None:
            self.hyper = self.objective.after_rollout(self.hyper, metrics, self.options)
        metrics["kl_coef"] = float(self.hyper["kl_coef"])
        return metrics, np.asarray(log_r_final)

    # ---------------------------------------------------------------- loop
    def save(self, step: int, force: bool = False) -> None:
        if step == getattr(self, "_last_saved", None):
            return  # already saved (e.g. by ckpt_every at the last step): no second save
        meta = {"step": step, "config": self.config.to_dict(), "hyper": dict(self.hyper),
                "reward_temperature": self.temperature(), "updates": self.updates_done()}
        if self.prompt_stream is not None:  # in the same atomic checkpoint as the state
            meta["data_stream"] = self.prompt_stream.state()
        if self.replay_seeded:
            meta["replay_seeded"] = sorted(self.replay_seeded)
        self.ckpt.save(step, self.state, meta=_jsonable(meta),
                       replay=self.replay.state_dict(), force=force)
        self._last_saved = step

    def make_batch(self, step: int) -> Tuple[TrainBatch, str]:
        """The host batch of loop step ``step`` and its behaviour's name."""
        temp = self.temperature() if self.config.replay.sampling == "reward" else None
        if self.prompt_stream is not None:
            self.take_stream_prompts()
        return self.rollouts.make_batch(step, self.policy, temp, self.source)

    def add_to_replay(self, batch: TrainBatch, log_r_final: np.ndarray) -> None:
        if self.config.explore.p_replay <= 0 and not self.config.replay.always_fill:
            return
        if self.source == "data":
            return
        self.rollouts.add_to_replay(batch, log_r_final)

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
        usage0 = process_usage()
        tokens_seen = 0
        last: Dict[str, float] = {}
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps,
                   desc="training", disable=not progress or jax.process_index() != 0,
                   dynamic_ncols=True)
        step = self.start_step
        prof = StepProfiler(self.workdir, tc.get("profile_start", 0), tc.get("profile_steps", 0))
        try:
            with PreemptionHandler(catch_sigint=True) as preempt:
                for step in bar:
                    prof.before(step)
                    t0 = time.time()
                    batch, kind = self.make_batch(step)
                    t_sample = time.time() - t0
                    temp = self.temperature()
                    metrics, log_r_final = self.train_step(batch, temp, step)
                    dt = time.time() - t0
                    n_tok = int(batch.size * (batch.max_len + np.shape(batch.prompt_tokens)[1]))
                    tokens_seen += n_tok
                    if not metrics["finite"]:
                        msg = (f"non-finite loss ({metrics['loss']}) or gradient "
                               f"({metrics['grad_norm']}) at step {step}; the update was skipped")
                        writer.write(step, {"nonfinite": 1.0})
                        if tc.on_nan == "stop":
                            writer.close()
                            raise NonFiniteLossError(msg + " and training stops (train.on_nan='stop')")
                        print("warning:", msg)
                    self.add_to_replay(batch, log_r_final)
                    self._report_profile(prof.after(step), summary)
                    metrics.update(reward_temperature=temp, step_time=dt, sample_time=t_sample,
                                   tokens_per_s=n_tok / max(dt, 1e-9),
                                   behaviour=float(BEHAVIOURS.index(kind)),
                                   replay_size=float(len(self.replay)))
                    if self.prompt_stream is not None:
                        metrics.update(self.prompt_stream.metrics())
                    if len(self.replay):
                        rs = self.replay.stats()
                        metrics.update(replay_best_log_r=rs["best_log_r"],
                                       replay_mean_log_r=rs["mean_log_r"])
                    last = metrics
                    if step % tc.log_every == 0 or step == tc.steps - 1:
                        writer.write(step, metrics)
                    post = {"loss": f"{metrics['loss']:.3g}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
                    if "log_r" in metrics:
                        post["logR"] = f"{metrics['log_r']:.3g}"
                    bar.set_postfix(**post)
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
        finally:  # a trace still running (stopped early, or an error) ends here
            self._report_profile(prof.close(step), summary)
        self.ckpt.wait()
        summary.update(
            steps=int(self.state.step) // max(self.calls_per_rollout, 1),
            optimizer_updates=self.updates_done(), wall_time_s=time.time() - t_start,
            tokens_per_s=tokens_seen / max(time.time() - t_start, 1e-9),
            host_malloc=malloc_setting(), final_metrics=last,
            # this process's CPU time, page faults and peak resident size over the loop
            host_usage={"training": usage_since(usage0)})
        writer.write_summary(_jsonable(summary))
        writer.close()
        try:
            if jax.process_index() == 0:  # only process 0 has the metrics; one writer
                plot_metrics(self.workdir)
        except Exception as e:  # plots are a convenience, never fatal
            print("warning: could not plot metrics:", e)
        return summary

    @staticmethod
    def _report_profile(p: Optional[Dict[str, Any]], summary: Dict[str, Any]) -> None:
        """A finished train.profile_steps trace: into the run's summary and on stdout."""
        if p is None:
            return
        summary["profile"] = p
        if jax.process_index() == 0:
            print(f"profile of steps {p['first_step']}-{p['last_step']}, per step: "
                  f"{describe(p)}; trace in {p['trace_dir']}")

    # ------------------------------------------------------------ evaluation
    def generate(self, num: int, prompt: Optional[str] = None, temperature: float = 1.0,
                 batch_size: int = 0, seed: int = 0) -> List[Dict[str, Any]]:
        """Draw ``num`` samples (from ``prompt`` or cycling through the task's eval prompts)
        from the current policy; returns dicts with prompt, text, tokens, log_q."""
        prompts = [prompt] if prompt is not None else list(self.task.eval_prompts())
        bs = batch_size or int(self.config.eval.batch_size)
        return self.policy.sample_total(prompts, num, batch_size=bs, temperature=temperature,
                                        seed=seed, progress=True)


def _base_bind():
    from gfn_jax.tasks.base import Task

    return Task.bind_reward_params


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


def plan_run(config: ml_collections.ConfigDict, devices: Optional[List[Any]] = None,
             target: Any = None) -> Any:
    """The :class:`~gfn_jax.memory.MemoryPlan` of the run ``config`` describes, on
    ``devices`` (default the mesh's), without reading any weight: the task, the model's
    config and tokenizer, the prompt lengths and the mesh are set up as ``gfn-jax train``
    sets them up, then the train step and the sampler are compiled on abstract shapes
    (``memory.estimate`` is ignored). ``target`` (a :class:`~gfn_jax.targets.TpuTarget` or
    its spec, e.g. ``"v5p-64"``): compile for that TPU slice's compile-only devices instead,
    by the TPU compiler, on whatever host this is (:func:`plan_devices`). Raises
    :class:`~gfn_jax.memory.DoesNotFitError` where the device's memory
    (``memory.device_gb``, or what the device reports, or the target chip's HBM) is too
    small."""
    import tempfile

    if target is not None:
        devices = plan_devices(config, target)
    with tempfile.TemporaryDirectory(prefix="gfn-jax-plan-") as d:
        return Trainer(config, d, restore=False, devices=devices, plan_only=True).memory_estimate


def plan_devices(config: ml_collections.ConfigDict, target: Any) -> List[Any]:
    """The compile-only devices a plan for ``target`` spans (a TPU slice: every chip, or the
    first ``mesh.devices`` chips of its first host, as a run there would take them)."""
    from gfn_jax.defaults import _mesh_devices_setting
    from gfn_jax.targets import TpuTarget, parse_target

    tgt = target if isinstance(target, TpuTarget) else parse_target(target)
    devices = tgt.devices()
    n = _mesh_devices_setting(config)
    if n:
        first_host = [d for d in devices if d.process_index == devices[0].process_index]
        if n > len(first_host):
            raise ValueError(f"mesh.devices={n} but a host of {tgt.name} has "
                             f"{len(first_host)} chip(s); set mesh.devices=0 (the whole "
                             f"slice) or at most {len(first_host)}")
        devices = first_host[:n]
    return devices
