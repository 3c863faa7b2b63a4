"""The arithmetic task: every-prefix reward against a naive per-prefix loop of ``forward``
calls under the few-shot context, the restricted vocabulary, ground-truth targets that the
calculator reproduces, answer parsing and majority votes on hand-made samples, evaluation
splits, bad data rows, and two training steps (SubTB with replay seeded from data, and SFT)."""

import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.batch import TrainBatch
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import forward, init_params
from gfn_jax.tasks import make_task
from gfn_jax.tasks.arithmetic import (ArithmeticTask, importance_diagnostics, majority_vote,
                                      parse_answer)
from gfn_jax.tasks.arithmetic_data import ArithmeticDataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = set(" ,.0123456789=+-")


def row(query_expr, answer, rationale=None):
    r = {"str_query": f"Question: {query_expr} = ? Answer:", "num_sol": answer}
    if rationale is not None:
        r["str_rationale"] = rationale
    r["str_sol"] = f". The answer is {answer}."
    return r


# Hand-written data in the release's format (short problems keep the tiny model cheap).
TRAIN = [row("3 + 4", 7, "3 + 4 ="), row("9 - 8", 1, "9 - 8 ="), row("2 - 7", -5, "2 - 7 ="),
         row("9 + 8", 17, "9 + 8 =")]
HW = [row("5 + 5", 10), row("1 - 6", -5), row("1 + 2 + 3", 6)]
TEST3 = [row("1 + 2 + 3", 6), row("4 - 1 + 2", 5), row("4 - 1 + 2", 5), row("7 + 7 - 1", 13)]
TEST4 = [row("1 + 1 + 1 + 1", 4), row("9 - 9 + 9 - 9", 0)]
TEST5 = [row("1 + 2 + 3 + 4 + 5", 15), row("9 - 1 - 1 - 1 - 1", 5)]
FILES = {"1digit_34_op+-_train_50.json": TRAIN, "1digit_34_op+-_hw.json": HW,
         "1digit_3_op+-_test.json": TEST3, "1digit_4_op+-_test.json": TEST4,
         "1digit_5_op+-_test.json": TEST5, "1digit_34_op+-_test.json": TEST3 + TEST4}


def write_data(d, files=None):
    os.makedirs(d, exist_ok=True)
    for name, rows in (files or FILES).items():
        rows = [{k: v for k, v in r.items() if not (k == "str_rationale" and "train" not in name)}
                for r in rows]
        if "test" in name:
            rows = [{k: r[k] for k in ("str_query", "num_sol")} for r in rows]
        with open(os.path.join(d, name), "w") as f:
            json.dump(rows, f, indent=4)
    return str(d)


TASK_KW = dict(num_labelled=3, num_answer_only=3, num_few_shot=1, min_len=2, max_len=12,
               eval_id="dedup", eval_id_num=0, eval_ood_num=0, vote_k=3, eval_batch_size=4,
               eval_log_z_queries=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("arith"))


@pytest.fixture(scope="module")
def setup(data_dir):
    task = make_task({"name": "arithmetic", "data_dir": data_dir, **TASK_KW})
    tok = task.build_tokenizer()
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                      n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=320, tie_embeddings=False)
    # a larger init than usual so that the logits are far from uniform (position mistakes show)
    params = init_params(cfg, jax.random.PRNGKey(7), std=0.3)
    task.setup(cfg, tok)
    return task, cfg, params, tok


@pytest.fixture(scope="module")
def naive_fwd(setup):
    _, cfg, _, _ = setup
    return jax.jit(lambda p, t, m: forward(cfg, p, t, m))


NAIVE_LEN = 128


def naive_logits(fwd, params, seq):
    toks = np.zeros((1, NAIVE_LEN), np.int32)
    mask = np.zeros((1, NAIVE_LEN), np.int32)
    toks[0, :len(seq)], mask[0, :len(seq)] = seq, 1
    return np.asarray(fwd(params, jnp.asarray(toks), jnp.asarray(mask)), np.float64)[0, :len(seq)]


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def naive_reward(fwd, params, tok, query, z, answer, min_len, allowed_ids, eos):
    """For i = 0..len(z): token by token, log p~(z_<i | C X) (Z positions: every token outside
    the allowed characters + EOS gets -99, renormalised) + log p(Y | C X z_<i), C = the one-shot
    prompt written out here by hand; -99 for i < min_len."""
    shot = "Question: 3 + 4 = ? Answer: 3 + 4 = 7. The answer is 7.\n"
    ctx = tok.encode(shot + query)
    y = tok.encode(f". The answer is {answer}.")
    bias = np.full(tok.vocab_size, -99.0)
    bias[list(allowed_ids) + [eos]] = 0.0
    out = []
    for i in range(len(z) + 1):
        seq = ctx + list(z[:i]) + y
        lg = naive_logits(fwd, params, seq)
        tot = 0.0
        for k in range(i):
            tot += log_softmax(lg[len(ctx) + k - 1] + bias)[z[k]]
        for j, t in enumerate(y):
            tot += log_softmax(lg[len(ctx) + i + j - 1])[t]
        out.append(-99.0 if i < min_len else tot)
    return np.array(out)


def allowed_ids(tok):
    return [i for i in range(tok.vocab_size) if tok.decode([i]) and set(tok.decode([i])) <= ALLOWED]


def batch_for(task, tok, rows, zs, T, action_masks=None, seed=0):
    """A TrainBatch of training prompts ``rows`` (indices) with trajectories ``zs``; garbage in
    the policy prompt's padding and after each row's end."""
    rng = np.random.default_rng(seed)
    prompts = task.train_prompts()
    rprompts = task.reward_prompts()
    pid = [tok.encode(prompts[r]) for r in rows]
    rid = [tok.encode(rprompts[r]) for r in rows]
    P, Pr = max(map(len, pid)) + 2, max(map(len, rid)) + 3
    B = len(rows)
    pt = rng.integers(0, tok.vocab_size, (B, P)).astype(np.int32)
    pm = np.zeros((B, P), np.int32)
    rt = rng.integers(0, tok.vocab_size, (B, Pr)).astype(np.int32)
    rm = np.zeros((B, Pr), np.int32)
    z = rng.integers(0, tok.vocab_size, (B, T)).astype(np.int32)
    n = np.zeros(B, np.int32)
    am = np.ones((B, T), bool)
    for b in range(B):
        pt[b, P - len(pid[b]):], pm[b, P - len(pid[b]):] = pid[b], 1
        rt[b, Pr - len(rid[b]):], rm[b, Pr - len(rid[b]):] = rid[b], 1
        z[b, :len(zs[b])], n[b] = zs[b], len(zs[b])
        if action_masks is not None:
            am[b, :len(zs[b])] = action_masks[b]
    return TrainBatch.build(pt, pm, z, n, am, np.asarray(rows, np.int32),
                            reward_prompt_tokens=rt, reward_prompt_mask=rm)


# ---------------------------------------------------------------------------
# Reward of every prefix against the naive loop
# ---------------------------------------------------------------------------
def test_reward_every_prefix_matches_naive_loop(setup, naive_fwd):
    task, cfg, params, tok = setup
    # prompts: labelled copies first (5 each), then the answer-only queries (1 each)
    prompts = task.train_prompts()
    assert task.labelled_copies == 5 and task.answer_only_copies == 1
    assert prompts[:15] == [TRAIN[k]["str_query"] for k in range(3) for _ in range(5)]
    assert prompts[15:] == [r["str_query"] for r in HW]
    rows = [0, 5, 15, 17]
    texts = [" 3 + 4 = 7", " 9-8=1,", "", " 1+2=3, 3+"]
    zs = [tok.encode(t) for t in texts]
    zs[1] = zs[1] + [tok.encode("Q")[0], tok.eos_id]  # tokens outside the allowed set count too
    T = 12
    batch = batch_for(task, tok, rows, zs, T)
    got = np.asarray(jax.jit(lambda b: task.log_reward(cfg, params, b))(batch))
    assert got.shape == (4, T + 1)
    ids = allowed_ids(tok)
    answers = {0: 7, 5: 1, 15: 10, 17: 6}
    for b, r in enumerate(rows):
        want = naive_reward(naive_fwd, params, tok, prompts[r], zs[b], answers[r],
                            task.min_len, ids, tok.eos_id)
        np.testing.assert_allclose(got[b, :len(zs[b]) + 1], want, atol=2e-4, rtol=1e-5,
                                   err_msg=f"row {b}")
        assert np.all(got[b, len(zs[b]) + 1:] == 0.0)
    # the restriction matters: renormalised over the allowed tokens, an all-allowed Z is more
    # likely than under the free model, and a forbidden token ('Q', z_7 of row 1) costs ~99
    task.reward_vocab_restrict = False
    try:
        free = np.asarray(task.log_reward(cfg, params, batch))
    finally:
        task.reward_vocab_restrict = True
    assert np.all(got[0, 2:11] > free[0, 2:11] + 1e-3)
    step_q = (got[1, 8] - got[1, 7]) - (free[1, 8] - free[1, 7])
    assert -99.0 < step_q < -90.0


def test_vocabulary_restriction(setup):
    task, cfg, params, tok = setup
    bias = task.policy_logit_bias()
    want = set(allowed_ids(tok)) | {tok.eos_id}
    assert {i for i in range(cfg.vocab_size) if bias[i] == 0.0} == want
    assert all(bias[i] == -99.0 for i in range(cfg.vocab_size) if i not in want)
    assert {tok.decode([i]) for i in want - {tok.eos_id}} == ALLOWED
    period = tok.encode(".")[0]
    assert set(task.policy_spec().term_ids) == {period, tok.eos_id}  # "." or EOS ends Z
    assert task.policy_spec().min_len == 2 and task.policy_spec().max_len == 12
    # the sampler with the task's bias and tool only writes allowed tokens
    from gfn_jax.policy import policy_from_task

    pol = policy_from_task(task, cfg, params, None, tok)
    out = pol.sample(task.train_prompts()[:1] + task.train_prompts()[-1:], n=8, seed=3)
    for s in out:
        assert set(s["tokens"]) <= want - {period, tok.eos_id}, s["text"]  # ⊤ is not in Z
        assert 2 <= len(s["tokens"]) <= 12


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------
def test_targets_carry_tool_mask_and_are_what_the_calculator_splices(setup, naive_fwd):
    task, cfg, params, tok = setup
    targets = task.targets()
    assert len(targets) == 15  # 3 labelled queries x 5 copies, no answer-only query
    assert sorted(t.prompt_index for t in targets) == list(range(15))
    want_text = {0: " 3 + 4 = 7", 1: " 9 - 8 = 1", 2: " 2 - 7 = -5"}
    tool = task.tool()
    call = jax.jit(lambda z, n: tool(z, n, 0))
    for t in targets[::5]:  # one of each query's copies (the copies are checked equal below)
        text = "".join(tok.decode([i]) for i in t.tokens)
        assert text == want_text[t.prompt_index // 5]
        # the mask is False exactly on the splice " <result>" after "="
        eq = text.index("=")
        assert list(t.action_mask) == [k <= eq for k in range(len(text))]
        # replaying the actions through the calculator forces exactly the masked tokens
        z = np.zeros((1, task.max_len), np.int32)
        for k in range(len(t.tokens)):
            force, forced = call(jnp.asarray(z), jnp.asarray([k], jnp.int32))
            assert bool(force[0]) == (not t.action_mask[k]), (text, k)
            if not t.action_mask[k]:
                assert int(forced[0]) == t.tokens[k]
            z[0, k] = t.tokens[k]
        assert t.weight == 1.0
    for t in targets:
        first = targets[t.prompt_index // 5 * 5]
        assert list(t.tokens) == list(first.tokens) and list(t.action_mask) == list(first.action_mask)
    # the reward of a target (tool tokens included) matches the naive loop
    t = targets[5]
    batch = batch_for(task, tok, [t.prompt_index], [list(t.tokens)], 12, [t.action_mask])
    got = np.asarray(task.log_reward(cfg, params, batch))[0, :len(t.tokens) + 1]
    want = naive_reward(naive_fwd, params, tok, task.train_prompts()[5], list(t.tokens), 1,
                        task.min_len, allowed_ids(tok), tok.eos_id)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    # ... and the evaluation-side helper agrees on the final value
    final = task.final_log_reward([task.train_prompts()[5]], [1], [list(t.tokens)], params)
    np.testing.assert_allclose(final, want[-1:], atol=2e-4, rtol=1e-5)


# ---------------------------------------------------------------------------
# Parsing, votes, evaluation
# ---------------------------------------------------------------------------
def test_parse_answer_and_majority_vote():
    assert parse_answer(" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6") == -6
    assert parse_answer(" 5 + 9 = 14, 14 - 3 = 11, 11 + 8 = 19.") == 19
    assert parse_answer("7 - 1 = 6. The answer is 12.") == 12  # the template wins
    assert parse_answer(" 1 + 2 =") is None  # a failed splice: no value after '='
    assert parse_answer(" 1 + 2 = , 3") is None
    assert parse_answer(" -1") == -1 and parse_answer(" 4 5") == 5
    assert parse_answer("") is None and parse_answer(" , .") is None
    assert majority_vote([3, 5, 5, None, 3, 5]) == 5
    assert majority_vote([None, None, 4]) is None  # unparsable wins: counts as wrong
    assert majority_vote([2, 7, 7, 2]) == 2  # a tie goes to the first seen
    assert majority_vote([]) is None


def test_importance_diagnostics_closed_forms():
    lz, ess = importance_diagnostics([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert lz == pytest.approx(0.5) and ess == pytest.approx(1.0)
    lz, ess = importance_diagnostics([0.0, -1000.0, -1000.0, -1000.0], [0.0] * 4)
    assert lz == pytest.approx(np.log(0.25)) and ess == pytest.approx(0.25)
    lw = np.array([0.3, -1.2, 2.0])
    lz, ess = importance_diagnostics(lw, np.zeros(3))
    w = np.exp(lw)
    assert lz == pytest.approx(np.log(w.mean())) and ess == pytest.approx(w.sum() ** 2 / 3 / (w ** 2).sum())


def test_eval_splits_and_majority_vote_accuracy(setup, tmp_path):
    task, cfg, params, tok = setup
    sets = task.eval_sets()
    # test_3: '1 + 2 + 3' is an hw query, '4 - 1 + 2' repeats -> 2 of 4 kept; test_4: 2 kept
    assert [p.query for p in sets["id"]] == [TEST3[1]["str_query"], TEST3[3]["str_query"],
                                             TEST4[0]["str_query"], TEST4[1]["str_query"]]
    assert [p.query for p in sets["ood"]] == [r["str_query"] for r in TEST5]
    assert task.eval_info["test_3_rows_kept"] == 2 and task.eval_info["test_4_rows_kept"] == 2
    assert task.eval_prompts() == [p.query for p in sets["id"] + sets["ood"]]
    q = task.eval_prompts()
    S = lambda query, text: {"prompt": query, "text": text}  # noqa: E731
    samples = [
        # id query 0 (gold 5): 2 of 3 right -> vote right; a 4th sample beyond vote_k=3 ignored
        S(q[0], " 4 - 1 = 3, 3 + 2 = 5"), S(q[0], " 4 - 1 = 3, 3 + 2 = 6"), S(q[0], " = 5"),
        S(q[0], " = 6"),
        # id query 1 (gold 13): one right, two unparsable -> vote None, wrong
        S(q[1], " 7 + 7 = 14, 14 - 1 = 13"), S(q[1], " 7 + 7 = ,"), S(q[1], " 7 + 7 ="),
        # id query 2 (gold 4): tie 4 / 3 -> first seen (3), wrong
        S(q[2], " = 3"), S(q[2], " = 4"),
        # ood query 0 (gold 15): all right
        S(q[4], " = 15"), S(q[4], "The answer is 15"), S(q[4], " 10 + 5 = 15."),
    ]
    m = task.evaluate(samples, out_dir=str(tmp_path), tag="t")
    assert m["id_accuracy"] == pytest.approx(1 / 3)
    assert m["id_num_queries"] == 3 and m["id_min_samples"] == 2
    assert m["id_sample_accuracy"] == pytest.approx(4 / 8)  # (2 + 1 + 1) of 3 + 3 + 2
    assert m["id_parsed_fraction"] == pytest.approx(6 / 8)
    assert m["ood_accuracy"] == 1.0 and m["ood_num_queries"] == 1
    assert "log_z_iw" not in m  # no log_q
    lines = [json.loads(x) for x in open(tmp_path / "arithmetic_votes_t.jsonl")]
    assert [r["vote"] for r in lines] == [5, None, 3, 15]
    with pytest.raises(ValueError, match="neither a training nor an evaluation query"):
        task.evaluate([S("Question: 0 + 0 = ? Answer:", " = 0")])


def test_generated_eval_split_is_disjoint_from_all_training_files(data_dir):
    task = make_task({"name": "arithmetic", "data_dir": data_dir, **TASK_KW,
                      "eval_id": "generated", "eval_id_num": 300, "eval_seed": 5})
    ident = task.eval_sets()["id"]
    train = {r["str_query"] for r in TRAIN + HW}
    assert len(ident) == 300 and len({p.query for p in ident}) == 300
    assert not train & {p.query for p in ident}
    assert {p.num_operands for p in ident} == {3, 4}
    again = make_task({"name": "arithmetic", "data_dir": data_dir, **TASK_KW,
                       "eval_id": "generated", "eval_id_num": 300, "eval_seed": 5})
    assert [p.query for p in again.eval_sets()["id"]] == [p.query for p in ident]


def test_posterior_diagnostics_use_the_reward(setup):
    task, cfg, params, tok = setup
    q = task.train_prompts()[0]
    zs = [tok.encode(" 3 + 4 = 7"), tok.encode(" 3 + 3 = 6"), tok.encode("7")]
    log_q = [-3.0, -5.0, -1.0]
    samples = [{"prompt": q, "tokens": z, "text": tok.decode(z), "log_q": lq}
               for z, lq in zip(zs, log_q)]
    task.bind_reward_params(params)
    try:
        m = task.evaluate(samples)
        log_r = task.final_log_reward([q] * 3, [7] * 3, zs)
        lz, ess = importance_diagnostics(log_r, log_q)
        assert m["log_z_iw"] == pytest.approx(lz, rel=1e-5) and m["ess_fraction"] == pytest.approx(ess)
        assert m["train_accuracy"] == 1.0 and log_r[2] == pytest.approx(-99.0)  # 1 < min_len
        cold = [dict(s, temperature=0.1) for s in samples]
        assert "log_z_iw" not in task.evaluate(cold)  # log_q is not the proposal's then
    finally:
        task.bind_reward_params(None)


# ---------------------------------------------------------------------------
# Data errors
# ---------------------------------------------------------------------------
def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    bad = dict(FILES)
    bad["1digit_34_op+-_hw.json"] = HW[:2] + [row("4 + 4", 9)]  # wrong answer in the 3rd row
    d = write_data(tmp_path / "bad", bad)
    path = os.path.join(d, "1digit_34_op+-_hw.json")
    line = open(path).read().splitlines().index('        "str_query": "Question: 4 + 4 = ? Answer:",')
    with pytest.raises(ArithmeticDataError) as e:
        make_task({"name": "arithmetic", "data_dir": d, **TASK_KW})
    assert path in str(e.value) and f"line {line}" in str(e.value) and "row 2" in str(e.value)
    bad["1digit_34_op+-_hw.json"] = HW
    bad["1digit_34_op+-_train_50.json"] = TRAIN[:1] + [row("9 - 8", 1, "9 + 8 =")]
    d = write_data(tmp_path / "bad2", bad)
    with pytest.raises(ArithmeticDataError, match=r"train_50\.json: row 1 \(line 8\).*rationale"):
        make_task({"name": "arithmetic", "data_dir": d, **TASK_KW})
    with pytest.raises(FileNotFoundError, match="arithmetic data file not found"):
        make_task({"name": "arithmetic", "data_dir": str(tmp_path / "nowhere"), **TASK_KW})
    with pytest.raises(ValueError, match="unknown config key"):
        make_task({"name": "arithmetic", "data_dir": d, "num_labeled": 3})


# ---------------------------------------------------------------------------
# Training steps through the Trainer
# ---------------------------------------------------------------------------
def train_config(data_dir, objective):
    c = runpy.run_path(os.path.join(ROOT, "configs", "arithmetic.py"))["get_config"]()
    c.task.update({**TASK_KW, "data_dir": data_dir, "num_answer_only": 2})
    c.model.spec = "random"
    c.model.init_std = 0.1
    c.model.random.update(dict(family="llama", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                               d_ff=64, max_seq_len=320))
    c.lora.enabled = False
    c.train.steps = 2
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 2
    c.train.ckpt_every = 0
    c.eval.num_samples = 0
    c.objective.name = objective
    if objective == "sft":
        c.explore.p_replay = 0.0
        c.replay.seed_from_data = False
    return c


@pytest.mark.parametrize("objective", ["subtb", "sft"])
def test_two_training_steps(data_dir, tmp_path, objective):
    from gfn_jax.metrics import read_metrics
    from gfn_jax.train import Trainer

    c = train_config(data_dir, objective)
    tr = Trainer(c, str(tmp_path / objective), restore=False, devices=jax.devices()[:1])
    assert isinstance(tr.task, ArithmeticTask) and tr.rollouts.targets is not None
    if objective == "subtb":
        # replay seeded with the 3 x 5 ground-truth rationales; their stored log R is the
        # task's own reward of the tool-on trajectory under the frozen base (seeded lazily,
        # when a replay batch first needs the prompts)
        assert len(tr.replay) == 0
        tr.rollouts.replay_batch(sorted({t.prompt_index for t in tr.task.targets()}), 1, None)
        assert len(tr.replay) == 15
        t = tr.task.targets()[0]
        entry = tr.replay.sample(str(t.prompt_index), 1)[0]
        assert list(entry.tokens) == list(t.tokens)
        assert list(entry.arrays["action_mask"]) == list(t.action_mask)
        want = tr.task.final_log_reward([tr.task.train_prompts()[t.prompt_index]], [7],
                                        [list(t.tokens)], tr.frozen["base"])
        assert entry.log_r == pytest.approx(float(want[0]), abs=1e-4)
    summary = tr.run(progress=False)
    assert summary["steps"] == 2
    recs = [r for r in read_metrics(tr.workdir) if "loss" in r]
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs)
    if objective == "subtb":
        assert all(np.isfinite(r["log_r"]) for r in recs)


def test_plan_compiles_the_sampler_with_the_calculator(data_dir):
    """``gfn-jax plan`` (``plan_run``) compiles the sampler the trainer runs, with the
    calculator that splices the results into Z (before, the plan left the tool out)."""
    from gfn_jax.train import plan_run

    c = train_config(data_dir, "subtb")
    plan = plan_run(c, devices=jax.devices()[:1])
    assert plan.sampler.knobs["sampler.tool"] == "CalculatorTool"
    assert plan.sampler.knobs["task.max_len"] == TASK_KW["max_len"]


@pytest.mark.parametrize("method", ["gfn", "sft", "ppo"])
def test_experiment_driver_flags_give_valid_configs(method):
    """scripts/arithmetic_experiment.py: each method's overrides name real keys and pass the
    whole-config validation (PPO: on-policy only, its own step count; the schedules follow
    --steps for every method)."""
    from gfn_jax.defaults import validate_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = runpy.run_path(os.path.join(root, "scripts", "arithmetic_experiment.py"))[
        "train_flags"](method, 80, 41)
    c = runpy.run_path(os.path.join(root, "configs", "arithmetic.py"))["get_config"]()
    for f in flags:
        key, _, val = f[len("--config."):].partition("=")
        *parents, last = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        assert last in node, key
        old = node[last]
        node[last] = (val == "True") if isinstance(old, bool) else type(old)(val)
    validate_config(c)
    assert c.train.steps == (41 if method == "ppo" else 80)
    assert c.optim.warmup_steps == 10 and c.eval.num_samples == 0
    assert c.objective.name == {"gfn": "subtb", "sft": "sft", "ppo": "ppo"}[method]
    if method != "gfn":
        assert c.explore.p_replay == 0 and c.explore.p_on_policy == 1.0
