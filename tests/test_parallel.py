"""Mesh, logical-axis rules and sharded loss/grad equality (8 virtual CPU devices)."""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tiny import CFG, lm_loss, np_params

from gfn_jax import parallel as par

from gfn_jax.models import param_axes

B, T = 8, 12


_loss_and_grad = jax.value_and_grad(lm_loss)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, size=(B, T)).astype(np.int32)
    lengths = np.array([12, 5, 9, 12, 3, 7, 11, 8])
    mask = (np.arange(T)[None, :] >= (T - lengths)[:, None]).astype(np.int32)  # left pad
    tokens = np.where(mask > 0, tokens, 0).astype(np.int32)
    params = np_params()
    ref_loss, ref_grads = jax.jit(_loss_and_grad)(params, tokens, mask)  # one device
    return params, tokens, mask, float(ref_loss), jax.device_get(ref_grads)


def _flat(tree) -> Dict[str, object]:
    return {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# Expected specs, written by hand from the rules (path -> per-dim mesh axis); leaves not
# listed are fully replicated.
_EXPECTED = {
    "data8": ((8, 1, 1), {}),
    "fsdp8": ((1, 8, 1), {
        "['embed']['embedding']": (None, "fsdp"),
        "['final_norm']['scale']": ("fsdp",),
        "['layers']['attn_norm']['scale']": (None, "fsdp"),
        "['layers']['mlp_norm']['scale']": (None, "fsdp"),
        "['layers']['attn']['q']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['k']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['v']['kernel']": (None, "fsdp", None, None),
        "['layers']['attn']['o']['kernel']": (None, None, None, "fsdp"),
        "['layers']['mlp']['gate']['kernel']": (None, "fsdp", None),
        "['layers']['mlp']['up']['kernel']": (None, "fsdp", None),
        "['layers']['mlp']['down']['kernel']": (None, None, "fsdp"),
        "['lm_head']['kernel']": ("fsdp", None),
    }),
    "d2f2t2": ((2, 2, 2), {
        "['embed']['embedding']": ("tensor", "fsdp"),
        "['final_norm']['scale']": ("fsdp",),
        "['layers']['attn_norm']['scale']": (None, "fsdp"),
        "['layers']['mlp_norm']['scale']": (None, "fsdp"),
        "['layers']['attn']['q']['kernel']": (None, "fsdp", "tensor", None),
        "['layers']['attn']['k']['kernel']": (None, "fsdp", "tensor", None),
        "['layers']['attn']['v']['kernel']": (None, "fsdp", "tensor", None),
        "['layers']['attn']['o']['kernel']": (None, "tensor", None, "fsdp"),
        "['layers']['mlp']['gate']['kernel']": (None, "fsdp", "tensor"),
        "['layers']['mlp']['up']['kernel']": (None, "fsdp", "tensor"),
        "['layers']['mlp']['down']['kernel']": (None, "tensor", "fsdp"),
        "['lm_head']['kernel']": ("fsdp", "tensor"),
    }),
    # tensor=4: kv_heads=2 is not divisible by 4 -> k/v kernels replicated.
    "tensor4": ((2, 1, 4), {
        "['embed']['embedding']": ("tensor", None),
        "['layers']['attn']['q']['kernel']": (None, None, "tensor", None),
        "['layers']['attn']['o']['kernel']": (None, "tensor", None, None),
        "['layers']['mlp']['gate']['kernel']": (None, None, "tensor"),
        "['layers']['mlp']['up']['kernel']": (None, None, "tensor"),
        "['layers']['mlp']['down']['kernel']": (None, "tensor", None),
        "['lm_head']['kernel']": (None, "tensor"),
    }),
}
_MESH_CFG = {
    "data8": par.MeshConfig(data=8),
    "fsdp8": par.MeshConfig(data=1, fsdp=8),
    "d2f2t2": par.MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor4": par.MeshConfig(tensor=4),  # data=-1 -> 2
}


def _check_sharding(arr, expected: Tuple, mesh_sizes: Dict[str, int]) -> None:
    assert isinstance(arr.sharding, NamedSharding)
    spec = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
    assert spec == expected
    shard_shape = tuple(
        d // (1 if a is None else mesh_sizes[a]) for d, a in zip(arr.shape, expected)
    )
    for s in arr.addressable_shards:
        assert s.data.shape == shard_shape


@pytest.mark.parametrize("layout", list(_EXPECTED))
def test_sharded_loss_and_grads_match_single_device(data, layout):
    params, tokens, mask, ref_loss, ref_grads = data
    (d, f, t), expected = _EXPECTED[layout]
    mesh = par.make_mesh(_MESH_CFG[layout])
    assert dict(mesh.shape) == {"data": d, "fsdp": f, "tensor": t}
    assert mesh.devices.size == 8

    shardings = par.tree_shardings(param_axes(CFG), params, mesh, par.DEFAULT_RULES)
    sp = par.shard_params(params, shardings)
    bs = par.batch_sharding(mesh, 2)
    tok = jax.device_put(tokens, bs)
    msk = jax.device_put(mask, bs)
    fn = jax.jit(
        _loss_and_grad,
        in_shardings=(shardings, bs, bs),
        out_shardings=(par.replicated(mesh), shardings),
    )
    loss, grads = fn(sp, tok, msk)

    sizes = dict(mesh.shape)
    for path, leaf in _flat(sp).items():
        _check_sharding(leaf, expected.get(path, (None,) * leaf.ndim), sizes)
    for path, leaf in _flat(grads).items():
        _check_sharding(leaf, expected.get(path, (None,) * leaf.ndim), sizes)
    batch_axes = tuple(a for a, n in (("data", d), ("fsdp", f)) if n > 1)
    assert tuple(tok.sharding.spec)[0] in (batch_axes, batch_axes[0])
    assert {s.data.shape for s in tok.addressable_shards} == {(B // (d * f), T)}

    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    g, r = _flat(jax.device_get(grads)), _flat(ref_grads)
    assert g.keys() == r.keys()
    for k in r:
        np.testing.assert_allclose(g[k], r[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert max(np.abs(v).max() for v in r.values()) > 1e-3  # gradients are not trivially 0


# ---------------------------------------------------------------------------
# Rules table
# ---------------------------------------------------------------------------
def test_divisibility_fallback_and_size1_drop():
    mesh = par.make_mesh(par.MeshConfig(tensor=4))  # data 2, fsdp 1, tensor 4
    r = par.DEFAULT_RULES
    assert par.logical_to_pspec(("kv_heads",), r, mesh, (2,)) == P(None)
    assert par.logical_to_pspec(("kv_heads",), r, mesh, (8,)) == P("tensor")
    assert par.logical_to_pspec(("vocab", "embed"), r, mesh, (63, 32)) == P(None, None)
    # fsdp has size 1 -> dropped even though it divides.
    assert par.logical_to_pspec(("embed",), r, mesh, (32,)) == P(None)
    # without a shape only size-1 axes are dropped
    assert par.logical_to_pspec(("kv_heads",), r, mesh) == P("tensor")


def test_batch_partial_division():
    mesh = par.make_mesh(par.MeshConfig(data=2, fsdp=4))
    r = par.DEFAULT_RULES
    assert par.logical_to_pspec(("batch", None), r, mesh, (8, 3)) == P(("data", "fsdp"), None)
    assert par.logical_to_pspec(("batch",), r, mesh, (4,)) == P("data")
    assert par.logical_to_pspec(("batch",), r, mesh, (3,)) == P(None)
    assert par.batch_pspec(mesh, 3) == P(("data", "fsdp"), None, None)
    assert par.batch_pspec(par.make_mesh(par.MeshConfig(data=1, fsdp=8)), 1) == P("fsdp")


def test_no_mesh_axis_used_twice():
    mesh = par.make_mesh(par.MeshConfig(data=1, fsdp=2, tensor=4))
    r = par.DEFAULT_RULES
    assert par.logical_to_pspec(("embed", "embed"), r, mesh, (4, 4)) == P("fsdp", None)
    assert par.logical_to_pspec(("heads", "mlp"), r, mesh, (8, 8)) == P("tensor", None)
    # batch takes fsdp first, so embed cannot use it
    assert par.logical_to_pspec(("batch", "embed"), r, mesh, (2, 8)) == P("fsdp", None)
    # first dim not divisible -> the second may use the axis
    assert par.logical_to_pspec(("heads", "mlp"), r, mesh, (2, 8)) == P(None, "tensor")


def test_rule_candidates_unknown_names_and_overrides():
    mesh = par.make_mesh(par.MeshConfig(data=1, fsdp=2, tensor=4))
    rules = (("mlp", "tensor"), ("mlp", "fsdp"))
    assert par.logical_to_pspec(("mlp",), rules, mesh, (6,)) == P("fsdp")
    assert par.logical_to_pspec(("mlp",), rules, mesh, (8,)) == P("tensor")
    r = par.DEFAULT_RULES
    assert par.logical_to_pspec(("layers", "lora", "foo", None), r, mesh, (2, 8, 8, 8)) == P(
        None, None, None, None
    )
    merged = par.merge_rules({"embed": None, "lora": "fsdp", "batch": "data+fsdp"})
    assert par.logical_to_pspec(("embed",), merged, mesh, (8,)) == P(None)
    assert par.logical_to_pspec(("lora",), merged, mesh, (8,)) == P("fsdp")
    assert dict(merged)["batch"] == ("data", "fsdp")
    assert dict(merged)["heads"] == "tensor"  # untouched entries kept
    assert par.merge_rules(None) == par.DEFAULT_RULES


def test_rule_errors():
    mesh = par.make_mesh(par.MeshConfig())
    with pytest.raises(ValueError, match="name 2 dims but the array has shape"):
        par.logical_to_pspec(("embed", "mlp"), par.DEFAULT_RULES, mesh, (4,))
    with pytest.raises(ValueError, match="mesh axis 'tensr'"):
        par.logical_to_pspec(("mlp",), (("mlp", "tensr"),), mesh, (8,))
    with pytest.raises(ValueError, match="pair"):
        par.merge_rules([("mlp",)])
    with pytest.raises(ValueError, match="different structures"):
        par.tree_shardings({"a": ("embed",)}, {"b": np.zeros(4)}, mesh)


def test_make_mesh_shapes_and_errors():
    m = par.make_mesh(par.MeshConfig(data=-1, fsdp=2, tensor=2))
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in m.devices.ravel()) == sorted(d.id for d in jax.devices())
    m4 = par.make_mesh(par.MeshConfig(data=2, fsdp=-1), devices=jax.devices()[:4])
    assert dict(m4.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="but 8 devices are available"):
        par.make_mesh(par.MeshConfig(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="does not divide 8"):
        par.make_mesh(par.MeshConfig(data=-1, tensor=3))
    with pytest.raises(ValueError, match="at most one"):
        par.make_mesh(par.MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="positive int"):
        par.make_mesh(par.MeshConfig(data=0))
    with pytest.raises(ValueError, match="unknown MeshConfig keys"):
        par.MeshConfig.from_dict({"dp": 2})
    assert par.MeshConfig.from_dict({"tensor": "2"}) == par.MeshConfig(tensor=2)


def test_mesh_over_cpu_devices_warns_of_the_deadlocking_emitter_flag(monkeypatch, caplog):
    # XLA reads XLA_FLAGS once at start-up, so changing it here only exercises the check
    monkeypatch.setattr(par, "_warned_unsafe_cpu_flags", False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with caplog.at_level("WARNING", logger=par.logger.name):
        par.make_mesh(par.MeshConfig(data=-1))
    assert "fusion_emitters" not in caplog.text
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
    assert not par.warn_unsafe_cpu_flags(jax.devices()[:1])  # one device: no collectives
    with caplog.at_level("WARNING", logger=par.logger.name):
        par.make_mesh(par.MeshConfig(data=2, fsdp=2), devices=jax.devices()[:4])
        par.make_mesh(par.MeshConfig(data=-1))
    assert caplog.text.count("--xla_cpu_use_fusion_emitters=false and this mesh spans 4 CPU") == 1
    assert "spans 8" not in caplog.text  # once per process
    assert "docs/reliability.md" in caplog.text


def test_with_logical_constraint_and_batch_helpers():
    mesh = par.make_mesh(par.MeshConfig(data=2, fsdp=2, tensor=2))

    @jax.jit
    def f(x):
        y = par.with_logical_constraint(x * 2.0, ("batch", "length", "embed"), par.DEFAULT_RULES, mesh)
        return y + 1.0

    x = jnp.ones((8, 3, 4))
    y = f(x)
    np.testing.assert_allclose(np.asarray(y), 3.0)
    # the constraint is visible in the compiled program
    hlo = f.lower(x).compile().as_text()
    assert "sharding" in hlo
    assert par.with_logical_constraint(x, ("batch",), mesh=None) is x

    assert par.replicated(mesh).spec == P()
    assert par.process_batch_slice(mesh, 8) == slice(0, 8)
    local = {"t": np.arange(16).reshape(8, 2)}
    g = par.global_batch_from_local(local, mesh)
    assert g["t"].shape == (8, 2)
    assert g["t"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g["t"]), local["t"])
    assert {s.data.shape for s in g["t"].addressable_shards} == {(2, 2)}
    assert par.is_main_process()


def test_initialize_distributed_single_process_and_errors(monkeypatch):
    for k in (
        par.ENV_COORDINATOR, par.ENV_NUM_PROCESSES, par.ENV_PROCESS_ID, par.ENV_LOCAL_DEVICE_IDS,
        par.ENV_DISTRIBUTED,
        "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(k, raising=False)
    assert par.initialize_distributed() is False
    assert par.initialize_distributed(num_processes=1, process_id=0) is False
    with pytest.raises(ValueError, match="needs all of"):
        par.initialize_distributed(coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match="not in"):
        par.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        par.initialize_distributed("localhost", 2, 0)
    monkeypatch.setenv(par.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="GFN_JAX_NUM_PROCESSES"):
        par.initialize_distributed()
    monkeypatch.delenv(par.ENV_NUM_PROCESSES)
    monkeypatch.setenv(par.ENV_DISTRIBUTED, "off")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert par.initialize_distributed() is False  # detection disabled
    monkeypatch.setenv(par.ENV_DISTRIBUTED, "maybe")
    with pytest.raises(ValueError, match="GFN_JAX_DISTRIBUTED"):
        par.initialize_distributed()


def test_cluster_detection(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert par._cluster_detected() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert par._cluster_detected() is None  # a one-task SLURM job is single-process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert par._cluster_detected() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
    assert par._cluster_detected() == "tpu"


def test_lora_adapter_shardings():
    """LoRA's own axis names (``lora``, ``heads_x_head_dim``...) are replicated; embed -> fsdp."""
    from gfn_jax.models import lora as lora_lib
    from gfn_jax.models import param_shapes

    lcfg = lora_lib.LoraConfig(rank=4)
    adapters = lora_lib.init_lora(CFG, param_shapes(CFG), lcfg, jax.random.PRNGKey(1))
    mesh = par.make_mesh(par.MeshConfig(data=2, fsdp=2, tensor=2))
    sh = par.tree_shardings(lora_lib.lora_axes(CFG, lcfg), adapters, mesh)
    assert sh["scale"].spec == P()
    q = sh["tree"]["layers"]["attn"]["q"]["kernel"]
    assert q["a"].spec == P(None, "fsdp", None)  # (layers, embed, lora)
    assert q["b"].spec == P(None, None, None)  # (layers, lora, heads_x_head_dim)
    down = sh["tree"]["layers"]["mlp"]["down"]["kernel"]
    assert down["a"].spec == P(None, "tensor", None)  # (layers, mlp, lora)
    assert down["b"].spec == P(None, None, "fsdp")  # (layers, lora, embed)
    placed = par.shard_params(adapters, sh)
    assert {s.data.shape for s in placed["tree"]["layers"]["attn"]["q"]["kernel"]["a"].addressable_shards} == {
        (CFG.n_layers, CFG.d_model // 2, 4)
    }


def test_split_rows_places_host_rows_over_the_batch_axes():
    """A pass outside the train step (evaluation scoring) over weights replicated on a mesh:
    its host rows split over data x fsdp (padded with copies of the first rows), so each
    device computes its rows only; to_host(...)[:n] gives every row back."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = par.make_mesh(par.MeshConfig(data=4, fsdp=2, tensor=1))
    w = jax.device_put(jnp.arange(15.0).reshape(3, 5), par.replicated(mesh))
    x = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)
    n = np.arange(13, dtype=np.int32)
    xs, ns = par.split_rows({"w": w}, x, n)
    assert xs.shape == (16, 3) and ns.shape == (16,)
    assert xs.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(xs)[13:], x[:3])  # padding: the first rows
    out = jax.jit(lambda w, x, n: (x @ w).sum(-1) + n)(w, xs, ns)
    assert {s.data.shape for s in out.addressable_shards} == {(2,)}  # 2 rows per device
    np.testing.assert_allclose(par.to_host(out)[:13], (x @ np.asarray(w)).sum(-1) + n)
    # weights on no mesh, or batch axes of one device: the arrays as they are
    (a,) = par.split_rows({"w": jnp.ones(2)}, x)
    assert a.shape == (13, 3)
    tp = par.make_mesh(par.MeshConfig(data=1, fsdp=1, tensor=8))
    (a,) = par.split_rows(jax.device_put(jnp.ones(2), par.replicated(tp)), x)
    assert a.shape == (13, 3)
    with pytest.raises(ValueError, match="different row counts"):
        par.split_rows({"w": w}, x, n[:5])
