"""The story reward model: SFT of the base model on the training stories (the paper fine-tunes
GPT-2 large on stories 100-999; here SmolLM2-135M-Instruct, full fine-tuning).

The model learns p(middle ending | beginning): X = the beginning (the infilling reward's
context, task.reward_template), Z = " <middle> <ending>" (task.target_template), trained with
objective sft on the task's targets (objective.sft_source='data'). The first 100 stories are
held out, as in configs/infill_stories.py, so the reward model never sees the evaluation
stories. Export it and use it as the infilling reward:

    gfn-jax train --config configs/sft_stories.py --workdir runs/sft_stories
    gfn-jax convert --workdir runs/sft_stories --out exported/story-reward-smollm2
    gfn-jax train --config configs/infill_stories.py --workdir runs/infill_stories_rm \\
        --config.reward.model=exported/story-reward-smollm2

Data: as configs/infill_stories.py (the OpenWebText STAND-IN by default, not ROCStories).
The release trains 50 epochs at lr 1e-4 with batch 32 x 32; here 1,000 stories x 10 epochs at
batch 32 (steps = 10 * 1000 / 32).
"""

import gfn_jax.tasks.stories  # noqa: F401  (registers infill_stories)
from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "infill_stories",
              data_path="runs/data/story_standin.jsonl",
              num_eval=100,
              prompt_template="{beginning}",  # the policy context = the reward's context
              reward_template="{beginning}",
              suffix_template=" {ending}",
              target_template=" {middle} {ending}",
              term_tokens=("\n",),
              use_eos=False,
              min_len=1,
              max_len=96,
              disallow_substrings=("\n",),
              penalty="hard",
              penalise_reward=False,
              eval_batch_size=4)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = False  # full fine-tuning, as the release's reward model
    c.objective.name = "sft"
    c.objective.sft_source = "data"
    c.explore.p_replay = 0.0
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.schedule = "constant"
    c.train.prompts_per_batch = 32
    c.train.samples_per_prompt = 1
    c.train.steps = 313
    c.train.ckpt_every = 100
    c.eval.num_samples = 0  # its metric is the infilling run it serves
    return c
