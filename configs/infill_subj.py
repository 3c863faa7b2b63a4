"""Infilling on SUBJ (subjectivity of movie-review snippets; Hu et al. 2024) on the embedded
SmolLM2-135M-Instruct with LoRA.

X = "Movie review: <text>\\nThoughts:", Z = a short thought (1..10 tokens) ended by a newline,
Y = "\\nSo the review is <objective|subjective>." (the gold label of the row).
log R = log p_base(Z | X) + log p_base(Y | X Z) for every prefix (LoRA adapters off): the
GFlowNet samples thoughts from the posterior p(Z | X, Y). Evaluation also reports how often
the gold label is the likelier suffix after a sampled thought (label_accuracy).
Data: the paper's 20-example training subset, ../shared/data/subj/train.20.jsonl.
Run: gfn-jax train --config configs/infill_subj.py --workdir runs/infill_subj
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "infill",
              data_path="../shared/data/subj/train.20.jsonl",  # relative to the working directory (or data.root)
              num_prompts=0,  # all rows
              max_prompt_tokens=0,
              prompt_template="Movie review: {text}\nThoughts:",
              suffix_template="\nSo the review is {label_text}.",
              label_key="label_text",
              candidate_labels=("objective", "subjective"),
              term_tokens=("\n",),
              use_eos=False,
              min_len=1,
              max_len=10,
              disallow_substrings=("\n",),  # no multi-newline tokens inside Z
              disallow_bias=-1e9,
              eval_batch_size=32)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "subtb"
    c.reward.temp_start = 1.0
    c.reward.temp_end = 1.0
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.train.steps = 300
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 4
    c.train.log_every = 1
    c.train.ckpt_every = 100
    c.explore.p_on_policy = 0.75
    c.explore.p_tempered = 0.25
    c.explore.temp_min = 1.0
    c.explore.temp_max = 1.5
    c.eval.num_samples = 80  # 20 prompts x 4 samples
    c.eval.batch_size = 4
    return c
