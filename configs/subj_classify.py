"""Supervised LoRA classification baseline for SUBJ (task ``subj_label`` without rationales):
SmolLM2-135M-Instruct with LoRA trained by SFT on p(label | X) for the k labelled examples.
Prompt "Review: <text>\\nQuestion: ...?\\nAnswer:", action " objective|subjective", ⊤ ".".

Changed from the release (LoRA r=256, lr 1e-3, 100 steps): LoRA r=16, alpha 32, lr 1e-3,
100 steps of 16 targets, 10 warm-up steps with linear decay.

Run: gfn-jax train --config configs/subj_classify.py --workdir runs/subj_cls_k10
(accuracy: scripts/subj_em.py --baselines, SubjLabelTask.evaluate_policy)
"""

from gfn_jax.defaults import default_config, with_task


def get_config():
    c = default_config()
    with_task(c, "subj_label",
              data_path="../shared/data/subj/train.10.jsonl",
              eval_path="../shared/data/subj/test.jsonl",
              eval_num=200,
              rationales_path="",
              eval_batch_size=16)
    c.model.spec = "smollm2-135m"
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.objective.name = "sft"
    c.objective.sft_source = "data"
    c.explore.p_replay = 0.0
    c.optim.lr = 1e-3
    c.optim.schedule = "linear"
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.prompts_per_batch = 4
    c.train.samples_per_prompt = 4
    c.train.ckpt_every = 50
    c.eval.num_samples = 0
    return c
