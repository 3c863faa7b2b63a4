"""Default configuration shared by every ``configs/*.py`` file (ml_collections), the task
schemas merged into ``c.task``, and validation of a whole config before anything is built."""

from __future__ import annotations

import difflib
import math
from typing import Any, List, Mapping, Optional, Sequence

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults; config files override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.spec = "smollm2-135m"  # HF dir, .gguf path, registered name, or "random"
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"
    c.model.remat = False
    c.model.remat_policy = ""  # none | full | dots_saveable | ... ("" follows model.remat)
    c.model.logits_chunk = 0  # positions per vocabulary-softmax chunk: 0 auto, -1 never
    # the train step runs the prompt shared by a prompt's samples once per group (every
    # layer's keys/values) and the samples against it, in the policy, reward and reference
    # passes; same scores up to float rounding. False = every row recomputes its prompt.
    c.model.share_prompt = True
    # the sampler tests "every row done?" once per this many decode steps (1 = every step);
    # same samples, fewer host round trips of the loop condition on a GPU
    c.model.decode_chunk = 1
    # the decoders' layers: "unrolled" over a per-layer copy of the weights made per call
    # (fastest on CPU; as many bytes again as the layer weights while sampling) or "scanned"
    # over the stacked weights (no copy; for a model whose second copy would not fit)
    c.model.decode_layers = "unrolled"
    # with mesh.fsdp > 1: the sampler gathers the weights over fsdp once per call instead of
    # on every decode step (more memory while sampling, far less traffic; `gfn-jax plan`
    # prints both)
    c.model.decode_gather_weights = False
    # LoRA on CPU: keep the frozen base's layer weights laid out feature-major for the
    # sampler once (one more copy of them in memory) instead of a transposed copy per call
    c.model.cache_decode_weights = True
    c.model.init_seed = 0  # spec == "random" only
    c.model.init_std = 0.02
    c.model.random = ml_collections.ConfigDict(
        dict(family="llama", vocab_size=0, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
             d_ff=128, max_seq_len=64))

    c.task = ml_collections.ConfigDict()
    c.task.name = "rng"

    c.data = ml_collections.ConfigDict()
    c.data.max_prompt_len = 0  # 0 = longest training prompt; longer prompts are an error
    c.data.root = ""  # relative data paths resolve against this (default: the working dir)
    # training prompts streamed from a source instead of the task's own list (tasks that
    # declare STREAM_FIELDS, e.g. continuation; see gfn_jax/prompt_stream.py): "" = the
    # task's prompts; else a .txt / .jsonl file (txt:PATH, jsonl:PATH) or
    # tfds:NAME[/CONFIG][:VERSION]:SPLIT (pip install "gfn-jax[data]"). Needs
    # data.max_prompt_len > 0; sharded per host, shuffled per epoch with `seed`, its
    # position saved in every checkpoint
    c.data.source = ""
    c.data.x_field = "X"  # the column holding the prompt (JSON key / TFDS feature)
    c.data.y_field = ""  # "" = not read; only for tasks that read Y from a stream
    c.data.z_field = ""  # "" = not read; only for tasks that read Z from a stream
    c.data.shuffle = True  # a new seeded permutation every epoch
    c.data.on_bad = "error"  # error | skip: bad rows, too long / empty prompts
    c.data.tfds_dir = ""  # TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = (r"layers/attn/(q|k|v|o)/kernel", r"layers/mlp/(gate|up|down)/kernel")

    c.objective = ml_collections.ConfigDict()
    c.objective.name = "subtb"  # subtb | tb | db | sft | reinforce | ppo
    c.objective.subtb_lambda = 1.0
    c.objective.log_z = "scalar"  # tb only: scalar | conditional
    c.objective.log_z_init = 0.0
    c.objective.log_z_lr = 0.1
    c.objective.sft_source = "data"  # sft: "data" (task targets) | "policy" (behaviour mix)
    c.objective.kl_coef = 0.05  # reinforce / ppo: beta of the KL(q || p_ref) penalty
    c.objective.kl_target = 0.0  # > 0: adapt kl_coef towards this sequence KL per rollout
    c.objective.kl_adapt_rate = 1.0
    c.objective.baseline = "loo"  # reinforce / ppo advantages: loo | mean | none
    c.objective.scale_by_std = False  # GRPO-style: divide advantages by the group's std
    c.objective.ppo_clip = 0.2
    c.objective.ppo_epochs = 4  # update epochs per rollout
    c.objective.ppo_minibatches = 2  # minibatches per epoch

    c.reward = ml_collections.ConfigDict()
    c.reward.temp_start = 1.0
    c.reward.temp_end = 1.0
    c.reward.temp_horizon = 1000  # in optimizer updates
    c.reward.model = ""  # "" = the base model with adapters off; else a model spec

    c.explore = ml_collections.ConfigDict()
    c.explore.p_on_policy = 1.0
    c.explore.p_tempered = 0.0
    c.explore.temp_min = 0.5
    c.explore.temp_max = 2.0
    c.explore.p_epsilon = 0.0
    c.explore.epsilon = 0.05
    c.explore.p_replay = 0.0
    c.explore.top_k = 0
    c.explore.top_p = 1.0

    c.replay = ml_collections.ConfigDict()
    c.replay.capacity = 32  # per prompt
    c.replay.near_dedup = False  # drop near-duplicates (edit distance < fraction * length)
    c.replay.dedup_fraction = 0.25
    c.replay.sampling = "reward"  # uniform | reward
    c.replay.min_size = 4
    c.replay.always_fill = False
    c.replay.seed_from_data = False  # seed the buffer with the task's target sequences
    c.replay.seed_lazily = True  # ... each prompt's when a replay batch first needs it

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "constant"  # constant | cosine | linear
    c.optim.warmup_steps = 0
    c.optim.end_lr_frac = 0.0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.prompts_per_batch = 1
    c.train.samples_per_prompt = 8
    c.train.grad_accum = 1
    c.train.log_every = 1
    c.train.ckpt_every = 50
    c.train.keep_checkpoints = 3
    c.train.on_nan = "stop"  # stop | skip
    # persistent XLA compilation cache (gfn_jax/compile_cache.py): auto = $JAX_COMPILATION_
    # CACHE_DIR or ~/.cache/gfn_jax/xla (4 GiB, least recently used first) | none | a path
    c.train.compilation_cache = "auto"
    # profile train.profile_steps steps from step train.profile_start (0 = no profile):
    # jax.profiler traces in workdir/profile/process_<i> (TensorBoard's profile plugin or
    # ui.perfetto.dev), a kernel summary in workdir/profile/summary.json and on stdout
    c.train.profile_start = 3
    c.train.profile_steps = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    c.eval.before_training = True
    c.eval.temperature = 1.0  # sampling temperature of evaluations (the release: 0.9 / 0.1)

    c.memory = ml_collections.ConfigDict()
    c.memory.estimate = "auto"  # compile the step on abstract shapes first: auto (not on
    #                             CPU) | always | never
    c.memory.device_gb = 0.0  # memory per device to plan for (0: what the device reports)
    c.memory.headroom = 0.9  # fraction of it the step may use

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # how many devices the mesh spans: 0 = every device (every process's); n = the first n of
    # this process's devices (one process only), e.g. 1 to debug a run on one chip of a host
    # or to keep a tiny model off 8 virtual CPU devices, where it runs ~3x slower
    c.mesh.devices = 0
    # logical-axis rule overrides, MaxText-style: "logical=mesh_axes" entries, e.g.
    # ("embed=none", "lora=fsdp", "batch=data+fsdp"); they replace the defaults in
    # gfn_jax/parallel.py (DEFAULT_RULES) for those logical names
    c.mesh.rules = ()
    return c


def mesh_devices(config: ml_collections.ConfigDict,
                 devices: Optional[Sequence[Any]] = None) -> Optional[List[Any]]:
    """The devices the run's mesh spans: ``devices`` when given, else every device
    (``mesh.devices`` = 0) or the first ``mesh.devices`` of this process's devices."""
    if devices is not None:
        return list(devices)
    n = _mesh_devices_setting(config)
    if n == 0:
        return None
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"mesh.devices={n} picks devices of one process; a run over "
                         f"{jax.process_count()} processes needs mesh.devices=0")
    local = jax.local_devices()
    if n > len(local):
        raise ValueError(f"mesh.devices={n} but this host has {len(local)} device(s); set "
                         f"mesh.devices=0 (all) or at most {len(local)}")
    return list(local[:n])


def _mesh_devices_setting(config: ml_collections.ConfigDict) -> int:
    n = config.mesh.get("devices", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"mesh.devices must be an int >= 0 (0: every device), got {n!r}")
    return n


def run_mesh(config: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None) -> Any:
    """The run's device mesh: ``mesh.data/fsdp/tensor`` over :func:`mesh_devices`."""
    from gfn_jax import parallel

    mc = config.mesh
    return parallel.make_mesh(parallel.MeshConfig(data=mc.data, fsdp=mc.fsdp, tensor=mc.tensor),
                              mesh_devices(config, devices))


def mesh_rules(config: ml_collections.ConfigDict) -> Any:
    """The logical-axis rules table: ``parallel.DEFAULT_RULES`` with ``mesh.rules`` applied."""
    from gfn_jax import parallel

    over = []
    for k, entry in enumerate(config.mesh.get("rules", ()) or ()):
        name, sep, target = str(entry).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"mesh.rules[{k}]={entry!r}: expected 'logical=mesh_axes' (e.g. "
                             f"'embed=fsdp', 'mlp=tensor', 'embed=none', 'batch=data+fsdp')")
        target = target.strip()
        axes = None if target.lower() in ("", "none") else tuple(t.strip() for t in
                                                                 target.split("+"))
        for a in axes or ():
            if a not in parallel.MESH_AXES:
                raise ValueError(f"mesh.rules[{k}]={entry!r}: unknown mesh axis {a!r}; the "
                                 f"mesh axes are {', '.join(parallel.MESH_AXES)}")
        over.append((name.strip(), axes))
    return parallel.merge_rules(over)


# ---------------------------------------------------------------------------- task schemas
def with_task(c: ml_collections.ConfigDict, name: str, **overrides: Any
              ) -> ml_collections.ConfigDict:
    """Set ``c.task`` to task ``name``'s defaults (its schema) plus ``overrides``; every key of
    the schema is then overridable from the command line (``--config.task.KEY=...``)."""
    from gfn_jax.tasks import task_defaults

    d = task_defaults(name)
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise ValueError(_unknown_keys_message(f"task {name!r}", unknown, d))
    c.task = ml_collections.ConfigDict({"name": name, **d, **overrides})
    return c


def _unknown_keys_message(where: str, unknown: Any, known: Mapping[str, Any]) -> str:
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(known), n=3)
        parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return f"unknown config key(s) for {where}: {', '.join(parts)}"


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config from a saved ``config.json`` dict, over today's defaults (keys added since the
    run was written keep their defaults)."""
    cfg = default_config()
    _merge(cfg, d)
    return cfg


def _merge(cfg: ml_collections.ConfigDict, d: Mapping[str, Any]) -> None:
    for k, v in d.items():
        if isinstance(v, dict) and k in cfg and isinstance(cfg[k], ml_collections.ConfigDict):
            if k == "task":  # a task's schema is its own: replace, don't merge
                cfg[k] = ml_collections.ConfigDict(_tuples(v))
            else:
                _merge(cfg[k], v)
        else:
            v = _tuples(v)
            if k in cfg:
                with cfg.ignore_type():
                    cfg[k] = v
            else:
                cfg[k] = v


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------- validation
def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check a whole config before any model is loaded or compiled; raises ``ValueError``
    whose message names the config key(s) and what to do."""
    from gfn_jax.objective_registry import get_objective
    from gfn_jax.tasks import check_task_config

    t, o, e, r, opt = config.train, config.objective, config.explore, config.reward, config.optim
    for key, v in (("train.steps", t.steps),):
        if v < 0:
            raise ValueError(f"{key} must be >= 0, got {v}")
    for key, v in (("train.prompts_per_batch", t.prompts_per_batch),
                   ("train.samples_per_prompt", t.samples_per_prompt),
                   ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                   ("train.keep_checkpoints", t.keep_checkpoints),
                   ("eval.batch_size", config.eval.batch_size),
                   ("replay.capacity", config.replay.capacity)):
        if v < 1:
            raise ValueError(f"{key} must be >= 1, got {v}")
    if not config.eval.temperature > 0:
        raise ValueError(f"eval.temperature must be > 0, got {config.eval.temperature}")
    for key, v in (("train.ckpt_every", t.ckpt_every),
                   ("train.profile_start", t.get("profile_start", 0)),
                   ("train.profile_steps", t.get("profile_steps", 0)),
                   ("eval.num_samples", config.eval.num_samples),
                   ("data.max_prompt_len", config.data.max_prompt_len)):
        if v < 0:
            raise ValueError(f"{key} must be >= 0, got {v}")
    if t.on_nan not in ("stop", "skip"):
        raise ValueError(f"train.on_nan must be 'stop' or 'skip', got {t.on_nan!r}")
    if not isinstance(t.get("compilation_cache", "auto"), str):
        raise ValueError(f"train.compilation_cache must be 'auto', 'none' or a directory, "
                         f"got {t.compilation_cache!r}")
    if not (opt.lr >= 0 and math.isfinite(opt.lr)):
        raise ValueError(f"optim.lr must be a finite number >= 0, got {opt.lr}")
    if opt.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
    if opt.schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"optim.schedule must be constant, cosine or linear, got {opt.schedule!r}")
    if r.temp_start <= 0 or r.temp_end <= 0:
        raise ValueError(f"reward.temp_start and reward.temp_end must be > 0, got "
                         f"{r.temp_start} and {r.temp_end}")
    if r.temp_horizon < 1:
        raise ValueError(f"reward.temp_horizon must be >= 1, got {r.temp_horizon}")
    if config.replay.sampling not in ("uniform", "reward"):
        raise ValueError(f"replay.sampling must be 'uniform' or 'reward', "
                         f"got {config.replay.sampling!r}")
    if not 0 <= config.replay.dedup_fraction < 1:
        raise ValueError(f"replay.dedup_fraction must be in [0, 1), got "
                         f"{config.replay.dedup_fraction}")
    ps = {"explore.p_on_policy": e.p_on_policy, "explore.p_tempered": e.p_tempered,
          "explore.p_epsilon": e.p_epsilon, "explore.p_replay": e.p_replay}
    if any(p < 0 for p in ps.values()) or sum(ps.values()) <= 0:
        raise ValueError(f"explore probabilities must be >= 0 with a positive sum, got {ps}")
    if e.p_tempered > 0 and not 0 < e.temp_min <= e.temp_max:
        raise ValueError(f"need 0 < explore.temp_min <= explore.temp_max, got "
                         f"{e.temp_min} and {e.temp_max}")
    if e.p_epsilon > 0 and not 0 <= e.epsilon <= 1:
        raise ValueError(f"explore.epsilon must be in [0, 1], got {e.epsilon}")
    if config.lora.enabled and (config.lora.rank < 1 or not 0 <= config.lora.dropout < 1):
        raise ValueError(f"lora.rank must be >= 1 and lora.dropout in [0, 1), got "
                         f"{config.lora.rank} and {config.lora.dropout}")

    mesh_rules(config)
    _mesh_devices_setting(config)
    if config.memory.estimate not in ("auto", "always", "never"):
        raise ValueError(f"memory.estimate must be auto, always or never, got "
                         f"{config.memory.estimate!r}")
    if not 0 < config.memory.headroom <= 1:
        raise ValueError(f"memory.headroom must be in (0, 1], got {config.memory.headroom}")
    objective = get_objective(o.name)
    if objective.validate is not None:
        objective.validate(config)
    options = o.to_dict()
    if objective.on_policy:
        bad = ["explore.p_replay"] if e.p_replay > 0 else []
        if not objective.uses_behaviour_logprobs:
            bad += [k for k in ("explore.p_tempered", "explore.p_epsilon") if ps[k] > 0]
        if bad:
            raise ValueError(
                f"objective {o.name!r} is on-policy only: set {' and '.join(bad)} to 0 "
                + ("(replayed trajectories have no behaviour log-probs)"
                   if objective.uses_behaviour_logprobs
                   else "(its gradient estimator assumes samples from the current policy)"))
    if config.replay.seed_from_data and objective.on_policy:
        raise ValueError(f"replay.seed_from_data has no use with the on-policy objective "
                         f"{o.name!r}")
    if objective.source_for(options) == "data" and e.p_replay > 0:
        raise ValueError(f"objective {o.name!r} trains on the task's data "
                         f"(objective.sft_source='data'): explore.* is unused; set "
                         f"explore.p_replay to 0")
    check_task_config(config.task)
    from gfn_jax.prompt_stream import check_data_config

    check_data_config(config)
