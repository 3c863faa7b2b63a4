"""E-step of subjectivity classification with a latent rationale (Hu et al. 2024, Sec. 4.3) on
the embedded SmolLM2-135M-Instruct with LoRA (task ``subj_cot``, gfn_jax/tasks/subj.py).

X = "Review: <text>\\nQuestion: does the review state facts (objective) or opinions
(subjective)?\\nReason: The review", Z = a rationale of 1..8 tokens ended by a newline,
Y = "\\nAnswer:" + " objective|subjective" + ".". Reward of every prefix under the reward model
(the base with adapters off, or reward.model = an exported M-step model):
log p(Z | X) + log p(Y | X Z) - 50 * [the model's argmax label given X Z is wrong].
Replay is pre-seeded with 5 "wishful" label-revealing rationales per example.

Changed from the release (GPT-J 6B, A100s) to fit a 2-core CPU: SmolLM2-135M; LoRA r=16 (not
256), alpha 32, on all attention and MLP projections (not k, v only); 200 steps (not 1,000) of
2 prompts x 8 samples (not 64 x grad-acc 8); lr 5e-4 with 20 warm-up steps and linear decay
(not 100); reward temperature 1.2 -> 1.0 over 30 steps (not 150); Z of 1..8 SmolLM2 tokens
(not 1..5 GPT-J tokens); replay capacity 32 per example pre-seeded with 5 wishful rationales
(not 100 and 20). The objective (modified SubTB), the penalty (50) and the 10/20/50-example
training sets are the release's. Evaluation: the first 200 of the 2,000 test rows.

Run:  gfn-jax train --config configs/subj_cot.py --workdir runs/subj_cot_k10
      (--config.task.data_path=../shared/data/subj/train.20.jsonl for k = 20; the full E/M
      loop with baselines: scripts/subj_em.py)
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "subj_cot",
              data_path="../shared/data/subj/train.10.jsonl",  # relative to the working dir
              eval_path="../shared/data/subj/test.jsonl",
              eval_num=200,
              min_len=1,
              max_len=8,
              wrong_label_penalty=50.0,
              vote_k=8,
              log_z_prompts=8,
              eval_batch_size=16)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "subtb"
    c.reward.temp_start = 1.2
    c.reward.temp_end = 1.0
    c.reward.temp_horizon = 30
    c.optim.lr = 5e-4
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 20
    c.train.steps = 200
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 8
    c.train.log_every = 1
    c.train.ckpt_every = 50
    c.explore.p_on_policy = 0.5
    c.explore.p_tempered = 0.25
    c.explore.temp_min = 1.0
    c.explore.temp_max = 2.0
    c.explore.p_replay = 0.25
    c.replay.capacity = 32
    c.replay.seed_from_data = True  # the wishful rationales (task.wishful)
    c.replay.sampling = "reward"
    c.eval.num_samples = 1600  # 200 test prompts x 8 rationales
    c.eval.batch_size = 8  # rationales per prompt (sample_total cycles through the prompts)
    c.eval.before_training = False
    return c
