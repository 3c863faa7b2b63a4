"""Infilling from a streamed data source (``data.source``): every record brings its own
prompt, reward context and suffix Y.

Checked against independent references: the streamed rows are the task's templates filled
from each record (on two hosts simulated in threads, and on two real ``jax.distributed``
processes on localhost through JAX's all-gather, which build the same global rows); the
reward the step computes for a streamed batch equals a direct per-prefix computation with
that record's Y and reward context (not the task's own table); a few train steps run; bad
records and templates are one-line errors naming the file and line or the config key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gfn_jax.data import DataError
from gfn_jax.defaults import default_config, with_task
from gfn_jax.models.registry import tiny_tokenizer
from gfn_jax.prompt_stream import PromptStream
from gfn_jax.tasks.stories import StoriesTask
from multiproc import ThreadGather, run_in_threads, run_workers
from test_stories import STORIES, naive_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# streamed stories: none of them is in the task's own file (STORIES)
STREAM = [{"first": f"Ed {w}.", "last": f"Ed {v}.", "other": i}
          for i, (w, v) in enumerate([("ran", "slept"), ("ate", "smiled"), ("hid", "left"),
                                      ("sang", "bowed"), ("fell", "cried"), ("won", "cheered")])]
TEMPLATES = dict(prompt_template="Start: {first}\nEnd: {last}\nMiddle:",
                 reward_template="{first}", suffix_template=" {last}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def own_file(tmp_path):
    # the task's own file (its evaluation stories), with the stream's column names
    rows = [{"beginning": s["beginning"], "middle": s["middle"], "ending": s["ending"],
             "first": s["beginning"], "last": s["ending"]} for s in STORIES]
    return write_jsonl(tmp_path / "own.jsonl", rows)


def stories_task(tmp_path, **over):
    own = over.pop("data_path", None) or own_file(tmp_path)  # (workers: written by the test)
    cfg = dict(data_path=own, num_eval=1, min_len=1, max_len=12, eval_batch_size=4,
               max_suffix_len=16, **TEMPLATES)
    cfg.update(over)
    t = StoriesTask(ml_collections.ConfigDict(cfg))
    tok = tiny_tokenizer()
    t.setup(types.SimpleNamespace(max_seq_len=512, vocab_size=tok.vocab_size), tok)
    return t


def stream_config(source, P=2, **data):
    c = default_config()
    with_task(c, "infill_stories")
    c.train.prompts_per_batch = P
    c.explore.p_replay = 0.0
    c.replay.seed_from_data = False
    c.data.source = source
    c.data.x_field, c.data.y_field = "first", "last"
    c.data.max_prompt_len = 48
    c.data.shuffle = False
    c.data.update(data)
    return c


def test_streamed_rows_are_the_templates_filled_from_each_record_on_two_hosts(tmp_path):
    src = write_jsonl(tmp_path / "stream.jsonl", STREAM)
    task = stories_task(tmp_path)
    tok = task.tokenizer
    config = stream_config(src, P=2)
    g = ThreadGather(2)

    def host(h):
        ps = PromptStream.open(config, task, process_index=h, process_count=2,
                               gather=g.for_host(h))
        return [ps.next_rows() for _ in range(3)]

    out = run_in_threads(host, g)
    assert out[0] == out[1]  # both hosts hold the same global rows
    seen = check_rows([dataclasses.asdict(r) for r in out[0]], tok)
    assert sorted(seen) == list(range(len(STREAM)))  # the two shards cover the file once


def check_rows(rows_per_step, tok):
    """Every step's rows are the templates filled from their records; returns the records."""
    seen = []
    for rows in rows_per_step:
        seen += rows["records"]
        for k, i in enumerate(rows["records"]):
            r = STREAM[i]
            assert rows["prompts"][k] == tok.encode(f"Start: {r['first']}\nEnd: {r['last']}\n"
                                                    f"Middle:")
            assert rows["reward_prompts"][k] == tok.encode(r["first"])
            assert rows["suffixes"][k] == tok.encode(" " + r["last"], add_bos=False)
    return seen


def _worker(out_path: str, own: str, src: str) -> None:
    """One of two processes: the stream over ``src`` with JAX's own all-gather."""
    import pathlib

    from gfn_jax import parallel as par

    assert par.initialize_distributed() is True and jax.process_count() == 2
    task = stories_task(pathlib.Path(os.path.dirname(own)), data_path=own)
    ps = PromptStream.open(stream_config(src, P=2), task)
    steps = [dataclasses.asdict(ps.next_rows()) for _ in range(3)]
    with open(out_path.format(pid=jax.process_index()), "w") as f:
        json.dump({"steps": steps, "state": ps.state()}, f)
    jax.distributed.shutdown()


def test_two_real_processes_gather_the_same_rows(tmp_path):
    src = write_jsonl(tmp_path / "stream.jsonl", STREAM)
    own = own_file(tmp_path)
    out = str(tmp_path / "rows{pid}.json")
    run_workers([os.path.abspath(__file__), "--worker", out, own, src],
                str(tmp_path / "worker"), 2, 1, 120.0)
    got = [json.load(open(out.format(pid=p))) for p in range(2)]
    assert got[0] == got[1]  # same global rows and the same saved state on both processes
    seen = check_rows(got[0]["steps"], tiny_tokenizer())
    assert sorted(seen) == list(range(len(STREAM)))
    # host-major: process h's records are position h of every step, its own shard
    own_records = [[s["records"][h] for s in got[0]["steps"]] for h in range(2)]
    assert not set(own_records[0]) & set(own_records[1])
    assert [h["position"] for h in got[0]["state"]["hosts"]] == [3, 3]


def test_streamed_batch_reward_equals_direct_computation_and_trains(tmp_path):
    """The step's reward for a streamed batch reads each row's own Y and reward context."""
    from gfn_jax.train import Trainer

    c = runpy.run_path(os.path.join(ROOT, "configs", "infill_stories.py"))["get_config"]()
    c.model.spec = "random"
    c.model.random.max_seq_len = 160
    c.lora.enabled = False
    c.task.update(dict(data_path=own_file(tmp_path), num_eval=1, min_len=1, max_len=6,
                       max_suffix_len=16, diversity_encoder="", penalise_special_tokens=False,
                       **TEMPLATES))
    c.train.update(dict(steps=2, grad_accum=1, prompts_per_batch=2, samples_per_prompt=2,
                        ckpt_every=0))
    c.explore.update(dict(p_replay=0.0, p_on_policy=1.0, p_tempered=0.0, p_epsilon=0.0))
    c.replay.seed_from_data = False
    c.eval.num_samples = 0
    c.mesh.data = 1
    c.data.update(dict(source=write_jsonl(tmp_path / "stream.jsonl", STREAM), x_field="first",
                       y_field="last", max_prompt_len=48, shuffle=False))
    tr = Trainer(c, str(tmp_path / "run"), restore=False, devices=jax.devices()[:1])
    tr.take_stream_prompts()
    batch, kind = tr.rollouts.make_batch(0, tr.policy, None)
    assert kind == "on_policy" and batch.group_size == 2
    params = tr.frozen["base"]
    got = np.asarray(tr.task.log_reward(tr.model_cfg, params, batch.map(jnp.asarray)))
    model = types.SimpleNamespace(config=tr.model_cfg, params=params)
    tok = tr.tokenizer
    for b in range(batch.size):
        r = STREAM[b // 2]  # no shuffle: records 0 and 1, two samples each
        n = int(batch.lengths[b])
        z = [int(t) for t in batch.tokens[b, :n]]
        want = naive_reward(model, tok.encode(r["first"]), z,
                            tok.encode(" " + r["last"], add_bos=False))
        np.testing.assert_allclose(got[b, :n + 1], want, atol=2e-4, rtol=1e-6)
    summary = tr.run(progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_metrics"]["loss"])
    assert summary["final_metrics"]["data_position"] == 6.0  # 3 takes of 2 records


def test_bad_streamed_records_and_templates_are_clear_errors(tmp_path):
    task = stories_task(tmp_path, max_suffix_len=16)
    long_y = STREAM[:1] + [{"first": "Ok.", "last": "x" * 30}] + STREAM[1:]
    src = write_jsonl(tmp_path / "s.jsonl", long_y)
    ps = PromptStream.open(stream_config(src, max_prompt_len=96), task)
    with pytest.raises(DataError, match=r"s\.jsonl:2: the suffix Y has 31 tokens, more than "
                                        r"the suffix width .*=16 \(raise task\.max_suffix_len"):
        ps.next_rows()
    ps = PromptStream.open(stream_config(src, on_bad="skip", max_prompt_len=96), task)
    assert ps.next_rows().records == [0, 2] and ps.metrics()["data_skipped"] == 1.0
    # a template naming a column the stream does not read
    with pytest.raises(ValueError, match=r"task\.prompt_template .* needs field\(s\) "
                                         r"\['first'\].*data\.x_field"):
        PromptStream.open(stream_config(src, x_field="other"), task)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:])
    else:
        sys.exit("usage: python tests/test_stream_infill.py --worker OUT OWN.jsonl STREAM.jsonl")
