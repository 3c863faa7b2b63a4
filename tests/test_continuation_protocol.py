"""Continuation to the release's protocol and the decoding baselines: the soft-penalty reward
against a direct float64 computation (log_softmax of the base logits + penalty, renormalised),
the hard mask, the 950/50 split with trailing spaces kept, the per-prompt metrics, the
baselines' sample format, and a few Trainer steps on a random model without LoRA."""

import os
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gfn_jax import baselines
from gfn_jax.models.registry import tiny_model
from gfn_jax.models.transformer import forward
from gfn_jax.policy import policy_from_task
from gfn_jax.scoring import score_policy
from gfn_jax.tasks.continuation import ContinuationTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The cat sat. ", "It rained all day. ", "We left early. ", "Dogs bark. "]
NAIVE_LEN = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def fwd(model):
    cfg = model.config
    return jax.jit(lambda p, t, m: forward(cfg, p, t, m))


def write_prompts(tmp_path, lines=PROMPTS, name="prompts.txt"):
    path = tmp_path / name
    path.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    return str(path)


def task_of(model, tmp_path, **over):
    cfg = dict(data_path=write_prompts(tmp_path), term_tokens=(".",), use_eos=False,
               min_len=0, max_len=5, disallow_substrings=("z", "q", "!"), num_eval=0)
    cfg.update(over)
    t = ContinuationTask(ml_collections.ConfigDict(cfg))
    t.setup(model.config, model.tokenizer)
    return t


def direct_log_r(fwd, params, x, z, term_ids, bias):
    """log p~(z_<i ⊤ | X) for i = 0..n, each prefix its own float64 log-softmax of
    (logits + bias): the release's penalised, renormalised reward."""
    seq = list(x) + list(z)
    toks = np.zeros((1, NAIVE_LEN), np.int32)
    mask = np.zeros((1, NAIVE_LEN), np.int32)
    toks[0, :len(seq)], mask[0, :len(seq)] = seq, 1
    logits = np.asarray(fwd(params, jnp.asarray(toks), jnp.asarray(mask)), np.float64)[0]
    logits = logits[:len(seq)] + (0.0 if bias is None else np.asarray(bias, np.float64))
    mx = logits.max(-1, keepdims=True)
    logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    out = []
    for i in range(len(z) + 1):
        pos = len(x) + i - 1
        tot = sum(logp[len(x) + k - 1, z[k]] for k in range(i))
        t = logp[pos, list(term_ids)]
        out.append(tot + np.log(np.exp(t - t.max()).sum()) + t.max())
    return np.array(out)


def batch_of(task, rows, zs, T=5):
    ids = [task.encode_prompt(task.train_prompts()[r]) for r in rows]
    P = max(len(p) for p in ids) + 1
    B = len(rows)
    pt = np.zeros((B, P), np.int32)
    pm = np.zeros((B, P), np.int32)
    z = np.full((B, T), 7, np.int32)
    n = np.zeros(B, np.int32)
    for r, (p, zr) in enumerate(zip(ids, zs)):
        pt[r, P - len(p):], pm[r, P - len(p):] = p, 1
        z[r, :len(zr)], n[r] = zr, len(zr)
    return {"prompt_tokens": jnp.asarray(pt), "prompt_mask": jnp.asarray(pm),
            "tokens": jnp.asarray(z), "lengths": jnp.asarray(n),
            "prompt_index": jnp.asarray(rows, jnp.int32)}, ids


# z rows with penalised bytes ("z" = 122, "q" = 113) inside, and plain ones
ZS = [[72, 122, 105], [], [113, 113], [97, 98, 99, 100, 101]]


@pytest.mark.parametrize("penalty", ["soft", "hard"])
def test_penalised_reward_equals_direct_computation(model, fwd, tmp_path, penalty):
    task = task_of(model, tmp_path, penalty=penalty)
    tok = model.tokenizer
    pen = [tok.encode(c)[0] for c in "zq!"]
    V = model.config.vocab_size
    rb, pb = task.reward_logit_bias(), task.policy_logit_bias()
    want_r = -50.0 if penalty == "soft" else -1e9
    want_p = -99.0 if penalty == "soft" else -1e9
    assert sorted(np.nonzero(rb)[0].tolist()) == sorted(pen) and np.all(rb[pen] == want_r)
    assert sorted(np.nonzero(pb)[0].tolist()) == sorted(pen) and np.all(pb[pen] == want_p)
    assert task.term_ids == (tok.encode(".")[0],)
    batch, ids = batch_of(task, [0, 1, 2, 3], ZS)
    got = np.asarray(jax.jit(lambda p, b: task.log_reward(model.config, p, b))(
        model.params, batch))
    bias = np.zeros(V)
    bias[pen] = want_r
    for r, zr in enumerate(ZS):
        want = direct_log_r(fwd, model.params, ids[r], zr, task.term_ids, bias)
        if penalty == "soft" or not set(zr) & set(pen):
            np.testing.assert_allclose(got[r, :len(zr) + 1], want, atol=2e-4, rtol=1e-6)
        else:  # a masked token inside Z: log R is hopeless from that token on
            first = min(k for k, t in enumerate(zr) if t in pen)
            np.testing.assert_allclose(got[r, :first + 1], want[:first + 1], atol=2e-4)
            assert np.all(got[r, first + 1:len(zr) + 1] < -1e8)
    # the penalty really changes the reward: unpenalised differs on every prefix
    plain = direct_log_r(fwd, model.params, ids[3], ZS[3], task.term_ids, None)
    assert np.all(np.abs(plain - got[3, :6]) > 1e-6)
    # penalise_reward=False is the plain LM
    t2 = task_of(model, tmp_path, penalty=penalty, penalise_reward=False)
    assert t2.reward_logit_bias() is None
    got2 = np.asarray(t2.log_reward(model.config, model.params, batch))
    np.testing.assert_allclose(got2[3, :6], plain, atol=2e-4)


def test_split_950_50_and_trailing_space(model, tmp_path):
    lines = [f"Line {k} says hi. " for k in range(1200)]
    path = write_prompts(tmp_path, lines, "many.txt")
    t = task_of(model, tmp_path, data_path=path, num_prompts=1000, num_eval=50)
    assert t.train_prompts() == lines[:950] and t.eval_prompts() == lines[950:1000]
    # the kept trailing space is its own token at the end of the prompt
    ids = t.encode_prompt(t.train_prompts()[0])
    assert ids == model.tokenizer.encode("Line 0 says hi. ")
    assert ids[:-1] == model.tokenizer.encode("Line 0 says hi.")
    assert model.tokenizer.decode(ids[-1:]) == " "
    with pytest.raises(ValueError, match="num_eval=4 leaves no training prompt"):
        task_of(model, tmp_path, num_eval=4).train_prompts()


def test_real_prompts_protocol_config():
    path = os.path.join(ROOT, "..", "shared", "data", "openwebtext", "prompts.txt")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/openwebtext/prompts.txt is absent")
    from gfn_jax.tasks import make_task

    c = runpy.run_path(os.path.join(ROOT, "configs", "continuation.py"))["get_config"]()
    t = make_task(c.task)
    with open(path, encoding="utf-8") as f:
        first = [next(f).rstrip("\n") for _ in range(1000)]
    assert t.train_prompts() == first[:950] and t.eval_prompts() == first[950:]
    assert all(p.endswith(" ") for p in first)
    assert c.task.penalty == "soft" and c.task.term_tokens == (".",) and c.task.max_len == 30


def test_evaluate_per_prompt_metrics(model, fwd, tmp_path):
    task = task_of(model, tmp_path, eval_batch_size=4)
    task.bind_reward_params(model.params)

    def enc(texts):  # a deterministic toy encoder: letter counts
        return np.array([[t.count(c) + 0.1 for c in "abcdehi"] for t in texts], np.float64)

    task.set_sentence_encoder(enc)
    p = task.train_prompts()
    zs = [[97, 98], [104, 105], [97], [99, 100, 101], [98, 98]]
    owners = [0, 0, 0, 1, 1]
    samples = [{"prompt": p[o], "tokens": z, "text": model.tokenizer.decode(z), "log_q": -1.0}
               for o, z in zip(owners, zs)]
    m = task.evaluate(samples)
    bias = np.zeros(model.config.vocab_size)
    bias[[model.tokenizer.encode(c)[0] for c in "zq!"]] = -50.0
    lr = np.array([direct_log_r(fwd, model.params, task.encode_prompt(s["prompt"]), s["tokens"],
                                task.term_ids, bias)[-1] for s in samples])
    g = [lr[:3], lr[3:]]
    assert m["logp_mean"] == pytest.approx(np.mean([x.mean() for x in g]), abs=1e-4)
    assert m["logp_max"] == pytest.approx(np.mean([x.max() for x in g]), abs=1e-4)
    assert m["mean_log_p_base"] == pytest.approx(lr.mean(), abs=1e-4)

    def div(texts):
        e = enc(texts)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        return 1 - np.mean([s[i, j] for i in range(len(e)) for j in range(i + 1, len(e))])

    texts = [s["text"] for s in samples]
    assert m["embedding_diversity"] == pytest.approx((div(texts[:3]) + div(texts[3:])) / 2)
    assert m["num_prompts"] == 2.0


def test_baselines_formats(model, tmp_path):
    task = task_of(model, tmp_path, penalty="hard", min_len=1, max_len=4, eval_batch_size=8)
    task.bind_reward_params(model.params)
    pol = policy_from_task(task, model.config, model.params, None, model.tokenizer)
    prompts = task.eval_prompts()[:2]
    out = baselines.run_methods(pol, prompts, 3, seed=1)
    assert set(out) == set(baselines.METHODS)
    pen = {model.tokenizer.encode(c)[0] for c in "zq!"}
    for method, samples in out.items():
        per = {p: [s for s in samples if s["prompt"] == p] for p in prompts}
        for p, ss in per.items():
            want = 1 if method == "greedy" else 3
            if method.startswith("beam") or method == "diverse_beam":
                assert 1 <= len(ss) <= 3
                assert len({tuple(s["tokens"]) for s in ss}) == len(ss)  # distinct
                lq = [s["log_q"] for s in ss]
                assert lq == sorted(lq, reverse=True)
            else:
                assert len(ss) == want
        for s in samples:
            assert set(s) >= {"prompt", "text", "tokens", "log_q", "method"}
            assert s["method"] == method and 1 <= len(s["tokens"]) <= 4
            assert not pen & set(s["tokens"]) and s["text"] == model.tokenizer.decode(s["tokens"])
        # log_q is the policy's own log q(Z⊤|X), re-scored independently
        ref = pol.log_prob([s["prompt"] for s in samples], [s["tokens"] for s in samples])
        np.testing.assert_allclose([s["log_q"] for s in samples], ref, atol=2e-4)
    table = baselines.evaluate_methods(task, out)
    assert set(table) == set(baselines.METHODS)
    for m in table.values():
        assert np.isfinite(m["logp_mean"]) and m["logp_max"] >= m["logp_mean"] - 1e-6
    # beam with 5n beams finds sequences at least as likely as beam with n beams (best one)
    best = {m: max(s["log_q"] for s in out[m] if s["prompt"] == prompts[0])
            for m in ("beam_n", "beam_5n")}
    assert best["beam_5n"] >= best["beam_n"] - 1e-5
    with pytest.raises(ValueError, match="unknown decoding method"):
        baselines.decode(pol, prompts, "topk", 2)


def test_trainer_steps_random_model_no_lora(tmp_path):
    from gfn_jax.train import Trainer

    c = runpy.run_path(os.path.join(ROOT, "configs", "continuation.py"))["get_config"]()
    c.model.spec = "random"
    c.model.random.max_seq_len = 128
    c.lora.enabled = False
    c.task.data_path = write_prompts(tmp_path)
    c.task.num_prompts = 0
    c.task.num_eval = 1
    c.task.max_len = 4
    c.task.diversity_encoder = ""
    c.train.steps = 2
    c.train.grad_accum = 1
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 2
    c.train.ckpt_every = 0
    c.explore.p_replay = 0.0
    c.explore.p_on_policy = 0.5
    c.eval.num_samples = 0
    c.mesh.data = 1
    tr = Trainer(c, str(tmp_path / "run"), restore=False, devices=jax.devices()[:1])
    assert len(tr.prompts) == 3 and tr.task.eval_prompts() == [PROMPTS[-1]]
    summary = tr.run(progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_metrics"]["loss"])
    samples = tr.generate(4, batch_size=2)
    m = tr.task.evaluate(samples)
    assert m["num_prompts"] == 1 and np.isfinite(m["logp_mean"])
