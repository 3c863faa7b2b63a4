"""Memory planning: compile the train step ahead of time on abstract shapes and read XLA's
per-device memory figures, before any weight is loaded.

* :func:`estimate_step_memory` -- the step of :func:`gfn_jax.step.make_train_step` (policy
  forward over ``[X | Z]`` with LoRA or full fine-tuning, an LM-likelihood reward from
  :func:`gfn_jax.scoring.score_reward_prefixes`, optionally plus a fixed suffix Y from
  :func:`gfn_jax.scoring.score_suffix_prefixes`, the objective's loss, the optimizer of
  :func:`gfn_jax.optim.build_optimizer`) lowered on ``jax.ShapeDtypeStruct`` inputs with their
  shardings on a mesh and compiled; ``compiled.memory_analysis()`` gives the bytes per device.
* :func:`estimate_from_config` -- the same from a run config (``default_config()`` schema).
* :func:`estimate_compiled` -- the figures of any compiled (or lowered) step, e.g. the
  trainer's own.
* :func:`check_fits` -- raises :class:`DoesNotFitError` naming the config knobs that would
  make a step fit a device's memory; :func:`device_memory_bytes` reads a device's limit.

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
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from gfn_jax import parallel
from gfn_jax.batch import TrainBatch
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import activation_sharding, param_axes, param_shapes
from gfn_jax.scoring import score_reward_prefixes, score_suffix_prefixes

__all__ = [
    "MemoryEstimate",
    "DoesNotFitError",
    "FIT_KNOBS",
    "estimate_step_memory",
    "estimate_from_config",
    "estimate_compiled",
    "check_fits",
    "device_memory_bytes",
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
        backend = mesh.devices.flat[0].platform
    else:
        n, shape, backend = 1, {}, jax.default_backend()
    return MemoryEstimate(
        argument_bytes=_stat(ma, "argument_size_in_bytes"),
        output_bytes=_stat(ma, "output_size_in_bytes"),
        alias_bytes=_stat(ma, "alias_size_in_bytes"),
        temp_bytes=_stat(ma, "temp_size_in_bytes"),
        code_bytes=_stat(ma, "generated_code_size_in_bytes"),
        num_devices=n, mesh_shape=shape, backend=backend, knobs=dict(knobs or {}))


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
    """
    from gfn_jax import objectives as obj
    from gfn_jax.defaults import default_config
    from gfn_jax.objective_registry import get_objective
    from gfn_jax.optim import build_optimizer
    from gfn_jax.step import StepSpec, TrainState, make_train_step

    config = default_config() if config is None else config
    if mesh is None:
        mesh = parallel.make_mesh(parallel.MeshConfig())
    rules = parallel.DEFAULT_RULES if rules is None else tuple(rules)
    use_lora = bool(config.lora.enabled) if use_lora is None else bool(use_lora)
    if use_lora and lora is None:
        lc = config.lora
        lora = lora_lib.LoraConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                                   targets=tuple(lc.targets))
    objective = get_objective(config.objective.name)
    options = dict(config.objective.to_dict())
    needs = objective.any_needs(options)
    rep = parallel.replicated(mesh)

    # parameters and trainable tree
    p_shapes = param_shapes(model_cfg)
    p_sh = parallel.tree_shardings(param_axes(model_cfg), p_shapes, mesh, rules)
    base = _with_shardings(p_shapes, p_sh)
    frozen: Dict[str, Any] = {}
    if use_lora:
        t_shapes = jax.eval_shape(
            lambda: lora_lib.init_lora(model_cfg, p_shapes, lora, jax.random.PRNGKey(0))["tree"])
        t_axes = lora_lib.lora_axes(model_cfg, lora)["tree"]
        trainable = _with_shardings(t_shapes, parallel.tree_shardings(t_axes, t_shapes, mesh,
                                                                      rules))
        frozen["base"] = base
    else:
        trainable = base
        if needs.reference or needs.reward:
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
        reward_key="base" if "base" in frozen else None,
        reference_key="base" if "base" in frozen else None)
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
        "model.dtype": model_cfg.dtype, "model.param_dtype": model_cfg.param_dtype,
        "mesh.data": int(mesh.shape["data"]), "mesh.fsdp": int(mesh.shape["fsdp"]),
        "mesh.tensor": int(mesh.shape["tensor"]),
        "lora.rank": int(lora.rank) if use_lora else None,
        "train.grad_accum": int(config.train.grad_accum),
        "model.share_prompt": bool(model_cfg.share_prompt) and int(group_size) > 1,
    }
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
    from gfn_jax.defaults import mesh_devices, mesh_rules
    from gfn_jax.objective_registry import get_objective

    t = config.train
    objective = get_objective(config.objective.name)
    options = dict(config.objective.to_dict())
    minibatches = objective.minibatches_for(options)
    epochs = objective.epochs_for(options)
    rows = int(t.prompts_per_batch) * int(t.samples_per_prompt)
    if rows % minibatches:
        raise ValueError(f"a batch of {rows} rows does not split into {minibatches} minibatches")
    mc = config.mesh
    mesh = parallel.make_mesh(parallel.MeshConfig(data=mc.data, fsdp=mc.fsdp, tensor=mc.tensor),
                              mesh_devices(config, devices))
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
    return estimate_step_memory(
        model_cfg, batch_size=rows // minibatches, group_size=group, prompt_len=prompt_len, traj_len=T,
        mesh=mesh, rules=mesh_rules(config), config=config,
        term_ids=tuple(term_ids) if term_ids is not None else (model_cfg.vocab_size - 1,),
        min_len=int(task.get("min_len", 0) or 0), reward_prompt_len=reward_prompt_len,
        suffix_len=suffix_len, logit_bias=logit_bias,
        num_groups=int(t.prompts_per_batch), knobs=knobs)


# ---------------------------------------------------------------------------
# Fit check
# ---------------------------------------------------------------------------
def device_memory_bytes(device: Any = None) -> Optional[int]:
    """The memory limit of ``device`` (default: the first device) as its runtime reports it
    (``memory_stats()["bytes_limit"]``: GPUs, TPUs), or None when unknown (CPU)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats:
        return None
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    return int(limit) if limit else None


def _knob(est: MemoryEstimate, key: str) -> str:
    v = est.knobs.get(key)
    return "" if v is None else f" (now {v!r})"


def check_fits(estimate: MemoryEstimate, device_bytes: Optional[float],
               headroom: float = 0.9) -> None:
    """Raise :class:`DoesNotFitError` when ``estimate.total_bytes`` exceeds ``headroom`` x
    ``device_bytes`` (nothing when ``device_bytes`` is None: unknown limit). The message
    gives the parts of the footprint and the config knobs that reduce each."""
    if device_bytes is None:
        return
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    budget = float(device_bytes) * headroom
    need = estimate.total_bytes
    if need <= budget:
        return
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
