"""Collective traffic read from compiled programs (``gfn_jax.comms``), against the ring
algorithm's closed forms: on the 8 virtual CPU devices, and on a two-slice TPU target
compiled by the TPU compiler (host transfers over the data-center network)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gfn_jax import comms, parallel, targets

S = jax.ShapeDtypeStruct
F32 = 4
needs_libtpu = pytest.mark.skipif(not targets._has_libtpu(),
                                  reason='needs the TPU compiler: pip install "gfn-jax[tpu]"')


def _traffic(fn, mesh, in_spec, out_spec, n, **kw):
    f = jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False)
    return comms.collective_traffic(jax.jit(f).lower(S((n,), jnp.float32)).compile(), **kw)


@pytest.fixture(scope="module")
def cpu_mesh():
    return parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1), jax.devices()[:8])


BLOCK = 1024  # floats per device


def test_each_collective_kind_against_the_ring_closed_form(cpu_mesh):
    m, b = cpu_mesh, BLOCK * F32
    rows = P(("data", "fsdp"))
    t = _traffic(lambda x: jax.lax.psum(x, ("data", "fsdp")), m, rows, rows, 8 * BLOCK)
    assert t.device_bytes == {"all-reduce": 2 * b * 7 / 8} and t.counts == {"all-reduce": 1}
    t = _traffic(lambda x: jax.lax.psum(x, "data"), m, rows, rows, 8 * BLOCK)
    assert t.device_bytes == {"all-reduce": 2 * b * 1 / 2}
    t = _traffic(lambda x: jax.lax.all_gather(x, "fsdp", tiled=True), m, P("fsdp"), P(None),
                 4 * BLOCK)
    assert t.device_bytes == {"all-gather": 3 * b}  # receives the 3 other blocks
    t = _traffic(lambda x: jax.lax.psum_scatter(x, "fsdp", tiled=True), m, P(None),
                 P("fsdp"), 4 * BLOCK)
    assert t.device_bytes == {"reduce-scatter": 3 * b}
    t = _traffic(lambda x: jax.lax.ppermute(x, "fsdp", [(i, (i + 1) % 4) for i in range(4)]),
                 m, P("fsdp"), P("fsdp"), 4 * BLOCK)
    assert t.device_bytes == {"collective-permute": b}
    t = _traffic(lambda x: jax.lax.all_to_all(x, "fsdp", 0, 0, tiled=True), m, P("fsdp"),
                 P("fsdp"), 4 * 4 * BLOCK)
    assert t.device_bytes == {"all-to-all": 4 * b * 3 / 4}
    assert t.dcn_bytes == {} and t.ungrouped == 0


def test_loops_count_per_trip_and_unknown_trip_counts_apart(cpu_mesh):
    m, b = cpu_mesh, BLOCK * F32
    rows = P(("data", "fsdp"))

    def scan3(x):
        return jax.lax.scan(lambda c, _: (jax.lax.psum(c, "data") * 0.5, None), x, None,
                            length=3)[0]

    t = _traffic(scan3, m, rows, rows, 8 * BLOCK)
    assert t.device_bytes == {"all-reduce": 3 * b} and t.counts == {"all-reduce": 3}
    assert t.per_iteration_bytes == 0

    def until(x):  # a loop XLA cannot count: its traffic is per iteration, not in the call's
        return jax.lax.while_loop(lambda c: c[0].sum() < 100.0,
                                  lambda c: (jax.lax.psum(c[0], "data"),), (x,))[0]

    t = _traffic(until, m, rows, rows, 8 * BLOCK)
    assert t.total_device_bytes == 0
    assert t.per_iteration_device_bytes == {"all-reduce": b}
    assert "plus per loop iteration: 4.0 KiB" in t.summary()

    def branch(x):  # a conditional counts its heavier branch
        return jax.lax.cond(x[0] > 0, lambda y: jax.lax.psum(y, ("data", "fsdp")),
                            lambda y: jax.lax.psum(y[:BLOCK // 2], "data").sum() + y, x)

    t = _traffic(branch, m, rows, rows, 8 * BLOCK)
    assert t.device_bytes == {"all-reduce": 2 * b * 7 / 8}


@pytest.mark.parametrize("attrs, n", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
    ("replica_groups=[2,4]<=[8], use_global_device_ids=true", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 2),
    ("replica_groups={}, to_apply=%add", 8),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
     "{'axis_0'}, dimensions={0}", 4),
    ("replica_groups=mesh['a'=4,'b'=2] {'a','b'}, to_apply=%add", 8),
    ("channel_id=3, to_apply=%add", None),
])
def test_device_groups_in_each_printed_form(attrs, n):
    assert comms._group_size(attrs, 8) == n


PEELED = """HloModule peeled

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]{0}) parameter(0)
  %n = s32[]{:T(128)} constant(28)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], f32[256])) -> (s32[], f32[256]) {
  %q = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%q), index=0
  %x = f32[256]{0} get-tuple-element(%q), index=1
  %r = f32[256]{0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %one = s32[] constant(1)
  %c = s32[] copy(%i)
  %j = s32[] add(%c, %one)
  ROOT %t = (s32[], f32[256]{0}) tuple(%j, %r)
}

ENTRY %main (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %r0 = f32[256]{0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
  %k = s32[] constant(START)
  %k1 = s32[] copy(%k)
  %init = (s32[], f32[256]{0}) tuple(%k1, %r0)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[256]{0} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start, trips", [(0, 28), (1, 27), (30, 0)])
def test_trip_count_read_from_a_loop_without_the_annotation(start, trips):
    """The TPU compiler drops ``known_trip_count`` and may peel a loop's first trip out of
    it (the counter then starts at 1): the trips are read from the counter's start, the
    condition's bound and the body's step. Each all-reduce of 1 KiB over groups of 4 sends
    2 x 1024 x 3/4 bytes; the peeled one outside the loop counts once."""
    t = comms.traffic_of_hlo(PEELED.replace("START", str(start)), 8)
    assert t.device_bytes == {"all-reduce": 1536.0 * (1 + trips)}
    assert t.counts == {"all-reduce": 1 + trips} and t.per_iteration_bytes == 0
    # a condition with more than the bound (the sampler's "and not every row done"): the
    # loop's traffic is per iteration, up to the bound
    t = comms.traffic_of_hlo(PEELED.replace("START", str(start)).replace(
        "ROOT %lt = pred[] compare(%i, %n), direction=LT",
        "%lt = pred[] compare(%i, %n), direction=LT\n  %f = pred[] constant(true)\n"
        "  ROOT %and = pred[] and(%lt, %f)"), 8)
    assert t.device_bytes == {"all-reduce": 1536.0}
    assert t.per_iteration_device_bytes == {"all-reduce": 1536.0} and t.max_iterations == 28


def test_hlo_without_entry_is_an_error():
    with pytest.raises(ValueError, match="no ENTRY"):
        comms.traffic_of_hlo("HloModule m\n", 2)


# --------------------------------------------------------------------------- with libtpu
@pytest.fixture(scope="module")
def two_slices():
    devs = targets.parse_target("2xv5p-16").devices()
    return parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=8, tensor=1), devs)


@needs_libtpu
def test_multislice_collectives_cross_the_dcn_only_along_data(two_slices):
    """On two v5p-16 slices with data=2 (the slices) x fsdp=8 (inside each): a psum over
    ``data`` is one host transfer of the device's block over the DCN and nothing inside a
    slice; over ``fsdp`` it stays inside; over both it is both."""
    m, b = two_slices, BLOCK * F32
    rows = P(("data", "fsdp"))
    t = _traffic(lambda x: jax.lax.psum(x, "data"), m, rows, rows, 16 * BLOCK)
    assert t.device_bytes == {} and t.dcn_bytes == {"all-reduce": b}
    t = _traffic(lambda x: jax.lax.psum(x, "fsdp"), m, rows, rows, 16 * BLOCK)
    assert t.device_bytes == {"all-reduce": 2 * b * 7 / 8} and t.dcn_bytes == {}
    t = _traffic(lambda x: jax.lax.psum(x, ("data", "fsdp")), m, rows, rows, 16 * BLOCK)
    assert t.dcn_bytes == {"all-reduce": b} and t.total_device_bytes > 0

    def scan3(x):  # the TPU compiler drops known_trip_count: read from the loop's bound
        return jax.lax.scan(lambda c, _: (jax.lax.psum(c, "data") * 0.5, None), x, None,
                            length=3)[0]

    t = _traffic(scan3, m, rows, rows, 16 * BLOCK)
    assert t.dcn_bytes == {"all-reduce": 3 * b} and t.per_iteration_bytes == 0


@needs_libtpu
def test_multislice_gradient_all_reduce_sends_one_shard_over_the_dcn(two_slices):
    """Data parallelism across slices: the gradient of an fsdp-sharded weight is reduced
    inside each slice, then one fsdp shard per device crosses the DCN."""
    m = two_slices

    def grad(w, x):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

    w = S((512, 1024), jnp.float32, sharding=NamedSharding(m, P("fsdp", None)))
    x = S((64, 512), jnp.float32, sharding=NamedSharding(m, P(("data", "fsdp"), None)))
    c = jax.jit(grad, out_shardings=NamedSharding(m, P("fsdp", None))).lower(w, x).compile()
    t = comms.collective_traffic(c)
    assert t.dcn_bytes == {"all-reduce": 512 * 1024 * F32 / 8}
    assert "256.0 KiB between slices over the DCN" in t.summary("a step")
