"""M-step of subjectivity classification with a latent rationale (task ``subj_label``,
gfn_jax/tasks/subj.py): a separate LoRA classifier p(Y | X Z) on SmolLM2-135M-Instruct, trained
with SFT on the label tokens, where Z are rationales sampled from a trained E-step policy
(configs/subj_cot.py) and written by scripts/subj_em.py to task.rationales_path.

Prompt: "Review: <text>\\nQuestion: ...\\nReason: The review" + Z + "\\nAnswer:" (as token
ids); action: " objective" or " subjective"; ⊤ = ".". Accuracy: argmax over the labels of
log p(label . | prompt), by the greedy rationale, the majority vote and the mean probability
over the sampled rationales (SubjLabelTask.evaluate_policy, called by the driver).

Changed from the release (LoRA r=256, 100 steps at lr 1e-4 with 20 warm-up, batch 32 x 8):
LoRA r=16, alpha 32; 100 steps at lr 1e-4, 10 warm-up; batch 16 (prompts_per_batch x
samples_per_prompt = the number of targets drawn per step).

Run (after the driver wrote the rationales):
  gfn-jax train --config configs/subj_mstep.py --workdir runs/subj_m \\
      --config.task.rationales_path=runs/subj_k10/rationales_r0.jsonl
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "subj_label",
              data_path="../shared/data/subj/train.10.jsonl",
              eval_path="../shared/data/subj/test.jsonl",
              eval_num=200,
              rationales_path="",  # set by scripts/subj_em.py
              eval_batch_size=16)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "sft"
    c.objective.sft_source = "data"
    c.explore.p_replay = 0.0
    c.optim.lr = 1e-4
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.prompts_per_batch = 4
    c.train.samples_per_prompt = 4  # 16 targets per step
    c.train.ckpt_every = 50
    c.eval.num_samples = 0  # accuracy is evaluate_policy's (argmax), run by the driver
    return c
