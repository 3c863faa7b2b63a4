"""Checkpointer (Orbax) round trips, retention, failure modes, preemption and sharding."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import flax
import numpy as np
import optax
import pytest

from gfn_jax.checkpoint import (
    MANIFEST_NAME,
    Checkpointer,
    CheckpointDiskFullError,
    CheckpointError,
    CheckpointWriteError,
    PreemptionHandler,
    decode_replay,
    encode_replay,
)
from tiny import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed: int = 0):
    """A realistic train state: LoRA-like params, adamw state after one update, step, keys, log Z."""
    rng = np.random.default_rng(seed)
    params = {
        "lora": {
            "layers": {
                "attn": {
                    "q": {"a": rng.normal(size=(2, 8, 4)).astype(np.float32),
                          "b": rng.normal(size=(2, 4, 8)).astype(np.float32)},
                },
            },
            "scale": np.float32(2.0),
        },
        "log_z": {"w": rng.normal(size=(8,)).astype(np.float32), "b": np.float32(0.5)},
    }
    params = jax.tree.map(jnp.asarray, params)
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7 + seed, jnp.int32),
        "rng": jax.random.key(seed),  # new-style typed key
        "legacy_rng": jax.random.PRNGKey(seed + 100),  # raw uint32 key
    }


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def assert_identical(a, b):
    """Same tree structure and byte-identical leaves (keys compared by key data)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (jnp.issubdtype(x.dtype, jax.dtypes.prng_key)) == (jnp.issubdtype(y.dtype, jax.dtypes.prng_key))
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


REPLAY = {
    "tokens": np.arange(24, dtype=np.int32).reshape(4, 6),
    "log_r": np.array([-1.5, np.nan, -np.inf, 3.0], np.float32),
    "mask": np.array([[True, False], [False, True]]),
    "texts": np.array(["a", "bcd"]),
    "empty": np.zeros((0, 3), np.float64),
    "size": 4,
    "ptr": np.int64(2),
    "cfg": {"capacity": 16, "name": "buf", "tuple": (1, 2)},
}


def assert_replay_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert isinstance(got[k], np.ndarray) and got[k].dtype == v.dtype and got[k].shape == v.shape
            assert got[k].tobytes() == v.tobytes()
        elif isinstance(v, np.generic):
            assert type(got[k]) is type(v) and got[k] == v
    assert got["size"] == 4 and got["cfg"] == {"capacity": 16, "name": "buf", "tuple": [1, 2]}


def test_replay_codec_roundtrip():
    assert_replay_equal(decode_replay(encode_replay(REPLAY)), REPLAY)
    assert decode_replay(encode_replay(None)) is None
    with pytest.raises(TypeError, match="object arrays"):
        encode_replay({"x": np.array([{}, 1], dtype=object)})
    with pytest.raises(TypeError, match="not a string"):
        encode_replay({1: 2})


def test_roundtrip_byte_identical(tmp_path):
    state = make_state()
    meta = {"config": {"lr": 1e-2, "objective": "subtb"}, "data_pos": np.int64(123),
            "history": {"loss": [1.0, 0.5]}}
    ck = Checkpointer(tmp_path / "ck")
    assert ck.latest_step() is None
    assert ck.save(7, state, meta, REPLAY)
    assert ck.latest_step() == 7 and ck.all_steps() == [7]
    ck.close()

    ck2 = Checkpointer(tmp_path / "ck")
    got, got_meta, got_replay = ck2.restore(abstract_state=abstract_of(state))
    assert_identical(got, state)
    assert got_meta == {"config": {"lr": 1e-2, "objective": "subtb"}, "data_pos": 123,
                        "history": {"loss": [1.0, 0.5]}}
    assert_replay_equal(got_replay, REPLAY)
    # The restored optimizer state works with optax (namedtuples restored).
    opt = optax.adamw(1e-2)
    opt.update(jax.tree.map(jnp.ones_like, got["params"]), got["opt_state"], got["params"])
    # Without abstract_state: same leaves, keys re-wrapped.
    raw, _, none_replay = ck2.restore(7)
    assert jnp.issubdtype(raw["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(raw["params"]["log_z"]["w"]), np.asarray(state["params"]["log_z"]["w"]))
    ck2.close()


def test_keep_last_k_interval_and_latest(tmp_path):
    d = tmp_path / "ck"
    ck = Checkpointer(d, keep=2, save_interval_steps=2)
    states = {s: make_state(s) for s in range(1, 8)}
    saved = {s: ck.save(s, states[s], {"s": s}, None) for s in range(1, 8)}
    assert saved == {1: False, 2: True, 3: False, 4: True, 5: False, 6: True, 7: False}
    assert ck.save(7, states[7], {"s": 7}, None, force=True)
    assert ck.save(7, states[7], {"s": 7}, None, force=True) is False  # never overwrite
    assert ck.all_steps() == [6, 7]
    assert sorted(n for n in os.listdir(d) if n.isdigit()) == ["6", "7"]
    ck.close()
    ck = Checkpointer(d)
    assert ck.latest_step() == 7
    got, meta, replay = ck.restore(abstract_state=abstract_of(states[7]))
    assert_identical(got, states[7])
    assert meta == {"s": 7} and replay is None
    got6, meta6, _ = ck.restore(6, abstract_state=abstract_of(states[6]))
    assert_identical(got6, states[6])


def test_async_save(tmp_path):
    state = make_state(3)
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    assert ck.save(1, state, {"a": 1}, REPLAY)
    ck.wait()
    assert os.path.isfile(tmp_path / "ck" / "1" / MANIFEST_NAME)
    got, meta, rep = ck.restore(abstract_state=abstract_of(state))
    assert_identical(got, state)
    assert_replay_equal(rep, REPLAY)
    ck.close()


# --------------------------------------------------------------------------------------
# failure modes
# --------------------------------------------------------------------------------------


@pytest.fixture
def saved_dir(tmp_path):
    d = tmp_path / "ck"
    ck = Checkpointer(d, keep=3)
    for s in (1, 2):
        ck.save(s, make_state(s), {"s": s}, REPLAY)
    ck.close()
    return d


def test_missing_and_empty_directory(tmp_path):
    missing = tmp_path / "nope"
    assert Checkpointer(missing).latest_step() is None
    with pytest.raises(CheckpointError, match=r"nope does not exist"):
        Checkpointer(missing).restore()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*empty: the directory is empty"):
        Checkpointer(empty).restore()


def test_unknown_step(saved_dir):
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 9 .*complete steps: \[1, 2\]"):
        Checkpointer(saved_dir).restore(9)


def test_uncommitted_tmp_checkpoint(saved_dir):
    shutil.copytree(saved_dir / "2", saved_dir / "3.orbax-checkpoint-tmp-1234")
    ck = Checkpointer(saved_dir)
    assert ck.latest_step() == 2
    with pytest.raises(CheckpointError, match=r"step 3 .*never committed.*interrupted"):
        ck.restore(3)
    got, meta, _ = ck.restore()
    assert meta == {"s": 2}


def test_only_partial_checkpoints(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "5.orbax-checkpoint-tmp-99").mkdir()
    with pytest.raises(CheckpointError, match=r"only incomplete/interrupted saves"):
        Checkpointer(d).restore()


def test_missing_manifest_is_incomplete(saved_dir):
    os.remove(saved_dir / "2" / MANIFEST_NAME)
    ck = Checkpointer(saved_dir)
    assert ck.latest_step() == 1
    with pytest.raises(CheckpointError, match=r"step 2\) is incomplete: it has no gfn_manifest.json"):
        ck.restore(2)
    assert ck.restore()[1] == {"s": 1}


def _largest_state_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs]
    return max(files, key=os.path.getsize)


def _snapshot(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for r, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(r, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _damage(path, damage):
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return r"file state/.* bytes, expected .*truncated"
    if damage == "delete":
        os.remove(path)
        return r"missing file state/"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return r"file state/.* wrong sha256"


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_checkpoint(saved_dir, damage):
    """An explicitly requested corrupt step is an error; the latest falls back (kept aside)."""
    reason = _damage(_largest_state_file(saved_dir / "2"), damage)
    damaged = _snapshot(saved_dir / "2")
    intact = _snapshot(saved_dir / "1")
    ck = Checkpointer(saved_dir)
    with pytest.raises(CheckpointError, match=r"step 2\) is corrupt: " + reason):
        ck.restore(2)
    assert ck.last_fallback is None and "2" in os.listdir(saved_dir)  # strict: nothing moved

    state, meta, replay = ck.restore(abstract_state=abstract_of(make_state(1)))
    assert meta == {"s": 1}
    assert_identical(state, make_state(1))
    assert_replay_equal(replay, REPLAY)
    fb = ck.last_fallback
    assert fb.restored_step == 1 and [c.step for c in fb.skipped] == [2]
    assert re.search(reason, fb.skipped[0].reason)
    moved = fb.skipped[0].moved_to
    assert os.path.dirname(moved) == str(saved_dir) and re.fullmatch(r"corrupt-2-\d{8}-\d{6}", os.path.basename(moved))
    assert re.fullmatch(r"checkpoint step 2 is corrupt \(.+\); moved aside to .*corrupt-2-.*; resuming from "
                        r"step 1, the newest intact checkpoint", fb.message)
    # the corrupt checkpoint is kept byte for byte, outside the step listing; step 1 untouched
    assert "2" not in os.listdir(saved_dir)
    assert _snapshot(moved) == damaged
    assert _snapshot(saved_dir / "1") == intact
    assert ck.all_steps() == [1]
    # the run continues: step 2 is saved again and restored; the corrupt copy stays aside
    assert ck.save(2, make_state(5), {"s": 22}, None)
    ck.close()
    ck = Checkpointer(saved_dir)
    assert ck.latest_step() == 2
    assert ck.restore()[1] == {"s": 22} and ck.last_fallback is None
    assert _snapshot(moved) == damaged
    ck.close()


def test_corrupt_latest_two_deep_and_restore_subset_fallback(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d, keep=5) as ck:
        for s in (1, 2, 3):
            ck.save(s, make_state(s), {"s": s}, None)
    _damage(_largest_state_file(d / "3"), "flip")
    (d / "2" / MANIFEST_NAME).write_text("{not json")
    ck = Checkpointer(d)
    sub, meta = ck.restore_subset(keys=["step"])
    assert meta == {"s": 1} and int(sub["step"]) == 8
    assert [c.step for c in ck.last_fallback.skipped] == [3, 2]
    assert "manifest gfn_manifest.json is unreadable" in ck.last_fallback.skipped[1].reason
    assert sorted(n.split("-")[1] for n in os.listdir(d) if n.startswith("corrupt-")) == ["2", "3"]
    assert ck.all_steps() == [1]


def test_all_checkpoints_corrupt_moves_nothing(saved_dir):
    _damage(_largest_state_file(saved_dir / "1"), "truncate")
    _damage(_largest_state_file(saved_dir / "2"), "flip")
    before = _snapshot(saved_dir)
    ck = Checkpointer(saved_dir)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*ck \(step 2: file state/.*sha256.*; "
                       r"step 1: file state/.*truncated.*\); nothing was moved"):
        ck.restore()
    assert _snapshot(saved_dir) == before and ck.last_fallback is None


def test_unreadable_manifest(saved_dir):
    (saved_dir / "2" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"2.*manifest gfn_manifest.json is unreadable"):
        Checkpointer(saved_dir).restore(2)


def test_structure_mismatch(saved_dir):
    state = make_state(2)
    ck = Checkpointer(saved_dir)
    extra = abstract_of(state)
    extra["params"]["new"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(CheckpointError, match=r"does not match abstract_state: not in checkpoint: \['params/new'\]"):
        ck.restore(abstract_state=extra)
    fewer = abstract_of(state)
    del fewer["legacy_rng"]
    with pytest.raises(CheckpointError, match=r"in checkpoint but not in abstract_state: \['legacy_rng'\]"):
        ck.restore(abstract_state=fewer)
    shape = abstract_of(state)
    shape["params"]["log_z"]["w"] = jax.ShapeDtypeStruct((9,), jnp.float32)
    with pytest.raises(CheckpointError, match=r"params/log_z/w: shape \(9,\) requested, \(8,\) stored"):
        ck.restore(abstract_state=shape)
    dtype = abstract_of(state)
    dtype["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(CheckpointError, match=r"step: dtype float32 requested, int32 stored"):
        ck.restore(abstract_state=dtype)


@flax.struct.dataclass
class _TrainState:  # the shape of gfn_jax.train.TrainState
    step: jax.Array
    trainable: dict
    log_z: dict
    opt_state: object
    rng: jax.Array


def _train_state(seed, width=8):
    rng = np.random.default_rng(seed)
    trainable = {"a": jnp.asarray(rng.normal(size=(width, 4)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    log_z = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    opt_state = optax.adamw(1e-2).init({"trainable": trainable, "log_z": log_z})
    return _TrainState(step=jnp.int32(10 + seed), trainable=trainable, log_z=log_z,
                       opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)))


@pytest.fixture
def deserialized_names(monkeypatch):
    """Names of the arrays orbax deserializes (reads and allocates)."""
    from orbax.checkpoint import type_handlers

    names = []
    real = type_handlers.ArrayHandler.deserialize

    async def spy(self, infos, args=None):
        names.extend(i.name for i in infos)
        return await real(self, infos, args)

    monkeypatch.setattr(type_handlers.ArrayHandler, "deserialize", spy)
    return names


def test_restore_subset_skips_optimizer_state(tmp_path, deserialized_names):
    saved = _train_state(1)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(11, saved, {"step": 11}, REPLAY)
    ck.close()
    # The policy's shapes now differ from the optimizer state stored (e.g. it was saved
    # with another optimizer): only the requested entries must match.
    want = {k: abstract_of(getattr(saved, k)) for k in ("step", "trainable", "log_z")}
    ck = Checkpointer(tmp_path / "ck")
    sub, meta = ck.restore_subset(abstract_subset=want)
    assert meta == {"step": 11} and set(sub) == {"step", "trainable", "log_z"}
    for k in want:
        assert_identical(sub[k], getattr(saved, k))
    assert sorted(deserialized_names) == ["log_z.w", "step", "trainable.a", "trainable.b"]
    # keys= restores entries as stored (on the default device), here without opt_state
    deserialized_names.clear()
    sub2, _ = ck.restore_subset(keys=["trainable", "rng"])
    assert_identical(sub2["trainable"], saved.trainable)
    np.testing.assert_array_equal(np.asarray(sub2["rng"]), np.asarray(saved.rng))
    assert not any(n.startswith("opt_state") for n in deserialized_names) and deserialized_names
    # a full restore with a state whose optimizer state has another shape fails; the subset does not care
    other = _train_state(1, width=5)
    with pytest.raises(CheckpointError, match=r"opt_state/0/mu/trainable/a: shape \(5, 4\) requested, \(8, 4\) stored"):
        ck.restore(abstract_state=abstract_of(other).replace(trainable=want["trainable"]))
    # a mismatch inside a requested entry, and an unknown entry, are clear errors
    with pytest.raises(CheckpointError, match=r"trainable/a: shape \(5, 4\) requested, \(8, 4\) stored"):
        ck.restore_subset(abstract_subset={"trainable": abstract_of(other.trainable)})
    with pytest.raises(CheckpointError, match=r"has no state entries \['params'\]; it has \['log_z', "
                       r"'opt_state', 'rng', 'step', 'trainable'\]"):
        ck.restore_subset(keys=["params"])
    with pytest.raises(ValueError, match="exactly one"):
        ck.restore_subset()
    ck.close()


def test_restore_subset_typed_keys_and_explicit_step(saved_dir):
    ck = Checkpointer(saved_dir)
    sub, meta = ck.restore_subset(step=1, keys=["rng", "params"])
    assert meta == {"s": 1}
    want = make_state(1)
    assert_identical(sub["rng"], want["rng"])  # typed PRNG key re-wrapped
    assert_identical(sub["params"], want["params"])
    _damage(_largest_state_file(saved_dir / "1"), "flip")
    with pytest.raises(CheckpointError, match=r"step 1\) is corrupt"):
        ck.restore_subset(step=1, keys=["rng"])  # explicit step: strict
    ck.close()


# --------------------------------------------------------------------------------------
# disk full while saving
# --------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somefile")


@pytest.mark.parametrize("where", ["orbax_write", "manifest", "orbax_write_async"])
def test_disk_full_while_saving_keeps_previous(tmp_path, monkeypatch, where):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    d = tmp_path / "ck"
    ck = Checkpointer(d, keep=2, async_save=where.endswith("async"))
    ck.save(1, make_state(1), {"s": 1}, REPLAY)
    ck.save(2, make_state(2), {"s": 2}, REPLAY)
    ck.wait()
    before = _snapshot(d)
    with monkeypatch.context() as m:
        if where == "manifest":
            m.setattr("gfn_jax.checkpoint._atomic_write_text", _enospc)
        else:
            async def full(self, x, directory):
                _enospc()
            m.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)
        with pytest.raises(CheckpointDiskFullError) as info:
            ck.save(3, make_state(3), {"s": 3}, REPLAY)
            ck.wait()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (f"disk full while saving checkpoint step 3 to {d}; free space or point --workdir "
                   f"elsewhere; the previous checkpoints are intact (latest: step 2)")
    # nothing lost (keep=2 did not drop step 1 for the failed step 3), nothing half-written left
    assert _snapshot(d) == before
    assert sorted(os.listdir(d)) == ["1", "2"]
    ck2 = Checkpointer(d)
    state, meta, replay = ck2.restore(abstract_state=abstract_of(make_state(2)))
    assert meta == {"s": 2} and ck2.last_fallback is None
    assert_identical(state, make_state(2))
    # with space again, the same Checkpointer saves step 3
    assert ck.save(3, make_state(3), {"s": 3}, REPLAY)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    assert ck.restore()[1] == {"s": 3}
    ck.close()
    ck2.close()


def test_other_write_errors_are_one_line(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    ck = Checkpointer(d)
    ck.save(1, make_state(1), {"s": 1}, None)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "x")

    monkeypatch.setattr("gfn_jax.checkpoint._atomic_write_text", denied)
    with pytest.raises(CheckpointWriteError, match=r"^permission denied while saving checkpoint step 2 to "
                       r".*ck; fix the permissions or point --workdir elsewhere; the previous checkpoints "
                       r"are intact \(latest: step 1\)$") as info:
        ck.save(2, make_state(2), {"s": 2}, None)
    assert not isinstance(info.value, CheckpointDiskFullError)
    assert sorted(os.listdir(d)) == ["1"]
    ck.close()


def test_sharded_restore(tmp_path):
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    P = jax.sharding.PartitionSpec
    state = {
        "w": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16),
        "b": jnp.arange(16, dtype=jnp.float32),
        "rng": jax.random.key(5),
    }
    ck = Checkpointer(tmp_path / "ck")
    ck.save(3, state, {}, None)
    specs = {"w": P("data", "model"), "b": P("model"), "rng": P()}
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(mesh, specs[k]))
        for k, v in state.items()
    }
    got, _, _ = ck.restore(abstract_state=abstract)
    for k in ("w", "b"):
        assert got[k].sharding.is_equivalent_to(abstract[k].sharding, got[k].ndim)
        assert len(got[k].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))
    assert got["w"].addressable_shards[0].data.shape == (16, 8)
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(state["rng"]))
    ck.close()


# --------------------------------------------------------------------------------------
# preemption and interrupted saves (subprocesses)
# --------------------------------------------------------------------------------------


def test_preemption_handler_in_process():
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with PreemptionHandler(catch_sigint=True) as pre:
            assert not pre.requested and not pre.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert pre.requested and pre.should_stop(1) and pre.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before
        with PreemptionHandler(catch_sigint=True) as pre:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert pre.requested
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C really interrupts
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # a process started with Ctrl-C ignored (nohup, some job runners) keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with PreemptionHandler(catch_sigint=True) as pre:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert pre.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before_int)


def _spawn(script: str, tmp_path):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(proc, token: str, timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if token in line:
            return line
    proc.kill()
    raise AssertionError(f"child never printed {token!r}; stderr:\n{proc.stderr.read()[-3000:]}")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    d = tmp_path / "ck"
    proc = _spawn(f"""
        import sys, time
        import jax.numpy as jnp
        from gfn_jax.checkpoint import Checkpointer, PreemptionHandler
        ck = Checkpointer({str(d)!r}, save_interval_steps=10**9)
        state = {{"w": jnp.zeros(3), "step": jnp.int32(0)}}
        ck.save(0, state, {{"step": 0}}, None, force=True)
        with PreemptionHandler() as pre:
            print("READY", flush=True)
            for step in range(1, 10**6):
                state = {{"w": state["w"] + 1.0, "step": jnp.int32(step)}}
                time.sleep(0.005)
                if pre.should_stop(step):
                    ck.save(step, state, {{"step": step}}, {{"n": step}}, force=True)
                    ck.close()
                    print("SAVED", step, flush=True)
                    sys.exit(0)
        sys.exit(3)
    """, tmp_path)
    _wait_for(proc, "READY")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    line = _wait_for(proc, "SAVED")
    assert proc.wait(timeout=60) == 0
    step = int(line.split()[1])
    assert step > 0
    ck = Checkpointer(d)
    assert ck.latest_step() == step
    state, meta, replay = ck.restore()
    assert int(state["step"]) == step and meta == {"step": step} and replay == {"n": step}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(3, float(step), np.float32))


@pytest.mark.parametrize("phase", ["before_commit", "before_manifest"])
def test_killed_during_save_keeps_previous(tmp_path, phase):
    d = tmp_path / "ck"
    proc = _spawn(f"""
        import os, time
        import jax.numpy as jnp
        from gfn_jax import checkpoint as C
        ck = C.Checkpointer({str(d)!r})
        ck.save(1, {{"w": jnp.ones(4)}}, {{"step": 1}}, None)
        def hang(*a, **k):
            print("HANG", flush=True)
            time.sleep(600)
        if {phase!r} == "before_commit":
            real = os.rename
            def rename(src, dst, *a, **k):  # orbax commits with an atomic rename
                if os.path.basename(os.fspath(dst)) == "2":
                    hang()
                return real(src, dst, *a, **k)
            os.rename = rename
        else:
            C.Checkpointer._write_manifest = hang
        ck.save(2, {{"w": jnp.full(4, 2.0)}}, {{"step": 2}}, None)
        print("UNREACHABLE", flush=True)
    """, tmp_path)
    _wait_for(proc, "HANG")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    names = os.listdir(d)
    if phase == "before_commit":
        assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names) and "2" not in names
        match = r"step 2 .*never committed"
    else:
        assert "2" in names and not os.path.exists(d / "2" / MANIFEST_NAME)
        match = r"step 2\) is incomplete"
    ck = Checkpointer(d)
    assert ck.latest_step() == 1
    state, meta, _ = ck.restore()
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4, np.float32))
    with pytest.raises(CheckpointError, match=match):
        ck.restore(2)
    # The next writer cleans up and can save step 2 again.
    assert ck.save(2, {"w": jnp.full(4, 2.0)}, {"step": 2}, None)
    assert ck.all_steps() == [1, 2]
    assert not any("tmp" in n for n in os.listdir(d))
    assert ck.restore()[1] == {"step": 2}
    ck.close()


_TWO_PROC_WORKER = """
import os, signal, sys
import jax
jax.distributed.initialize(coordinator_address=os.environ["COORD"], num_processes=2,
                           process_id=int(os.environ["PID"]))
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gfn_jax.checkpoint import Checkpointer, PreemptionHandler

pid = jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("data",))
stop_at = None
with PreemptionHandler() as pre:
    for step in range(1, 50):
        if pid == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is "preempted"
        if pre.should_stop(step):
            stop_at = step
            break
assert stop_at is not None
w = jax.make_array_from_callback((8, 2), NamedSharding(mesh, P("data")),
                                 lambda idx: np.arange(16, dtype=np.float32).reshape(8, 2)[idx] + stop_at)
ck = Checkpointer(os.environ["CKDIR"])
ck.save(stop_at, {"w": w, "step": jnp.int32(stop_at)}, {"stop": stop_at}, None)
ck.close()
multihost_utils.sync_global_devices("manifest written")
print("STOPPED", pid, stop_at, pre.requested, flush=True)
jax.distributed.shutdown()
"""


def test_two_process_preemption_and_save(tmp_path):
    """Process 1 alone gets SIGTERM; both stop at the same step and save one checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROC_WORKER)
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", COORD=f"localhost:{port}",
                   PID=str(pid), CKDIR=str(tmp_path / "ck"),
                   XLA_FLAGS=xla_flags(2))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"worker {pid}:\n{out[-3000:]}"
    lines = [next(l for l in out.splitlines() if l.startswith("STOPPED")).split() for out in outs]
    assert [l[2] for l in lines] == ["3", "3"]  # same step on both processes
    assert [l[3] for l in lines] == ["False", "True"]  # only process 1 was signalled
    ck = Checkpointer(tmp_path / "ck")
    assert ck.all_steps() == [3]
    with pytest.raises(CheckpointError, match=r"step 3\) could not be restored \(pass abstract_state"):
        ck.restore()  # saved on 2x2 devices of two processes; here 8 devices of one
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    abstract = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec("data"))),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, meta, _ = ck.restore(abstract_state=abstract)
    assert meta == {"stop": 3} and int(state["step"]) == 3
    assert len(state["w"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(16, dtype=np.float32).reshape(8, 2) + 3)
