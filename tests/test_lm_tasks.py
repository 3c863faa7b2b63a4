"""LM-likelihood reward tasks (continuation, infilling): every-prefix rewards against a naive
per-prefix loop of plain ``forward`` calls, the trainer with LoRA (reward from the base
params), policy bias, evaluation metrics and data-file errors."""

import json
import os
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gfn_jax.models.registry import tiny_model
from gfn_jax.models.transformer import forward
from gfn_jax.tasks import make_task
from gfn_jax.tasks.continuation import (ContinuationTask, distinct_n, read_prompt_lines,
                                        vocab_substring_bias)
from gfn_jax.tasks.infill import InfillTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAIVE_LEN = 96  # every naive sequence is right-padded to this length: one compile

PROMPTS = ["Hi.", "The cat sat on the mat.", "", "A much longer prompt, with words in it."]
ROWS = [
    {"text": "a dull and lifeless film", "label_text": "subjective"},
    {"text": "the story follows a young man", "label_text": "objective"},
    {"text": "wow", "label_text": "subjective"},
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def naive_fwd(model):
    cfg = model.config
    return jax.jit(lambda p, t, m: forward(cfg, p, t, m))


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def prompt_file(tmp_path, lines=PROMPTS):
    return _write(tmp_path / "prompts.txt", "\n".join(s + "  " for s in lines) + "\n")


def jsonl_file(tmp_path, rows=ROWS):
    return _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r) for r in rows))


def naive_logp(fwd, params, seq):
    """float64 log-softmax [len(seq), V] of one unpadded sequence (right-padded, masked)."""
    toks = np.zeros((1, NAIVE_LEN), np.int32)
    mask = np.zeros((1, NAIVE_LEN), np.int32)
    toks[0, :len(seq)], mask[0, :len(seq)] = seq, 1
    logits = np.asarray(fwd(params, jnp.asarray(toks), jnp.asarray(mask)), np.float64)[0]
    logits = logits[:len(seq)]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def naive_prefix_reward(fwd, params, x, z, n, term_ids=None, suffix=None):
    """For i = 0..n: log p(z_<i|X) + log p(⊤|X z_<i) (continuation) or
    log p(z_<i|X) + log p(Y|X z_<i) (infill), each prefix its own forward call."""
    out = []
    for i in range(n + 1):
        seq = list(x) + list(z[:i]) + list(suffix or [])
        lp = naive_logp(fwd, params, seq)
        tot = sum(lp[len(x) + k - 1, z[k]] for k in range(i))
        if suffix is None:
            last = lp[len(x) + i - 1, list(term_ids)]
            tot += np.log(np.exp(last - last.max()).sum()) + last.max()
        else:
            tot += sum(lp[len(x) + i + j - 1, y] for j, y in enumerate(suffix))
        out.append(tot)
    return np.array(out)


def make_batch(task, prompt_rows, z_rows, P=None, T=6, seed=0):
    """Left-padded prompts of the task's prompts ``prompt_rows``; right-padded Z with garbage
    ids after each row's end."""
    ids = [task.encode_prompt(task.train_prompts()[r]) for r in prompt_rows]
    P = P or max(len(p) for p in ids) + 2
    rng = np.random.default_rng(seed)
    B = len(ids)
    pt = rng.integers(0, 200, (B, P)).astype(np.int32)
    pm = np.zeros((B, P), np.int32)
    z = rng.integers(0, 256, (B, T)).astype(np.int32)  # garbage beyond each length
    n = np.zeros(B, np.int32)
    for r, (p, zr) in enumerate(zip(ids, z_rows)):
        pt[r, P - len(p):], pm[r, P - len(p):] = p, 1
        z[r, :len(zr)], n[r] = zr, len(zr)
    batch = {"prompt_tokens": pt, "prompt_mask": pm, "tokens": z, "lengths": n,
             "action_mask": np.ones((B, T), bool), "prompt_index": np.asarray(prompt_rows,
                                                                              np.int32)}
    return {k: jnp.asarray(v) for k, v in batch.items()}, ids


def cont_task(model, tmp_path, **over):
    cfg = dict(data_path=prompt_file(tmp_path, [p for p in PROMPTS if p]), max_len=6,
               min_len=0, term_tokens=(".", "\n"), use_eos=True)
    cfg.update(over)
    t = ContinuationTask(ml_collections.ConfigDict(cfg))
    t.setup(model.config, model.tokenizer)
    return t


def infill_task(model, tmp_path, **over):
    cfg = dict(data_path=jsonl_file(tmp_path), max_len=6, min_len=0,
               prompt_template="Review: {text}\n", suffix_template=" It is {label_text}.",
               candidate_labels=("objective", "subjective"))
    cfg.update(over)
    t = InfillTask(ml_collections.ConfigDict(cfg))
    t.setup(model.config, model.tokenizer)
    return t


Z_ROWS = [[72, 101, 108, 108, 111, 33], [], [32, 97], [120, 121, 122, 46]]


# ---------------------------------------------------------------------------
# Rewards against the naive loop
# ---------------------------------------------------------------------------
def test_continuation_reward_matches_naive_loop(model, naive_fwd, tmp_path):
    task = cont_task(model, tmp_path)
    tok = model.tokenizer
    assert task.term_ids == tuple(sorted({tok.encode(".")[0], tok.encode("\n")[0], tok.eos_id}))
    batch, ids = make_batch(task, [0, 1, 2, 1], Z_ROWS)
    got = np.asarray(jax.jit(lambda p, b: task.log_reward(model.config, p, b))(
        model.params, batch))
    assert got.shape == (4, 7) and got.dtype == np.float32
    for r, zr in enumerate(Z_ROWS):
        want = naive_prefix_reward(naive_fwd, model.params, ids[r], zr, len(zr),
                                   term_ids=task.term_ids)
        np.testing.assert_allclose(got[r, :len(zr) + 1], want, atol=1e-4, rtol=0)
        assert np.all(want < 0)


def test_infill_reward_matches_naive_loop(model, naive_fwd, tmp_path):
    task = infill_task(model, tmp_path)
    sfx, sm = task.suffix_table()
    assert sfx.shape == (3, len(" It is subjective.")) and sm.dtype == bool
    assert sm.sum(1).tolist() == [len(" It is subjective."), len(" It is objective."),
                                  len(" It is subjective.")]
    rows = [2, 0, 1, 2]
    batch, ids = make_batch(task, rows, Z_ROWS)
    got = np.asarray(jax.jit(lambda p, b: task.log_reward(model.config, p, b))(
        model.params, batch))
    for r, zr in enumerate(Z_ROWS):
        y = model.tokenizer.encode(f" It is {ROWS[rows[r]]['label_text']}.", add_bos=False)
        want = naive_prefix_reward(naive_fwd, model.params, ids[r], zr, len(zr), suffix=y)
        np.testing.assert_allclose(got[r, :len(zr) + 1], want, atol=1e-4, rtol=0)
    # the suffix really depends on prompt_index: a different label changes log R
    other = dict(batch, prompt_index=jnp.asarray([1, 0, 1, 2], jnp.int32))  # objective
    got2 = np.asarray(task.log_reward(model.config, model.params, other))
    assert abs(got2[0, 0] - got[0, 0]) > 1e-3 and np.allclose(got2[1:], got[1:], atol=1e-5)


# ---------------------------------------------------------------------------
# Policy bias, filters, data errors
# ---------------------------------------------------------------------------
def test_policy_bias_and_spec(model, tmp_path):
    tok = model.tokenizer
    dot, nl = tok.encode(".")[0], tok.encode("\n")[0]
    task = cont_task(model, tmp_path, term_tokens=("\n",), use_eos=False,
                     disallow_substrings=(".", "z"), min_len=2, penalty="hard")
    bias = task.policy_logit_bias()
    assert bias.shape == (model.config.vocab_size,)
    assert set(np.nonzero(bias)[0].tolist()) == {dot, tok.encode("z")[0]}
    assert bias[dot] == -1e9 and bias[nl] == 0.0
    # the default is the release's soft penalty: -99 in the policy, -50 in the reward
    soft = cont_task(model, tmp_path, term_tokens=("\n",), use_eos=False,
                     disallow_substrings=(".", "z"))
    assert soft.policy_logit_bias()[dot] == -99.0 and soft.reward_logit_bias()[dot] == -50.0
    spec = task.policy_spec()
    assert spec.term_ids == (nl,) and spec.min_len == 2 and spec.max_len == 6
    # a termination token is never biased; a finite bias only penalises
    b2 = vocab_substring_bias(tok, tok.vocab_size + 3, ("\n", "."), -2.5, keep_ids=[nl])
    assert b2[nl] == 0.0 and b2[dot] == -2.5 and np.all(b2[tok.vocab_size:] == -1e9)
    assert vocab_substring_bias(tok, tok.vocab_size, (), -1e9) is None
    assert cont_task(model, tmp_path).policy_logit_bias() is None


def test_prompt_file_reading_and_length_filter(model, tmp_path):
    task = cont_task(model, tmp_path, prompt_prefix="<", prompt_suffix=">")
    # trailing spaces are kept (the release's prompts end with one), blank lines dropped
    assert task.train_prompts() == ["<" + p + "  >" for p in PROMPTS if p]
    t2 = cont_task(model, tmp_path, num_prompts=2)
    assert t2.train_prompts() == [p + "  " for p in PROMPTS[:2]]
    t3 = cont_task(model, tmp_path, max_prompt_tokens=5, num_prompts=5)
    assert t3.train_prompts() == ["Hi.  "]
    t4 = cont_task(model, tmp_path, keep_trailing_space=False, num_prompts=2)
    assert t4.train_prompts() == PROMPTS[:2]
    with pytest.raises(ValueError, match="max_prompt_tokens=2"):
        cont_task(model, tmp_path, max_prompt_tokens=2)
    # infill: the filter keeps rows, prompts and suffixes aligned
    t5 = infill_task(model, tmp_path, max_prompt_tokens=len("Review: wow\n"))
    assert t5.train_prompts() == ["Review: wow\n"] and t5.suffixes == [" It is subjective."]
    assert t5.suffix_table()[0].shape[0] == 1


def test_data_file_errors_are_clear(model, tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt.*data_path"):
        make_task(ml_collections.ConfigDict({"name": "continuation", "data_path": missing}))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_task(ml_collections.ConfigDict({"name": "infill",
                                             "data_path": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(ValueError, match="no non-empty lines"):
        read_prompt_lines(_write(tmp_path / "empty.txt", "\n  \n"))
    bad = _write(tmp_path / "bad.jsonl", json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        InfillTask({"data_path": bad})
    with pytest.raises(ValueError, match=r"rows.jsonl:1: missing field\(s\) 'label'"):
        InfillTask({"data_path": jsonl_file(tmp_path), "suffix_template": "{label}"})
    with pytest.raises(ValueError, match="encodes to no tokens"):
        infill_task(model, tmp_path, suffix_template="")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        infill_task(model, tmp_path, max_len=250)
    with pytest.raises(ValueError, match="min_len"):
        ContinuationTask({"data_path": prompt_file(tmp_path), "min_len": 5, "max_len": 3})
    # relative paths resolve against the working directory (the tests run from the root)
    rel = os.path.relpath(prompt_file(tmp_path), os.getcwd())
    assert ContinuationTask({"data_path": rel}).train_prompts()[0] == "Hi.  "


def test_real_openwebtext_prompts_if_present(model):
    path = os.path.join(ROOT, "..", "shared", "data", "openwebtext", "prompts.txt")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/openwebtext/prompts.txt is absent")
    with open(path, encoding="utf-8") as f:
        first = [line.rstrip("\n") for line in (next(f) for _ in range(3))]
    task = make_task(ml_collections.ConfigDict({"name": "continuation", "num_prompts": 3}))
    assert task.train_prompts() == [s for s in first if s.strip()][:3]
    assert all(p.endswith(" ") for p in task.train_prompts())  # the trailing space is kept


# ---------------------------------------------------------------------------
# Evaluation metrics
# ---------------------------------------------------------------------------
def test_distinct_n_closed_form():
    assert distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == 2 / 4  # (1,2),(2,1),(1,2),(1,2)
    assert distinct_n([[1]], 2) == 0.0


def test_evaluate_metrics_against_naive(model, naive_fwd, tmp_path):
    task = cont_task(model, tmp_path, eval_batch_size=4)
    prompts = task.train_prompts()
    zs = [[72, 105], [72, 105], [120], [65, 66, 67], [], [97, 98, 99]]
    samples = [{"prompt": prompts[k % 2], "tokens": z, "text": "", "log_q": -1.0}
               for k, z in enumerate(zs)]
    m = task.evaluate(samples)
    assert "mean_log_p_base" not in m  # no base params bound
    assert m["mean_length"] == pytest.approx(np.mean([len(z) for z in zs]))
    g0, g1 = [zs[0], zs[2], zs[4]], [zs[1], zs[3], zs[5]]
    assert m["distinct_1"] == pytest.approx((distinct_n(g0, 1) + distinct_n(g1, 1)) / 2)
    assert m["unique_fraction"] == pytest.approx(1.0)
    task.bind_reward_params(model.params)
    m = task.evaluate(samples)
    want = [naive_prefix_reward(naive_fwd, model.params, task.encode_prompt(s["prompt"]),
                                s["tokens"], len(s["tokens"]), term_ids=task.term_ids)[-1]
            for s in samples]
    assert m["mean_log_p_base"] == pytest.approx(np.mean(want), abs=1e-4)

    inf = infill_task(model, tmp_path, eval_batch_size=4)
    inf.bind_reward_params(model.params)
    iprompts = inf.train_prompts()
    samples = [{"prompt": iprompts[k % 3], "tokens": z, "text": "", "log_q": 0.0}
               for k, z in enumerate(zs)]
    m = inf.evaluate(samples)
    tok = model.tokenizer
    want, correct = [], []
    for k, s in enumerate(samples):
        x = inf.encode_prompt(s["prompt"])
        sc = {c: naive_prefix_reward(naive_fwd, model.params, x, s["tokens"], len(s["tokens"]),
                                     suffix=tok.encode(f" It is {c}.", add_bos=False))[-1]
              for c in ("objective", "subjective")}
        gold = ROWS[k % 3]["label_text"]
        want.append(sc[gold])
        correct.append(max(sc, key=sc.get) == gold)
    assert m["mean_log_p_base"] == pytest.approx(np.mean(want), abs=1e-4)
    assert m["label_accuracy"] == pytest.approx(np.mean(correct))
    with pytest.raises(ValueError, match="not one of the task's prompts"):
        inf.evaluate([{"prompt": "???", "tokens": [1], "text": "", "log_q": 0.0}])


# ---------------------------------------------------------------------------
# The trainer with LoRA
# ---------------------------------------------------------------------------
def trainer_config(tmp_path, config_file, **task):
    c = runpy.run_path(os.path.join(ROOT, "configs", config_file))["get_config"]()
    c.model.spec = "tiny-llama"
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.train.steps = 3
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 4
    c.train.grad_accum = 1
    c.train.ckpt_every = 0
    c.explore.p_replay = 0.0
    c.eval.num_samples = 0
    c.mesh.data = 2  # sharded over 2 of the 8 virtual devices (fewer, cheaper compiles)
    c.task.update(task)
    return c


@pytest.mark.parametrize("which", ["continuation", "infill"])
def test_trainer_three_steps_reward_from_base_params(model, tmp_path, which):
    from gfn_jax.train import Trainer

    if which == "continuation":
        c = trainer_config(tmp_path, "continuation.py", data_path=prompt_file(tmp_path),
                           max_len=5, max_prompt_tokens=0, num_prompts=0, num_eval=1,
                           diversity_encoder="")
    else:
        c = trainer_config(tmp_path, "infill_subj.py", data_path=jsonl_file(tmp_path),
                           max_len=5)
    tr = Trainer(c, str(tmp_path / "run"), restore=False, devices=jax.devices()[:2])
    base = tr.frozen["base"]
    assert tr.use_lora and tr.task._reward_params is base  # bound for evaluate
    base_before = jax.tree_util.tree_map(np.array, base)
    lora_before = jax.tree_util.tree_map(np.array, tr.state.trainable)  # the step donates it
    # the step's final log R is the task's reward of the base (adapters-off) parameters,
    # before and after the adapters moved
    for step in range(3):
        batch, _ = tr.make_batch(step)
        jb = {k: jnp.asarray(batch[k]) for k in ("prompt_tokens", "prompt_mask", "tokens",
                                                 "lengths", "action_mask", "prompt_index")}
        want = np.asarray(tr.task.log_reward(tr.model_cfg, base_before, jb))
        want = want[np.arange(len(batch["lengths"])), np.asarray(batch["lengths"])]
        metrics, r = tr.train_step(batch, 1.0, step)
        assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
        np.testing.assert_allclose(np.asarray(r), want, atol=1e-4)
    # training moved the adapters, never the base (reward) parameters
    jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                           jax.tree_util.tree_map(np.asarray, tr.frozen["base"]))
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(lora_before), jax.tree_util.tree_leaves(tr.state.trainable)))
