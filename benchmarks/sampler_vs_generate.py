"""Our jitted sampler against ``transformers`` ``generate`` on SmolLM2-135M, nothing else.

16 samples of one 59-token prompt (random ids), exactly 20 new tokens, float32, no adapters,
the sides alternating; prints every call's time and the medians. Ours runs twice: as a bare
``sample`` call, which lays the weights out for its decode loop itself, and with the weights
laid out once beforehand (``gfn_jax.DecodeWeights``, what the Trainer keeps for a LoRA run's
frozen base; on CPU it spares each call a transposed copy of the layer weights). It needs no
snapshot of the official code (``bench_official.py``'s sampler section does the same with
LoRA on both sides), so it is the quick way to check the sampler-vs-generate ratio on a
machine; ``--no-generate`` times ours only, ``--rows`` / ``--prompt`` / ``--new`` change the
shape (the main job's: ``--rows 32 --prompt 20 --new 4``); ``--scanned`` also times ours with
``decode_layers="scanned"`` (the layers under ``lax.scan`` over the stacked weights: no copy of
them):

    python benchmarks/sampler_vs_generate.py --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed calls per side after 1 warm-up")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=16, help="samples of the prompt")
    ap.add_argument("--prompt", type=int, default=59, help="prompt tokens")
    ap.add_argument("--new", type=int, default=20, help="new tokens per sample (exactly)")
    ap.add_argument("--no-generate", action="store_true", help="ours only (no torch)")
    ap.add_argument("--scanned", action="store_true",
                    help="also ours with model.decode_layers='scanned'")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gfn_jax import sampling
    from gfn_jax.baselines import hardware
    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models import hf, registry

    K, P, T = args.rows, args.prompt, args.new
    m = registry.load("smollm2-135m", dtype="float32")
    prompt = np.random.default_rng(0).integers(100, 1000, P).tolist()
    toks = jnp.asarray([prompt], jnp.int32)
    spec = PolicySpec(term_ids=(30,), max_len=T, min_len=T)
    kept = sampling.cache_decode_weights(m.params)  # None off CPU: then both are the same

    def ours_with(weights, cfg=m.config):
        def call(i: int) -> float:
            t = time.perf_counter()
            out = sampling.sample(cfg, m.params, jax.random.PRNGKey(i), toks,
                                  jnp.ones_like(toks), spec, num_samples=K,
                                  decode_weights=weights)
            jax.block_until_ready(out.tokens)
            return time.perf_counter() - t
        return call

    sides = {"ours": ours_with(None), "ours, weights kept": ours_with(kept)}
    if args.scanned:
        sides["ours, layers scanned"] = ours_with(None, m.config.replace(decode_layers="scanned"))
    if not args.no_generate:
        sides["generate"] = generate_side(m, hf, args, prompt, K, T)
    times = {k: [] for k in sides}
    for i in range(1 + args.steps):
        for k, call in sides.items():
            times[k].append(call(i))
        print(f"call {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    line = (f"{K} x {T} new tokens from a {P}-token prompt, float32, {hardware()}: "
            + ", ".join(f"{k} {v:.3f} s ({1e3 * v / T:.0f} ms per decode step)"
                        for k, v in med.items()))
    if "generate" in med:
        line += "; generate / ours = " + ", ".join(
            f"{med['generate'] / med[k]:.2f} ({k})" for k in med if k != "generate")
    print(line)


def generate_side(m, hf, args, prompt, K: int, T: int):
    """A timed call of ``transformers`` ``generate`` on the same model, exported to HF."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = tempfile.mkdtemp(prefix="smollm2-hf-")
    hf.save_hf(m.config, m.params, out_dir)
    pol = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    torch.set_num_threads(args.torch_threads)
    ids = torch.tensor([prompt])

    def generate(i: int) -> float:
        torch.manual_seed(i)
        t = time.perf_counter()
        with torch.no_grad():
            pol.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         num_return_sequences=K, max_new_tokens=T, min_new_tokens=T, top_k=0,
                         top_p=1.0, temperature=1.0, pad_token_id=0)
        return time.perf_counter() - t

    return generate


if __name__ == "__main__":
    main()
