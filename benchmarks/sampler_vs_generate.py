"""Our jitted sampler against ``transformers`` ``generate`` on SmolLM2-135M, nothing else.

16 samples of one 59-token prompt (random ids), exactly 20 new tokens, float32, no adapters,
the two sides alternating; prints every call's time and the medians. It needs no snapshot of
the official code (``bench_official.py``'s sampler section does the same with LoRA on both
sides), so it is the quick way to check the sampler-vs-generate ratio on a machine:

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
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from gfn_jax import sampling
    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models import hf, registry

    K, P, T = 16, 59, 20
    m = registry.load("smollm2-135m", dtype="float32")
    out_dir = tempfile.mkdtemp(prefix="smollm2-hf-")
    hf.save_hf(m.config, m.params, out_dir)
    pol = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    torch.set_num_threads(args.torch_threads)
    prompt = np.random.default_rng(0).integers(100, 1000, P).tolist()
    toks = jnp.asarray([prompt], jnp.int32)
    spec = PolicySpec(term_ids=(30,), max_len=T, min_len=T)
    ids = torch.tensor([prompt])

    def ours(i: int) -> float:
        t = time.perf_counter()
        out = sampling.sample(m.config, m.params, jax.random.PRNGKey(i), toks,
                              jnp.ones_like(toks), spec, num_samples=K)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t

    def generate(i: int) -> float:
        torch.manual_seed(i)
        t = time.perf_counter()
        with torch.no_grad():
            pol.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         num_return_sequences=K, max_new_tokens=T, min_new_tokens=T, top_k=0,
                         top_p=1.0, temperature=1.0, pad_token_id=0)
        return time.perf_counter() - t

    times = {"ours": [], "generate": []}
    for i in range(1 + args.steps):
        times["ours"].append(ours(i))
        times["generate"].append(generate(i))
        print(f"call {i}: ours {times['ours'][-1]:.2f} s, generate "
              f"{times['generate'][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{K} x {T} new tokens from a {P}-token prompt, float32, jax {jax.__version__}, "
          f"torch {torch.__version__}: ours {med['ours']:.2f} s "
          f"({1e3 * med['ours'] / T:.0f} ms per decode step), generate "
          f"{med['generate']:.2f} s; generate / ours = {med['generate'] / med['ours']:.2f}")


if __name__ == "__main__":
    main()
