"""Training from a streamed data source (``data.source``) through ``gfn-jax train``.

A tiny TFDS dataset (array_record, nothing downloaded) is built in a temporary data_dir and
the continuation task trains a few steps of a tiny random model from it through the CLI, the
path a user takes. Checked: the prompts of every step are exactly the seeded shuffle of the
host's shard, in order across an epoch boundary; a run preempted and resumed consumes the same
sequence as an uninterrupted one (the position is in the checkpoint); two hosts (simulated in
threads with an all-gather) read disjoint shards covering the data and build the same global
prompt list; a JSON-lines file goes through the same interface; bad configs are one-line errors.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from gfn_jax import cli
from gfn_jax import train as train_mod
from gfn_jax.checkpoint import Checkpointer, PreemptionHandler
from gfn_jax.data import DataError, ShardedStream, open_source
from gfn_jax.defaults import default_config, with_task
from gfn_jax.metrics import read_metrics
from gfn_jax.models.registry import tiny_tokenizer
from gfn_jax.prompt_stream import PromptStream
from gfn_jax.tasks import make_task
from multiproc import ThreadGather, run_in_threads
from tiny import temporary_files_in

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - depends on the environment
    tfds = None
    _TFDS_ERROR = str(e)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONT = os.path.join(ROOT, "configs", "continuation.py")
N = 10  # records in the TFDS train split
P = 2  # prompts per step
SPEC = "tfds:gfnjax_stream_prompts:train"


def _need_tfds():
    if tfds is None:
        if os.environ.get("CI"):
            pytest.fail(f"tensorflow-datasets is not importable in CI: {_TFDS_ERROR}")
        pytest.skip(f'tensorflow-datasets not installed (pip install "gfn-jax[data]"): '
                    f"{_TFDS_ERROR}")


if tfds is not None:

    class GfnjaxStreamPrompts(tfds.core.GeneratorBasedBuilder):
        """N train rows: text 'prompt i', idx i."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "idx": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(N):
                yield i, {"text": f"prompt {i}", "idx": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    _need_tfds()
    d = tmp_path_factory.mktemp("tfds")
    with temporary_files_in(tmp_path_factory.mktemp("tfds-scratch")):
        GfnjaxStreamPrompts(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module (the runs share their programs)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture
def own_prompts(tmp_path):
    """The task's own prompt file (its evaluation prompts; training ignores it)."""
    p = tmp_path / "own.txt"
    p.write_text("own prompt a \nown prompt b \n")
    return str(p)


@pytest.fixture
def consumed(monkeypatch):
    """Every step's (record indices, prompt token ids), as the trainer took them."""
    seen = []
    orig = PromptStream.next_rows

    def spy(self):
        rows = orig(self)
        seen.append((list(self.last_records), rows.prompts))
        return rows

    monkeypatch.setattr(PromptStream, "next_rows", spy)
    return seen


def train(capsys, workdir, own, source, *extra, steps=4):
    """``gfn-jax train`` in-process on configs/continuation.py with a tiny model."""
    capsys.readouterr()
    rc = cli.main(["gfn-jax", "train", "--config", CONT, "--workdir", str(workdir),
                   "--noprogress", "--config.model.spec=tiny-llama", "--config.lora.rank=2",
                   f"--config.task.data_path={own}", "--config.task.max_len=3",
                   "--config.task.diversity_encoder=", f"--config.train.steps={steps}",
                   f"--config.train.prompts_per_batch={P}",
                   "--config.train.samples_per_prompt=4", "--config.train.grad_accum=1",
                   "--config.train.ckpt_every=0", "--config.explore.p_replay=0",
                   "--config.eval.num_samples=0", "--config.optim.schedule=constant",
                   f"--config.data.source={source}", "--config.data.max_prompt_len=16",
                   *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def expected(source, steps, seed=0):
    """Record indices of every step: the seeded per-epoch shuffle, read in order."""
    s = ShardedStream(source, seed=seed, with_index=True)
    idx = [i for i, _ in s.take(steps * P)]
    return [idx[k:k + P] for k in range(0, len(idx), P)]


def check_prompts(consumed, source):
    tok = tiny_tokenizer()
    for records, ids in consumed:
        assert ids == [tok.encode(source[i]["X"]) for i in records]


def tfds_args(tfds_dir):
    return ("--config.data.x_field=text", f"--config.data.tfds_dir={tfds_dir}")


# ---------------------------------------------------------------------------
# TFDS through the CLI: order, epoch boundary, preemption and resume
# ---------------------------------------------------------------------------
def test_tfds_stream_order_and_resume_match_an_uninterrupted_run(
        tmp_path, capsys, monkeypatch, tfds_dir, own_prompts, consumed):
    src = open_source(SPEC, fields={"X": "text"}, data_root=tfds_dir)
    steps = 7  # 14 records of 10: crosses into the second (reshuffled) epoch
    want = expected(src, steps)
    rc, _, err = train(capsys, tmp_path / "a", own_prompts, SPEC, *tfds_args(tfds_dir),
                       steps=steps)
    assert rc == 0, err
    assert [r for r, _ in consumed] == want
    assert sorted(sum(want[:5], [])) == list(range(N))  # epoch 0 is a permutation
    check_prompts(consumed, src)
    last = read_metrics(str(tmp_path / "a"))[-1]
    assert (last["data_epoch"], last["data_position"]) == (1.0, 4.0)

    # the same run, preempted after 3 steps and resumed by the same command
    class StopAt3(PreemptionHandler):
        def should_stop(self, step):
            return step >= 3

    consumed.clear()
    monkeypatch.setattr(train_mod, "PreemptionHandler", StopAt3)
    rc, _, err = train(capsys, tmp_path / "b", own_prompts, SPEC, *tfds_args(tfds_dir),
                       steps=steps)
    assert rc == cli.EXIT_PREEMPTED, err
    assert [r for r, _ in consumed] == want[:3]
    _, meta = Checkpointer(str(tmp_path / "b" / "checkpoints")).restore_subset(keys=["step"])
    saved = meta["data_stream"]
    assert saved["source"] == SPEC and saved["num_records"] == N
    assert saved["hosts"] == [{"epoch": 0, "position": 6, "skipped": 0, "skipped_prompts": 0}]

    monkeypatch.setattr(train_mod, "PreemptionHandler", PreemptionHandler)
    rc, out, err = train(capsys, tmp_path / "b", own_prompts, SPEC, *tfds_args(tfds_dir),
                         steps=steps)
    assert rc == 0, err
    assert "resuming from step 3" in out
    assert [r for r, _ in consumed] == want  # = the uninterrupted run's sequence


def test_jsonl_file_goes_through_the_same_interface(tmp_path, capsys, own_prompts, consumed):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"line {i}", "other": i}) + "\n"
                            for i in range(5)))
    rc, _, err = train(capsys, tmp_path / "run", own_prompts, str(path),
                       "--config.data.x_field=sentence", "--config.seed=3", steps=3)
    assert rc == 0, err
    src = open_source(str(path), fields={"X": "sentence"})
    assert [r for r, _ in consumed] == expected(src, 3, seed=3)
    check_prompts(consumed, src)


# ---------------------------------------------------------------------------
# Two hosts (threads with an all-gather)
# ---------------------------------------------------------------------------
def stream_config(source, **data):
    c = default_config()
    with_task(c, "continuation")
    c.train.prompts_per_batch = P
    c.data.source = source
    c.data.max_prompt_len = 16
    c.data.update(data)
    return c


def continuation_task(own):
    task = make_task(ml_collections.ConfigDict({"name": "continuation", "data_path": own}))
    task.tokenizer = tiny_tokenizer()
    return task


def run_hosts(config, task, steps, states=None):
    """``steps`` of every host's prompts in threads; returns per host (prompt lists,
    record lists of its own share, final state)."""
    g = ThreadGather(2)

    def host(h):
        ps = PromptStream.open(config, task, process_index=h, process_count=2,
                               gather=g.for_host(h))
        if states is not None:
            assert ps.restore(states[h]) is None
        prompts, mine = [], []
        for _ in range(steps):
            prompts.append(ps.next_prompts())
            mine.append(ps.last_records[h])  # host-major: one prompt per host per step
            assert len(ps.last_records) == P
        return prompts, mine, ps.state()

    return run_in_threads(host, g)


def test_two_hosts_read_disjoint_shards_and_build_the_same_prompts(tfds_dir, own_prompts):
    config = stream_config(SPEC, x_field="text", tfds_dir=tfds_dir)
    task = continuation_task(own_prompts)
    (p0, mine0, s0), (p1, mine1, s1) = run_hosts(config, task, N // 2)
    assert p0 == p1 and s0 == s1  # every host holds the same global batch and state
    assert not set(mine0) & set(mine1) and sorted(mine0 + mine1) == list(range(N))
    src = open_source(SPEC, fields={"X": "text"}, data_root=tfds_dir)
    for h, mine in enumerate((mine0, mine1)):
        shard = ShardedStream(src, seed=0, process_index=h, process_count=2)
        assert mine == shard.epoch_indices(0).tolist()
    # resumed from the gathered state, the hosts continue exactly where they were
    (q0, _, _), _ = run_hosts(config, task, 3, states=[s0, s0])
    (full, _, _), _ = run_hosts(config, task, N // 2 + 3)
    assert p0 + q0 == full


def test_restore_refuses_another_host_count_and_restarts_on_another_source(
        tmp_path, own_prompts):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"text line {i}\n" for i in range(6)))
    task = continuation_task(own_prompts)
    ps = PromptStream.open(stream_config(str(path)), task)
    ps.next_prompts()
    state = json.loads(json.dumps(ps.state()))
    assert state["hosts"][0]["position"] == P
    again = PromptStream.open(stream_config(str(path)), task)
    assert again.restore(state) is None and again.stream.position == P
    two = dict(state, hosts=state["hosts"] * 2)
    with pytest.raises(DataError, match=r"read by 2 process\(es\), this run has 1"):
        again.restore(two)
    other = tmp_path / "q.txt"
    other.write_text(path.read_text())
    fresh = PromptStream.open(stream_config(str(other)), task)
    assert "source changed" in fresh.restore(state) and fresh.stream.position == 0


def test_a_too_long_prompt_names_its_record_or_is_skipped(tmp_path, own_prompts):
    path = tmp_path / "p.txt"
    path.write_text("short\n" + "x" * 40 + "\nalso short\nfine\n")
    task = continuation_task(own_prompts)
    ps = PromptStream.open(stream_config(str(path), shuffle=False), task)
    with pytest.raises(DataError, match=r"p\.txt:2: the prompt has 40 tokens, more than "
                                        r"data\.max_prompt_len=16"):
        ps.next_prompts()
    ps = PromptStream.open(stream_config(str(path), shuffle=False, on_bad="skip"), task)
    ps.next_prompts()
    assert ps.last_records == [0, 2] and ps.metrics()["data_skipped"] == 1.0


# ---------------------------------------------------------------------------
# Config errors: one line naming the key and what to do
# ---------------------------------------------------------------------------
def one_line_error(rc, err, *needles):
    assert rc == cli.EXIT_ERROR and "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[1].startswith("(run with --debug"), err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.mark.parametrize("source, extra, needles", [
    ("tfds:", (), ("data.source='tfds:'", "tfds:NAME[/CONFIG][:VERSION]:SPLIT")),
    ("tfds:glue/sst2", (), ("data.source='tfds:glue/sst2'", "expected tfds:NAME")),
    ("hf:org/name", (), ("unknown kind 'hf:'", "tfds:NAME[/CONFIG]:SPLIT")),
    ("prompts.csv", (), ("data.source='prompts.csv'", "cannot tell its format")),
    ("p.jsonl", ("--config.data.max_prompt_len=0",), ("data.max_prompt_len",)),
    ("p.jsonl", ("--config.explore.p_replay=0.25",), ("explore.p_replay=0",)),
    ("p.jsonl", ("--config.data.y_field=label",), ("data.y_field is set", "continuation")),
    ("p.jsonl", ("--config.data.on_bad=drop",), ("data.on_bad",)),
    ("missing.jsonl", (), ("data.source='missing.jsonl'", "not found")),
])
def test_bad_data_config_is_a_one_line_error(tmp_path, capsys, own_prompts, monkeypatch,
                                             source, extra, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"X": "a"}\n')
    rc, _, err = train(capsys, tmp_path / "run", own_prompts, source, *extra)
    one_line_error(rc, err, *needles)


def test_missing_tfds_and_a_task_without_streaming_are_one_line_errors(
        tmp_path, capsys, own_prompts, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not installed
    rc, _, err = train(capsys, tmp_path / "run", own_prompts, SPEC)
    one_line_error(rc, err, "data.source='tfds:gfnjax_stream_prompts:train'",
                   'pip install "gfn-jax[data]"')
    capsys.readouterr()
    rc = cli.main(["gfn-jax", "train", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                   "--workdir", str(tmp_path / "toy"), "--config.data.source=p.txt",
                   "--config.data.max_prompt_len=8"])
    one_line_error(rc, capsys.readouterr().err, "task 'toy_exact'", "unset data.source")
