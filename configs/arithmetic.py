"""Integer arithmetic with a calculator tool (Hu et al. 2024, Sec. 4.4) on the embedded
SmolLM2-135M-Instruct with LoRA: the rationale Z is a latent variable between the query X and
the answer Y (see gfn_jax/tasks/arithmetic.py for the exact formulation).

X = "Question: 6 - 0 - 4 - 8 = ? Answer:", Z = " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6" (the numbers
after "=" spliced by the calculator), ended by EOS; Y = ". The answer is -6.".
log R = log p~(Z | C X) + log p(Y | C X Z) of every prefix under the base model (adapters off),
C = a 3-shot prompt from the labelled file, p~ = the vocabulary restricted to digits and
", . = + -" (and space) on Z. Training prompts: 10 labelled queries (weight 1) and the 1,000
answer-only queries (weight 0.2). Evaluation: majority vote over 10 rationales per query, in
distribution on 100 fresh 3/4-operand problems disjoint from all training files, out of
distribution on 100 5-operand queries.

Kept from the paper's release: modified SubTB with lambda = 1, LoRA r=64, alpha=16, dropout 0.1
on q, k, v, o; lr 1e-4 with 20 warm-up steps then constant; AdamW weight decay 0.01, no
gradient clipping; reward temperature 1.1 -> 0.5 over 150 steps; exploration 1/4 on-policy,
1/2 tempered with T ~ U[0.5, 2], 1/4 replay (reward-proportional, 50 per query, near-duplicates
removed, seeded with the ground-truth rationales); min_len 5; 3-shot reward prompt;
vocab penalty -99 in policy and reward; 10 labelled + 1,000 answer-only queries, weights 1 / 0.2;
majority vote over 10 samples at T = 0.1.

Changed for this 2-core CPU:
- model: SmolLM2-135M-Instruct instead of GPT-J 6B instruct;
- batch: 2 queries x 4 samples per step, no gradient accumulation (the release: 16 samples x 32
  accumulated queries), 300 steps instead of 2,000;
- max_len 44 tokens counting the tool's splices (the release: 18 policy steps, spliced tokens
  not counted, GPT-J tokens): SmolLM2 writes digits and spaces as separate tokens, and the
  longest 5-operand rationale with results is 42 of them;
- the few-shot prompt shows the rationales *with* the calculator's results (the release's
  prompt shows them without, while every Z it scores contains them);
- Z ends with "." (the answer template's first token, then scored as part of Y) or EOS; the
  release ends Z with EOS only, which the base model almost never writes after a rationale
  (term_tokens=() restores that);
- evaluation on 100 + 100 queries (the release: 100 test rows, which overlap training);
  `gfn-jax eval` samples at T = 1 (its only temperature); the release's T = 0.1 vote is
  `python -m gfn_jax.tasks.arithmetic --workdir RUN`; no evaluation before training (the
  base-model baseline is the few-shot command below).
- replay: the harness uses replay only once every training prompt's buffer holds samples, so
  with 1,050 prompts the replay quarter falls back to on-policy in a run this short.

Run:
  gfn-jax train --config configs/arithmetic.py --workdir runs/arith
  python -m gfn_jax.tasks.arithmetic --workdir runs/arith            # T = 0.1 majority vote
  python -m gfn_jax.tasks.arithmetic --few_shot --config configs/arithmetic.py   # baseline
  python scripts/arithmetic_experiment.py --out runs/arith --steps 80   # all four methods
  gfn-jax train --config configs/arithmetic.py --workdir runs/arith_sft \\
      --config.objective.name=sft --config.explore.p_replay=0 --config.replay.seed_from_data=False
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "arithmetic",
              data_dir="../shared/data/arithmetic",  # relative to the working directory (or data.root)
              num_labelled=10,
              num_answer_only=1000,
              labelled_weight=1.0,
              answer_only_weight=0.2,
              num_few_shot=3,
              few_shot_results=True,
              min_len=5,
              max_len=44,
              term_tokens=(".",),
              use_eos=True,
              vocab_penalty=-99.0,
              reward_vocab_restrict=True,
              short_log_reward=-99.0,
              eval_id="generated",
              eval_id_num=100,
              eval_ood_num=100,
              eval_seed=1,
              vote_k=10,
              eval_temperature=0.1,
              eval_batch_size=16,
              eval_log_z_queries=8)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.lora.targets = (r"layers/attn/(q|k|v|o)/kernel",)
    c.objective.name = "subtb"
    c.objective.subtb_lambda = 1.0
    c.reward.temp_start = 1.1
    c.reward.temp_end = 0.5
    c.reward.temp_horizon = 150
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 0.0
    c.train.steps = 300
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 4
    c.train.grad_accum = 1
    c.train.log_every = 1
    c.train.ckpt_every = 50
    c.explore.p_on_policy = 0.25
    c.explore.p_tempered = 0.5
    c.explore.temp_min = 0.5
    c.explore.temp_max = 2.0
    c.explore.p_replay = 0.25
    c.replay.capacity = 50
    c.replay.sampling = "reward"
    c.replay.near_dedup = True
    c.replay.dedup_fraction = 0.25
    c.replay.seed_from_data = True
    c.eval.batch_size = 10  # = task.vote_k samples of each query in turn
    c.eval.num_samples = 2000  # 10 x (100 in-distribution + 100 out-of-distribution queries)
    c.eval.before_training = False  # ~20 CPU minutes; the baseline is the few-shot command
    c.mesh.data = 1
    return c
