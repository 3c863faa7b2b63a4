"""Memory plan of the train step on abstract shapes (no weights, no accelerator needed).

For each setting the SubTB train step (policy forward + backward with LoRA, LM-likelihood
reward, AdamW, state donated) is lowered on ``jax.ShapeDtypeStruct`` inputs with their
shardings and compiled; XLA's ``memory_analysis()`` gives the bytes per device
(:func:`gfn_jax.memory.estimate_step_memory`).

* GPT-J 6B with the paper's LoRA settings, batches and lengths (random numbers,
  subjectivity, arithmetic; ``../shared/PAPER-PROTOCOLS.md``), on one device and over 8
  devices (data / fsdp / fsdp x tensor). Each step's rows are samples of one prompt, planned
  as the trainer runs them (``model.share_prompt``: the prompt once per group); one row per
  setting plans the row-by-row program for comparison.
* A Llama-3-8B shape (V = 128,256) with the vocabulary log-softmax chunked (auto) and
  unchunked (``logits_chunk=-1``): the temporaries with and without [B, T+1, V] float32
  logits.
* The sampling phase (``--only sampler``): the sampler's program
  (:func:`gfn_jax.memory.estimate_sampler_memory`) for a step's draw, with the decode loop's
  layers unrolled over a per-layer copy of the weights and scanned over the stacked weights
  (``model.decode_layers``), beside the train step; the run's peak is the larger phase
  (:class:`gfn_jax.memory.MemoryPlan`).
* Collective traffic (``--only comms``; needs 16 devices, e.g. ``--target 2xv5p-16``): the
  GPT-J subjectivity step and sampler over every device, data-parallel across the devices
  or FSDP inside a slice; what each device sends per step and per decode step
  (:mod:`gfn_jax.comms`), over the DCN apart on a multislice target.

The compile uses whatever backend JAX has; on a CPU host the figures are the CPU backend's
buffer assignment for the same program (not a GPU's: fusion differs, and the CPU backend may
widen bfloat16 arithmetic to float32), i.e. an estimate. ``--devices N`` makes N virtual
CPU devices (set before JAX starts).

    python benchmarks/memory_plan.py                  # everything, 8 virtual devices
    python benchmarks/memory_plan.py --only llama3 --json plan.json
    python benchmarks/memory_plan.py --only sampler
    python benchmarks/memory_plan.py --only comms --target 2xv5p-16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8,
                    help="virtual CPU devices (XLA_FLAGS, CPU only); default 8")
    ap.add_argument("--only", choices=("gptj", "llama3", "sampler", "comms", "all"),
                    default="all")
    ap.add_argument("--device-gb", type=float, default=None,
                    help="device memory the plan is checked against (GB = 1e9 bytes); "
                         "default 80, or a --target chip's HBM")
    ap.add_argument("--json", default="", help="write every figure to this file")
    ap.add_argument("--target", default="",
                    help="compile for this TPU slice's chips with the TPU compiler instead "
                         "(gfn_jax.targets; needs the tpu extra), e.g. v5p-16 (8 chips); "
                         "--device-gb then defaults to a chip's HBM")
    args = ap.parse_args()
    args.device_gb_given = args.device_gb is not None
    if args.device_gb is None:
        args.device_gb = 80.0
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.target:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing runs; compile-only TPU devices
elif ARGS is not None and ARGS.devices > 1:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                                   f"{ARGS.devices}").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from gfn_jax import memory, parallel  # noqa: E402
from gfn_jax.defaults import default_config  # noqa: E402
from gfn_jax.models import ModelConfig  # noqa: E402
from gfn_jax.policy import lora_config  # noqa: E402

GB = 1e9


@functools.lru_cache(maxsize=None)
def _devices():
    """The devices plans are compiled for: the target's chips, or this host's devices."""
    if ARGS is not None and ARGS.target:
        from gfn_jax.targets import parse_target

        return tuple(parse_target(ARGS.target).devices())
    return tuple(jax.devices())

GPTJ_6B = ModelConfig(family="gptj", vocab_size=50400, d_model=4096, n_layers=28, n_heads=16,
                      d_ff=16384, max_seq_len=2048, rotary_dim=64, dtype="bfloat16",
                      param_dtype="bfloat16")
LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32,
                        n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=8192,
                        rope_theta=500000.0, tie_embeddings=False, dtype="bfloat16",
                        param_dtype="bfloat16")

# The paper's GPT-J settings (PAPER-PROTOCOLS.md). Rows per step call = samples per step
# (one prompt); grad_accum as released. Prompt lengths are token counts chosen to cover the
# data with margin: SUBJ training reviews have at most 23 words (+ the template), the
# arithmetic query is ~20 tokens and its 3-shot reward context ~190, the random-number
# prompt ~20.
GPTJ_SETTINGS = {
    "random numbers (§2)": dict(rows=8, grad_accum=8, P=32, T=5, min_len=1, rank=512,
                                alpha=32.0, dropout=0.1, targets=("k", "v")),
    "subjectivity (§4.3)": dict(rows=64, grad_accum=8, P=64, T=5, min_len=1, rank=256,
                                alpha=16.0, dropout=0.0, targets=("k", "v"), suffix=8),
    "arithmetic (§4.4)": dict(rows=16, grad_accum=32, P=32, Pr=192, T=18, min_len=5,
                              rank=64, alpha=16.0, dropout=0.1, targets=("q", "k", "v", "o")),
}
MESHES = {
    "1 device": (1, parallel.MeshConfig(data=1)),
    "8: data=8": (8, parallel.MeshConfig(data=8)),
    "8: fsdp=8": (8, parallel.MeshConfig(data=1, fsdp=8)),
    "8: fsdp=4 x tensor=2": (8, parallel.MeshConfig(data=1, fsdp=4, tensor=2)),
}


def _config(s):
    c = default_config()
    c.objective.name = "subtb"
    c.train.grad_accum = s["grad_accum"]
    c.train.samples_per_prompt = s["rows"]
    c.lora.rank, c.lora.alpha, c.lora.dropout = s["rank"], s["alpha"], s["dropout"]
    c.lora.targets = (r"layers/attn/(%s)/kernel" % "|".join(s["targets"]),)
    return c


def _estimate(model_cfg, s, n_dev, mc, shared=True):
    devices = list(_devices()[:n_dev])
    mesh = parallel.make_mesh(mc, devices)
    cfg = _config(s)
    t0 = time.perf_counter()
    e = memory.estimate_step_memory(
        model_cfg, batch_size=s["rows"], prompt_len=s["P"], traj_len=s["T"], mesh=mesh,
        config=cfg, term_ids=(198,), min_len=s["min_len"], reward_prompt_len=s.get("Pr"),
        suffix_len=s.get("suffix", 0), group_size=s.get("group", s["rows"]) if shared else 1,
        knobs={"train.samples_per_prompt": s["rows"], "train.prompts_per_batch": 1,
               "train.grad_accum": s["grad_accum"]})
    return e, time.perf_counter() - t0


def _row(name, mesh_name, e, secs, device_gb):
    fits = e.total_bytes <= device_gb * GB
    return (f"| {name} | {mesh_name} | {e.argument_bytes / GB:.2f} | {e.temp_bytes / GB:.2f} | "
            f"{(e.output_bytes - e.alias_bytes) / GB:.2f} | {e.total_bytes / GB:.2f} | "
            f"{'yes' if fits else 'NO'} | {secs:.0f} |")


HEADER = ("| setting | mesh | arguments GB | temporaries GB | outputs (not donated) GB | "
          "total GB / device | fits {gb:.0f} GB | compile s |\n|---|---|---:|---:|---:|---:|---|---:|")


def main() -> None:
    args = ARGS
    devices = _devices()
    n = len(devices)
    if args.target and not args.device_gb_given:
        args.device_gb = memory.device_memory_bytes(devices[0]) / GB
    print(f"backend {devices[0].platform}, {n} device(s): {devices[0].device_kind}"
          f"{' (compile-only, target ' + args.target + ')' if args.target else ''}; "
          f"jax {jax.__version__}")
    print("figures per device from compiled.memory_analysis() of the whole train step; "
          "GB = 1e9 bytes")
    out = {"backend": devices[0].platform, "target": args.target or None,
           "jax": jax.__version__, "devices": n, "rows": []}

    if args.only in ("gptj", "all"):
        print("\nGPT-J 6B (bfloat16 weights and compute, LoRA adapters float32), SubTB, AdamW:\n")
        print(HEADER.format(gb=args.device_gb))
        for name, s in GPTJ_SETTINGS.items():
            meshes = MESHES if name.startswith("subjectivity") else {"1 device": MESHES["1 device"]}
            runs = ([("none", m, True) for m in meshes] + [("full", "1 device", True),
                                                           ("none", "1 device", False)])
            for remat, mesh_name, shared in runs:
                n_dev, mc = MESHES[mesh_name]
                if n_dev > n:
                    continue
                e, secs = _estimate(GPTJ_6B.replace(remat_policy=remat), s, n_dev, mc, shared)
                label = f"{name}, remat {remat}" + ("" if shared else ", prompt row by row")
                print(_row(label, mesh_name, e, secs, args.device_gb), flush=True)
                out["rows"].append({"model": "gptj-6b", "setting": label, "mesh": mesh_name,
                                    **s, **e.as_dict(), "compile_s": secs})

    if args.only in ("llama3", "all"):
        s = dict(rows=64, grad_accum=1, P=64, T=32, min_len=0, rank=8, alpha=16.0,
                 dropout=0.0, targets=("q", "k", "v", "o"))
        print(f"\nLlama-3-8B shape (V = {LLAMA3_8B.vocab_size}, bfloat16), B {s['rows']}, "
              f"P {s['P']}, T {s['T']}, LoRA r=8 on q,k,v,o, SubTB, 1 device:\n")
        print(HEADER.format(gb=args.device_gb))
        for label, chunk, remat in (("remat full, logits chunked (auto)", 0, "full"),
                                    ("remat full, logits unchunked", -1, "full"),
                                    ("remat none, logits chunked (auto)", 0, "none"),
                                    ("remat none, logits unchunked", -1, "none")):
            e, secs = _estimate(LLAMA3_8B.replace(logits_chunk=chunk, remat_policy=remat), s, 1,
                                parallel.MeshConfig(data=1))
            print(_row(label, "1 device", e, secs, args.device_gb), flush=True)
            out["rows"].append({"model": "llama3-8b", "setting": label, "mesh": "1 device",
                                **s, **e.as_dict(), "compile_s": secs})
        logits = s["rows"] * (s["T"] + 1) * LLAMA3_8B.vocab_size * 4
        print(f"\none [B, T+1, V] float32 logits array: {logits / GB:.2f} GB")

    if args.only in ("sampler", "all"):
        sampler_plans(args, n, out)

    if args.only == "comms":
        comms_plans(args, n, out)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


SAMPLER_HEADER = ("| setting | mesh | decode layers | layer weights GB | sampler temporaries GB | "
                  "sampling phase GB | train step GB | peak GB / device | fits {gb:.0f} GB | "
                  "compile s |\n|---|---|---|---:|---:|---:|---:|---:|---|---:|")


def sampler_plans(args, n, out) -> None:
    """The sampling phase beside the train step, both decode layouts (see the docstring)."""
    llama = dict(rows=16, prompts=4, grad_accum=1, P=64, T=32, min_len=0, rank=8, alpha=16.0,
                 dropout=0.0, targets=("q", "k", "v", "o"))
    cases = [("GPT-J 6B, subjectivity (§4.3), remat none", GPTJ_6B,
              GPTJ_SETTINGS["subjectivity (§4.3)"], ("1 device", "8: fsdp=8")),
             ("GPT-J 6B, arithmetic (§4.4), remat none", GPTJ_6B,
              GPTJ_SETTINGS["arithmetic (§4.4)"], ("1 device",)),
             ("Llama-3-8B shape, 4 prompts x 16 samples, remat full", LLAMA3_8B.replace(
                 remat_policy="full"), llama, ("1 device",))]
    print("\nThe sampling phase beside the train step (SubTB, LoRA as above; sampling holds "
          "the step's arguments plus the sampler's temporaries):\n")
    print(SAMPLER_HEADER.format(gb=args.device_gb))
    for name, model_cfg, s, meshes in cases:
        for mesh_name in meshes:
            n_dev, mc = MESHES[mesh_name]
            if n_dev > n:
                continue
            mesh = parallel.make_mesh(mc, list(_devices()[:n_dev]))
            step, step_secs = _estimate(  # every prompt's samples: one group each
                model_cfg, dict(s, rows=s["rows"] * s.get("prompts", 1), group=s["rows"]),
                n_dev, mc)
            lora = lora_config(_config(s))
            layer_bytes = memory.layer_weight_bytes(model_cfg, mesh)
            for layers in ("unrolled", "scanned"):
                t0 = time.perf_counter()
                sm = memory.estimate_sampler_memory(
                    model_cfg.replace(decode_layers=layers), prompts=s.get("prompts", 1),
                    num_samples=s["rows"], prompt_len=s["P"], traj_len=s["T"], mesh=mesh,
                    lora=lora, term_ids=(198,), min_len=s["min_len"])
                secs = step_secs + time.perf_counter() - t0
                plan = memory.MemoryPlan(step=step, sampler=sm, layer_weight_bytes=layer_bytes)
                fits = plan.total_bytes <= args.device_gb * GB
                print(f"| {name} | {mesh_name} | {layers} | {layer_bytes / GB:.2f} | "
                      f"{sm.temp_bytes / GB:.2f} | {plan.sampling_bytes / GB:.2f} | "
                      f"{plan.step_bytes / GB:.2f} | {plan.total_bytes / GB:.2f} | "
                      f"{'yes' if fits else 'NO'} | {secs:.0f} |", flush=True)
                out["rows"].append({"model": name, "setting": f"sampling, {layers}",
                                    "mesh": mesh_name, **s, **plan.as_dict(),
                                    "compile_s": secs})


COMMS_MESHES = {"data=16": (parallel.MeshConfig(data=16, fsdp=1), False),
                "data=2 x fsdp=8": (parallel.MeshConfig(data=2, fsdp=8), False),
                "data=2 x fsdp=8, decode_gather_weights": (
                    parallel.MeshConfig(data=2, fsdp=8), True),
                "data=1 x fsdp=16": (parallel.MeshConfig(data=1, fsdp=16), False)}


def comms_plans(args, n, out) -> None:
    """What each device sends per train step and per sampler call, GPT-J subjectivity."""
    if n != 16:
        raise SystemExit(f"--only comms plans 16 devices; this target has {n}")
    s = GPTJ_SETTINGS["subjectivity (§4.3)"]
    slices = len({getattr(d, "slice_index", 0) for d in _devices()})
    MiB = 2 ** 20

    def mib(x):
        return f"{x / MiB:,.1f}"

    print(f"\nGPT-J 6B subjectivity (§4.3): the train step ({s['rows']} rows, LoRA r="
          f"{s['rank']} on k, v, remat none) and the sampler ({s['rows']} samples of one "
          f"prompt, decode layers unrolled); MiB sent per device ({slices} slice(s); DCN = "
          f"between slices)\n")
    print("| mesh | step: between devices | step: over the DCN | sampler, once: between "
          "devices | sampler, once: DCN | per decode step: between devices | per decode "
          "step: DCN | step GB / device | sampler temporaries GB | compile s |\n|---|---:|---:|"
          "---:|---:|---:|---:|---:|---:|---:|")
    lora = lora_config(_config(s))
    steps = {}  # the step does not depend on decode_gather_weights: one compile per mesh
    for mesh_name, (mc, gather) in COMMS_MESHES.items():
        mesh = parallel.make_mesh(mc, list(_devices()))
        key = (mc.data, mc.fsdp, mc.tensor)
        if key not in steps:
            steps[key] = _estimate(GPTJ_6B, s, 16, mc)
        step, secs = steps[key]
        t0 = time.perf_counter()
        sm = memory.estimate_sampler_memory(
            GPTJ_6B.replace(decode_gather_weights=gather), prompts=1, num_samples=s["rows"],
            prompt_len=s["P"], traj_len=s["T"], mesh=mesh, lora=lora, term_ids=(198,),
            min_len=s["min_len"])
        secs += time.perf_counter() - t0
        st, sa = step.comms, sm.comms
        print(f"| {mesh_name} | {mib(st.total_device_bytes)} | {mib(st.total_dcn_bytes)} | "
              f"{mib(sa.total_device_bytes)} | {mib(sa.total_dcn_bytes)} | "
              f"{mib(sum(sa.per_iteration_device_bytes.values()))} | "
              f"{mib(sum(sa.per_iteration_dcn_bytes.values()))} | "
              f"{step.total_bytes / GB:.2f} | {sm.temp_bytes / GB:.2f} | {secs:.0f} |",
              flush=True)
        out["rows"].append({"model": "gptj-6b", "setting": "subjectivity, collectives",
                            "mesh": mesh_name, "step": step.as_dict(),
                            "sampler": sm.as_dict(), "compile_s": secs})


if __name__ == "__main__":
    main()
