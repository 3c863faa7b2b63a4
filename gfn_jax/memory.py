"""Memory planning: compile the train step ahead of time on abstract shapes and read XLA's
per-device memory figures, before any weight is loaded.

* :func:`estimate_step_memory` -- the step of :func:`gfn_jax.step.make_train_step` (policy
  forward over ``[X | Z]`` with LoRA or full fine-tuning, an LM-likelihood reward from
  :func:`gfn_jax.scoring.score_reward_prefixes`, optionally plus a fixed suffix Y from
  :func:`gfn_jax.scoring.score_suffix_prefixes`, the objective's loss, the optimizer of
  :func:`gfn_jax.optim.build_optimizer`) lowered on ``jax.ShapeDtypeStruct`` inputs with their
  shardings on a mesh and compiled; ``compiled.memory_analysis()`` gives the bytes per device.
* :func:`estimate_sampler_memory` -- the sampler's program (:func:`gfn_jax.sampling.sample`:
  prefill, the KV cache of every row, the decode loop; with ``decode_layers="unrolled"`` the
  per-layer copy of the layer weights it makes) on the same abstract inputs.
* :func:`estimate_from_config` -- the step from a run config (``default_config()`` schema);
  :func:`plan_from_config` -- the run's :class:`MemoryPlan`: the step and the larger of its
  sampler calls (a training draw, an evaluation draw), while the train state is held.
* :func:`estimate_compiled` -- the figures of any compiled (or lowered) step, e.g. the
  trainer's own; on several devices with what each sends to the others per call
  (:mod:`gfn_jax.comms`: between devices, and between TPU slices over the DCN).
* :func:`check_fits` -- raises :class:`DoesNotFitError` naming the config knobs that would
  make a step (or a plan's peak) fit a device's memory; :func:`device_memory_bytes` reads a
  device's limit.

The figures are what XLA's buffer assignment plans for the compiled program on the backend
that compiled it: ``argument`` (weights, adapters, optimizer state, batch), ``output``,
``alias`` (outputs written into donated arguments: the train state), ``temp`` (activations,
gradients, workspace) and the generated code. ``total = argument + output - alias + temp``
is the step's peak footprint on one device. Compiled on a CPU host for a GPU plan, the
figures are the CPU backend's: the program is the same, but fusion and layout differ, and
the CPU backend may widen bfloat16 arithmetic to float32 (larger temporaries); treat them as
an estimate and leave headroom.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.batch import TrainBatch
from gfn_jax.comms import CollectiveTraffic, collective_traffic
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import (activation_sharding, for_backend, param_axes,
                                         param_shapes)
from gfn_jax.scoring import score_reward_prefixes, score_suffix_prefixes

logger = logging.getLogger(__name__)

__all__ = [
    "MemoryEstimate",
    "DoesNotFitError",
    "FIT_KNOBS",
    "estimate_step_memory",
    "estimate_from_config",
    "estimate_sampler_memory",
    "MemoryPlan",
    "plan_from_config",
    "layer_weight_bytes",
    "estimate_compiled",
    "check_fits",
    "device_memory_bytes",
    "memory_limit_bytes",
    "lm_reward_fn",
    "abstract_batch",
    "format_bytes",
    "opt_state_shardings",
    "FAST_CPU_COMPILE",
]

GiB = 2**30

#: The config keys that change the step's memory, in the order :func:`check_fits` names them.
FIT_KNOBS = (
    "train.samples_per_prompt",
    "train.prompts_per_batch",
    "train.grad_accum",
    "task.max_len",
    "model.remat_policy",
    "mesh.fsdp",
    "lora.rank",
    "model.dtype",
)


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB (MiB below 1 GiB, KiB below 1 MiB)."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes of one compiled train step (see the module docstring).

    ``knobs`` holds the current values of the config keys of :data:`FIT_KNOBS` (and any
    other setting that shaped the program) so :func:`check_fits` can name them."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    num_devices: int
    mesh_shape: Mapping[str, int]
    backend: str
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: what one device sends to others per call (:mod:`gfn_jax.comms`); None on one device
    comms: Optional[CollectiveTraffic] = None

    @property
    def total_bytes(self) -> int:
        """Peak footprint per device: arguments + outputs not aliased to a donated argument
        + temporaries + generated code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mesh_shape"] = dict(self.mesh_shape)
        d["knobs"] = dict(self.knobs)
        d["total_bytes"] = self.total_bytes
        d["comms"] = None if self.comms is None else self.comms.as_dict()
        return d

    def summary(self) -> str:
        """One line: total and its parts per device, the mesh and the backend."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        return (f"train step memory per device: {format_bytes(self.total_bytes)} "
                f"(arguments {format_bytes(self.argument_bytes)}, outputs "
                f"{format_bytes(self.output_bytes)} of which {format_bytes(self.alias_bytes)} "
                f"donated, temporaries {format_bytes(self.temp_bytes)}, code "
                f"{format_bytes(self.code_bytes)}) on {self.num_devices} device(s), mesh "
                f"{mesh}, compiled for {self.backend}")


class DoesNotFitError(MemoryError):
    """The compiled step needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory of a training run: its train step and its largest sampler call.

    The sampler runs between steps while the train state stays on the device, so sampling
    holds the step's arguments (weights, adapters, optimizer state; they include the
    sampler's own weights) plus the sampler's temporaries and outputs (the KV cache of every
    row, logits, and with ``model.decode_layers="unrolled"`` a per-layer copy of the layer
    weights). ``kept_bytes`` is held through the whole run: the decode weights a LoRA run
    lays out once (``model.cache_decode_weights``, CPU backends). The batch's few bytes are
    counted in both phases (an upper bound)."""

    step: MemoryEstimate
    sampler: Optional[MemoryEstimate] = None
    kept_bytes: int = 0
    layer_weight_bytes: int = 0  # per device: what the unrolled decode layout copies

    @property
    def step_bytes(self) -> int:
        """Peak per device while the step runs."""
        return self.step.total_bytes + self.kept_bytes

    @property
    def sampling_bytes(self) -> int:
        """Peak per device while the sampler runs (0 without a sampler plan)."""
        if self.sampler is None:
            return 0
        sm = self.sampler
        return (self.step.argument_bytes + self.kept_bytes + sm.temp_bytes
                + max(sm.output_bytes - sm.alias_bytes, 0) + sm.code_bytes)

    @property
    def total_bytes(self) -> int:
        """The run's peak per device: the larger phase."""
        return max(self.step_bytes, self.sampling_bytes)

    def as_dict(self) -> Dict[str, Any]:
        return {"step": self.step.as_dict(),
                "sampler": None if self.sampler is None else self.sampler.as_dict(),
                "kept_bytes": self.kept_bytes, "layer_weight_bytes": self.layer_weight_bytes,
                "step_bytes": self.step_bytes, "sampling_bytes": self.sampling_bytes,
                "total_bytes": self.total_bytes}

    def summary(self) -> str:
        """The step's line, then the sampling phase's and the run's peak."""
        lines = [self.step.summary()]
        if self.step.comms is not None:
            lines.append(self.step.comms.summary("a train step"))
        if self.kept_bytes:
            lines.append(f"decode weights kept for the sampler: {format_bytes(self.kept_bytes)} "
                         f"per device through the run (model.cache_decode_weights)")
        if self.sampler is not None:
            sm = self.sampler
            rows = sm.knobs.get("sampler.rows", "?")
            lines.append(
                f"sampling memory per device: {format_bytes(self.sampling_bytes)} (train state "
                f"held {format_bytes(self.step.argument_bytes)}, sampler temporaries "
                f"{format_bytes(sm.temp_bytes)} for {rows} rows, decode layers "
                f"{sm.knobs.get('model.decode_layers', '?')})")
            if sm.comms is not None:
                lines.append(sm.comms.summary("a sampler call", "decode step"))
            lines.append(f"peak per device: {format_bytes(self.total_bytes)} "
                         f"({'sampling' if self.sampling_bytes > self.step_bytes else 'train step'})")
        return "\n".join(lines)


def _stat(ma: Any, name: str) -> int:
    return int(getattr(ma, name, 0) or 0)


def estimate_compiled(compiled: Any, mesh: Optional[jax.sharding.Mesh] = None,
                      knobs: Optional[Mapping[str, Any]] = None) -> MemoryEstimate:
    """:class:`MemoryEstimate` of a ``jax.stages.Compiled`` (a ``Lowered`` is compiled
    first). The figures are per device: XLA reports the partitioned (per-device) program."""
    if isinstance(compiled, jax.stages.Lowered):
        compiled = compiled.compile()
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs")
    if mesh is not None:
        n = int(mesh.devices.size)
        shape = dict(mesh.shape)
        d0 = mesh.devices.flat[0]
        backend = d0.platform if d0.platform == "cpu" else f"{d0.platform} ({d0.device_kind})"
    else:
        n, shape, backend = 1, {}, jax.default_backend()
    traffic = None
    if n > 1:
        try:
            traffic = collective_traffic(compiled, n)
        except Exception as e:  # noqa: BLE001 - HLO text this reader does not know
            logger.warning("collective traffic not read from the compiled program: %s", e)
    return MemoryEstimate(
        argument_bytes=_stat(ma, "argument_size_in_bytes"),
        output_bytes=_stat(ma, "output_size_in_bytes"),
        alias_bytes=_stat(ma, "alias_size_in_bytes"),
        temp_bytes=_stat(ma, "temp_size_in_bytes"),
        code_bytes=_stat(ma, "generated_code_size_in_bytes"),
        num_devices=n, mesh_shape=shape, backend=backend, knobs=dict(knobs or {}),
        comms=traffic)


# ---------------------------------------------------------------------------
# Abstract inputs
# ---------------------------------------------------------------------------
def lm_reward_fn(term_ids: Sequence[int], suffix: bool = False):
    """A task reward ``log_reward(cfg, params, batch) -> [B, T+1]`` of the LM-likelihood
    kind (:mod:`gfn_jax.tasks.continuation`): ``log p(z_<i ⊤ | X)`` for every prefix, from
    :func:`score_reward_prefixes` under the reward context; with ``suffix``, infilling's
    ``log p(z_<i | X) + log p(Y | X z_<i)`` with Y from ``batch.extras["suffix_tokens"]`` /
    ``["suffix_mask"]`` (:func:`score_suffix_prefixes`)."""
    term_ids = tuple(int(t) for t in term_ids)

    def log_reward(cfg: ModelConfig, params: Any, batch: TrainBatch) -> jax.Array:
        r = score_reward_prefixes(cfg, params, batch.reward_prompt_tokens,
                                  batch.reward_prompt_mask, batch.tokens, batch.lengths,
                                  term_ids)
        if not suffix:
            return r.log_pz + r.log_pterm
        y = score_suffix_prefixes(cfg, params, batch.reward_prompt_tokens,
                                  batch.reward_prompt_mask, batch.tokens, batch.lengths,
                                  batch.extras["suffix_tokens"], batch.extras["suffix_mask"])
        return r.log_pz + y

    return log_reward


def abstract_batch(batch_size: int, prompt_len: int, traj_len: int,
                   reward_prompt_len: Optional[int] = None, suffix_len: int = 0,
                   group_size: int = 1) -> TrainBatch:
    """A :class:`TrainBatch` of ``jax.ShapeDtypeStruct`` leaves (no data); ``group_size``
    (static) says the rows come in groups of that many samples of one prompt."""
    B, P, T = int(batch_size), int(prompt_len), int(traj_len)
    Pr = P if reward_prompt_len is None else int(reward_prompt_len)
    i32, f32 = jnp.int32, jnp.float32
    S = jax.ShapeDtypeStruct
    extras = {}
    if suffix_len:
        extras = {"suffix_tokens": S((B, int(suffix_len)), i32),
                  "suffix_mask": S((B, int(suffix_len)), jnp.bool_)}
    return TrainBatch(
        prompt_tokens=S((B, P), i32), prompt_mask=S((B, P), i32),
        reward_prompt_tokens=S((B, Pr), i32), reward_prompt_mask=S((B, Pr), i32),
        tokens=S((B, T), i32), lengths=S((B,), i32), action_mask=S((B, T), jnp.bool_),
        prompt_index=S((B,), i32), beh_log_pf=S((B, T), f32), beh_log_pterm=S((B, T + 1), f32),
        old_log_pf=S((B, T), f32), old_log_pterm=S((B, T + 1), f32),
        has_behaviour=S((B,), jnp.bool_), weight=S((B,), f32), extras=extras,
        group_size=int(group_size))


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _abstract_weights(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Sequence[Any],
                      lora: Optional[lora_lib.LoraConfig]) -> Tuple[Any, Any]:
    """(base params, LoRA adapter tree or None) as sharded ``ShapeDtypeStruct`` leaves."""
    p_shapes = param_shapes(model_cfg)
    base = _with_shardings(p_shapes, parallel.tree_shardings(param_axes(model_cfg), p_shapes,
                                                             mesh, rules))
    if lora is None:
        return base, None
    t_shapes = jax.eval_shape(
        lambda: lora_lib.init_lora(model_cfg, p_shapes, lora, jax.random.PRNGKey(0))["tree"])
    t_axes = lora_lib.lora_axes(model_cfg, lora)["tree"]
    return base, _with_shardings(t_shapes, parallel.tree_shardings(t_axes, t_shapes, mesh, rules))


def layer_weight_bytes(model_cfg: ModelConfig, mesh: jax.sharding.Mesh,
                       rules: Optional[Sequence[Any]] = None) -> int:
    """Bytes per device of the stacked layer weights under ``mesh`` (their largest shards):
    what the unrolled decode layout copies, and what a kept :class:`DecodeWeights` holds."""
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    base, _ = _abstract_weights(model_cfg, mesh, rules, None)
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(base["layers"]))


def opt_state_shardings(tx: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of ``tx.init(params)``: every parameter-shaped leaf (Adam's moments, the
    accumulated gradient of ``optax.MultiSteps``) takes its parameter's sharding, every other
    leaf (counters) is replicated. ``params`` holds arrays or ``ShapeDtypeStruct`` leaves with
    shardings.

    (``jax.jit(tx.init)(params)`` alone does not do this: a moment is ``zeros_like`` of its
    parameter, which carries no sharding for the compiler to propagate, so the moments come
    back on one device and replicating them keeps a full copy of the optimizer state on
    every device. Use ``jax.jit(tx.init, out_shardings=opt_state_shardings(...))``.)"""
    rep = parallel.replicated(mesh)
    shapes = jax.eval_shape(tx.init, params)
    by_path = {tuple(path): (tuple(x.shape), x.sharding)
               for path, x in jax.tree_util.tree_leaves_with_path(params)}

    def one(path, leaf):
        path = tuple(path)
        for k in range(len(path)):  # the parameter's path is a suffix of the state leaf's
            hit = by_path.get(path[k:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, shapes)


# ---------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------
#: Compile options for estimates on the CPU backend. LLVM code generation is not optimised
#: (the program is never run; buffer assignment, which the figures come from, does not depend
#: on it). Loop-invariant code motion is off: the CPU backend computes bfloat16 matmuls in
#: float32, and that pass would hoist the float32 conversion of every layer's weights out of
#: the layer scan -- a float32 copy of all weights at once (measured: 2.3x the bf16 weights in
#: temporaries) that a GPU or TPU, with native bfloat16 matmuls, never makes.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0,
                    "xla_llvm_disable_expensive_passes": True,
                    "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _shared_knobs(model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Dict[str, Any]:
    """The knobs every estimate records: the dtypes and the mesh's shape."""
    return {"model.dtype": model_cfg.dtype, "model.param_dtype": model_cfg.param_dtype,
            **{f"mesh.{a}": int(mesh.shape[a]) for a in ("data", "fsdp", "tensor")}}


def _compile(lowered: Any, mesh: jax.sharding.Mesh,
             compiler_options: Optional[Mapping[str, Any]]) -> Any:
    if compiler_options is None and mesh.devices.flat[0].platform == "cpu":
        compiler_options = FAST_CPU_COMPILE
    return lowered.compile(dict(compiler_options) if compiler_options else None)


def estimate_step_memory(
    model_cfg: ModelConfig,
    *,
    batch_size: int,
    prompt_len: int,
    traj_len: int,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence[Any]] = None,
    config: Any = None,
    lora: Optional[lora_lib.LoraConfig] = None,
    use_lora: Optional[bool] = None,
    term_ids: Sequence[int] = (0,),
    min_len: int = 0,
    reward_prompt_len: Optional[int] = None,
    suffix_len: int = 0,
    logit_bias: bool = False,
    num_groups: int = 1,
    group_size: int = 1,
    knobs: Optional[Mapping[str, Any]] = None,
    compiler_options: Optional[Mapping[str, Any]] = None,
    reward_model_cfg: Optional[ModelConfig] = None,
) -> MemoryEstimate:
    """Compile one train step on abstract shapes and return its per-device memory.

    Args:
      model_cfg: the policy (and reward) architecture, with the run's dtypes, remat policy
        and ``logits_chunk``.
      batch_size: rows per step call (prompts_per_batch x samples_per_prompt / minibatches).
      prompt_len, traj_len: padded prompt length P and the maximum trajectory length T.
      mesh: the device mesh (default: every device on the ``data`` axis); ``rules`` the
        logical-axis rules (default :data:`gfn_jax.parallel.DEFAULT_RULES`).
      config: a run config (``gfn_jax.defaults.default_config()`` schema) for the objective,
        the optimizer (:func:`gfn_jax.optim.build_optimizer`, incl. ``train.grad_accum``) and
        the LoRA settings; default ``default_config()``.
      lora, use_lora: override ``config.lora`` (None = from the config).
      term_ids, min_len: the policy's ⊤ ids and minimum length.
      reward_prompt_len: the reward context length (default P); ``suffix_len`` > 0 adds
        infilling's suffix reward with a Y of that many tokens.
      logit_bias: whether the policy has a [V] logit bias (one more argument).
      num_groups: number of prompts (group ids for baselines).
      group_size: the rows come in consecutive groups of this many samples of one prompt
        (:attr:`TrainBatch.group_size`); with ``model_cfg.share_prompt`` the planned program
        then runs each prompt once per group, as the trainer's step does.
      knobs: extra knob values recorded in the estimate (for :func:`check_fits`).
      compiler_options: XLA options for the compile; default on CPU
        :data:`FAST_CPU_COMPILE` (LLVM optimisation off: same buffer assignment, about half
        the compile time), none elsewhere.
      reward_model_cfg: a separate reward model (``reward.model``; same tokenizer): its
        weights are held beside the policy's and the reward is computed with it.
    """
    from gfn_jax import objectives as obj
    from gfn_jax.defaults import default_config
    from gfn_jax.objective_registry import get_objective
    from gfn_jax.optim import build_optimizer
    from gfn_jax.policy import lora_config
    from gfn_jax.step import StepSpec, TrainState, make_train_step

    config = default_config() if config is None else config
    if mesh is None:
        mesh = parallel.make_mesh(parallel.MeshConfig())
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    use_lora = bool(config.lora.enabled) if use_lora is None else bool(use_lora)
    if use_lora and lora is None:
        lora = lora_config(config)
    objective = get_objective(config.objective.name)
    options = dict(config.objective.to_dict())
    needs = objective.any_needs(options)
    rep = parallel.replicated(mesh)

    # parameters and trainable tree
    base, adapter_tree = _abstract_weights(model_cfg, mesh, rules, lora if use_lora else None)
    frozen: Dict[str, Any] = {}
    reward_key = "base"
    if reward_model_cfg is not None:  # as the Trainer holds it: frozen["reward"]
        frozen["reward"], _ = _abstract_weights(reward_model_cfg, mesh, rules, None)
        reward_key = "reward"
    if use_lora:
        trainable = adapter_tree
        frozen["base"] = base
    else:
        trainable = base
        if needs.reference or (needs.reward and reward_model_cfg is None):
            frozen["base"] = base
    log_z: Dict[str, Any] = {}
    if needs.log_z:
        kind = {"scalar": "scalar", "conditional": "mlp"}[config.objective.log_z]
        lz = jax.eval_shape(lambda: obj.init_log_z(kind, model_cfg.d_model,
                                                   jax.random.PRNGKey(0)))
        log_z = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), lz)

    # optimizer
    from gfn_jax.optim import total_updates

    tx = build_optimizer(config, total_updates(int(config.train.steps), 1,
                                               int(config.train.grad_accum)))
    tp = {"trainable": trainable, "log_z": log_z}
    opt_shapes = jax.eval_shape(tx.init, tp)
    opt_state = _with_shardings(opt_shapes, opt_state_shardings(tx, tp, mesh))
    S = jax.ShapeDtypeStruct
    state = TrainState(step=S((), jnp.int32, sharding=rep), trainable=trainable, log_z=log_z,
                       opt_state=opt_state, rng=S((2,), jnp.uint32, sharding=rep))
    state_sh = jax.tree_util.tree_map(lambda s: s.sharding, state)
    frozen_sh = jax.tree_util.tree_map(lambda s: s.sharding, frozen)

    T = int(traj_len)
    spec = PolicySpec(term_ids=tuple(term_ids), max_len=T, min_len=int(min_len))
    ss = StepSpec(
        model_cfg=model_cfg, objective=objective, options=options, spec=spec,
        reward_fn=lm_reward_fn(term_ids, suffix=bool(suffix_len)),
        logit_bias=jnp.zeros((model_cfg.vocab_size,), jnp.float32) if logit_bias else None,
        use_lora=use_lora, lora_scale=float(lora.scale) if use_lora else 1.0,
        lora_dropout=float(lora.dropout) if use_lora else 0.0, num_groups=int(num_groups),
        reward_key=reward_key if reward_key in frozen else None,
        reference_key="base" if "base" in frozen else None, reward_model_cfg=reward_model_cfg)
    bsh = parallel.batch_sharding(mesh, 1, rules)
    step = make_train_step(ss, tx, mesh, state_sh, frozen_sh, bsh)
    if int(group_size) < 1 or int(batch_size) % int(group_size):
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the "
                         f"{batch_size} rows")
    batch = abstract_batch(batch_size, prompt_len, T, reward_prompt_len, suffix_len,
                           group_size=group_size)
    hyper = {"temperature": S((), jnp.float32), "kl_coef": S((), jnp.float32)}
    if objective.prepare is not None:
        # what the objective's once-per-rollout function adds to the batch (e.g. PPO's
        # advantages), as abstract leaves, batch-sharded like the rest of the batch
        from gfn_jax.step import make_prepare

        prep = make_prepare(ss, mesh, state_sh, frozen_sh, bsh, rules=rules)
        with activation_sharding(mesh, rules):
            extras, _ = jax.eval_shape(prep, state, frozen, batch, hyper)
        batch = batch.replace(extras={**batch.extras, **{
            k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in extras.items()}})
    with activation_sharding(mesh, rules):
        lowered = step.lower(state, frozen, batch, hyper)
    all_knobs = {
        "train.batch_rows": int(batch_size), "task.max_len": T, "prompt_len": int(prompt_len),
        "model.remat_policy": model_cfg.effective_remat_policy,
        "model.logits_chunk": model_cfg.logits_chunk,
        **_shared_knobs(model_cfg, mesh),
        "lora.rank": int(lora.rank) if use_lora else None,
        "train.grad_accum": int(config.train.grad_accum),
        "model.share_prompt": bool(model_cfg.share_prompt) and int(group_size) > 1,
    }
    all_knobs.update(knobs or {})
    return estimate_compiled(_compile(lowered, mesh, compiler_options), mesh, all_knobs)


def estimate_sampler_memory(
    model_cfg: ModelConfig,
    *,
    prompts: int,
    num_samples: int,
    prompt_len: int,
    traj_len: int,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Optional[Sequence[Any]] = None,
    lora: Optional[lora_lib.LoraConfig] = None,
    term_ids: Sequence[int] = (0,),
    min_len: int = 0,
    logit_bias: bool = False,
    kept_decode_weights: bool = False,
    tool: Optional[Any] = None,
    knobs: Optional[Mapping[str, Any]] = None,
    compiler_options: Optional[Mapping[str, Any]] = None,
) -> MemoryEstimate:
    """Compile the sampler (:func:`gfn_jax.sampling.sample`) on abstract shapes and return its
    per-device memory: ``prompts`` prompts of ``prompt_len`` tokens, ``num_samples`` samples
    of each, up to ``traj_len`` new tokens; the weights sharded as the train state holds them
    (``mesh``, ``rules``), with ``lora`` adapters when given. ``kept_decode_weights``: the
    sampler gets the layer weights laid out beforehand (``gfn_jax.sampling.DecodeWeights``,
    an argument here, not a temporary). The temporaries hold the KV cache of every row
    (``prompts * num_samples`` rows of ``prompt_len + traj_len`` slots, all layers) and, with
    ``model_cfg.decode_layers == "unrolled"``, the per-layer copy of the layer weights that
    the decode loop reads. ``tool``: the task's sampler tool (the arithmetic task's
    calculator, :class:`~gfn_jax.tasks.calculator.CalculatorTool`), compiled into the loop
    as the trainer's sampler has it."""
    from gfn_jax import sampling
    from gfn_jax.models.transformer import decode_weights

    if mesh is None:
        mesh = parallel.make_mesh(parallel.MeshConfig())
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    base, tree = _abstract_weights(model_cfg, mesh, rules, lora)
    rep = parallel.replicated(mesh)
    S = jax.ShapeDtypeStruct
    adapters = None if tree is None else {"scale": S((), jnp.float32, sharding=rep),
                                          "tree": tree}
    laid_out = None
    if kept_decode_weights and model_cfg.decode_layers == "unrolled":
        layers = jax.eval_shape(lambda p: decode_weights({"layers": p}, True), base["layers"])
        laid_out = dict(base, **jax.tree_util.tree_map(
            lambda x: S(x.shape, x.dtype), layers))
    B, P = int(prompts), int(prompt_len)
    spec = PolicySpec(term_ids=tuple(int(t) for t in term_ids), max_len=int(traj_len),
                      min_len=int(min_len))
    scalar = S((), jnp.float32)
    bias = S((model_cfg.vocab_size,), jnp.float32) if logit_bias else None
    platform = mesh.devices.flat[0].platform
    fn = sampling._sample_jit
    if platform != jax.default_backend():  # traced for another platform: not via the cache
        fn = jax.jit(fn.__wrapped__, static_argnames=sampling.SAMPLE_STATIC_ARGNAMES)
    # the decode layout the target's sampler uses; rows split over the mesh as the trainer's
    with for_backend(platform):
        lowered = fn.lower(
            base, S((2,), jnp.uint32), S((B, P), jnp.int32), S((B, P), jnp.int32), scalar,
            scalar, scalar, None, bias, adapters, S((), jnp.int32), laid_out, cfg=model_cfg,
            spec=spec, num_samples=int(num_samples), top_k=0, tool=tool,
            shard=(mesh, rules))
    all_knobs = {"sampler.rows": B * int(num_samples), "sampler.prompts": B,
                 "task.max_len": int(traj_len), "prompt_len": P,
                 "model.decode_layers": model_cfg.decode_layers,
                 "sampler.tool": None if tool is None else type(tool).__name__,
                 "model.decode_gather_weights": bool(model_cfg.decode_gather_weights),
                 **_shared_knobs(model_cfg, mesh)}
    all_knobs.update(knobs or {})
    return estimate_compiled(_compile(lowered, mesh, compiler_options), mesh, all_knobs)


def estimate_from_config(config: Any, model_cfg: ModelConfig, prompt_len: int, *,
                         devices: Optional[Sequence[Any]] = None,
                         reward_prompt_len: Optional[int] = None, suffix_len: int = 0,
                         term_ids: Optional[Sequence[int]] = None,
                         logit_bias: bool = False) -> MemoryEstimate:
    """:func:`estimate_step_memory` for a run config: rows per call =
    ``train.prompts_per_batch * train.samples_per_prompt`` / the objective's minibatches;
    T = ``task.max_len``; the mesh from ``mesh.*`` and ``mesh.rules`` over ``devices``
    (default: ``mesh.devices``); ``model_cfg`` should carry ``model.dtype`` /
    ``model.remat_policy``."""
    from gfn_jax.defaults import mesh_rules, run_mesh
    from gfn_jax.objective_registry import get_objective

    t = config.train
    objective = get_objective(config.objective.name)
    options = dict(config.objective.to_dict())
    minibatches = objective.minibatches_for(options)
    epochs = objective.epochs_for(options)
    rows = int(t.prompts_per_batch) * int(t.samples_per_prompt)
    if rows % minibatches:
        raise ValueError(f"a batch of {rows} rows does not split into {minibatches} minibatches")
    mesh = run_mesh(config, devices)
    task = config.task
    T = int(task.get("max_len", 0) or 0)
    if T < 1:
        raise ValueError("config.task.max_len must be set (>= 1) to plan the step's memory")
    knobs = {"train.samples_per_prompt": int(t.samples_per_prompt),
             "train.prompts_per_batch": int(t.prompts_per_batch),
             "train.grad_accum": int(t.grad_accum)}
    # The trainer's first (or only) call per rollout gets the whole batch in groups of
    # samples_per_prompt; shuffled minibatches and later epochs get ungrouped rows, whose
    # program holds every row's prompt: plan the larger of the two.
    k = int(t.samples_per_prompt)
    group = k if (model_cfg.share_prompt and minibatches == 1 and epochs == 1 and k > 1) else 1
    reward_model_cfg = None
    if config.reward.get("model", ""):  # its config only: no weight is read
        from gfn_jax.models import registry

        rm_cfg, _ = registry.load_config(config.reward.model, dtype=config.model.param_dtype)
        reward_model_cfg = rm_cfg.replace(dtype=config.model.dtype)
    return estimate_step_memory(
        model_cfg, batch_size=rows // minibatches, group_size=group, prompt_len=prompt_len, traj_len=T,
        reward_model_cfg=reward_model_cfg,
        mesh=mesh, rules=mesh_rules(config), config=config,
        term_ids=tuple(term_ids) if term_ids is not None else (model_cfg.vocab_size - 1,),
        min_len=int(task.get("min_len", 0) or 0), reward_prompt_len=reward_prompt_len,
        suffix_len=suffix_len, logit_bias=logit_bias,
        num_groups=int(t.prompts_per_batch), knobs=knobs)


def plan_from_config(config: Any, model_cfg: ModelConfig, prompt_len: int, *,
                     devices: Optional[Sequence[Any]] = None,
                     reward_prompt_len: Optional[int] = None, suffix_len: int = 0,
                     term_ids: Optional[Sequence[int]] = None,
                     logit_bias: bool = False, tool: Optional[Any] = None) -> MemoryPlan:
    """The run's :class:`MemoryPlan`: :func:`estimate_from_config`'s step, and the sampler
    for the larger of a training draw (``train.prompts_per_batch`` prompts x
    ``train.samples_per_prompt`` samples) and an evaluation draw (one prompt x
    ``min(eval.batch_size, eval.num_samples)`` samples, when ``eval.num_samples`` > 0; a task
    that evaluates without sampling makes this an upper bound), on the same mesh, with the
    decode weights the trainer keeps (LoRA with ``model.cache_decode_weights``, where the
    sampler decodes feature-major: CPU backends) and the task's sampler ``tool``."""
    from gfn_jax.defaults import mesh_rules, run_mesh
    from gfn_jax.policy import lora_config, run_keeps_decode_weights

    step = estimate_from_config(config, model_cfg, prompt_len, devices=devices,
                                reward_prompt_len=reward_prompt_len, suffix_len=suffix_len,
                                term_ids=term_ids, logit_bias=logit_bias)
    t, e = config.train, config.eval
    train_draw = (int(t.prompts_per_batch), int(t.samples_per_prompt))
    draw, which = train_draw, "train.prompts_per_batch x train.samples_per_prompt"
    eval_rows = min(int(e.batch_size), int(e.num_samples)) if int(e.num_samples) > 0 else 0
    if eval_rows > train_draw[0] * train_draw[1]:
        draw, which = (1, eval_rows), "eval.batch_size"
    lora = lora_config(config) if config.lora.enabled else None
    mesh = run_mesh(config, devices)
    with for_backend(mesh.devices.flat[0].platform):  # the trainer's rule on those devices
        keep = run_keeps_decode_weights(config, model_cfg)
    rules = mesh_rules(config)
    layer_bytes = layer_weight_bytes(model_cfg, mesh, rules)
    sampler = estimate_sampler_memory(
        model_cfg, prompts=draw[0], num_samples=draw[1], prompt_len=prompt_len,
        traj_len=int(config.task.max_len), mesh=mesh, rules=rules, lora=lora,
        term_ids=tuple(term_ids) if term_ids is not None else (model_cfg.vocab_size - 1,),
        min_len=int(config.task.get("min_len", 0) or 0), logit_bias=logit_bias,
        kept_decode_weights=keep, tool=tool, knobs={"sampler.rows_from": which})
    return MemoryPlan(step=step, sampler=sampler, kept_bytes=layer_bytes if keep else 0,
                      layer_weight_bytes=layer_bytes)


# ---------------------------------------------------------------------------
# Fit check
# ---------------------------------------------------------------------------
def device_memory_bytes(device: Any = None) -> Optional[int]:
    """The memory limit of ``device`` (default: the first device) as its runtime reports it
    (``memory_stats()["bytes_limit"]``: GPUs, TPUs); for a TPU that reports none (the
    compile-only devices of :mod:`gfn_jax.targets`) its chip's HBM; None when unknown (CPU)."""
    from gfn_jax.targets import hbm_bytes_of_kind

    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    stats = stats or {}
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    if limit:
        return int(limit)
    if getattr(device, "platform", "") == "tpu":
        return hbm_bytes_of_kind(getattr(device, "device_kind", ""))
    return None


def memory_limit_bytes(device_gb: float, device: Any = None) -> Optional[float]:
    """The memory a plan is checked against: ``device_gb`` GB (1e9 bytes) when set (> 0),
    else what ``device`` reports (:func:`device_memory_bytes`; None when unknown: CPU)."""
    return float(device_gb) * 1e9 or device_memory_bytes(device)


def _knob(est: MemoryEstimate, key: str) -> str:
    v = est.knobs.get(key)
    return "" if v is None else f" (now {v!r})"


def check_fits(estimate: Any, device_bytes: Optional[float],
               headroom: float = 0.9) -> None:
    """Raise :class:`DoesNotFitError` when ``estimate.total_bytes`` (a step's
    :class:`MemoryEstimate` or a run's :class:`MemoryPlan`, whose peak is the larger of its
    step and sampling phases) exceeds ``headroom`` x ``device_bytes`` (nothing when
    ``device_bytes`` is None: unknown limit). The message gives the parts of the footprint
    and the config knobs that reduce each."""
    if device_bytes is None:
        return
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    budget = float(device_bytes) * headroom
    need = estimate.total_bytes
    if need <= budget:
        return
    if isinstance(estimate, MemoryPlan):
        if estimate.sampling_bytes > estimate.step_bytes:
            raise DoesNotFitError(_sampling_does_not_fit(estimate, budget, device_bytes,
                                                         headroom))
        estimate = estimate.step
    e = estimate
    state_like = e.argument_bytes
    act_like = e.temp_bytes + max(e.output_bytes - e.alias_bytes, 0)
    k = lambda key: key + _knob(e, key)  # noqa: E731
    activation_knobs = [
        f"lower {k('train.samples_per_prompt')} or {k('train.prompts_per_batch')} and raise "
        f"{k('train.grad_accum')} to keep the effective batch",
        f"lower {k('task.max_len')} (trajectory length; prompt length "
        f"{e.knobs.get('prompt_len', '?')})",
        f"rematerialise more: {k('model.remat_policy')} -> 'full' (or 'dots_saveable')",
    ]
    state_knobs = [
        f"shard weights and optimizer state over more devices: raise {k('mesh.fsdp')}",
        f"lower {k('lora.rank')} (adapters, their gradients and Adam moments)",
        f"use bfloat16: {k('model.dtype')} and model.param_dtype"
        f"{_knob(e, 'model.param_dtype')}",
    ]
    first, second = ((activation_knobs, state_knobs) if act_like >= state_like
                     else (state_knobs, activation_knobs))
    lines = "\n".join(f"  - {s}" for s in first + second)
    raise DoesNotFitError(
        f"the train step needs {format_bytes(need)} per device but "
        f"{format_bytes(budget)} is available ({headroom:.0%} of "
        f"{format_bytes(float(device_bytes))}): arguments (weights, adapters, optimizer "
        f"state, batch) {format_bytes(e.argument_bytes)}, temporaries (activations, "
        f"gradients) {format_bytes(e.temp_bytes)}, outputs {format_bytes(e.output_bytes)} "
        f"({format_bytes(e.alias_bytes)} donated). To fit, in order of effect:\n{lines}")


def _sampling_does_not_fit(plan: MemoryPlan, budget: float, device_bytes: float,
                           headroom: float) -> str:
    """The message of a plan whose sampling phase does not fit: its parts, then the knobs,
    the three that free the most first (by the bytes each would free)."""
    sm, st = plan.sampler, plan.step
    assert sm is not None
    k = lambda key: key + _knob(sm, key)  # noqa: E731
    unrolled = sm.knobs.get("model.decode_layers") == "unrolled"
    copy = plan.layer_weight_bytes if unrolled else 0
    rest = max(sm.temp_bytes - copy, 0)  # the KV cache, logits and the like
    first = [(rest, f"draw fewer rows per sampler call ({sm.knobs.get('sampler.rows', '?')} "
                    f"now, from {sm.knobs.get('sampler.rows_from', '?')}): every row holds a KV "
                    f"cache of every layer (the temporaries other than the weight copy: "
                    f"{format_bytes(rest)})")]
    if unrolled:
        first.append((copy, f"set model.decode_layers='scanned' (now 'unrolled'): the decode "
                            f"loop then reads the stacked weights instead of a per-layer copy of "
                            f"them, {format_bytes(copy)} per device"))
    gathered = sm.comms.device_bytes.get("all-gather", 0.0) if sm.comms is not None else 0.0
    if sm.knobs.get("model.decode_gather_weights") and gathered:
        first.append((gathered, f"set model.decode_gather_weights=False: the sampler then "
                                f"reads the fsdp-sharded weights (gathered on every decode "
                                f"step) instead of holding them whole, about "
                                f"{format_bytes(gathered)} per device"))
    if plan.kept_bytes:
        first.append((plan.kept_bytes, f"set model.cache_decode_weights=False: frees the kept "
                                       f"decode weights, {format_bytes(plan.kept_bytes)} per "
                                       f"device"))
    knobs = [text for _, text in sorted(first, key=lambda x: -x[0])] + [
        f"lower {k('task.max_len')} (the cache's length; prompt length "
        f"{sm.knobs.get('prompt_len', '?')})",
        f"shard weights and optimizer state over more devices: raise {k('mesh.fsdp')}",
        f"use bfloat16: {k('model.dtype')} and model.param_dtype{_knob(sm, 'model.param_dtype')}",
    ]
    parts = [f"the train state held through it {format_bytes(st.argument_bytes)}",
             f"the sampler's temporaries (KV cache, logits"
             f"{', the per-layer weight copy' if unrolled else ''}) {format_bytes(sm.temp_bytes)}"]
    if plan.kept_bytes:
        parts.append(f"kept decode weights {format_bytes(plan.kept_bytes)}")
    lines = "\n".join(f"  - {x}" for x in knobs)
    return (f"sampling needs {format_bytes(plan.sampling_bytes)} per device but "
            f"{format_bytes(budget)} is available ({headroom:.0%} of "
            f"{format_bytes(float(device_bytes))}): {', '.join(parts)}. The train step itself "
            f"needs {format_bytes(plan.step_bytes)}. To fit, in order of effect:\n{lines}")
