"""SUBJ with a latent rationale (gfn_jax/tasks/subj.py, scripts/subj_em.py): the E-step reward
of every prefix against a token-by-token loop of ``forward`` calls (with the wrong-label
penalty), the packed label scorer against Policy.log_prob, votes and importance diagnostics on
hand-made inputs, bad data rows, two training steps of each task, and the driver's plumbing."""

import json
import math
import os
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models import lora as lora_lib
from gfn_jax.models.adapters import Adapters
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.registry import tiny_tokenizer
from gfn_jax.models.transformer import forward, init_params
from gfn_jax.policy import Policy
from gfn_jax.tasks import make_task
from gfn_jax.tasks.subj import (candidate_log_probs, importance_log_z, majority_vote,
                                mean_prob_vote, predict_rows, prompting_prompts,
                                read_rationales, read_subj_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = [("a plot about a cat .", "obj"), ("so dull and long .", "subj"),
         ("he meets her in rome .", "obj"), ("a great film !", "subj")]
TEST = [("the boy goes home .", "obj"), ("i loved it .", "subj"), ("she runs a shop .", "obj")]
LABELS = ("obj", "subj")
# short templates keep the byte-level sequences of the tiny model short
TEMPLATES = dict(question_template="R: {text}", reason_prefix="\nW:", answer_prefix="\nA:",
                 label_prefix=" ", label_end=".", labels=LABELS)
WISHFUL = {"obj": (" fact", " plot"), "subj": (" view",)}
CFG = ModelConfig(family="llama", vocab_size=257, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=64, max_seq_len=128, tie_embeddings=False)


def write_jsonl(path, rows, final_newline=False):
    lines = [json.dumps({"text": t, "label": LABELS.index(l), "label_text": l}) for t, l in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" if final_newline else ""))  # like the release files
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("subj")
    return write_jsonl(d / "train.4.jsonl", TRAIN), write_jsonl(d / "test.jsonl", TEST)


def cot_task(data, **kw):
    return make_task({"name": "subj_cot", "data_path": data[0], "eval_path": data[1],
                      "eval_num": 0, "min_len": 1, "max_len": 5, "wishful": WISHFUL,
                      "eval_batch_size": 4, "vote_k": 3, "log_z_prompts": 2, **TEMPLATES, **kw})


@pytest.fixture(scope="module")
def setup(data):
    task = cot_task(data)
    tok = tiny_tokenizer()
    cfg = CFG
    # a large init: logits far from uniform, so position or mask mistakes show
    params = init_params(cfg, jax.random.PRNGKey(3), std=0.3)
    task.setup(cfg, tok)
    return task, cfg, params, tok


@jax.jit
def _logp(params, adapters, seq):
    return jax.nn.log_softmax(forward(CFG, params, seq, adapters=adapters).astype(jnp.float32), -1)


def seq_logp(cfg, params, ctx, cont, adapters=None):
    """log p(cont | ctx) from one forward over the sequence (no padding before it; tokens
    after it cannot change causal logits), summed token by token."""
    assert cfg == CFG
    seq = list(ctx) + list(cont)
    lp = np.asarray(_logp(params, adapters, np.asarray([seq + [0] * (64 - len(seq))], np.int32)))[0]
    return float(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


# ---------------------------------------------------------------------------- reward
def test_reward_of_every_prefix_matches_a_direct_computation(setup):
    task, cfg, params, tok = setup
    rows = [0, 1, 3, 2]
    zs = [tok.encode(s, add_bos=False) for s in (" abc", " xy", " hell", " q")]
    xs = [task.t.x_ids(task.train_rows[r]) for r in rows]
    P, T = max(map(len, xs)) + 2, task.max_len
    pt = np.zeros((len(rows), P), np.int32)
    pm = np.zeros((len(rows), P), np.int32)
    z = np.full((len(rows), T), 7, np.int32)  # pads are arbitrary ids
    n = np.zeros(len(rows), np.int32)
    for j, (x, zz) in enumerate(zip(xs, zs)):
        pt[j, P - len(x):], pm[j, P - len(x):] = x, 1
        z[j, :len(zz)], n[j] = zz, len(zz)
    batch = {"prompt_tokens": pt, "prompt_mask": pm, "tokens": z, "lengths": n,
             "prompt_index": np.asarray(rows, np.int32)}
    got = np.asarray(jax.jit(lambda b: task.log_reward(cfg, params, b))(batch))
    assert got.shape == (len(rows), T + 1)
    penalised = []
    for j, r in enumerate(rows):
        gold = task.train_rows[r].label
        for i in range(n[j] + 1):
            lpz = seq_logp(cfg, params, xs[j], zs[j][:i])
            ys = [seq_logp(cfg, params, xs[j] + zs[j][:i], task.t.answer(c)) for c in range(2)]
            wrong = ys[1 - gold] > ys[gold]
            penalised.append(wrong)
            want = lpz + ys[gold] - 50.0 * wrong
            assert got[j, i] == pytest.approx(want, abs=2e-3), (j, i)
        assert np.all(got[j, n[j] + 1:] == 0)
    # the check covers both branches of the penalty
    assert any(penalised) and not all(penalised)
    # Y is "\nA: obj." etc.: its first token is the newline that terminates Z
    assert task.t.answer(0)[0] in task.term_ids


def test_penalty_value_and_final_log_reward_agree_with_the_step_reward(setup, data):
    task, cfg, params, tok = setup
    free = cot_task(data, wrong_label_penalty=0.0)
    free.setup(cfg, tok)
    rows = task.train_rows[:3]
    zs = [tok.encode(s, add_bos=False) for s in (" ab", " c", " dd")]
    task.bind_reward_params(params)
    free.bind_reward_params(params)
    a, b = task.final_log_reward(rows, zs), free.final_log_reward(rows, zs)
    for j, r in enumerate(rows):
        x = task.t.x_ids(r)
        ys = [seq_logp(cfg, params, x + zs[j], task.t.answer(c)) for c in range(2)]
        want = seq_logp(cfg, params, x, zs[j]) + ys[r.label]
        assert b[j] == pytest.approx(want, abs=2e-3)
        assert a[j] - b[j] == pytest.approx(-50.0 * (ys[1 - r.label] > ys[r.label]), abs=1e-3)


def test_policy_cannot_write_a_newline_and_targets_are_the_wishful_phrases(setup):
    task, cfg, params, tok = setup
    bias = task.policy_logit_bias()
    nl = tok.encode("\n", add_bos=False)[0]
    assert nl in task.term_ids and bias[nl] == 0
    assert bias[tok.eos_id] < -1e8  # special tokens are masked
    t = task.targets()
    per_label = {"obj": 2, "subj": 1}
    assert len(t) == sum(per_label[l] for _, l in TRAIN)
    for x in t:
        lab = LABELS[task.train_rows[x.prompt_index].label]
        assert tok.decode(x.tokens) in WISHFUL[lab]


# ---------------------------------------------------------------------------- label scoring
def test_candidate_log_probs_equal_policy_log_prob(setup):
    task, cfg, params, tok = setup
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    tree = lora_lib.init_lora(cfg, params, lcfg, jax.random.PRNGKey(1))["tree"]
    # non-zero B matrices so the adapters change the model
    tree = jax.tree_util.tree_map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape, x.dtype), tree)
    ad = Adapters(tree=tree, scale=jnp.float32(lcfg.scale))
    end = task.t.end_id
    pol = Policy(model_config=cfg, params=params, adapters=ad,
                 spec=PolicySpec(term_ids=(end,), max_len=8, min_len=0), tokenizer=tok)
    prompts = ["R: a b\nA:", "R: longer text here\nA:", "x\nA:"]
    ids = [tok.encode(p) for p in prompts]
    cands = [task.t.label_continuation(c) for c in range(2)]
    got = candidate_log_probs(cfg, params, ids, cands, adapters=ad, batch_size=2)
    for c in range(2):
        ref = pol.log_prob(prompts, [list(task.t.label_ids[c])] * len(prompts))
        np.testing.assert_allclose(got[:, c], ref, atol=2e-3)
    # and a direct loop of forward calls
    assert got[1, 1] == pytest.approx(seq_logp(cfg, params, ids[1], cands[1], ad), abs=2e-3)
    # without adapters: different numbers (the adapters are used)
    base = candidate_log_probs(cfg, params, ids, cands, batch_size=2)
    assert np.max(np.abs(base - got)) > 1e-2
    # weights replicated on a data=8 mesh: the rows split over it (parallel.split_rows, 2
    # rows per call padded to 8), the same scores
    if len(jax.devices()) >= 8:
        from gfn_jax import parallel

        mesh = parallel.make_mesh(parallel.MeshConfig(data=8))
        on_mesh = jax.device_put((params, ad), parallel.replicated(mesh))
        split = candidate_log_probs(cfg, on_mesh[0], ids, cands, adapters=on_mesh[1],
                                    batch_size=2)
        np.testing.assert_allclose(split, got, atol=1e-5)


def test_votes_and_predictions_on_hand_made_scores():
    assert majority_vote([1, 0, 1]) == 1
    assert majority_vote([0, 1]) == 0  # tie: the first occurring
    assert majority_vote([1, 0, 0, 1]) == 1
    assert majority_vote([]) is None
    # mean probability vs vote: two weak votes for 0, one confident vote for 1
    s = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.01, 0.99]]))
    assert majority_vote(list(np.argmax(s, 1))) == 0
    assert mean_prob_vote(s) == 1  # mean p = (0.403, 0.597)
    # unnormalised scores: only differences between candidates matter
    assert mean_prob_vote(s + np.array([[5.0], [-3.0], [1.0]])) == 1
    p = predict_rows(s, [[0, 1], [2], []], greedy=[2, None, 0])
    assert p["single"].tolist() == [0, 0, 1]
    assert p["vote"].tolist() == [0, 1, -1]
    assert p["mean_prob"].tolist() == [0, 1, -1]
    assert p["greedy"].tolist() == [1, -1, 0]


def test_importance_log_z_and_ess_closed_forms():
    # weights 1 and 3: log mean = log 2, ESS = 4^2 / (1 + 9) = 1.6
    lz, ess = importance_log_z([0.0, math.log(3.0)], [0.0, 0.0])
    assert lz == pytest.approx(math.log(2.0)) and ess == pytest.approx(1.6)
    # q = R / Z exactly: every weight is Z, the estimate is exact and ESS = n
    log_r = np.log([0.1, 0.3, 0.6]) + math.log(7.0)
    lz, ess = importance_log_z(log_r, np.log([0.1, 0.3, 0.6]))
    assert lz == pytest.approx(math.log(7.0)) and ess == pytest.approx(3.0)
    # one dominant weight: ESS -> 1
    assert importance_log_z([100.0, 0.0, 0.0], [0.0, 0.0, 0.0])[1] == pytest.approx(1.0)
    assert math.isnan(importance_log_z([], [])[0])


def test_evaluate_reports_votes_and_diagnostics(setup, data):
    task, cfg, params, tok = setup
    task.bind_reward_params(params)
    test = task.test_rows()
    zs = [" ab", " c", " ab", " x"]
    samples = []
    for r in test[:2]:
        for zt in zs[:3]:
            ids = tok.encode(zt, add_bos=False)
            samples.append({"prompt": task.t.x_text(r), "tokens": ids, "text": zt, "log_q": -3.0})
    m = task.evaluate(samples)
    # the reference: argmax of the base model's label scores, directly
    single, votes = [], []
    for r in test[:2]:
        preds = []
        for zt in zs[:3]:
            ctx = task.t.x_ids(r) + tok.encode(zt, add_bos=False) + list(task.t.answer_ids)
            sc = [seq_logp(cfg, params, ctx, task.t.label_continuation(c)) for c in range(2)]
            preds.append(int(np.argmax(sc)))
        single += [p == r.label for p in preds]
        votes.append(majority_vote(preds) == r.label)
    assert m["test_single_accuracy"] == pytest.approx(np.mean(single))
    assert m["test_vote_accuracy"] == pytest.approx(np.mean(votes))
    # IW log Z of the first prompt from final_log_reward and log q = -3
    lr = task.final_log_reward([test[0]] * 3, [tok.encode(z, add_bos=False) for z in zs[:3]])
    lr2 = task.final_log_reward([test[1]] * 3, [tok.encode(z, add_bos=False) for z in zs[:3]])
    want = np.mean([importance_log_z(lr, [-3.0] * 3)[0], importance_log_z(lr2, [-3.0] * 3)[0]])
    assert m["log_z_iw"] == pytest.approx(want, abs=1e-4)
    assert 1.0 <= m["ess"] <= 3.0
    with pytest.raises(ValueError, match="neither a training nor a test prompt"):
        task.evaluate([{"prompt": "nope", "tokens": [1], "log_q": 0.0}])


def test_prompting_prompts_put_the_examples_first(setup):
    task, cfg, params, tok = setup
    rows = task.test_rows()[:2]
    zero = prompting_prompts(task.t, rows)
    few = prompting_prompts(task.t, rows, task.train_rows[:2])
    assert tok.decode(zero[0]) == "R: the boy goes home .\nA:"
    assert tok.decode(few[1]) == ("R: a plot about a cat .\nA: obj.\n\nR: so dull and long .\nA: "
                                  "subj.\n\nR: i loved it .\nA:")


# ---------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("line,match", [
    ('{"text": "", "label_text": "obj"}', "'text' is missing, empty"),
    ('{"text": "ok", "label_text": "neutral"}', "not one of the labels"),
    ('{"text": "ok", "label": 1, "label_text": "obj"}', "disagrees with 'label_text'"),
    ('{"text": "ok", "label_text": "obj"', "not valid JSON"),
    ('["text"]', "must be a JSON object"),
])
def test_bad_rows_are_reported_with_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine", "label_text": "subj"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read_subj_jsonl(str(p), LABELS)
    assert f"{p}:3:" in str(e.value)


def test_non_utf8_row_and_mismatched_rationales(tmp_path, data):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"text": "fine", "label_text": "obj"}\n{"text": "caf\xe9", "label_text": "obj"}')
    with pytest.raises(ValueError, match=f"{p}:2: not UTF-8"):
        read_subj_jsonl(str(p), LABELS)
    train, test = read_subj_jsonl(data[0], LABELS), read_subj_jsonl(data[1], LABELS)
    assert len(train) == 4 and len(test) == 3  # the last line has no newline
    r = tmp_path / "rat.jsonl"
    ok = {"split": "train", "index": 1, "text": TRAIN[1][0], "z_tokens": [5, 6]}
    r.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "index": 2}) + "\n")
    with pytest.raises(ValueError, match=f"{r}:2: 'text' does not match train row 2"):
        read_rationales(str(r), train, test)
    r.write_text(json.dumps({**ok, "z_tokens": "ab"}) + "\n")
    with pytest.raises(ValueError, match=f"{r}:1: 'z_tokens'"):
        read_rationales(str(r), train, test)


# ---------------------------------------------------------------------------- training
def tiny_config(name, data, **task_kw):
    c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
    c.model.spec = "random"
    c.model.random.update(dict(family="llama", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                               d_ff=64, max_seq_len=128))
    c.lora.rank = 2
    with c.task.ignore_type():  # replace (not merge) nested values such as task.wishful
        for k, v in dict(data_path=data[0], eval_path=data[1], eval_num=0, **TEMPLATES,
                         **task_kw).items():
            c.task[k] = v
    c.train.steps = 2
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 2
    c.train.ckpt_every = 0
    c.eval.num_samples = 0
    return c


def test_e_step_trains_two_steps_with_replay_seeded(data, tmp_path):
    from gfn_jax.train import Trainer

    c = tiny_config("subj_cot", data, max_len=5, wishful=WISHFUL, eval_batch_size=4)
    tr = Trainer(c, str(tmp_path / "e"), restore=False, devices=jax.devices()[:1])
    assert len(tr.replay) == 0  # seeded lazily, when a replay batch first needs a prompt
    tr.rollouts.replay_batch(list(range(len(TRAIN))), 1, temperature=None)
    assert len(tr.replay) == sum(len(WISHFUL[l]) for _, l in TRAIN)
    s = tr.run(progress=False)
    assert s["steps"] == 2 and math.isfinite(s["final_metrics"]["loss"])
    assert os.path.isdir(tmp_path / "e" / "checkpoints")


def test_m_step_and_classifier_train_two_steps_and_evaluate(data, tmp_path, setup):
    from gfn_jax.policy import load_run
    from gfn_jax.train import Trainer

    tok = tiny_tokenizer()
    rat = tmp_path / "rat.jsonl"
    with open(rat, "w") as f:
        for split, rows in (("train", TRAIN), ("test", TEST)):
            for i, (t, _) in enumerate(rows):
                for k, z in enumerate((" ab", " c")):
                    f.write(json.dumps({"split": split, "index": i, "text": t, "greedy": k == 0,
                                        "z_tokens": tok.encode(z, add_bos=False)}) + "\n")
    for name, kw in (("subj_mstep", {"rationales_path": str(rat)}), ("subj_classify", {})):
        c = tiny_config(name, data, eval_batch_size=4, **kw)
        w = str(tmp_path / name)
        tr = Trainer(c, w, restore=False, devices=jax.devices()[:1])
        assert len(tr.prompts) == (8 if kw else 4)
        assert tr.rollouts.targets[0].tokens == tok.encode(" obj", add_bos=False)
        # the prompt ids are X [+ reason + Z] + answer prefix, joined as ids
        if kw:
            assert tr.prompt_ids[1] == (tok.encode("R: a plot about a cat .\nW:")
                                        + tok.encode(" c", add_bos=False)
                                        + tok.encode("\nA:", add_bos=False))
        s = tr.run(progress=False)
        assert s["steps"] == 2 and math.isfinite(s["final_metrics"]["loss"])
        _, task, pol, _ = load_run(w)
        m = task.evaluate_policy(pol)
        # the reference: argmax of Policy.log_prob over the labels, then the vote
        prompts, groups, greedy = task.test_items()
        lp = np.stack([pol.log_prob(prompts, [list(task.t.label_ids[c])] * len(prompts))
                       for c in range(2)], 1)
        pred = np.argmax(lp, 1)
        gold = np.array([LABELS.index(l) for _, l in TEST])
        if kw:
            assert len(prompts) == 6 and greedy == [0, 2, 4]
            assert m["greedy_accuracy"] == pytest.approx(np.mean(pred[[0, 2, 4]] == gold))
            assert m["vote_accuracy"] == pytest.approx(np.mean(pred[[1, 3, 5]] == gold))
        else:
            assert m["accuracy"] == pytest.approx(np.mean(pred == gold))


@pytest.mark.slow
def test_driver_plumbing_one_round(data, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import subj_em

    d = os.path.dirname(data[0])
    sets = ["model.spec=random", "lora.rank=2", "train.prompts_per_batch=2",
            "train.samples_per_prompt=4", "train.ckpt_every=0", "model.random.d_model=32",
            "model.random.n_layers=1", "model.random.n_heads=2", "model.random.n_kv_heads=1",
            "model.random.d_ff=64", "model.random.max_seq_len=128", "mesh.devices=1"]
    sets += [f"task.{k}={json.dumps(v)}" for k, v in TEMPLATES.items()]
    out = str(tmp_path / "run")
    argv = ["--k", "4", "--out", out, "--data_dir", d, "--rounds", "1", "--e_steps", "2",
            "--m_steps", "2", "--cls_steps", "2", "--train_rationales", "2", "--vote_k", "2",
            "--eval_num", "2", "--baselines", "--noprogress",
            "--set_e", 'task.wishful={"obj": [" fact"], "subj": [" view"]}',
            "--set_e", "task.max_len=5"] + sum([["--set", s] for s in sets], [])
    assert subj_em.main(argv) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    em = res["rounds"][0]["em"]
    assert {"greedy_accuracy", "vote_accuracy", "mean_prob_accuracy"} <= set(em)
    assert {"zero_shot", "few_shot", "supervised_lora"} <= set(res["baselines"])
    rat = [json.loads(l) for l in open(os.path.join(out, "rationales_r0.jsonl"))]
    assert sum(r["split"] == "train" for r in rat) == 4 * 2
    assert sum(r["split"] == "test" and r["greedy"] for r in rat) == 2
    assert os.path.isfile(os.path.join(out, "m0", "DONE"))
    table = subj_em.summarize([out], str(tmp_path / "acc.png"))
    assert table["em_vote"][4] == em["vote_accuracy"]
    assert os.path.getsize(tmp_path / "acc.png") > 0
