"""Default configuration shared by every ``configs/*.py`` file (ml_collections)."""

from __future__ import annotations

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
    c.model.init_seed = 0  # spec == "random" only
    c.model.init_std = 0.02
    c.model.random = ml_collections.ConfigDict(
        dict(family="llama", vocab_size=0, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
             d_ff=128, max_seq_len=64))

    c.task = ml_collections.ConfigDict()
    c.task.name = "rng"

    c.data = ml_collections.ConfigDict()
    c.data.max_prompt_len = 0  # 0 = longest training prompt; longer prompts are an error

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
    c.objective.ppo_clip = 0.2
    c.objective.kl_coef = 0.05

    c.reward = ml_collections.ConfigDict()
    c.reward.temp_start = 1.0
    c.reward.temp_end = 1.0
    c.reward.temp_horizon = 1000

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
    c.replay.dedup_fraction = 0.0
    c.replay.sampling = "reward"  # uniform | reward
    c.replay.min_size = 4
    c.replay.always_fill = False

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

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    c.eval.before_training = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
