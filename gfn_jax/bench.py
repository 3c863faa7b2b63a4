"""``gfn-jax bench``: time the phases of one training step of a config, with FLOPs and MFU.

:func:`run_bench` builds exactly what ``gfn-jax train`` builds for a config (a
:class:`~gfn_jax.train.Trainer` in a temporary directory: task, model, adapters, mesh and
shardings, the jitted train step), then times each phase of one loop step: the sampler call
that draws the batch, the task's reward alone (adapters off), the objective's once-per-rollout
``prepare`` (PPO), and the jitted train step. For each: the first call (compilation) apart,
the median of the timed calls, tokens/s, FLOPs, achieved FLOP/s and MFU against a device peak
(:data:`DEVICE_PEAKS`, or measured on CPU).

FLOPs come from XLA's ``compiled.cost_analysis()`` when the compiled program has no loop:
XLA's analysis counts the body of every ``while`` loop once, whatever its trip count, and
every model program here has one (the scan over layers; the sampler's decode loop, whose trip
count depends on the samples), so those phases use the standard estimate
(:func:`forward_flops`: 2·N·tokens forward, 3x that for forward + backward, plus attention
and the vocabulary projection) on the shapes the program runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEVICE_PEAKS", "DEVICE_BANDWIDTH", "Peak", "FlopShape", "matmul_params",
           "forward_flops", "train_flops", "resolve_peak", "resolve_bandwidth",
           "measure_cpu_peak", "measure_cpu_bandwidth", "decode_floor_bytes", "run_bench",
           "format_report"]

# Dense (no sparsity) peak FLOP/s per chip, from the vendors' published figures:
# * NVIDIA H100 SXM5 and H200 SXM datasheets / Hopper whitepaper: BF16 tensor core 989.4
#   TFLOPS dense (the datasheets print 1,979 "with sparsity"), TF32 494.7 dense (989 with
#   sparsity), FP32 67 (non-tensor-core). The H200 has the H100 SXM's compute.
# * NVIDIA A100 datasheet (SXM and PCIe): BF16 312, TF32 156 (dense), FP32 19.5.
# * Google Cloud TPU documentation, peak bf16 compute per chip: v4 275, v5e 197, v5p 459,
#   v6e (Trillium) 918 TFLOPS. No float32 figure is published (float32 matmuls at the default
#   precision run as bf16 passes on the MXU), so float32 configs use the bf16 peak there.
DEVICE_PEAKS: Dict[str, Dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "TPU v4": {"bf16": 275e12},
    "TPU v5e": {"bf16": 197e12},
    "TPU v5p": {"bf16": 459e12},
    "TPU v6e": {"bf16": 918e12},
}

# Memory bandwidth per chip (bytes/s), vendors' published figures: H100 SXM5 3.35 TB/s, H200
# 4.8 TB/s (HBM3e), A100 80 GB SXM 2.039 TB/s (the 40 GB part: 1.555), TPU v4 1,200 GB/s, v5e
# 819 GB/s, v5p 2,765 GB/s, v6e 1,640 GB/s. A decode step must read every weight (and the KV
# cache) once: bytes / bandwidth is its floor (the roofline of a memory-bound step).
DEVICE_BANDWIDTH: Dict[str, float] = {
    "H100 SXM": 3.35e12, "H200": 4.8e12, "A100": 2.039e12, "TPU v4": 1.2e12,
    "TPU v5e": 0.819e12, "TPU v5p": 2.765e12, "TPU v6e": 1.64e12,
}

_ALIASES = {"h100": "H100 SXM", "h100sxm": "H100 SXM", "h100sxm5": "H100 SXM", "h200": "H200",
            "a100": "A100", "v4": "TPU v4", "tpuv4": "TPU v4", "v5e": "TPU v5e",
            "tpuv5e": "TPU v5e", "v5lite": "TPU v5e", "tpuv5lite": "TPU v5e", "v5p": "TPU v5p",
            "tpuv5p": "TPU v5p", "v6e": "TPU v6e", "tpuv6e": "TPU v6e", "v6lite": "TPU v6e",
            "tpuv6lite": "TPU v6e"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


# ---------------------------------------------------------------------------- device peak
@dataclasses.dataclass
class Peak:
    """The peak FLOP/s of one device (None: unknown) and where it comes from."""

    flops_per_s: Optional[float]
    name: str
    source: str


def measure_cpu_peak(n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of the fastest of ``reps`` jitted ``n`` x ``n`` float32 matmuls (after one
    untimed call): the "CPU measured" peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measure_cpu_bandwidth(mbytes: int = 512, reps: int = 3) -> float:
    """Read bandwidth (bytes/s) of the fastest of ``reps`` jitted sums over a ``mbytes`` MB
    float32 array (after one untimed call): the "CPU measured" bandwidth."""
    n = int(mbytes) * 2 ** 20 // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4.0 * n / best


def resolve_bandwidth(spec: Optional[str], device: Any,
                      measure: Callable[[], float] = measure_cpu_bandwidth) -> Peak:
    """The memory bandwidth (bytes/s, in :class:`Peak`'s number) of ``device``: ``spec`` is
    ``--device-bandwidth`` (a name of :data:`DEVICE_BANDWIDTH`, ``cpu`` to measure, or a
    number of bytes/s), else detected from ``device.device_kind`` (CPU: measured). Raises
    ValueError for an unknown name."""
    return _resolve_device_figure(
        spec, device, flag="--device-bandwidth", unit="bytes/s", example="3.35e12",
        names=DEVICE_BANDWIDTH, measure=measure,
        cpu_source="CPU measured: fastest 512 MB float32 sum",
        from_table=lambda name: Peak(DEVICE_BANDWIDTH[name], name,
                                     f"{name} memory bandwidth (vendor figure)"),
        unknown="unknown device: pass --device-bandwidth for the decode roofline")


def decode_floor_bytes(cfg: Any, weight_bytes: float, prompts: int, prompt_len: int,
                       rows: int, steps: int, kv_itemsize: int) -> Dict[str, float]:
    """Bytes one decode step must read at least, averaged over ``steps`` steps of ``rows``
    rows: every weight once (``weight_bytes``: what the step multiplies by, adapters
    included) and the keys and values attended to -- each prompt's ``prompt_len`` positions
    once per prompt (its samples share them) and each row's own tokens so far."""
    per_pos = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * int(kv_itemsize)
    mean_own = (steps + 1) / 2.0  # the row's tokens read at step t: t + 1, averaged
    kv = per_pos * (prompts * prompt_len + rows * mean_own)
    return {"weights": float(weight_bytes), "kv": float(kv), "total": float(weight_bytes + kv)}


def _precision_key(dtype: str) -> str:
    """Which peak column a compute dtype runs at: bf16 (also float16), else float32 matmuls
    at JAX's default precision (TF32 on NVIDIA tensor cores) or full fp32 when the default
    matmul precision is set to highest / float32."""
    if dtype in ("bfloat16", "float16"):
        return "bf16"
    prec = str(jax.config.jax_default_matmul_precision or "").lower()
    return "fp32" if prec in ("highest", "float32") else "tf32"


def _detect(kind: str) -> Optional[str]:
    """The :data:`DEVICE_PEAKS` entry of a ``device_kind`` string, if known."""
    k = kind.lower()
    if "h200" in k:
        return "H200"
    if "h100" in k and "pcie" not in k and "nvl" not in k:
        return "H100 SXM"
    if "a100" in k:
        return "A100"
    m = re.search(r"tpu\s*v(\d)\s*(lite|e|p)?", k)
    if m:
        gen, var = m.group(1), m.group(2) or ""
        name = {("4", ""): "TPU v4", ("5", "lite"): "TPU v5e", ("5", "e"): "TPU v5e",
                ("5", ""): "TPU v5p", ("5", "p"): "TPU v5p", ("6", "lite"): "TPU v6e",
                ("6", "e"): "TPU v6e"}.get((gen, var))
        return name
    return None


def _table_peak(name: str, dtype: str) -> Peak:
    row = DEVICE_PEAKS[name]
    key = _precision_key(dtype)
    if key not in row:
        return Peak(row["bf16"], name, f"{name} bf16 (vendor peak; no published {dtype} "
                                       f"figure)")
    return Peak(row[key], name, f"{name} {key} (vendor peak, dense)")


def _resolve_device_figure(spec: Optional[str], device: Any, *, flag: str, unit: str,
                           example: str, names: Any, measure: Callable[[], float],
                           cpu_source: str, from_table: Callable[[str], Peak],
                           unknown: str) -> Peak:
    """A per-device figure (peak FLOP/s, memory bandwidth) from ``flag``'s value ``spec`` (a
    number of ``unit``, ``cpu`` to measure, or a name of ``names`` / an alias), else detected
    from ``device.device_kind`` (CPU: measured). ValueError for a bad number or an unknown
    name."""
    if spec is not None and str(spec).strip():
        s = str(spec).strip()
        try:
            value = float(s)
        except ValueError:
            value = None
        if value is not None:
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{flag} must be > 0 {unit}, got {s}")
            return Peak(value, "given", f"{flag} {s} {unit}")
        if _norm(s) == "cpu":
            return Peak(measure(), "CPU measured", cpu_source)
        name = {_norm(k): k for k in names}.get(_norm(s)) or _ALIASES.get(_norm(s))
        if name is None:
            raise ValueError(f"unknown {flag} {s!r}: give a number of {unit} (e.g. "
                             f"{example}) or one of {', '.join(names)}, cpu")
        return from_table(name)
    if device.platform == "cpu":
        return Peak(measure(), "CPU measured", cpu_source)
    name = _detect(str(device.device_kind))
    if name is None:
        return Peak(None, str(device.device_kind), unknown)
    return from_table(name)


def resolve_peak(spec: Optional[str], device: Any, dtype: str,
                 measure: Callable[[], float] = measure_cpu_peak) -> Peak:
    """The peak of ``device`` for compute ``dtype``: ``spec`` is ``--device-peak`` (a name of
    :data:`DEVICE_PEAKS`, ``cpu`` to measure, or a number of FLOP/s), else it is detected from
    ``device.device_kind`` (CPU: measured). Raises ValueError for an unknown name."""
    return _resolve_device_figure(
        spec, device, flag="--device-peak", unit="FLOP/s", example="989e12",
        names=DEVICE_PEAKS, measure=measure,
        cpu_source="CPU measured: fastest 2048x2048 float32 matmul",
        from_table=lambda name: _table_peak(name, dtype),
        unknown="unknown device: pass --device-peak for MFU")


# ---------------------------------------------------------------------------- FLOP estimate
@dataclasses.dataclass(frozen=True)
class FlopShape:
    """What one forward computes: ``tokens`` through the layers, (query, key) ``pairs`` of
    attention per layer (summed over rows, as computed: masked pairs included) and ``logits``
    positions projected to the vocabulary."""

    tokens: float
    pairs: float
    logits: float

    def __add__(self, other: "FlopShape") -> "FlopShape":
        return FlopShape(self.tokens + other.tokens, self.pairs + other.pairs,
                         self.logits + other.logits)


def matmul_params(cfg: Any) -> int:
    """Weights of the block matmuls (q, k, v, o, MLP) of all layers; embeddings, norms and
    biases excluded, the vocabulary projection counted apart (per logit position)."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
    mlp = (3 if cfg.family == "llama" else 2) * D * F
    return int(cfg.n_layers * (attn + mlp))


def forward_flops(cfg: Any, shape: FlopShape, lora_params: int = 0) -> float:
    """Standard forward FLOP estimate: ``2·(N + N_lora)·tokens`` for the block matmuls
    (:func:`matmul_params`; LoRA adapters as extra ``r·(n_in + n_out)`` weights each),
    ``4·L·H·Dh`` per attention pair (scores and weighted values) and ``2·D·V`` per logit."""
    lin = 2.0 * (matmul_params(cfg) + lora_params) * shape.tokens
    attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * shape.pairs
    head = 2.0 * cfg.d_model * cfg.vocab_size * shape.logits
    return lin + attn + head


def train_flops(cfg: Any, shape: FlopShape, lora_params: int = 0,
                frozen_base: bool = False) -> float:
    """Forward + backward: 3x :func:`forward_flops` (the standard 6·N·tokens: forward, the
    gradient of the activations, the gradient of the weights). With ``frozen_base`` (LoRA)
    the base weights get no gradient: 2x their forward, and 3x the adapters'."""
    if not frozen_base:
        return 3.0 * forward_flops(cfg, shape, lora_params)
    return 2.0 * forward_flops(cfg, shape) + 3.0 * 2.0 * lora_params * shape.tokens


def scoring_shape(rows: int, prompt_len: int, traj_len: int, groups: int) -> FlopShape:
    """A scorer's forward over ``[X | Z]`` (``rows`` x (P + T)); with ``groups`` > 0 shared
    prompts, each prompt runs once and the continuations attend to its keys/values."""
    B, P, T = rows, prompt_len, traj_len
    if groups:
        return FlopShape(groups * P + B * T, groups * P * P + B * T * (P + T), B * (T + 1))
    return FlopShape(B * (P + T), B * (P + T) ** 2, B * (T + 1))


def sampling_shape(prompts: int, prompt_len: int, traj_len: int, rows: int,
                   steps: int) -> FlopShape:
    """The sampler: a prefill of ``prompts`` prompts into a cache of P + T slots, then
    ``steps`` decode steps of ``rows`` tokens, each attending to the whole cache."""
    S = prompt_len + traj_len
    return FlopShape(prompts * prompt_len + rows * steps,
                     prompts * prompt_len * S + rows * steps * S, prompts + rows * steps)


def _lora_layer_params(tree: Any) -> int:
    """Adapter weights applied per token (those of the layer kernels; top-level adapters
    are merged into their weights)."""
    layers = tree.get("layers") if isinstance(tree, dict) else None
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(layers or {})))


def xla_flops(compiled: Any) -> Tuple[Optional[float], bool]:
    """(XLA's per-device ``flops`` of a compiled program or None, whether the program has a
    ``while`` loop, whose body XLA's cost analysis counts once)."""
    flops = None
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else None
        if ca and ca.get("flops", -1.0) >= 0:
            flops = float(ca["flops"])
    except Exception:  # noqa: BLE001 - some backends do not implement it
        flops = None
    try:
        has_loop = re.search(r"\bwhile\(", compiled.as_text() or "") is not None
    except Exception:  # noqa: BLE001
        has_loop = True
    return flops, has_loop


# ---------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Phase:
    """One timed phase and its figures."""

    name: str
    first_s: Optional[float]
    times_s: List[float]
    tokens: int
    flops: float
    flop_source: str
    xla_flops: Optional[float] = None
    note: str = ""
    profile: Optional[Dict[str, Any]] = None  # gfn_jax.profiling.summarize of a traced call

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.times_s))


def _time(fn: Callable[[], Any], warmup: int, steps: int) -> Tuple[float, List[float]]:
    """(first call, timed calls) in seconds: the first call (it compiles), ``warmup - 1``
    more untimed calls, then ``steps`` timed calls, each waited for."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def _trace(fn: Callable[[], Any], trace_dir: Optional[str], name: str) -> Optional[Dict[str, Any]]:
    """With ``trace_dir``: one more call of ``fn`` under ``jax.profiler.trace`` (into
    ``trace_dir/<name>``) and its kernel summary (:func:`gfn_jax.profiling.summarize`)."""
    if not trace_dir:
        return None
    from gfn_jax import profiling

    d = os.path.join(trace_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    profiling.start_trace(d)  # without the Python tracer, which would inflate the wall time
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        wall = time.perf_counter() - t0
    finally:
        jax.profiler.stop_trace()
    out = profiling.summarize(profiling.kernel_spans(d), wall)
    out["trace_dir"] = d
    return out


class _Lazy:
    """A jitted function compiled ahead of time on its first call (so that its compiled
    program's cost and memory analyses are at hand), then called compiled."""

    def __init__(self, jitted: Any) -> None:
        self.jitted = jitted
        self.compiled: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
        return self.compiled(*args)


def _flops_choice(compiled: Any, n_dev: int, analytic: float, what: str
                  ) -> Tuple[float, str, Optional[float]]:
    """(FLOPs, their source, XLA's raw figure x devices) of one phase."""
    per_dev, has_loop = xla_flops(compiled)
    xla = None if per_dev is None else per_dev * n_dev
    if xla is not None and not has_loop:
        return xla, "xla", xla
    why = ("XLA has no cost analysis here" if xla is None else
           "XLA's cost analysis counts a while loop's body once; this program has one")
    return analytic, f"analytic ({what}; {why})", xla


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the bench
def run_bench(config: Any, *, steps: int = 5, warmup: int = 1, device_peak: Optional[str] = None,
              progress: bool = True, config_name: str = "", command: str = "",
              measure: Callable[[], float] = measure_cpu_peak,
              device_bandwidth: Optional[str] = None,
              measure_bw: Callable[[], float] = measure_cpu_bandwidth,
              trace_dir: Optional[str] = None) -> Dict[str, Any]:
    """Build the config's trainer and time its phases; returns every figure as a JSON-able
    dict (see :func:`format_report`). With ``trace_dir``, each phase is called once more
    under ``jax.profiler.trace`` (a Perfetto trace in ``trace_dir/<phase>``) and its kernel
    summary (:mod:`gfn_jax.profiling`) goes into the phase's ``profile``."""
    from gfn_jax.train import Trainer

    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
    _log(progress, "building what `gfn-jax train` builds (task, model, adapters, mesh, step)")
    with tempfile.TemporaryDirectory(prefix="gfn-jax-bench-") as workdir:
        tr = Trainer(config, workdir, restore=False)  # nothing is saved: no run directory
        out = _run(tr, config, steps, warmup, device_peak, progress, config_name, command,
                   measure, trace_dir)
        shape = out.pop("_decode_shape", None)
        if shape is not None:  # a sampling phase ran
            out["decode"] = _decode_roofline(tr, out, shape, device_bandwidth, measure_bw)
        return out


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shard of every array in ``tree``."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shards = getattr(x, "addressable_shards", None)
        total += int(shards[0].data.nbytes) if shards else int(np.asarray(x).nbytes)
    return total


def _decode_roofline(tr: Any, r: Dict[str, Any], d: Dict[str, int], spec: Optional[str],
                     measure_bw: Callable[[], float]) -> Dict[str, Any]:
    """The sampler's time per decode step against the time to read what a step must read
    once (weights and KV cache) at the device's memory bandwidth."""
    cfg, b = tr.model_cfg, r["batch"]
    device = tr.mesh.devices.flat[0]
    n_dev = int(tr.mesh.devices.size)
    bw = resolve_bandwidth(spec, device, measure_bw)
    params = {"trainable": tr.state.trainable}
    if tr.use_lora:
        params["base"] = tr.frozen["base"]
    base = params.get("base", tr.state.trainable)
    weights = _shard_bytes(params)
    if not cfg.tie_embeddings and isinstance(base, dict) and "embed" in base:
        weights -= _shard_bytes(base["embed"])  # only the prompt's rows are gathered
    kv_item = int(jnp.dtype(cfg.dtype).itemsize)
    fb = decode_floor_bytes(cfg, weights, d["prompts"], b["prompt_len"], b["rows"],
                            d["steps"], kv_item)
    per_dev = fb["weights"] + fb["kv"] / n_dev  # weights: one device's shards
    step_s = r["phases"]["sampling"]["median_s"] / max(1, d["steps"])
    floor_s = per_dev / bw.flops_per_s if bw.flops_per_s else None
    return {
        "steps": d["steps"], "rows": b["rows"], "ms_per_step": step_s * 1e3,
        "bytes_per_step_per_device": per_dev, "weight_bytes_per_device": fb["weights"],
        "kv_bytes_per_step": fb["kv"],
        "bandwidth": {"bytes_per_s": bw.flops_per_s, "name": bw.name, "source": bw.source},
        "floor_ms": None if floor_s is None else floor_s * 1e3,
        "roofline_fraction": None if floor_s is None else floor_s / step_s,
        "note": "ms per step = the sampling phase / decode steps (its prefill included, so "
                "an upper bound); floor = bytes a step must read once / bandwidth",
    }


def _run(tr: Any, config: Any, steps: int, warmup: int, device_peak: Optional[str],
         progress: bool, config_name: str, command: str, measure: Callable[[], float],
         trace_dir: Optional[str] = None) -> Dict[str, Any]:
    from gfn_jax.batch import TrainBatch
    from gfn_jax.models.transformer import activation_sharding
    from gfn_jax.parallel import to_host
    from gfn_jax.scoring import _num_groups, prompt_groups
    from gfn_jax.step import host_hyper

    ss = tr.step_spec
    cfg = tr.model_cfg
    mesh, rules = tr.mesh, tr.rules
    n_dev = int(mesh.devices.size)
    device = mesh.devices.flat[0]
    dtype = str(config.model.dtype)
    peak = resolve_peak(device_peak, device, dtype, measure)
    needs = tr.objective.needs_for(tr.options)
    prep_needs = tr.objective.prepare_needs_for(tr.options) if tr.objective.prepare else None
    lora_p = _lora_layer_params(tr.state.trainable) if tr.use_lora else 0
    rcfg = ss.reward_model_cfg or cfg
    reward_uses_model = bool(config.reward.model) or tr.task.needs_reward_model()
    tc = config.train
    K = int(tc.samples_per_prompt)
    phases: List[Phase] = []
    notes: List[str] = []
    decode_shape: Optional[Dict[str, int]] = None
    total = (1 if tr.source != "data" else 0) + int(needs.reward or bool(prep_needs and
                                                                          prep_needs.reward))
    total += 1 + int(tr.objective.prepare is not None)
    done = [0]

    def announce(name: str) -> None:
        done[0] += 1
        more = f", {warmup - 1} more warm-up call(s)" if warmup > 1 else ""
        _log(progress, f"[{done[0]}/{total}] {name}: first call (compiles){more}, "
                       f"{steps} timed call(s) ...")

    def report(p: Phase) -> None:
        _log(progress, f"[{done[0]}/{total}] {p.name}: median {p.median_s * 1e3:.3g} ms "
                       f"(first call {p.first_s:.3g} s)")

    # --- sampling: the sampler call train makes for a batch (on-policy behaviour) -------
    if tr.prompt_stream is not None:
        tr.take_stream_prompts()
    if tr.source == "data":
        batch = tr.rollouts.data_batch(0)
        notes.append("the objective trains on the task's data: no sampling phase")
    else:
        rows = tr.rollouts.choose_prompts(0)
        key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 1), 0)
        beh = {"kind": "on_policy", "temperature": 1.0, "epsilon": 0.0}
        out: Dict[str, TrainBatch] = {}

        def draw() -> Any:
            out["batch"] = tr.rollouts.draw(tr.policy, key, rows, K, beh)
            return out["batch"].tokens

        announce("sampling")
        first, times = _time(draw, warmup, steps)
        prof = _trace(draw, trace_dir, "sampling")
        batch = out["batch"]
        P, T = int(np.shape(batch.prompt_tokens)[1]), batch.max_len
        n_rows = batch.size
        lengths = np.asarray(batch.lengths)
        decode_steps = int(min(T, int(lengths.max()) + 1))
        pm = np.asarray(batch.prompt_mask)[::K]  # rows are prompt-major, K per prompt
        shape = sampling_shape(len(rows), P, T, n_rows, decode_steps)
        decode_shape = {"prompts": len(rows), "steps": decode_steps}
        p = Phase("sampling", first, times, int(pm.sum() + lengths.sum()),
                  forward_flops(cfg, shape, lora_p),
                  "analytic (forward of the prefill and the decode steps run; XLA's cost "
                  "analysis cannot count the data-dependent decode loop)",
                  note=f"on-policy draw of {len(rows)} prompts x {K} samples, "
                       f"{decode_steps} decode steps", profile=prof)
        phases.append(p)
        report(p)

    B, P, T = batch.size, int(np.shape(batch.prompt_tokens)[1]), batch.max_len
    Pr = int(np.shape(batch.reward_prompt_tokens)[1])
    lengths = np.asarray(batch.lengths)
    k = int(batch.group_size) if cfg.share_prompt else 1

    def groups_of(rows_: int, k_: int) -> int:
        with activation_sharding(mesh, rules), prompt_groups(k_):
            return _num_groups(cfg, rows_, T, None)

    def real_tokens(b: TrainBatch, g: int, field: str = "prompt_mask") -> int:
        pmask = np.asarray(getattr(b, field))
        if g:  # each group's prompt runs once
            pmask = pmask.reshape(g, -1, pmask.shape[1])[:, 0]
        return int(pmask.sum() + np.asarray(b.lengths).sum())

    G = groups_of(B, k)
    hyper = host_hyper(tr.temperature(), tr.hyper["kl_coef"])
    dev = batch.to_device(mesh, rules)
    frozen = tr.frozen

    def reward_analytic(rows_: int, g: int) -> float:
        if not reward_uses_model:
            return 0.0
        return forward_flops(rcfg, scoring_shape(rows_, Pr, T, g))

    # --- reward: the task's log R of every prefix, alone (adapters off) -----------------
    reward_phase: Optional[Phase] = None
    if needs.reward or (prep_needs is not None and prep_needs.reward):
        rkey = ss.reward_key
        reward_fn = ss.reward_fn

        def reward_only(frozen_: Any, b: TrainBatch) -> jax.Array:
            with activation_sharding(mesh, rules), prompt_groups(k):
                rparams = frozen_.get(rkey) if rkey else None
                return reward_fn(rcfg, rparams, b).astype(jnp.float32)

        rj = _Lazy(jax.jit(reward_only))
        announce("reward")
        first, times = _time(lambda: rj(frozen, dev), warmup, steps)
        prof = _trace(lambda: rj(frozen, dev), trace_dir, "reward")
        flops, src, xla = _flops_choice(
            rj.compiled, n_dev, reward_analytic(B, G),
            "one reward-model forward over [reward prompt | Z]" if reward_uses_model
            else "the task's reward uses no model")
        reward_phase = Phase("reward", first, times, real_tokens(batch, G, "reward_prompt_mask"),
                             flops, src, xla,
                             note="task reward, adapters off" + (
                                 "" if reward_uses_model else " (no model: a lookup)"),
                             profile=prof)
        phases.append(reward_phase)
        report(reward_phase)

    # --- prepare (PPO): once per rollout, then the minibatch the first step call sees --
    tr._build()
    state = tr.state
    step_batch = batch
    if tr.objective.prepare is not None:
        pj = _Lazy(tr._prepare_fn)
        announce("prepare")
        first, times = _time(lambda: pj(state, frozen, dev, hyper), warmup, steps)
        prof = _trace(lambda: pj(state, frozen, dev, hyper), trace_dir, "prepare")
        extras, _ = pj(state, frozen, dev, hyper)
        extras = to_host(extras)
        step_batch = batch.with_extras({kk: np.asarray(v) for kk, v in extras.items()})
        a = forward_flops(cfg, scoring_shape(B, P, T, G), lora_p)
        if prep_needs.reward:
            a += reward_analytic(B, G)
        if prep_needs.reference:
            a += forward_flops(cfg, scoring_shape(B, P, T, G))
        parts = ["policy forward"]
        if prep_needs.reward:
            parts.append("reward-model forward" if reward_uses_model else "reward (no model)")
        if prep_needs.reference:
            parts.append("reference forward")
        flops, src, xla = _flops_choice(pj.compiled, n_dev, a, ", ".join(parts))
        p = Phase("prepare", first, times, real_tokens(batch, G), flops, src, xla,
                  note="the objective's once-per-rollout pass", profile=prof)
        phases.append(p)
        report(p)
    M = tr.minibatches
    if M > 1:
        order = np.random.default_rng([int(config.seed), 0, 7, 0]).permutation(B)
        step_batch = step_batch.take(order[:B // M])
        notes.append(f"the train step runs on minibatches of {B // M} rows: "
                     f"{tr.calls_per_rollout} calls per rollout ({tr.epochs} epochs x {M})")
    sb_rows = step_batch.size
    sk = int(step_batch.group_size) if cfg.share_prompt else 1
    SG = groups_of(sb_rows, sk)
    sdev = step_batch.to_device(mesh, rules)

    # --- the jitted train step: scoring, (reward), loss, backward, update ---------------
    sj = _Lazy(tr._step_fn)
    holder = {"state": state}

    def step_call() -> Any:
        holder["state"], metrics, lrf = sj(holder["state"], frozen, sdev, hyper)
        return metrics, lrf

    announce("train step")
    first, times = _time(step_call, warmup, steps)
    prof = _trace(step_call, trace_dir, "train step")
    tr.state = holder["state"]
    a = train_flops(cfg, scoring_shape(sb_rows, P, T, SG), lora_p, frozen_base=tr.use_lora)
    parts = ["policy forward + backward (" + (
        "2x the frozen base's forward, 3x the adapters'" if tr.use_lora else "3x forward") + ")"]
    reward_inside = bool(needs.reward)
    if reward_inside:
        a += reward_analytic(sb_rows, SG)
        parts.append("reward-model forward" if reward_uses_model else "reward (no model: 0)")
    if needs.reference:
        a += forward_flops(cfg, scoring_shape(sb_rows, P, T, SG))
        parts.append("reference forward")
    flops, src, xla = _flops_choice(sj.compiled, n_dev, a, ", ".join(parts))
    step_phase = Phase("train step", first, times, real_tokens(step_batch, SG), flops, src, xla,
                       note="policy scoring + backward + update" +
                            (" + reward (computed inside the step)" if reward_inside else ""),
                       profile=prof)
    phases.append(step_phase)
    report(step_phase)
    if reward_inside and reward_phase is not None:
        scale = sb_rows / B  # the reward phase ran on the whole batch
        d = Phase("policy+update", None,
                  [step_phase.median_s - reward_phase.median_s * scale],
                  step_phase.tokens, step_phase.flops - reward_phase.flops * scale,
                  "train step - reward", note="train step - reward (the step computes the "
                                              "reward inside)")
        phases.append(d)
        notes.append("policy+update = train step - reward: the step computes the reward "
                     "inside, so it is the step's time and FLOPs less the reward phase's")

    # --- memory --------------------------------------------------------------------------
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports it
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        memory = {"bytes": int(stats["peak_bytes_in_use"]),
                  "source": "device.memory_stats()['peak_bytes_in_use'] (process peak, every "
                            "phase, one device)"}
    else:
        ma = sj.compiled.memory_analysis()
        memory = {"bytes": int(ma.temp_size_in_bytes + ma.argument_size_in_bytes),
                  "source": "the compiled train step's memory_analysis(): temp + argument "
                            "bytes per device (the device reports no memory stats)"}

    pk = peak.flops_per_s * n_dev if peak.flops_per_s else None
    out_phases = {}
    for p in phases:
        med = p.median_s
        fps = p.flops / med if med > 0 else None
        out_phases[p.name] = {
            "first_call_s": p.first_s, "median_s": med, "times_s": p.times_s,
            "ms": med * 1e3, "tokens": p.tokens,
            "tokens_per_s": p.tokens / med if med > 0 else None,
            "flops": p.flops, "gflop": p.flops / 1e9, "flop_source": p.flop_source,
            "xla_flops": p.xla_flops, "flops_per_s": fps,
            "gflops_per_s": None if fps is None else fps / 1e9,
            "mfu": None if (fps is None or pk is None) else fps / pk, "note": p.note,
            "profile": p.profile}
    return {
        "command": command, "config": config_name,
        "device": {"platform": device.platform, "kind": str(device.device_kind),
                   "count": n_dev, "host_cpu": _host_cpu()},
        "peak": {"flops_per_s": peak.flops_per_s, "name": peak.name, "source": peak.source,
                 "dtype": dtype, "total_flops_per_s": pk},
        "jax_version": jax.__version__,
        "batch": {"rows": B, "prompts": int(tc.prompts_per_batch), "samples_per_prompt": K,
                  "prompt_len": P, "reward_prompt_len": Pr, "max_len": T,
                  "mean_len": float(lengths.mean()), "shared_prompt_groups": G,
                  "step_rows": sb_rows},
        "model": {"family": cfg.family, "layers": cfg.n_layers, "d_model": cfg.d_model,
                  "vocab": cfg.vocab_size, "matmul_params": matmul_params(cfg),
                  "lora_params": lora_p, "dtype": dtype},
        "objective": str(config.objective.name), "steps": steps, "warmup": warmup,
        "phases": out_phases, "memory": memory, "notes": notes,
        "_decode_shape": decode_shape,
        "tokens_note": "real (unpadded) prompt + trajectory tokens; a prompt shared by a "
                       "group of samples counts once (it runs once)",
        "flops_note": "FLOPs of the shapes the program runs (padding included), summed over "
                      "devices; MFU = FLOP/s / (peak x devices)",
    }


def _host_cpu() -> str:
    from gfn_jax.baselines import cpu_model

    return cpu_model()


# ---------------------------------------------------------------------------- printing
def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_report(r: Dict[str, Any]) -> str:
    """The Markdown report of :func:`run_bench`'s result: header, table, notes."""
    d, pk, b = r["device"], r["peak"], r["batch"]
    peak = ("unknown" if pk["flops_per_s"] is None
            else f"{pk['flops_per_s'] / 1e12:.4g} TFLOP/s ({pk['source']})")
    lines = [
        f"## gfn-jax bench: {r['config'] or 'config'}",
        "",
        f"device: {d['count']} x {d['kind']} ({d['platform']}); peak per device: {peak}; "
        f"host CPU: {d.get('host_cpu', '?')}; jax {r['jax_version']}",
        f"batch: {b['rows']} rows = {b['prompts']} prompts x {b['samples_per_prompt']} "
        f"samples, prompt {b['prompt_len']} positions, trajectories <= {b['max_len']} tokens "
        f"(mean {b['mean_len']:.3g}); objective {r['objective']}; model {r['model']['family']} "
        f"{r['model']['layers']} layers, d_model {r['model']['d_model']}, "
        f"{r['model']['dtype']}" + (f", LoRA {r['model']['lora_params']} params"
                                     if r["model"]["lora_params"] else ", full fine-tuning"),
        f"median of {r['steps']} timed calls after {r['warmup']} warm-up call(s)",
        "",
        "| phase | ms | tokens/s | GFLOP | GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, p in r["phases"].items():
        mfu = "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.3g}%"
        lines.append(f"| {name} | {p['ms']:.4g} | {_fmt(p['tokens_per_s'], ',.0f')} | "
                     f"{p['gflop']:.4g} | {_fmt(p['gflops_per_s'], '.4g')} | {mfu} |")
    lines.append("")
    lines.append("first call (compilation + one run): " + ", ".join(
        f"{n} {p['first_call_s']:.3g} s" for n, p in r["phases"].items()
        if n != "policy+update"))
    lines.append("FLOPs: " + "; ".join(f"{n}: {p['flop_source']}"
                                       for n, p in r["phases"].items()))
    m = r["memory"]
    lines.append(f"peak memory: {m['bytes'] / 2**20:.4g} MiB ({m['source']})")
    dc = r.get("decode")
    if dc:
        bw = dc["bandwidth"]
        floor = ("n/a (unknown bandwidth)" if dc["floor_ms"] is None else
                 f"{dc['floor_ms']:.3g} ms = {dc['bytes_per_step_per_device'] / 1e6:.4g} MB "
                 f"per device (weights {dc['weight_bytes_per_device'] / 1e6:.4g} MB + KV "
                 f"{dc['kv_bytes_per_step'] / 1e6:.3g} MB) at {bw['bytes_per_s'] / 1e9:.4g} "
                 f"GB/s ({bw['source']})")
        frac = ("" if dc["roofline_fraction"] is None
                else f"; {100 * dc['roofline_fraction']:.3g}% of the roofline")
        lines.append(f"decode: {dc['ms_per_step']:.4g} ms per step for {dc['rows']} rows "
                     f"(sampling / {dc['steps']} decode steps, prefill included); floor "
                     f"{floor}{frac}")
    profiled = [(n, p["profile"]) for n, p in r["phases"].items() if p.get("profile")]
    if profiled:
        from gfn_jax.profiling import describe

        lines.append("kernels (one more call of each phase under jax.profiler.trace; "
                     "spans summed over tracks):")
        for n, prof in profiled:
            lines.append(f"- {n}: {describe(prof)}; trace in {prof['trace_dir']}")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
