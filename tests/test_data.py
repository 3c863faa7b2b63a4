"""gfn_jax.data: text / JSON-lines / TFDS sources and the deterministic sharded stream.

The TFDS tests build a tiny dataset (array_record, nothing downloaded) in a temporary data_dir
and read it back through ``open_source("tfds:...")``, the path a user takes. They need the
``data`` extra (tensorflow-datasets); CI installs it, so there a missing tfds is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gfn_jax.data import DataError, ShardedStream, Source, open_source, parse_tfds_spec
from tiny import temporary_files_in

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - depends on the environment
    tfds = None
    _TFDS_ERROR = str(e)

N_TRAIN = 10


def _need_tfds():
    if tfds is None:
        if os.environ.get("CI"):
            pytest.fail("tensorflow-datasets is not importable in CI (.ci/run must install "
                        f"the data extra): {_TFDS_ERROR}")
        pytest.skip('tensorflow-datasets not installed (pip install "gfn-jax[data]"); '
                    f"import failed: {_TFDS_ERROR}")


if tfds is not None:

    class GfnjaxTinyPrompts(tfds.core.GeneratorBasedBuilder):
        """10 train rows (X: 'prompt i', Y: 'yes' for odd i, '' for even i) and 3 test rows."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "text": tfds.features.Text(), "label": tfds.features.Text(),
                    "idx": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(N_TRAIN),
                    "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"prompt {i}", "label": "yes" if i % 2 else "", "idx": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    _need_tfds()
    data_dir = tmp_path_factory.mktemp("tfds")
    with temporary_files_in(tmp_path_factory.mktemp("tfds-scratch")):
        builder = GfnjaxTinyPrompts(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare()
    files = os.listdir(data_dir / "gfnjax_tiny_prompts" / "1.0.0")
    assert any(".array_record" in f for f in files), files
    return str(data_dir)


# ---------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------
def test_tfds_source_reads_all_rows(tfds_dir):
    src = open_source("tfds:gfnjax_tiny_prompts:train", fields=("text", "idx"), data_root=tfds_dir)
    assert src.backend == "data_source" and len(src) == N_TRAIN
    recs = list(src)
    assert sorted(r["idx"] for r in recs) == list(range(N_TRAIN))
    for r in recs:  # bytes decoded to str, numpy scalars to Python
        assert r["text"] == f"prompt {r['idx']}" and type(r["idx"]) is int
    # renaming, an explicit version and a split slice
    src = open_source("tfds:gfnjax_tiny_prompts:1.0.0:test", fields={"X": "text"},
                      data_root=tfds_dir)
    assert sorted(r["X"] for r in src) == ["prompt 0", "prompt 1", "prompt 2"]
    half = open_source("tfds:gfnjax_tiny_prompts:train[:50%]", fields={"X": "text"},
                       data_root=tfds_dir)
    assert len(half) == N_TRAIN // 2


def test_tfds_without_builder_class_in_a_fresh_process(tfds_dir):
    # a user's process has no builder class registered: data_source reads the prepared files
    code = ("import json,sys; from gfn_jax.data import open_source; "
            "s=open_source('tfds:gfnjax_tiny_prompts:train', fields={'X':'text'}, data_root=sys.argv[1]); "
            "print(json.dumps(sorted(r['X'] for r in s))); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, tfds_dir], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == sorted(f"prompt {i}" for i in range(N_TRAIN))
    assert lines[-1] == "False"  # TensorFlow was not imported


def test_tfds_sharded_stream_partitions_and_resumes(tfds_dir):
    def stream(pid, **kw):
        src = open_source("tfds:gfnjax_tiny_prompts:train", fields={"X": "text", "i": "idx"},
                          data_root=tfds_dir)
        return ShardedStream(src, seed=3, process_index=pid, process_count=2, **kw)

    h0 = [r["i"] for r in stream(0).take(5)]
    h1 = [r["i"] for r in stream(1).take(5)]
    assert not set(h0) & set(h1) and sorted(h0 + h1) == list(range(N_TRAIN))
    s = stream(0)
    first = s.take(3)
    saved = json.loads(json.dumps(s.state()))
    rest = s.take(8)
    assert stream(0).restore(saved).take(8) == rest
    assert stream(0).take(3) == first


def test_tfds_bad_record_error_and_skip(tfds_dir):
    src = open_source("tfds:gfnjax_tiny_prompts:train", fields={"X": "text", "Y": "label"},
                      data_root=tfds_dir)
    with pytest.raises(DataError, match=r"tfds:gfnjax_tiny_prompts:train record \d+: field 'label' is empty"):
        list(src)
    with pytest.raises(DataError, match="missing field 'nope'"):
        open_source("tfds:gfnjax_tiny_prompts:train", fields=("nope",), data_root=tfds_dir)[0]
    src = open_source("tfds:gfnjax_tiny_prompts:train", fields={"X": "text", "Y": "label"},
                      data_root=tfds_dir, on_bad="skip")
    s = ShardedStream(src, seed=0, num_epochs=2)
    got = list(s)
    assert len(got) == 2 * (N_TRAIN // 2) and s.skipped == 2 * (N_TRAIN // 2)
    assert all(r["Y"] == "yes" for r in got)
    assert sorted({r["X"] for r in got}) == sorted(f"prompt {i}" for i in range(1, N_TRAIN, 2))
    assert s.state()["skipped"] == s.skipped


def test_tfds_missing_dataset_is_a_clear_error(tfds_dir):
    with pytest.raises(DataError, match="cannot open 'tfds:no_such_dataset_xyz:train'"):
        open_source("tfds:no_such_dataset_xyz:train", data_root=tfds_dir)


def test_tfds_spec_parsing():
    assert parse_tfds_spec("tfds:glue/sst2:train") == {"name": "glue/sst2", "version": None,
                                                        "split": "train"}
    assert parse_tfds_spec("tfds:my_ds:1.2.0:train[:90%]") == {
        "name": "my_ds", "version": "1.2.0", "split": "train[:90%]"}
    for bad in ("tfds:", "tfds:name", "tfds::train", "tfds:a b:train"):
        with pytest.raises(DataError, match="bad TFDS spec"):
            parse_tfds_spec(bad)


# ---------------------------------------------------------------------------
# the stream (in-memory records from a .txt file)
# ---------------------------------------------------------------------------
def _txt(tmp_path, n, name="p.txt"):
    path = tmp_path / name
    path.write_text("".join(f"row {i}\n" for i in range(n)))
    return path


def test_sharding_partitions_rows_exactly(tmp_path):
    src = open_source(str(_txt(tmp_path, 12)))
    shards = [ShardedStream(src, seed=1, process_index=h, process_count=2, num_epochs=1)
              for h in range(2)]
    rows = [[r["X"] for r in s] for s in shards]
    assert len(rows[0]) == len(rows[1]) == 6 and len(shards[0]) == 6
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(f"row {i}" for i in range(12))

    # 11 rows: even=False partitions exactly (6 + 5); even=True gives 5 each, in lock-step
    src = open_source(str(_txt(tmp_path, 11, "q.txt")))
    uneven = [list(ShardedStream(src, seed=1, process_index=h, process_count=2, even=False,
                                 num_epochs=1)) for h in range(2)]
    assert [len(u) for u in uneven] == [6, 5]
    assert sorted(r["X"] for u in uneven for r in u) == sorted(f"row {i}" for i in range(11))
    dropped = []
    for epoch in range(6):
        got = [ShardedStream(src, seed=1, process_index=h, process_count=2)
               .epoch_indices(epoch) for h in range(2)]
        assert len(got[0]) == len(got[1]) == 5 and not set(got[0]) & set(got[1])
        dropped.append(set(range(11)) - set(got[0]) - set(got[1]))
    assert all(len(d) == 1 for d in dropped) and len(set.union(*dropped)) > 1


def test_shuffle_differs_per_epoch_and_is_reproducible(tmp_path):
    src = open_source(str(_txt(tmp_path, 20)))
    a = [r["X"] for r in ShardedStream(src, seed=7, num_epochs=3)]
    b = [r["X"] for r in ShardedStream(src, seed=7, num_epochs=3)]
    c = [r["X"] for r in ShardedStream(src, seed=8, num_epochs=3)]
    assert a == b and a != c
    epochs = [a[i * 20:(i + 1) * 20] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch: every row once
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [f"row {i}" for i in range(20)]
    plain = [r["X"] for r in ShardedStream(src, shuffle=False, num_epochs=1)]
    assert plain == [f"row {i}" for i in range(20)]


def test_state_restore_continues_the_same_stream(tmp_path):
    src = open_source(str(_txt(tmp_path, 9)))
    s = ShardedStream(src, seed=5, process_index=1, process_count=2, with_index=True)
    s.take(7)  # 4 per epoch on this host: into the second epoch
    state = json.loads(json.dumps(s.state()))
    assert state["epoch"] == 1 and state["position"] == 3
    rest = s.take(10)
    fresh = ShardedStream(open_source(str(_txt(tmp_path, 9))), seed=5, process_index=1,
                          process_count=2, with_index=True)
    assert fresh.restore(state).take(10) == rest
    assert all(isinstance(i, int) and r["X"] == f"row {i}" for i, r in rest)
    # restoring into a different set-up is refused
    with pytest.raises(DataError, match="seed: saved 5, now 6"):
        ShardedStream(src, seed=6, process_index=1, process_count=2).restore(state)
    with pytest.raises(DataError, match="num_records"):
        ShardedStream(open_source(str(_txt(tmp_path, 10, "r.txt"))), seed=5, process_index=1,
                      process_count=2).restore(state)


class _AllBad(Source):
    name = "all-bad"
    skip_bad = True

    def __len__(self):
        return 3

    def __getitem__(self, i):
        raise DataError(f"all-bad[{i}]: field 'X' is empty")


def test_a_shard_of_only_bad_records_is_an_error_not_an_endless_loop():
    with pytest.raises(DataError, match="every record of host 0's shard is bad"):
        next(ShardedStream(_AllBad()))


def test_num_epochs_stops(tmp_path):
    s = ShardedStream(open_source(str(_txt(tmp_path, 4))), num_epochs=2)
    assert len(list(s)) == 8 and s.state()["epoch"] == 2
    with pytest.raises(StopIteration):
        next(s)


# ---------------------------------------------------------------------------
# files: bad rows, paths
# ---------------------------------------------------------------------------
def test_txt_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first\nsecond\n\nfourth\n\xff\xfe bad bytes\nsixth\r\n   \n")
    with pytest.raises(DataError, match=rf"{path}:3: empty line"):
        open_source(str(path))
    src = open_source(str(path), on_bad="skip")
    assert [r["X"] for r in src] == ["first", "second", "fourth", "sixth"]
    assert src.num_bad == 3 and [src.location(i) for i in range(4)] == [
        f"{path}:{n}" for n in (1, 2, 4, 6)]
    assert src.bad[1].startswith(f"{path}:5: not valid UTF-8")
    assert src.bad[2] == f"{path}:7: empty line"

    only_bytes = tmp_path / "latin1.txt"
    only_bytes.write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{only_bytes}:2: not valid UTF-8"):
        open_source(str(only_bytes))
    with pytest.raises(DataError, match="one field per line"):
        open_source(str(path), fields=("X", "Y"))


def test_jsonl_fields_and_bad_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"X": "a", "Y": "obj", "extra": 1}, {"X": "b"}, {"X": None, "Y": "s"},
            {"X": "", "Y": "s"}, "not json", [1, 2], {"X": "c", "Y": "subj"}]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    cases = [(("X", "Y"), r":2: missing field 'Y' \(fields present: X\)")]
    for fields, pat in cases:
        with pytest.raises(DataError, match=rf"{path}{pat}"):
            open_source(str(path), fields=fields)
    src = open_source(str(path), fields=("X", "Y"), on_bad="skip")
    assert list(src) == [{"X": "a", "Y": "obj"}, {"X": "c", "Y": "subj"}]
    assert src.num_bad == 5
    reasons = [b.split(": ", 1)[1] for b in src.bad]
    assert reasons[0].startswith("missing field 'Y'")
    assert reasons[1] == "field 'X' is null" and reasons[2] == "field 'X' is empty"
    assert reasons[3].startswith("invalid JSON") and reasons[4] == "expected a JSON object, got list"
    assert [b.split(": ", 1)[0] for b in src.bad] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    renamed = open_source(str(path), fields={"prompt": "X"}, on_bad="skip")
    assert [r["prompt"] for r in renamed] == ["a", "b", "c"]


def test_relative_paths_resolve_against_cwd_or_data_root(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    _txt(tmp_path / "d", 3, "rel.txt")
    monkeypatch.chdir(tmp_path)
    assert len(open_source("d/rel.txt")) == 3
    assert open_source("d/rel.txt").name == str(tmp_path / "d" / "rel.txt")
    assert len(open_source("rel.txt", data_root=str(tmp_path / "d"))) == 3
    assert len(open_source("txt:d/rel.txt")) == 3
    monkeypatch.chdir(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "d" / "d" / "rel.txt")):
        open_source("d/rel.txt")
    with pytest.raises(DataError, match="cannot tell the format"):
        open_source("rel.csv")


def test_tfds_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "gfn-jax\[data\]"'):
        open_source("tfds:anything:train")
