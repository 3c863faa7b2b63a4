"""The paper's random-number example on the embedded SmolLM2-135M-Instruct with LoRA.

Prompt: "The following is a random integer drawn uniformly between 0 and 100: ";
log R = 0 for a canonical integer 0..99 followed by termination (newline or end of text),
task.invalid_log_reward otherwise. GFlowNet fine-tuning (modified SubTB) makes the policy
uniform over the valid integers.
Run: gfn-jax train --config configs/rng.py --workdir runs/rng
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "rng",
              prompt="The following is a random integer drawn uniformly between 0 and 100: ",
              max_len=3,
              invalid_log_reward=-8.0,
              term_tokens=("\n",),
              use_eos=True,
              digits_only=True)  # actions: the ten digit tokens and termination
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "subtb"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 10
    c.train.steps = 150
    c.train.prompts_per_batch = 1
    c.train.samples_per_prompt = 32
    c.train.log_every = 1
    c.train.ckpt_every = 50
    # a 49k-token vocabulary at temperature 2 samples garbage: keep tempering mild, and
    # replay the best trajectories found so far
    c.explore.p_on_policy = 0.5
    c.explore.p_tempered = 0.25
    c.explore.temp_min = 1.0
    c.explore.temp_max = 1.5
    c.explore.p_replay = 0.25
    c.replay.capacity = 64
    c.replay.min_size = 8
    c.eval.num_samples = 10000
    c.eval.batch_size = 1000
    return c
