"""Compile-only TPU targets: parsing slice names against Cloud TPU's documented slice shapes,
the TPU compiler's devices on this CPU host (libtpu, no TPU), plans compiled for them, and
``gfn-jax plan --target``."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from gfn_jax import memory, parallel, targets
from gfn_jax.models import ModelConfig
from gfn_jax.models.transformer import default_feature_major, for_backend, target_backend
from gfn_jax.targets import TargetError, parse_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


@pytest.mark.parametrize("spec, gen, shape, chips, hosts, hbm_gib", [
    # v4 / v5p names count TensorCores (2 per chip), 4 chips per host
    ("v4-8", "v4", (2, 2, 1), 4, 1, 32),
    ("v4-32", "v4", (2, 2, 4), 16, 4, 32),
    ("v5p-8", "v5p", (2, 2, 1), 4, 1, 95),
    ("tpu:v5p-128", "v5p", (4, 4, 4), 64, 16, 95),
    # v5e / v6e names count chips; up to 8 chips on one host, then 4 per host
    ("v5litepod-8", "v5e", (2, 4), 8, 1, 16),
    ("V5E-16", "v5e", (4, 4), 16, 4, 16),
    ("v6e-256", "v6e", (16, 16), 256, 64, 32),
    ("v6e-1", "v6e", (1, 1), 1, 1, 32),
    # explicit topologies
    ("v5p:4x4x2", "v5p", (4, 4, 2), 32, 8, 95),
    ("tpu:v6e:2x4", "v6e", (2, 4), 8, 1, 32),
])
def test_parse_target_matches_cloud_tpu_slices(spec, gen, shape, chips, hosts, hbm_gib):
    t = parse_target(spec)
    assert (t.generation, t.shape, t.chips, t.hosts) == (gen, shape, chips, hosts)
    assert t.hbm_bytes == hbm_gib * GiB
    assert t.topology_name == f"{gen}:{'x'.join(map(str, shape))}"
    if ":" not in spec.lower().removeprefix("tpu:"):  # a standard slice: its name round-trips
        assert t.accelerator_type.lower() == spec.lower().removeprefix("tpu:").replace(
            "v5e-", "v5litepod-")
        assert parse_target(t.accelerator_type) == dataclasses.replace(
            t, name=t.accelerator_type)


@pytest.mark.parametrize("spec, slices, chips, hosts, accel, topology", [
    ("2xv5p-16", 2, 16, 4, "v5p-16", "v5p:2x2x2"),
    ("tpu:4 x v6e-16", 4, 64, 16, "v6e-16", "v6e:4x4"),
    ("2*v5litepod-8", 2, 16, 2, "v5litepod-8", "v5e:2x4"),  # a single-host slice each
    ("3xv4:2x2x4", 3, 48, 12, "v4-32", "v4:2x2x4"),
    ("1xv5p-8", 1, 4, 1, "v5p-8", "v5p:2x2x1"),
])
def test_parse_multislice_targets(spec, slices, chips, hosts, accel, topology):
    """``N x SLICE``: N slices joined by the data-center network; every slice is SLICE (what
    a Multislice queued resource's --accelerator-type names)."""
    t = parse_target(spec)
    assert (t.slices, t.chips, t.hosts, t.accelerator_type, t.topology_name) == (
        slices, chips, hosts, accel, topology)
    assert t.chips == slices * t.chips_per_slice
    assert ("data-center network" in t.describe()) == (slices > 1)


@pytest.mark.parametrize("spec, says", [
    ("0xv5p-16", "number of slices must be at least 1"),
    ("2xv5p-12", "not a standard v5p slice"),
    ("v5p-12", "not a standard v5p slice"),  # 6 chips
    ("v5p-7", "not a standard v5p slice"),  # odd core count
    ("v7x-8", "unknown TPU generation 'v7x'"),
    ("v5e:2x2x2", "a v5e topology has 2 dimensions"),
    ("h100", "expected an accelerator type"),
    ("", "expected an accelerator type"),
])
def test_parse_target_rejects_bad_names_saying_what_is_accepted(spec, says):
    with pytest.raises(TargetError, match=says):
        parse_target(spec)


def test_missing_tpu_compiler_names_the_install(monkeypatch):
    from jax.experimental import topologies

    def no_libtpu(**kwargs):
        raise RuntimeError("Unable to find libtpu")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    monkeypatch.setattr(targets, "_has_libtpu", lambda: False)
    with pytest.raises(TargetError, match=r'pip install "gfn-jax\[tpu\]"'):
        parse_target("v5e-4").devices()


def test_for_backend_sets_the_platform_programs_are_traced_for(monkeypatch):
    monkeypatch.delenv("GFN_JAX_DECODE_FEATURE_MAJOR", raising=False)
    assert target_backend() == jax.default_backend() == "cpu"
    assert default_feature_major(16)  # feature-major decode: a CPU backend's choice
    with for_backend("tpu"):
        assert target_backend() == "tpu" and not default_feature_major(16)
        with for_backend(None):  # None keeps the enclosing platform
            assert target_backend() == "tpu"
    assert target_backend() == "cpu" and default_feature_major(16)


# --------------------------------------------------------------------------- with libtpu
needs_libtpu = pytest.mark.skipif(not targets._has_libtpu(),
                                  reason='needs the TPU compiler: pip install "gfn-jax[tpu]"')


@needs_libtpu
@pytest.mark.parametrize("spec, n, kind, processes", [
    ("v4-8", 4, "TPU v4", 1),  # megacore: one device per chip
    ("v5p-16", 8, "TPU v5", 2),
    ("v5litepod-8", 8, "TPU v5 lite", 1),
    ("v6e-16", 16, "TPU v6 lite", 4),
])
def test_compile_only_devices_of_a_slice(spec, n, kind, processes):
    devs = parse_target(spec).devices()
    assert len(devs) == n and {d.device_kind for d in devs} == {kind}
    assert len({d.process_index for d in devs}) == processes
    assert {d.platform for d in devs} == {"tpu"}
    # they report no memory: the chip's HBM is the limit plans are checked against
    assert memory.device_memory_bytes(devs[0]) == parse_target(spec).hbm_bytes


# bf16, 1.09 GB of layer weights (4 x 272 MB): far larger than a TPU core's on-chip memory,
# where the TPU compiler keeps small temporaries (its figures count device memory, HBM)
BF16 = ModelConfig(family="llama", vocab_size=512, d_model=4096, n_layers=4, n_heads=32,
                   n_kv_heads=2, d_ff=8192, max_seq_len=256, tie_embeddings=False,
                   dtype="bfloat16", param_dtype="bfloat16")


@needs_libtpu
def test_sampler_planned_by_the_tpu_compiler_keeps_bfloat16():
    """The TPU compiler's plan of a bf16 sampler: its arguments are the bf16 weights (plus
    tile padding); the unrolled decode loop holds one copy of the layer weights plus the
    KV cache, scanned layers none. The CPU backend, which widens bf16 matmuls to float32,
    plans the same program at about 3x the layer weights."""
    mesh = parallel.make_mesh(parallel.MeshConfig(), parse_target("v5p-8").devices()[:1])
    weights = sum(int(x.size) * 2 for x in jax.tree_util.tree_leaves(
        memory._abstract_weights(BF16, mesh, parallel.DEFAULT_RULES, None)[0]))
    layers = memory.layer_weight_bytes(BF16, mesh)
    assert layers == 4 * (2 * 4096 * 4096 + 2 * 4096 * 256 + 3 * 4096 * 8192 + 2 * 4096) * 2
    rows, P, T = 16, 64, 64
    cache = BF16.n_layers * 2 * rows * (P + T) * BF16.n_kv_heads * BF16.head_dim * 2

    def plan(decode_layers, m):
        return memory.estimate_sampler_memory(
            BF16.replace(decode_layers=decode_layers), prompts=1, num_samples=rows,
            prompt_len=P, traj_len=T, mesh=m)

    unrolled, scanned = plan("unrolled", mesh), plan("scanned", mesh)
    assert unrolled.backend == scanned.backend == "tpu (TPU v5)"
    for e in (unrolled, scanned):
        assert weights <= e.argument_bytes <= weights + 2 ** 20
    assert layers <= unrolled.temp_bytes <= 1.1 * layers + 4 * cache
    assert scanned.temp_bytes <= 0.25 * layers
    cpu = plan("unrolled", parallel.make_mesh(parallel.MeshConfig(), jax.devices()[:1]))
    assert cpu.temp_bytes > 2.5 * layers > 2 * unrolled.temp_bytes


@needs_libtpu
def test_plan_command_for_a_tpu_slice(tmp_path, capsys):
    """``gfn-jax plan --target`` compiles a config's step and sampler for a slice's chips:
    the whole slice is the mesh, the chip's HBM the limit; ``mesh.devices`` picks chips of
    one host; a bad target or too many chips is a one-line error."""
    from gfn_jax import cli

    base = ["--config", os.path.join(ROOT, "configs/toy_exact.py"), "--config.eval.num_samples=64"]
    out_json = str(tmp_path / "plan.json")
    capsys.readouterr()
    assert cli.main(["gfn-jax", "plan", *base, "--target", "v5p-16", "--json", out_json]) == 0
    out = capsys.readouterr().out
    assert "target v5p-16: 8 x TPU v5 chip(s), topology v5p:2x2x2, 2 host(s)" in out
    assert "on 8 device(s), mesh data=8" in out and "compiled for tpu (TPU v5)" in out
    assert f"fits 90% of {95 * GiB / 1e9:.1f} GB" in out
    with open(out_json) as f:
        plan = json.load(f)
    assert plan["target"] == "v5p-16" and plan["step"]["num_devices"] == 8
    assert plan["sampler"]["backend"] == "tpu (TPU v5)"

    assert cli.main(["gfn-jax", "plan", *base, "--target", "v5e-4",
                     "--config.mesh.devices=2"]) == 0
    assert "on 2 device(s)" in capsys.readouterr().out
    assert cli.main(["gfn-jax", "plan", *base, "--target", "v5p-16",
                     "--config.mesh.devices=5"]) == 1
    assert "a host of v5p-16 has 4 chip(s)" in capsys.readouterr().err
    assert cli.main(["gfn-jax", "plan", *base, "--target", "v5p-12"]) == 1
    err = capsys.readouterr().err
    assert "not a standard v5p slice" in err and "Traceback" not in err
    # nothing ran on a TPU: this process's own devices are still the CPU's
    assert jax.default_backend() == "cpu"
    assert jnp.ones(2).devices() == {jax.devices()[0]}


@needs_libtpu
def test_multislice_devices_and_the_mesh_over_them(caplog):
    """Two v5p-16 slices: 16 compile-only devices, two ``slice_index`` values, 2 hosts per
    slice; the mesh puts the slices along ``data`` (so only data-parallel traffic crosses the
    DCN) and says so when ``data`` cannot hold them."""
    import numpy as np

    devs = parse_target("2xv5p-16").devices()
    assert len(devs) == 16 and sorted({d.slice_index for d in devs}) == [0, 1]
    assert len({d.process_index for d in devs}) == 4
    for data, fsdp in [(2, 8), (4, 4)]:
        m = parallel.make_mesh(parallel.MeshConfig(data=data, fsdp=fsdp, tensor=1), devs)
        slices = np.vectorize(lambda d: d.slice_index)(m.devices).reshape(data, -1)
        assert all(len(set(row)) == 1 for row in slices.tolist())  # one slice per data row
        assert sorted(set(slices[:, 0].tolist())) == [0, 1]
    with caplog.at_level("WARNING", logger="gfn_jax.parallel"):
        parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=16, tensor=1), devs)
    assert "not a multiple of the 2 TPU slices" in caplog.text


@needs_libtpu
def test_plan_command_for_two_slices_reports_the_dcn_traffic(tmp_path, capsys):
    """``gfn-jax plan --target 2xv5p-16``: the step's and the sampler's collectives per
    device, the data-parallel gradient reduction crossing the DCN between the slices."""
    from gfn_jax import cli

    out_json = str(tmp_path / "plan.json")
    capsys.readouterr()
    assert cli.main(["gfn-jax", "plan", "--config", os.path.join(ROOT, "configs/toy_exact.py"),
                     "--config.eval.num_samples=64", "--config.mesh.data=2",
                     "--config.mesh.fsdp=8", "--target", "2xv5p-16", "--json", out_json]) == 0
    out = capsys.readouterr().out
    assert "2 slices joined by the data-center network (DCN), each 8 x TPU v5" in out
    assert "on 16 device(s), mesh data=2 x fsdp=8" in out
    step_line = next(x for x in out.splitlines() if "in a train step" in x)
    assert "between slices over the DCN (all-reduce" in step_line
    assert "in a sampler call" in out and "per decode step" in out
    with open(out_json) as f:
        plan = json.load(f)
    step = plan["step"]["comms"]
    assert step["total_dcn_bytes"] > 0 and step["per_iteration_dcn_bytes"] == {}
    # the step's data-parallel reduction over the DCN moves at most the gradients' bytes per
    # device (LoRA off: every trained weight, sharded fsdp=8) plus the loss's scalars
    assert step["dcn_bytes"]["all-reduce"] <= plan["step"]["argument_bytes"]


@needs_libtpu
def test_two_processes_build_compile_only_devices_at_once():
    """libtpu locks /tmp/libtpu_lockfile for the process that drives a host's chips; a plan
    drives none, so two plans at once (two test workers, two users) both get their devices."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom gfn_jax.targets import parse_target\n"
            "print(len(parse_target('v5e-4').devices()), flush=True)\ntime.sleep(5)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "4", err[-2000:]


@needs_libtpu
def test_quiet_tpu_probe_on_a_host_without_a_tpu(tmp_path, monkeypatch):
    """With libtpu installed and no TPU chip, JAX's start-up probe makes libtpu print its
    TPU VM warnings; the CLI's ``quiet_tpu_probe`` (before JAX starts) silences them, and
    leaves a TPU host or an explicit ``JAX_PLATFORMS`` alone."""
    import subprocess
    import sys

    def start_jax(quiet: bool) -> str:
        code = ("from gfn_jax.targets import quiet_tpu_probe\n"
                + ("assert quiet_tpu_probe()\n" if quiet else "")
                + "import jax\nassert jax.default_backend() == 'cpu'\n")
        env = {k: v for k, v in os.environ.items()
               if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another process's lock must not hide it
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stderr

    assert "TPU_WORKER_HOSTNAMES" in start_jax(quiet=False)  # the noise, without it
    assert "TPU" not in start_jax(quiet=True)
    # an explicit platform choice, or a host with TPU device files: nothing is set
    for k in ("TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
              "TPU_WORKER_ID", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not targets.quiet_tpu_probe() and "TPU_WORKER_ID" not in os.environ
    monkeypatch.delenv("JAX_PLATFORMS")
    (tmp_path / "accel0").write_text("")
    monkeypatch.setattr(targets, "_TPU_DEVICE_FILES", (str(tmp_path / "accel*"),))
    assert not targets.quiet_tpu_probe() and "TPU_WORKER_ID" not in os.environ
