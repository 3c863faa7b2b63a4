"""Story infilling: the ROCStories CSV loader (file:line errors), the seeded stand-in builder,
the reward against a direct per-prefix computation, targets and BLEU/GLEU, and a few Trainer
steps (GFlowNet and SFT on the true middles) on a random model without LoRA, and the story
reward model recipe (configs/sft_stories.py) trained, exported and served as reward.model."""

import json
import os
import runpy
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gfn_jax.models.registry import tiny_model
from gfn_jax.models.transformer import forward
from gfn_jax.tasks.stories import StoriesTask, read_rocstories

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_story_standin as standin  # noqa: E402

HEADER = "storyid,storytitle,sentence1,sentence2,sentence3,sentence4,sentence5\n"
STORIES = [
    {"beginning": "Al ran.", "middle": "He fell.", "ending": "He cried."},
    {"beginning": "Bo ate.", "middle": "It was hot.", "ending": "Bo drank."},
    {"beginning": "Cy sang.", "middle": "We sat.", "ending": "All clap."},
    {"beginning": "Di hid.", "middle": "No one came.", "ending": "Di left."},
]


def test_rocstories_loader_and_errors(tmp_path):
    good = tmp_path / "roc.csv"
    good.write_text(HEADER + 'a1,Title,"S1, with comma.",S2.,S3.,S4.,S5.\n'
                    "\n" "a2,T2,One.,Two.,Three.,Four.,Five.\n", encoding="utf-8")
    rows = read_rocstories(str(good))
    assert rows == [
        {"id": "a1", "title": "Title", "beginning": "S1, with comma. S2. S3.", "middle": "S4.",
         "ending": "S5."},
        {"id": "a2", "title": "T2", "beginning": "One. Two. Three.", "middle": "Four.",
         "ending": "Five."}]
    assert len(read_rocstories(str(good), num=1)) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "a1,T,1.,2.,3.,4.,5.\n" "a2,T,1.,2, unquoted.,3.,4.,5.\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: 8 field\(s\), the header has 7"):
        read_rocstories(str(bad))
    empty = tmp_path / "empty.csv"
    empty.write_text(HEADER + "a1,T,1.,2.,3.,  ,5.\n")
    with pytest.raises(ValueError, match=r"empty\.csv:2: empty sentence4"):
        read_rocstories(str(empty))
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("storyid,title,sentence1\n")
    with pytest.raises(ValueError, match=r"nohead\.csv:1: the header lacks column\(s\) "
                                         r"storytitle, sentence2"):
        read_rocstories(str(nohead))
    # the task reads the CSV too (beginning = sentences 1-3, middle = 4, ending = 5)
    t = StoriesTask({"data_path": str(good), "num_eval": 1})
    assert t.eval_prompts() == ["Beginning: S1, with comma. S2. S3.\nEnding: S5.\nMiddle:"]
    assert t.train_prompts() == ["Beginning: One. Two. Three.\nEnding: Five.\nMiddle:"]
    assert t.reward_prompts() == ["One. Two. Three."]


def test_standin_builder_seeded_three_sentences(tmp_path):
    lines = ["Skip me. Two here. Three now."] + [
        f"First {k} words. Second {k} words. Third {k} words." for k in range(30)] + [
        "Only one sentence here.", "Two sentences here. And here now.",
        "Four of them. Yes four of them. Really four of them. Truly four here.",
        "A question is here? Then two more. And three more.",
        'He said "hi" there. Then two more. And three more.', "Short. Too. Yes."]
    assert standin.split_sentences("A b c. D e f! G h?") == ["A b c.", "D e f!", "G h?"]
    rows = standin.build_standin(lines, 10, seed=3, skip_first=1)
    assert len(rows) == 10
    assert rows == standin.build_standin(lines, 10, seed=3, skip_first=1)  # seeded
    assert rows != standin.build_standin(lines, 10, seed=4, skip_first=1)
    all_rows = standin.build_standin(lines, 100, seed=0, skip_first=1)
    assert sorted(r["source_line"] for r in all_rows) == list(range(2, 32))  # only the 30
    for r in all_rows:
        k = r["source_line"] - 2
        assert (r["beginning"], r["middle"], r["ending"]) == (
            f"First {k} words.", f"Second {k} words.", f"Third {k} words.")
    src = tmp_path / "p.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "s.jsonl"
    assert standin.main(["--prompts", str(src), "--out", str(out), "--num", "5",
                         "--skip_first", "1"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == standin.build_standin(lines, 5, seed=0, skip_first=1)
    assert standin.main(["--prompts", str(src), "--out", str(out)]) == 2  # no overwrite


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=7)


def stories_file(tmp_path):
    p = tmp_path / "stories.jsonl"
    p.write_text("".join(json.dumps(s) + "\n" for s in STORIES))
    return str(p)


def make_task(model, tmp_path, **over):
    cfg = dict(data_path=stories_file(tmp_path), num_eval=1, min_len=1, max_len=12,
               eval_batch_size=4)
    cfg.update(over)
    t = StoriesTask(ml_collections.ConfigDict(cfg))
    t.setup(model.config, model.tokenizer)
    return t


def naive_reward(model, x, z, y):
    """log p(z_<i | x) + log p(y | x z_<i) for i = 0..len(z), one float64 pass per prefix."""
    fwd = jax.jit(lambda p, t, m: forward(model.config, p, t, m))
    out = []
    for i in range(len(z) + 1):
        seq = list(x) + list(z[:i]) + list(y)
        toks = np.zeros((1, 96), np.int32)
        mask = np.zeros((1, 96), np.int32)
        toks[0, :len(seq)], mask[0, :len(seq)] = seq, 1
        lg = np.asarray(fwd(model.params, jnp.asarray(toks), jnp.asarray(mask)), np.float64)[0]
        lg = lg - lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        out.append(sum(lp[len(x) + k - 1, seq[len(x) + k]] for k in range(i + len(y))))
    return np.array(out)


def test_stories_reward_equals_direct_computation(model, tmp_path):
    t = make_task(model, tmp_path)
    tok = model.tokenizer
    # the first story is held out; training prompt k is story k + 1
    assert t.train_prompts()[0] == "Beginning: Bo ate.\nEnding: Bo drank.\nMiddle:"
    assert t.reward_prompts() == ["Bo ate.", "Cy sang.", "Di hid."]
    zs = [tok.encode(" It was"), [], tok.encode(" Hm.")]
    rows = [0, 2, 1]
    rp = [tok.encode(t.reward_prompts()[r]) for r in rows]
    pp = [t.encode_prompt(t.train_prompts()[r]) for r in rows]
    P, Pr, T = max(map(len, pp)), max(map(len, rp)) + 2, 12
    B = len(rows)
    pt, pm = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
    rt, rm = np.zeros((B, Pr), np.int32), np.zeros((B, Pr), np.int32)
    z, n = np.full((B, T), 5, np.int32), np.zeros(B, np.int32)
    for b in range(B):
        pt[b, P - len(pp[b]):], pm[b, P - len(pp[b]):] = pp[b], 1
        rt[b, Pr - len(rp[b]):], rm[b, Pr - len(rp[b]):] = rp[b], 1
        z[b, :len(zs[b])], n[b] = zs[b], len(zs[b])
    batch = {k: jnp.asarray(v) for k, v in dict(
        prompt_tokens=pt, prompt_mask=pm, reward_prompt_tokens=rt, reward_prompt_mask=rm,
        tokens=z, lengths=n, prompt_index=np.asarray(rows, np.int32)).items()}
    got = np.asarray(t.log_reward(model.config, model.params, batch))
    for b, r in enumerate(rows):
        y = tok.encode(" " + STORIES[r + 1]["ending"])
        want = naive_reward(model, rp[b], zs[b], y)
        np.testing.assert_allclose(got[b, :len(zs[b]) + 1], want, atol=2e-4, rtol=1e-6)
    # evaluation scores the same quantity under the reward context
    t.bind_reward_params(model.params)
    samples = [{"prompt": t.train_prompts()[0], "tokens": zs[0], "text": " It was",
                "log_q": 0.0}]
    m = t.evaluate(samples)
    assert m["mean_log_p_base"] == pytest.approx(
        naive_reward(model, rp[0], zs[0], tok.encode(" Bo drank."))[-1], abs=2e-4)


def test_targets_and_text_metrics(model, tmp_path):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu

    t = make_task(model, tmp_path)
    tg = t.targets()  # " No one came." is 13 byte tokens > max_len=12: left out
    assert [x.prompt_index for x in tg] == [0, 1]
    assert [model.tokenizer.decode(x.tokens) for x in tg] == [" It was hot.", " We sat."]
    assert [x.prompt_index for x in make_task(model, tmp_path, max_len=13).targets()] == [0, 1, 2]
    t.bind_reward_params(model.params)
    held = t.eval_prompts()[0]
    texts = [" He fell down.", " She ran off."]
    samples = [{"prompt": held, "tokens": model.tokenizer.encode(x), "text": x, "log_q": 0.0}
               for x in texts]
    m = t.evaluate(samples)
    ref = ["He", "fell"]
    sm = SmoothingFunction().method1
    hyps = [["He", "fell", "down"], ["She", "ran", "off"]]
    assert m["bleu4"] == pytest.approx(np.mean([sentence_bleu([ref], h, smoothing_function=sm)
                                                for h in hyps]))
    assert m["gleu"] == pytest.approx(np.mean([sentence_gleu([ref], h) for h in hyps]))
    assert m["bleu4"] > 0 and m["num_stories"] == 1.0
    with pytest.raises(ValueError, match="not one of the task's prompts"):
        t.evaluate([{"prompt": "?", "tokens": [1], "text": "x", "log_q": 0.0}])


@pytest.mark.parametrize("objective", ["subtb", "sft"])
def test_trainer_steps_random_model_no_lora(tmp_path, objective):
    from gfn_jax.train import Trainer

    c = runpy.run_path(os.path.join(ROOT, "configs", "infill_stories.py"))["get_config"]()
    c.model.spec = "random"
    c.model.random.max_seq_len = 160
    c.lora.enabled = False
    c.task.data_path = stories_file(tmp_path)
    c.task.num_eval = 1
    c.task.min_len = 1
    c.task.max_len = 14
    c.task.diversity_encoder = ""
    c.objective.name = objective
    if objective == "sft":
        c.explore.p_replay = 0.0
        c.replay.seed_from_data = False
    c.train.steps = 2
    c.train.grad_accum = 1
    c.train.prompts_per_batch = 2
    c.train.samples_per_prompt = 2
    c.train.ckpt_every = 0
    c.eval.num_samples = 0
    c.mesh.data = 1
    tr = Trainer(c, str(tmp_path / "run"), restore=False, devices=jax.devices()[:1])
    if objective == "subtb":  # replay seeded (lazily) with the true middles
        assert len(tr.replay) == 0
        tr.rollouts.replay_batch([0, 1], 2, temperature=None)
        middles = {tr.tokenizer.decode(list(e.tokens)) for r in ("0", "1")
                   for e in tr.replay.entries(r)}
        assert middles == {tr.tokenizer.decode(list(t.tokens)) for t in tr.task.targets()
                           if t.prompt_index in (0, 1)}
    summary = tr.run(progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_metrics"]["loss"])


def test_story_reward_model_recipe_trains_exports_and_serves(tmp_path):
    """configs/sft_stories.py (SFT of p(middle ending | beginning)) trains, `gfn-jax convert`
    exports it, and the infilling run given it as reward.model scores with those weights
    (not the policy's base) and trains."""
    from gfn_jax import cli
    from gfn_jax.models import registry
    from gfn_jax.models.transformer import init_params
    from gfn_jax.train import Trainer

    data = stories_file(tmp_path)
    shared = ["--config.model.spec=random", "--config.model.random.max_seq_len=160",
              f"--config.task.data_path={data}", "--config.task.num_eval=1",
              "--config.task.diversity_encoder="]
    sft = str(tmp_path / "sft")
    assert cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs",
                                                                   "sft_stories.py"),
                     "--workdir", sft, "--noprogress", "--config.train.steps=2",
                     "--config.train.prompts_per_batch=2", "--config.optim.lr=1e-2",
                     "--config.optim.warmup_steps=0", "--config.mesh.data=2",
                     "--config.mesh.tensor=4"] + shared) == 0
    out = str(tmp_path / "story-reward")
    assert cli.main(["gfn-jax", "convert", "--workdir", sft, "--out", out]) == 0
    rm = registry.load(out, dtype="float32")

    c = runpy.run_path(os.path.join(ROOT, "configs", "infill_stories.py"))["get_config"]()
    c.model.spec = "random"
    c.model.random.max_seq_len = 160
    c.lora.enabled = False
    c.task.data_path = data
    c.task.num_eval = 1
    c.task.min_len, c.task.max_len = 1, 14
    c.task.diversity_encoder = ""
    c.reward.model = out
    c.train.steps, c.train.grad_accum, c.train.ckpt_every = 1, 1, 0
    c.train.prompts_per_batch, c.train.samples_per_prompt = 2, 2
    c.eval.num_samples = 0
    c.mesh.data = 1
    tr = Trainer(c, str(tmp_path / "infill"), restore=False, devices=jax.devices()[:1])
    base = init_params(tr.model_cfg, jax.random.PRNGKey(c.model.init_seed), std=c.model.init_std)
    served = jax.tree_util.tree_leaves(jax.device_get(tr.frozen["reward"]))
    exported = jax.tree_util.tree_leaves(rm.params)
    assert len(served) == len(exported)
    for a, b in zip(served, exported):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(exported, jax.tree_util.tree_leaves(base)))
    assert moved > 1e-3  # the SFT steps changed the weights the reward uses
    summary = tr.run(progress=False)
    assert summary["steps"] == 1 and np.isfinite(summary["final_metrics"]["loss"])
