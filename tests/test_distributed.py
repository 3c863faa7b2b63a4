"""Two localhost processes (4 CPU devices each) form one 8-device mesh and compute a
sharded loss and gradient that must equal the single-process value.

The file is also the worker: ``python tests/test_distributed.py --worker OUT.npz`` with
the ``GFN_JAX_*`` variables set (the test does that).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from multiproc import run_workers
from tiny import CFG, lm_loss, np_params

from gfn_jax.models import param_axes

B, T = 8, 10
N_PROC, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 90.0


def _global_batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, size=(B, T)).astype(np.int32)
    lengths = np.array([10, 4, 7, 10, 2, 9, 6, 10])
    mask = (np.arange(T)[None, :] >= (T - lengths)[:, None]).astype(np.int32)
    return np.where(mask > 0, tokens, 0).astype(np.int32), mask


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _worker(out_path: str) -> None:
    from gfn_jax import parallel as par

    assert par.initialize_distributed() is True
    pid = jax.process_index()
    assert jax.process_count() == N_PROC, jax.process_count()
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == N_PROC * LOCAL_DEVICES
    assert par.is_main_process() == (pid == 0)

    mesh = par.make_mesh(par.MeshConfig(data=2, fsdp=2, tensor=2))
    tokens, mask = _global_batch()
    rows = par.process_batch_slice(mesh, B)
    assert rows == slice(pid * B // N_PROC, (pid + 1) * B // N_PROC), rows
    batch = par.global_batch_from_local({"t": tokens[rows], "m": mask[rows]}, mesh)
    assert batch["t"].shape == (B, T) and not batch["t"].is_fully_addressable

    params = np_params()
    shardings = par.tree_shardings(param_axes(CFG), params, mesh)
    sp = par.shard_params(params, shardings)
    fn = jax.jit(
        jax.value_and_grad(lm_loss),
        in_shardings=(shardings, par.batch_sharding(mesh, 2), par.batch_sharding(mesh, 2)),
        # gradients are computed sharded, then gathered inside the same program so each
        # process can read the full value (one compile instead of a second gather)
        out_shardings=(par.replicated(mesh), par.replicated(mesh)),
    )
    loss, grads = fn(sp, batch["t"], batch["m"])
    q = sp["layers"]["attn"]["q"]["kernel"]
    q_shards = {s.data.shape for s in q.addressable_shards}
    out = {f"g{k}": v for k, v in _flat(jax.device_get(grads)).items()}
    # to_host: sharded params and batch rows gathered by one program, the replicated loss
    # read locally, numpy passed through
    import gfn_jax

    assert gfn_jax.to_host is par.to_host  # public API
    host = par.to_host({"p": sp, "t": batch["t"], "loss": loss, "np": np.arange(3)})
    assert par._replicate_fn.cache_info().misses == 1, par._replicate_fn.cache_info()
    out.update({f"h{k}": v for k, v in _flat(host).items()})
    np.savez(out_path.format(pid=pid), loss=np.asarray(loss), q_shard_shape=np.array(sorted(q_shards)), **out)
    jax.distributed.shutdown()


def test_two_process_sharded_loss_and_grad(tmp_path):
    elapsed = run_workers([os.path.abspath(__file__), "--worker", str(tmp_path / "out{pid}.npz")],
                          str(tmp_path / "worker"), N_PROC, LOCAL_DEVICES, TIMEOUT_S)

    tokens, mask = _global_batch()
    params = np_params()
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lm_loss))(params, tokens, mask)
    ref = _flat(jax.device_get(ref_grads))
    for pid in range(N_PROC):
        out = np.load(str(tmp_path / "out{pid}.npz").format(pid=pid))
        np.testing.assert_allclose(out["loss"], float(ref_loss), rtol=1e-5, atol=1e-5)
        # q kernel [L, D, H, Dh] = [2, 32, 4, 8] sharded (None, fsdp, tensor, None)
        np.testing.assert_array_equal(out["q_shard_shape"], [[2, 16, 2, 8]])
        got = {k[1:]: out[k] for k in out.files if k.startswith("g")}
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f"proc {pid} {k}")
        # to_host gave every process the whole value of every leaf
        host = {k[1:]: out[k] for k in out.files if k.startswith("h")}
        want = {**{"['p']" + k: v for k, v in _flat(params).items()}, "['t']": tokens,
                "['loss']": out["loss"], "['np']": np.arange(3)}
        assert host.keys() == want.keys(), (sorted(host), sorted(want))
        for k, v in want.items():
            np.testing.assert_array_equal(host[k], v, err_msg=f"to_host, proc {pid} {k}")
    print(f"two-process run took {elapsed:.1f}s")  # ~40 s on a busy 2-core machine


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_distributed.py --worker OUT.npz")
