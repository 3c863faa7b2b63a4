"""Next-sentence continuation (Hu et al. 2024, Sec. 4.1) to the paper's release protocol,
scaled to the embedded SmolLM2-135M-Instruct with LoRA.

X: the first 1,000 lines of ``../shared/data/openwebtext/prompts.txt`` (each ends with a
space, kept: it changes the tokenisation), the first 950 for training and the last 50 held
out (``eval_prompts``). Z: one sentence of 1..30 tokens ended by "." (⊤, the only
termination). Tokens that cannot belong to one sentence (any token containing a newline, tab,
quote, "!", "?", another ".", a URL piece or a run of symbols; the special tokens; the
release's abbreviation tokens "A".."Z", "Mr", "Dr", ...) get -99 in the policy and -50 in the
reward LM, which is renormalised (``task.penalty="soft"``, the release's form;
``--config.task.penalty=hard`` masks them in both instead).
log R = log p~(Z ⊤ | X) / T, T annealed 1.0 -> ``reward.temp_end`` over 750 optimizer updates
(the final temperature is swept: configs/sweeps/continuation_temperature.py).

The release (GPT-2 XL) trains LoRA r=64, alpha=16 with lr 1e-4 (20 warm-up, constant), AdamW
weight decay 0.01, no clipping, 8 samples per prompt and 32 prompts per update, exploration
replay 0.25 / tempered (T ~ U[0.5, 2]) 0.5 / on-policy 0.25, replay of the top 50 per prompt
(uniform sampling, near-duplicates dropped); this config does the same on SmolLM2-135M
(8 prompts x 8 samples per call, 4 calls accumulated per update). Evaluation: 8 samples for
each of the 50 held-out prompts; metrics as the release defines them (``task.evaluate``):
per-prompt mean / max of log p~(Z⊤|X) averaged over prompts (logp_mean, logp_max), embedding
diversity with all-MiniLM-L6-v2 (the release used all-mpnet-base-v2, which no registry package
ships offline), distinct-n.

Deviations: no early stopping on validation log p (the release's patience 10); prefixes
shorter than min_len are excluded from the balance by the trainer instead of getting
log R = -99; the penalised token set is defined by substrings over this tokenizer's vocabulary
rather than the release's GPT-2 token list.

Run (a GPU or TPU; a 2-core CPU manages ~100 tokens/s, far too slow for the full run):
    gfn-jax train --config configs/continuation.py --workdir runs/continuation
Smoke test: ... --config.train.steps=2 --config.train.grad_accum=1 --config.eval.num_samples=0
Baselines on the same model and held-out prompts: python -m gfn_jax.baselines --help
Training prompts from a data set instead (txt / jsonl / tfds:NAME:SPLIT, streamed, sharded per
host, position checkpointed; evaluation keeps the held-out lines): ... --config.data.source=SPEC
--config.data.x_field=FIELD --config.data.max_prompt_len=128 --config.explore.p_replay=0
"""

from gfn_jax.defaults import default_config, with_task

# tokens that cannot be inside one sentence ending in "." (matched as substrings of each
# token's text; "." itself is ⊤ and is never penalised)
NOT_IN_ONE_SENTENCE = (
    "\n", "\r", "\t", '"', "!", "?", ".",
    "http", "www", "://",
    "--", "==", "**", "__", "~~", "##", "$$", "%%", "@@", "&&", "^", "|", "~",
)
# the release's exact-token list: single capitals and abbreviations that take a period
ABBREVIATIONS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + (
    "US", "Mr", "Mrs", "Ms", "Dr", "Prof", "Jr", "St", "Av")


def get_config():
    c = default_config()
    with_task(c, "continuation",
              data_path="../shared/data/openwebtext/prompts.txt",  # relative to the working directory (or data.root)
              num_prompts=1000,  # the first 1,000 lines ...
              num_eval=50,  # ... of which the last 50 are held out
              keep_trailing_space=True,
              max_prompt_tokens=0,
              prompt_prefix="",
              prompt_suffix="",
              term_tokens=(".",),
              use_eos=False,
              min_len=1,
              max_len=30,
              disallow_substrings=NOT_IN_ONE_SENTENCE,
              illegal_tokens=ABBREVIATIONS,
              penalise_special_tokens=True,
              penalty="soft",  # the release: -99 policy, -50 reward, renormalised; or "hard"
              policy_penalty=-99.0,
              reward_penalty=-50.0,
              penalise_reward=True,
              eval_batch_size=64,
              diversity_encoder="all-MiniLM-L6-v2")
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.objective.name = "subtb"
    c.objective.subtb_lambda = 1.0
    c.reward.temp_start = 1.0
    c.reward.temp_end = 0.8
    c.reward.temp_horizon = 750  # optimizer updates
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 0.0  # the release does not clip
    c.train.prompts_per_batch = 8
    c.train.samples_per_prompt = 8
    c.train.grad_accum = 4  # 32 prompts x 8 samples per optimizer update
    c.train.steps = 4000  # sampler/step calls: 1,000 optimizer updates
    c.train.log_every = 1
    c.train.ckpt_every = 200
    c.explore.p_on_policy = 0.25
    c.explore.p_tempered = 0.5
    c.explore.temp_min = 0.5
    c.explore.temp_max = 2.0
    c.explore.p_replay = 0.25
    c.replay.capacity = 50
    c.replay.sampling = "uniform"
    c.replay.near_dedup = True
    c.replay.dedup_fraction = 0.25
    c.replay.min_size = 8
    c.eval.num_samples = 400  # 50 held-out prompts x 8 samples (eval.batch_size per prompt)
    c.eval.batch_size = 8
    return c
