"""Where the infilling reward pass goes, on SmolLM2-135M (float32, setting A of issue #10).

The reward of every prefix of a 20-token Z under infilling is log p(Y | X z_<i) for 21
prefixes, scored by :func:`gfn_jax.scoring.score_suffix_prefixes` in one packed pass with
the 16 samples' shared prompt X run once. This times, each jitted alone (median of
``--reps`` calls after a warm-up):

* the whole scorer;
* its transformer pass alone (the hidden states of ``[Z | Y'_0 .. Y'_T]`` against X), with
  the copies' attention in blocks (:class:`gfn_jax.models.CopyBlockMask`, what the scorer
  runs) and with the same mask dense (every query against every key, then masked: what the
  scorer ran before);
* its vocabulary part alone (the log-probabilities of Y's tokens at the 21 x |Y| read
  positions, in the scorer's chunks);

beside their FLOPs, the rate each reaches (and the largest difference between the parts'
result and the whole scorer's), and two matmul rates of this host: a 1024^3
float32 matmul and one MLP projection of the pass's own shape ([rows x positions, 576] @
[576, 1536]). Prints one line per figure:

    python benchmarks/reward_breakdown.py [--reps 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a registered name or a path")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=59)
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--suffix", type=int, default=10)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gfn_jax import scoring
    from gfn_jax.baselines import hardware
    from gfn_jax.logprobs import chunked_position_logprobs
    from gfn_jax.models import registry
    from gfn_jax.models.transformer import head_params

    m = registry.load(args.model, dtype="float32")
    cfg, params = m.config, m.params
    B, P, T, S = args.rows, args.prompt, args.new, args.suffix
    C = T + 1
    print(f"# {hardware()}; {args.model} float32, {B} rows sharing one {P}-token prompt, "
          f"Z of {T}, Y of {S}")

    def ms(f, *a) -> float:
        return median_ms(args.reps, f, *a)

    rng = np.random.default_rng(0)
    hi = min(5000, cfg.vocab_size)
    prompt = jnp.asarray(np.repeat(rng.integers(1, hi, (1, P)), B, 0), jnp.int32)
    pmask = jnp.ones((B, P), bool)
    z = jnp.asarray(rng.integers(1, hi, (B, T)), jnp.int32)
    lengths = jnp.full((B,), T, jnp.int32)
    y = jnp.asarray(np.repeat(rng.integers(1, hi, (1, S)), B, 0), jnp.int32)
    ymask = jnp.ones((B, S), bool)

    def whole(p):
        return scoring.score_suffix_prefixes(cfg, p, prompt, pmask, z, lengths, y, ymask,
                                             group_size=B)

    positions, mask, idx = scoring.suffix_layout(pmask, lengths, ymask, T)
    blocks = scoring.suffix_block_mask(pmask, lengths, ymask, T).drop_main_queries(P)
    cont = jnp.concatenate([z, jnp.tile(y[:, :S - 1], (1, C))], axis=1)

    def pass_with(rows):
        @jax.jit
        def hidden_pass(p):
            hid, _, _ = scoring._shared_prefix_hidden(cfg, p, prompt, pmask, cont, 1, None,
                                                      positions[:, P:], rows)
            return hid
        return hidden_pass

    hidden_pass, dense_pass = pass_with(blocks), pass_with(mask[:, P:, :])
    hid = hidden_pass(params)
    pass_diff = float(jnp.max(jnp.abs(dense_pass(params) - hid)))
    read = hid[:, (idx - (P - 1)).reshape(-1)]  # [B, C*S, D]
    targets = jnp.broadcast_to(y[:, None, :], (B, C, S)).reshape(B, C * S)
    chunk = scoring._chunk(cfg, B, C * S)

    @jax.jit
    def vocab_part(p, h):
        lp, _ = chunked_position_logprobs(scoring._logits_fn(cfg), head_params(cfg, p), h,
                                          targets, chunk)
        return lp

    # FLOPs: every weight matmul once per continuation token (+ the prompt once), the
    # attention's two products over the keys each query may see, the vocabulary projection
    D, F, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    per_tok = L * (2 * D * cfg.n_heads * cfg.head_dim + 2 * D * kv + 3 * D * F)
    n_cont = cont.shape[1]
    mm = 2 * per_tok * (B * n_cont + P)
    att = 2 * 2 * L * B * n_cont * (P + n_cont) * cfg.n_heads * cfg.head_dim  # dense, masked
    # in blocks: Z against X and Z; each copy against X, Z and itself
    att_b = 2 * 2 * L * B * (T * (P + T) + C * (S - 1) * (P + T + S - 1)) * cfg.n_heads * \
        cfg.head_dim
    voc = 2 * B * C * S * D * cfg.vocab_size
    t_whole = ms(whole, params)
    t_hid = ms(hidden_pass, params)
    t_dense = ms(dense_pass, params)
    t_voc = ms(vocab_part, params, read)

    def line(name: str, t: float, flops: float) -> None:
        print(f"{name}: {t:.0f} ms, {flops / 1e9:.0f} GFLOP, {flops / t / 1e6:.0f} GFLOP/s")

    # the two parts compute the scorer's own result
    diff = float(jnp.max(jnp.abs(vocab_part(params, read).reshape(B, C, S).sum(-1)
                                 - whole(params))))
    line("whole scorer", t_whole, mm + att_b + voc)
    line("transformer pass (weights + attention in blocks)", t_hid, mm + att_b)
    line("transformer pass, attention dense (every key, masked)", t_dense, mm + att)
    line("vocabulary part (chunk %d positions)" % chunk, t_voc, voc)
    a = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
    mat = jax.jit(lambda x: x @ x)
    line("1024^3 matmul", ms(mat, a), 2 * 1024 ** 3)
    x = jnp.asarray(rng.standard_normal((B * n_cont, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, F)) * 0.02, jnp.float32)
    proj = jax.jit(lambda x, w: x @ w)
    line(f"[{B * n_cont}, {D}] @ [{D}, {F}] matmul", ms(proj, x, w), 2 * B * n_cont * D * F)
    print(f"max |parts - whole scorer| over the {B} x {C} prefix rewards: {diff:.2e}; "
          f"max |dense - blocks| over the pass's hidden states: {pass_diff:.2e}")


if __name__ == "__main__":
    main()
