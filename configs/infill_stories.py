"""Story infilling (Hu et al. 2024, Sec. 4.2) on the embedded SmolLM2-135M-Instruct with LoRA.

X = "Beginning: <beginning>\\nEnding: <ending>\\nMiddle:", Z = the missing middle sentence
(5..25 tokens, ended by a newline), Y = " <ending>". log R = log p(Z | beginning) +
log p(Y | beginning Z) for every prefix in one packed suffix pass, under the base model with
the adapters off or, with --config.reward.model, a model fine-tuned on stories
(configs/sft_stories.py, then `gfn-jax convert`). Metrics against the true middle: BLEU-4,
GLEU, embedding diversity of the infills per story (gfn_jax.tasks.stories).

DATA: ROCStories is not downloadable offline. The default data is a STAND-IN built from
three-sentence OpenWebText prompts (NOT stories; not comparable with the paper's numbers):
    python scripts/make_story_standin.py --out runs/data/story_standin.jsonl
With ROCStories: --config.task.data_path=/path/ROCStories_winter2017.csv (beginning =
sentences 1-3, middle = 4, ending = 5). The first 100 stories are held out for evaluation.

The release: GPT-2 LoRA r=64, alpha=16, dropout 0.1 on attention and projections; lr 1e-4;
64 samples x grad-acc 16; 2,000 steps; length 5-25; reward temperature 1.1 -> 0.85 over 100
steps; replay 50 per story seeded with the true middles, sampled in proportion to the reward;
exploration replay 1/4, tempered 1/2, on-policy 1/4; evaluation at T = 0.9 (this harness
evaluates at T = 1.0).

Runs:
    gfn-jax train --config configs/infill_stories.py --workdir runs/infill_stories
    # SFT on the true middles (baseline):
    gfn-jax train --config configs/infill_stories.py --workdir runs/infill_stories_sft \\
        --config.objective.name=sft --config.explore.p_replay=0 --config.replay.seed_from_data=False
    # the prompting baseline is the "before" evaluation of any run (the base model under X)
Smoke test: ... --config.train.steps=2 --config.eval.num_samples=0
"""

import gfn_jax.tasks.stories  # noqa: F401  (registers infill_stories)
from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "infill_stories",
              data_path="runs/data/story_standin.jsonl",  # the stand-in (or a ROCStories .csv)
              data_format="auto",
              num_prompts=0,
              num_eval=100,
              prompt_template="Beginning: {beginning}\nEnding: {ending}\nMiddle:",
              reward_template="{beginning}",
              suffix_template=" {ending}",
              target_template=" {middle}",
              term_tokens=("\n",),
              use_eos=False,
              min_len=5,
              max_len=25,
              disallow_substrings=("\n",),
              penalise_special_tokens=True,
              penalty="hard",
              penalise_reward=False,
              eval_batch_size=8,  # the packed suffix pass holds [rows, 26, |Y|, vocab] logits
              diversity_encoder="all-MiniLM-L6-v2")
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.objective.name = "subtb"
    c.reward.temp_start = 1.1
    c.reward.temp_end = 0.85
    c.reward.temp_horizon = 100
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 8
    c.train.grad_accum = 4  # 64 samples per update
    c.train.steps = 8000  # calls: 2,000 optimizer updates
    c.train.log_every = 1
    c.train.ckpt_every = 200
    c.explore.p_on_policy = 0.25
    c.explore.p_tempered = 0.5
    c.explore.temp_min = 0.5
    c.explore.temp_max = 2.0
    c.explore.p_replay = 0.25
    c.replay.capacity = 50
    c.replay.sampling = "reward"
    c.replay.seed_from_data = True
    c.replay.min_size = 1
    c.eval.num_samples = 800  # 100 held-out stories x 8 infills
    c.eval.batch_size = 8
    return c
