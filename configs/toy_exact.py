"""Exactly solvable toy task: a tiny random Llama-family policy, full fine-tuning.

Z is 1..3 characters over {a, b, c}; log R = 0.8·#a − 0.6·#c + 1.2·[palindrome, len ≥ 2].
Run: gfn-jax train --config configs/toy_exact.py --workdir runs/toy
(TB instead of SubTB: --config.objective.name=tb)
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "toy_exact",
              min_len=1,
              max_len=3)
    c.model.spec = "random"
    c.model.random.update(dict(family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=128, max_seq_len=16))
    c.model.init_std = 0.02
    c.lora.enabled = False
    c.objective.name = "subtb"
    c.objective.log_z_lr = 0.05
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    c.optim.end_lr_frac = 0.1
    c.train.steps = 400
    c.train.prompts_per_batch = 1
    c.train.samples_per_prompt = 64
    c.train.log_every = 10
    c.train.ckpt_every = 200
    c.explore.p_on_policy = 0.75
    c.explore.p_tempered = 0.25
    c.explore.temp_min = 1.0
    c.explore.temp_max = 2.0
    c.eval.num_samples = 10000
    c.eval.batch_size = 5000
    return c
