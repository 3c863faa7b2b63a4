"""Next-sentence continuation (Hu et al. 2024, Sec. 4.1) on the embedded SmolLM2-135M-Instruct
with LoRA.

X: a sentence from OpenWebText (``task.data_path``, one per line; at most
``task.max_prompt_tokens`` tokens, the first ``task.num_prompts`` such lines). Z: the next
sentence, 2..12 tokens, ended by "." or a newline (⊤); the policy cannot emit any other token
containing "." or a newline. log R = log p_base(Z ⊤ | X) (LoRA adapters off), tempered by the
trainer from 1.0 to 0.8, so the GFlowNet samples likely *and* diverse continuations.
Run: gfn-jax train --config configs/continuation.py --workdir runs/continuation
Smoke test: ... --config.train.steps=3 --config.eval.num_samples=0
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "continuation",
              data_path="../shared/data/openwebtext/prompts.txt",  # relative to the working directory (or data.root)
              num_prompts=64,
              max_prompt_tokens=24,
              prompt_prefix="",
              prompt_suffix="",
              term_tokens=(".", "\n"),
              use_eos=True,
              min_len=2,
              max_len=12,
              disallow_substrings=(".", "\n") + tuple("0123456789"),
              disallow_bias=-1e9,  # a finite value (e.g. -5.0) penalises instead
              eval_batch_size=64)
    # other tokens with "." or newline are forbidden; so are digits: with them the base LM's
    # favourite "next sentence" is a list marker (" 1." has a high likelihood), which a
    # 150-step run learned to emit almost always
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "subtb"
    c.reward.temp_start = 1.0
    c.reward.temp_end = 0.8
    c.reward.temp_horizon = 500
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.train.steps = 500
    c.train.prompts_per_batch = 1
    c.train.samples_per_prompt = 8
    c.train.log_every = 1
    c.train.ckpt_every = 100
    c.explore.p_on_policy = 0.5
    c.explore.p_tempered = 0.25
    c.explore.temp_min = 1.0
    c.explore.temp_max = 1.5
    c.explore.p_replay = 0.25
    c.replay.capacity = 32
    c.replay.min_size = 8
    c.eval.num_samples = 128  # generate() draws eval.batch_size samples per prompt in turn:
    c.eval.batch_size = 8  # 16 prompts x 8 samples (distinct-n is measured within a prompt)
    return c
