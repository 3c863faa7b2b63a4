#!/usr/bin/env python
"""GFlowNet train step and sampler: gfn-jax (ours) vs a PyTorch reference, side by side.

One run, one machine, one architecture (random weights), the same batch, prompt length,
trajectory length, LoRA rank/targets and dtype, measures:

* ours: a jitted step built from the functions :class:`gfn_jax.train.Trainer` uses
  (:func:`~gfn_jax.scoring.score_policy` with LoRA adapters, the LM-likelihood reward
  :func:`~gfn_jax.scoring.score_reward_prefixes` on the base weights,
  :func:`~gfn_jax.objectives.subtb_loss`, optax clip + AdamW on the adapters) and the
  sampler :func:`gfn_jax.sampling.sample`;
* the reference, in the style of the official PyTorch release of Hu et al. (2024):
  ``transformers.LlamaForCausalLM`` (sdpa attention) + ``peft`` LoRA (a small hand-written
  LoRA when ``peft`` is missing); the policy forward over ``[X | Z]`` -> ``log_softmax`` ->
  gathered per-step and termination log-probs; the reward forward under ``torch.no_grad()``
  with the adapters disabled; the modified SubTB loss in the cumulative-sum-over-windows
  form; backward; gradient clipping; ``torch.optim.AdamW``; and a Python sampling loop with
  ``past_key_values``.

It prints a table (median step time after warm-up, tokens/s, peak device memory, ratios
ours/reference) and a float32 correctness check of the comparison itself: the torch weights
(base and LoRA) are copied into our param tree (``save_pretrained`` -> ``load_hf``) and
both implementations' SubTB loss, per-step log-probs, log R and LoRA gradients are compared
on the same batch. ``--json OUT`` writes every figure to a JSON file.

Only needs jax, flax, optax, numpy, safetensors, tokenizers (and torch + transformers, peft
optional, unless ``--skip-torch``). If ``import gfn_jax`` fails because an optional
dependency of the training loop is missing (e.g. ``ml_collections``), the submodules used
here are imported directly.

Example::

    python benchmarks/bench_step.py --preset smollm2-135m --dtype bfloat16 \\
        --batch 64 --prompt-len 64 --traj-len 32 --json bench.json
"""

from __future__ import annotations

import os

# JAX would otherwise grab 75% of the GPU up front, leaving little for torch in the same
# process and making JAX's peak-memory figure meaningless.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------
# Presets (architectures only; weights are random)
# ---------------------------------------------------------------------------
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        rope_theta=10000.0, tie_embeddings=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        rope_theta=100000.0, tie_embeddings=True,
    ),
    # Llama-3.2-1B shape (untied head here; no llama3 rope scaling: random weights).
    "llama-1b": dict(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        rope_theta=500000.0, tie_embeddings=False,
    ),
}
NORM_EPS = 1e-5
# Our LoRA target name -> (param path group, HF module name).
LORA_TARGETS: Dict[str, Tuple[str, str]] = {
    "q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------
# Imports of gfn_jax that survive a missing optional dependency
# ---------------------------------------------------------------------------
def import_gfn_jax_package() -> Optional[str]:
    """Make ``gfn_jax`` importable (the repository root on ``sys.path`` when it is not
    installed); when ``import gfn_jax`` fails for lack of an optional package, register a bare
    package module so that its submodules still import, and return a note saying so."""
    root = str(Path(__file__).resolve().parents[1])
    if importlib.util.find_spec("gfn_jax") is None and root not in sys.path:
        sys.path.insert(0, root)
    try:
        import gfn_jax  # noqa: F401
    except ImportError as e:
        spec = importlib.util.find_spec("gfn_jax")
        if spec is None or not spec.submodule_search_locations:
            raise
        pkg = types.ModuleType("gfn_jax")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["gfn_jax"] = pkg
        return f"`import gfn_jax` failed ({e}); imported its submodules directly"
    return None


def import_gfn_jax() -> types.SimpleNamespace:
    """The gfn_jax functions used here, imported without needing ``ml_collections`` etc.

    ``gfn_jax/__init__.py`` re-exports the trainer, whose module imports ``ml_collections``
    at import time; a bare GPU image may lack it. On that ImportError a bare package module
    is registered so that the submodules (which do not need it) still import.
    """
    note = import_gfn_jax_package()
    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models.config import ModelConfig
    from gfn_jax.models.hf import load_hf
    from gfn_jax.models.lora import LoraConfig, init_lora
    from gfn_jax.models.transformer import init_params
    from gfn_jax.objectives import default_state_mask, subtb_loss
    from gfn_jax.sampling import sample
    from gfn_jax.scoring import score_policy, score_reward_prefixes

    return types.SimpleNamespace(
        PolicySpec=PolicySpec, ModelConfig=ModelConfig, load_hf=load_hf, LoraConfig=LoraConfig,
        init_lora=init_lora, init_params=init_params, default_state_mask=default_state_mask,
        subtb_loss=subtb_loss, sample=sample, score_policy=score_policy,
        score_reward_prefixes=score_reward_prefixes, import_note=note,
    )


# ---------------------------------------------------------------------------
# Shared set-up: batch and LoRA weights as numpy (identical for both sides)
# ---------------------------------------------------------------------------
def make_batch(
    rng: np.random.Generator, batch: int, prompt_len: int, traj_len: int, vocab: int, term_id: int
) -> Dict[str, np.ndarray]:
    """Random unpadded prompts and right-padded trajectories (no ⊤ inside), lengths in [1, T]."""

    def draw(shape):
        x = rng.integers(0, vocab - 1, size=shape)
        return np.where(x >= term_id, x + 1, x).astype(np.int32)  # skip the ⊤ id

    lengths = rng.integers(1, traj_len + 1, size=(batch,)).astype(np.int32)
    lengths[0] = traj_len  # at least one full-length row
    tokens = draw((batch, traj_len))
    tokens = np.where(np.arange(traj_len)[None, :] < lengths[:, None], tokens, 0).astype(np.int32)
    return {
        "prompt_tokens": draw((batch, prompt_len)),
        "prompt_mask": np.ones((batch, prompt_len), np.int32),
        "tokens": tokens,
        "lengths": lengths,
    }


def lora_io(cfg: Any, name: str) -> Tuple[int, int]:
    """(in, out) features of the HF linear layer that LoRA target ``name`` adapts."""
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return {
        "q": (D, H * Dh), "k": (D, K * Dh), "v": (D, K * Dh), "o": (H * Dh, D),
        "gate": (D, F), "up": (D, F), "down": (F, D),
    }[name]


def make_lora_weights(
    rng: np.random.Generator, cfg: Any, targets: Sequence[str], rank: int, b_std: float
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per target: torch-layout ``A [L, r, in]`` (Kaiming-uniform) and ``B [L, out, r]``.

    ``B`` is random (not zero) so that the correctness check exercises the adapter path.
    """
    out = {}
    for t in targets:
        n_in, n_out = lora_io(cfg, t)
        bound = 1.0 / math.sqrt(n_in)
        a = rng.uniform(-bound, bound, size=(cfg.n_layers, rank, n_in)).astype(np.float32)
        b = (b_std * rng.standard_normal((cfg.n_layers, n_out, rank))).astype(np.float32)
        out[t] = (a, b)
    return out


# ---------------------------------------------------------------------------
# Timing and memory helpers
# ---------------------------------------------------------------------------
def time_calls(fn: Callable[[int], Any], sync: Callable[[Any], None], warmup: int, steps: int):
    """Call ``fn(i)`` warmup + steps times, syncing after each.

    Returns (first-call seconds, list of timed seconds, first call's output)."""
    times, first_s, first_out = [], None, None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = fn(i)
        sync(out)
        dt = time.perf_counter() - t0
        if i == 0:
            first_s, first_out = dt, out
        if i >= warmup:
            times.append(dt)
    return first_s, times, first_out


def jax_peak_bytes(jax: Any) -> Optional[int]:
    """``peak_bytes_in_use`` of the default device (process-lifetime peak), if reported."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def summarise(
    first_s: float, times: List[float], tokens: int, peak: Optional[int]
) -> Dict[str, Any]:
    med = statistics.median(times)
    return {
        "first_call_s": first_s,
        "median_s": med,
        "min_s": min(times),
        "times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / med,
        "peak_bytes": peak,
    }


# ---------------------------------------------------------------------------
# Ours (JAX)
# ---------------------------------------------------------------------------
def adapters_from_numpy(g: Any, jnp: Any, cfg: Any, lora_cfg: Any, params: Any,
                        weights: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """Our adapter dict ``{"scale", "tree"}`` holding the given torch-layout weights (float32).

    The structure comes from :func:`init_lora`; each leaf is replaced (``a = A^T``, ``b = B^T``
    per layer) after checking its shape.
    """
    import jax

    ref = g.init_lora(cfg, params, lora_cfg, jax.random.PRNGKey(0))
    tree = ref["tree"]
    for t, (a, b) in weights.items():
        group, _ = LORA_TARGETS[t]
        leaf = tree["layers"][group][t]["kernel"]
        a_ours, b_ours = np.swapaxes(a, 1, 2), np.swapaxes(b, 1, 2)
        if leaf["a"].shape != a_ours.shape or leaf["b"].shape != b_ours.shape:
            raise RuntimeError(
                f"LoRA shape mismatch for {t}: ours a{leaf['a'].shape} b{leaf['b'].shape}, "
                f"torch-derived a{a_ours.shape} b{b_ours.shape}"
            )
        tree["layers"][group][t]["kernel"] = {"a": jnp.asarray(a_ours), "b": jnp.asarray(b_ours)}
    return {"scale": ref["scale"], "tree": tree}


def make_ours_fns(g: Any, cfg: Any, spec: Any, scale: float, lamb: float, tx: Any):
    """(loss_and_grad, step) jitted functions of (adapter tree, base params, batch)."""
    import jax
    import jax.numpy as jnp
    import optax

    T = spec.max_len

    def loss_fn(tree, params, batch):
        adapters = {"scale": jnp.float32(scale), "tree": tree}
        pol = g.score_policy(
            cfg, params, batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"],
            batch["lengths"], spec, adapters=adapters)
        rew = g.score_reward_prefixes(
            cfg, params, batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"],
            batch["lengths"], spec.term_ids)
        log_r = jax.lax.stop_gradient(rew.log_pz + rew.log_pterm)  # log R(X z_<i ⊤), temp 1
        smask = g.default_state_mask(batch["lengths"], T, spec.min_len)
        loss, _ = g.subtb_loss(pol.log_pf, pol.log_pterm, log_r, smask, lamb=lamb)
        return loss, {"log_pf": pol.log_pf, "log_pterm": pol.log_pterm, "log_r": log_r}

    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def step(tree, opt_state, params, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree, params, batch)
        updates, opt_state = tx.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, loss

    return loss_and_grad, jax.jit(step, donate_argnums=(0, 1))


def bench_ours(g: Any, args: argparse.Namespace, cfg: Any, params: Any, adapters: Dict[str, Any],
               spec: Any, batch_np: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Time our sampler then our train step; returns figures and the first-step loss."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(optax.clip_by_global_norm(args.clip_norm),
                     optax.adamw(args.lr, weight_decay=args.weight_decay))
    _, step = make_ours_fns(g, cfg, spec, float(adapters["scale"]), args.subtb_lambda, tx)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    B, P, T = args.batch, args.prompt_len, args.traj_len

    # Sampler (runs first: the JAX peak is a process-lifetime figure).
    key = jax.random.PRNGKey(args.seed)
    lens: List[Any] = []

    def run_sample(i):
        out = g.sample(cfg, params, jax.random.fold_in(key, i), batch["prompt_tokens"],
                       batch["prompt_mask"], spec, num_samples=1, adapters=adapters)
        lens.append(out.lengths)
        return out

    f, ts, _ = time_calls(run_sample, lambda out: out.tokens.block_until_ready(), args.warmup,
                          args.steps)
    res = {"sample": summarise(f, ts, B * T, jax_peak_bytes(jax))}
    res["sample"]["mean_length"] = float(np.mean([np.asarray(x) for x in lens]))

    # Train step (params and optimizer state donated, like the Trainer's step).
    state = {"tree": jax.tree_util.tree_map(jnp.array, adapters["tree"])}
    state["opt"] = tx.init(state["tree"])

    def run_step(i):
        state["tree"], state["opt"], loss = step(state["tree"], state["opt"], params, batch)
        return loss

    f, ts, first_loss = time_calls(run_step, lambda x: x.block_until_ready(), args.warmup,
                                   args.steps)
    res["train"] = summarise(f, ts, B * (P + T), jax_peak_bytes(jax))
    res["train"]["first_loss"] = float(first_loss)
    return res


# ---------------------------------------------------------------------------
# Reference (PyTorch, official-release style)
# ---------------------------------------------------------------------------
def _hand_lora_class(torch: Any):
    class HandLoRALinear(torch.nn.Module):
        """``base(x) + scale * B(A(x))`` with float32 adapters (what peft computes)."""

        def __init__(self, base: Any, rank: int, scale: float) -> None:
            super().__init__()
            self.base_layer = base
            dev = base.weight.device
            self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, device=dev,
                                          dtype=torch.float32)
            self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, device=dev,
                                          dtype=torch.float32)
            self.scale = scale
            self.enabled = True

        def forward(self, x):
            y = self.base_layer(x)
            if not self.enabled:
                return y
            d = self.lora_B(self.lora_A(x.to(torch.float32))) * self.scale
            return (y.to(torch.float32) + d).to(y.dtype) if y.dtype != torch.float32 else y + d

    return HandLoRALinear


class HandLoRAModel:
    """Minimal stand-in for ``peft.PeftModel``: ``__call__``, ``disable_adapter()``,
    ``parameters()``, ``train()``/``eval()``."""

    def __init__(self, torch: Any, model: Any, targets: Sequence[str], rank: int, alpha: float):
        cls = _hand_lora_class(torch)
        names = {LORA_TARGETS[t][1] for t in targets}
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora_modules = []
        for mname, mod in list(model.named_modules()):
            for child_name, child in list(mod.named_children()):
                if child_name in names and isinstance(child, torch.nn.Linear):
                    wrapped = cls(child, rank, alpha / rank)
                    setattr(mod, child_name, wrapped)
                    self.lora_modules.append(wrapped)
        self.model = model

    def __call__(self, *a, **kw):
        return self.model(*a, **kw)

    def named_modules(self):
        return self.model.named_modules()

    def parameters(self):
        return self.model.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        for m in self.lora_modules:
            m.enabled = False
        try:
            yield
        finally:
            for m in self.lora_modules:
                m.enabled = True


def torch_lora_model(torch: Any, model: Any, args: argparse.Namespace):
    """Wrap ``model`` with LoRA adapters (peft if importable); adapters are float32."""
    targets = args.lora_targets
    if args.no_peft or importlib.util.find_spec("peft") is None:
        return HandLoRAModel(torch, model, targets, args.lora_rank, args.lora_alpha), "hand-written"
    import peft

    lcfg = peft.LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules=[LORA_TARGETS[t][1] for t in targets], task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(model, lcfg)
    for n, p in pm.named_parameters():
        if "lora_" in n and p.dtype != torch.float32:
            p.data = p.data.float()
    return pm, f"peft {peft.__version__}"


_LAYER_RE = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")


def set_torch_lora(torch: Any, model: Any, weights: Dict[str, Tuple[np.ndarray, np.ndarray]]):
    """Copy the numpy LoRA weights into every adapted linear layer of ``model``."""
    by_proj = {LORA_TARGETS[t][1]: t for t in weights}
    seen = 0
    for name, mod in model.named_modules():
        m = _LAYER_RE.search(name)
        if not m or not hasattr(mod, "lora_A") or m.group(3) not in by_proj:
            continue
        i, t = int(m.group(1)), by_proj[m.group(3)]
        a, b = weights[t]
        la = mod.lora_A["default"] if isinstance(mod.lora_A, torch.nn.ModuleDict) else mod.lora_A
        lb = mod.lora_B["default"] if isinstance(mod.lora_B, torch.nn.ModuleDict) else mod.lora_B
        with torch.no_grad():
            la.weight.copy_(torch.from_numpy(a[i]))
            lb.weight.copy_(torch.from_numpy(b[i]))
        seen += 1
    n_layers = next(iter(weights.values()))[0].shape[0]
    if seen != n_layers * len(weights):
        raise RuntimeError(f"set {seen} LoRA layers, expected {n_layers * len(weights)}")


def torch_lora_tensors(torch: Any, model: Any, targets: Sequence[str]):
    """{target: ([L] lora_A weights, [L] lora_B weights)} in layer order."""
    by_proj = {LORA_TARGETS[t][1]: t for t in targets}
    out: Dict[str, Tuple[Dict[int, Any], Dict[int, Any]]] = {t: ({}, {}) for t in targets}
    for name, mod in model.named_modules():
        m = _LAYER_RE.search(name)
        if not m or not hasattr(mod, "lora_A") or m.group(3) not in by_proj:
            continue
        la = mod.lora_A["default"] if isinstance(mod.lora_A, torch.nn.ModuleDict) else mod.lora_A
        lb = mod.lora_B["default"] if isinstance(mod.lora_B, torch.nn.ModuleDict) else mod.lora_B
        t = by_proj[m.group(3)]
        out[t][0][int(m.group(1))] = la.weight
        out[t][1][int(m.group(1))] = lb.weight
    return {t: ([a[i] for i in sorted(a)], [b[i] for i in sorted(b)]) for t, (a, b) in out.items()}


def torch_policy_logprobs(torch: Any, logits: Any, prefix_len: Any, term_ids: Sequence[int],
                          min_len: int, max_len: int):
    """(log q over the vocab [..., V], log q(⊤) [...]) of the constrained policy, float32."""
    x = logits.float()
    V = x.shape[-1]
    is_term = torch.zeros(V, dtype=torch.bool, device=x.device)
    is_term[list(term_ids)] = True
    plen = prefix_len.unsqueeze(-1)
    allowed = torch.where(is_term, plen >= min_len, plen < max_len)
    x = x.masked_fill(~allowed, -1e30)
    logp = torch.log_softmax(x, dim=-1)
    return logp, torch.logsumexp(logp[..., list(term_ids)], dim=-1)


def torch_subtb_loss(torch: Any, log_pf: Any, log_pterm: Any, log_r: Any, lengths: Any,
                     min_len: int, lamb: float):
    """Modified SubTB, cumulative sums over windows (written from the paper's maths).

    log F_i = log R(s_i ⊤) - log q(⊤ | s_i); delta_t = log F_t + log_pf_t - log F_{t+1};
    D = cumsum(delta) with D_0 = 0, so residual(i, j) = D_j - D_i
    = log F_i + sum_{t=i}^{j-1} log_pf_t - log F_j. For each window length k = j - i,
    weight λ^(k-1); pairs count when both states are terminable (min_len <= i, j <= n).
    loss = sum w res^2 / sum w over the batch.
    """
    B, T = log_pf.shape
    kw = {"device": log_pf.device, "dtype": log_pf.dtype}
    idx = torch.arange(T + 1, device=log_pf.device)
    valid = (idx[None, :] <= lengths[:, None]) & (idx[None, :] >= min_len)
    zero = torch.zeros((), **kw)
    log_f = torch.where(valid, log_r - log_pterm, zero)
    pf = torch.where(idx[None, :T] < lengths[:, None], log_pf, zero)
    delta = log_f[:, :-1] + pf - log_f[:, 1:]
    D = torch.cat([torch.zeros((B, 1), **kw), torch.cumsum(delta, 1)], 1)
    num = torch.zeros((), **kw)
    den = torch.zeros((), **kw)
    for k in range(1, T + 1):
        res = D[:, k:] - D[:, :-k]
        m = (valid[:, k:] & valid[:, :-k]).to(log_pf.dtype)
        w = lamb ** (k - 1)
        num = num + w * (res.pow(2) * m).sum()
        den = den + w * m.sum()
    return num / den.clamp_min(1e-30)


def torch_scores(torch: Any, model: Any, batch: Dict[str, Any], term_ids: Sequence[int],
                 min_len: int, slice_logits: bool):
    """Policy (with grad) and reward (no grad, adapters off) per-step arrays."""
    pt, toks, lens = batch["prompt_tokens"], batch["tokens"], batch["lengths"]
    B, P = pt.shape
    T = toks.shape[1]
    zmask = torch.arange(T, device=toks.device)[None, :] < lens[:, None]
    seq = torch.cat([pt, torch.where(zmask, toks, torch.zeros_like(toks))], 1)
    am = torch.cat([batch["prompt_mask"], zmask.long()], 1)
    kw = {"logits_to_keep": T + 1} if slice_logits else {}
    states = torch.arange(T + 1, device=toks.device)
    smask = states[None, :] <= lens[:, None]
    zero = torch.zeros((), device=toks.device)

    logits = model(input_ids=seq, attention_mask=am, **kw).logits[:, -(T + 1):]
    logp, lp_term = torch_policy_logprobs(torch, logits, states[None, :].expand(B, -1),
                                          term_ids, min_len, T)
    log_pf = torch.where(zmask, logp[:, :T].gather(-1, seq[:, P:, None])[..., 0], zero)
    log_pterm = torch.where(smask, lp_term, zero)
    with torch.no_grad(), model.disable_adapter():
        rlogits = model(input_ids=seq, attention_mask=am, **kw).logits[:, -(T + 1):]
        rlp = torch.log_softmax(rlogits.float(), dim=-1)
        tok_lp = torch.where(zmask, rlp[:, :T].gather(-1, seq[:, P:, None])[..., 0], zero)
        log_pz = torch.cat([torch.zeros((B, 1), device=toks.device), torch.cumsum(tok_lp, 1)], 1)
        log_r = torch.where(smask, log_pz + torch.logsumexp(rlp[..., list(term_ids)], -1), zero)
    return log_pf, log_pterm, log_r


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The KV-cache keyword (and output field) of the installed transformers:
    ``past_key_values`` (the official release's), renamed ``cache`` in transformers >= 5.2x."""
    import inspect

    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def torch_sample(torch: Any, model: Any, prompt: Any, prompt_mask: Any, T: int,
                 term_ids: Sequence[int], min_len: int, gen: Any, pad_id: int = 0):
    """Official-style sampling loop with ``past_key_values``; records log q per step."""
    kv = cache_kwarg()
    B = prompt.shape[0]
    dev = prompt.device
    is_term = torch.zeros(model_vocab(model), dtype=torch.bool, device=dev)
    is_term[list(term_ids)] = True
    with torch.no_grad():
        am = prompt_mask.long()
        out = model(input_ids=prompt, attention_mask=am, use_cache=True)
        past, logits = getattr(out, kv), out.logits[:, -1]
        tokens = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        log_pf = torch.zeros((B, T), device=dev)
        log_pterm = torch.zeros((B, T + 1), device=dev)
        zero = torch.zeros((), device=dev)
        for t in range(T):
            plen = torch.full((B,), t, device=dev)
            logp, lp_term = torch_policy_logprobs(torch, logits, plen, term_ids, min_len, T)
            log_pterm[:, t] = torch.where(done, zero, lp_term)
            tok = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
            ends = ~done & is_term[tok]
            emits = ~done & ~ends
            tokens[:, t] = torch.where(emits, tok, torch.full_like(tok, pad_id))
            log_pf[:, t] = torch.where(emits, logp.gather(-1, tok[:, None])[:, 0], zero)
            lengths = torch.where(emits, torch.full_like(lengths, t + 1), lengths)
            done = done | ends
            if bool(done.all()):
                break
            am = torch.cat([am, torch.ones((B, 1), dtype=am.dtype, device=dev)], 1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=am, use_cache=True,
                        **{kv: past})
            past, logits = getattr(out, kv), out.logits[:, -1]
        if not bool(done.all()):
            plen = torch.full((B,), T, device=dev)
            _, lp_term = torch_policy_logprobs(torch, logits, plen, term_ids, min_len, T)
            log_pterm[:, T] = torch.where(done, zero, lp_term)
    return tokens, lengths, log_pf, log_pterm


def model_vocab(model: Any) -> int:
    cfg = getattr(model, "config", None) or model.model.config
    return int(cfg.vocab_size)


def torch_sync(torch: Any, dev: Any) -> Callable[[Any], None]:
    if dev.type == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def torch_peak(torch: Any, dev: Any) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def bench_torch(torch: Any, args: argparse.Namespace, model: Any, term_ids: Sequence[int],
                batch_np: Dict[str, np.ndarray], dev: Any) -> Dict[str, Any]:
    """Time the reference sampler then the reference train step."""
    B, P, T = args.batch, args.prompt_len, args.traj_len
    batch = {k: torch.as_tensor(v, dtype=torch.long, device=dev) for k, v in batch_np.items()}
    sync = torch_sync(torch, dev)
    res: Dict[str, Any] = {}

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    lens: List[Any] = []
    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def run_sample(i):
        out = torch_sample(torch, model, batch["prompt_tokens"], batch["prompt_mask"], T,
                           term_ids, args.min_len, gen)
        lens.append(out[1])
        return out

    f, ts, _ = time_calls(run_sample, sync, args.warmup, args.steps)
    res["sample"] = summarise(f, ts, B * T, torch_peak(torch, dev))
    res["sample"]["mean_length"] = float(np.mean([x.float().mean().item() for x in lens]))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def run_step(i):
        opt.zero_grad(set_to_none=True)
        log_pf, log_pterm, log_r = torch_scores(torch, model, batch, term_ids, args.min_len,
                                                args.torch_slice_logits)
        loss = torch_subtb_loss(torch, log_pf, log_pterm, log_r, batch["lengths"],
                                args.min_len, args.subtb_lambda)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip_norm)
        opt.step()
        return loss.detach()

    f, ts, first_loss = time_calls(run_step, sync, args.warmup, args.steps)
    res["train"] = summarise(f, ts, B * (P + T), torch_peak(torch, dev))
    res["train"]["first_loss"] = float(first_loss)
    return res


# ---------------------------------------------------------------------------
# Float32 correctness check of the comparison
# ---------------------------------------------------------------------------
def correctness_check(g: Any, torch: Any, transformers: Any, args: argparse.Namespace,
                      hf_dir: str, weights: Dict[str, Tuple[np.ndarray, np.ndarray]],
                      spec: Any, batch_np: Dict[str, np.ndarray], dev: Any) -> Dict[str, Any]:
    """Both implementations in float32 on the same weights and rows: loss, per-step arrays,
    LoRA gradients; plus the torch sampler's recorded log-probs against our scorer."""
    import jax
    import jax.numpy as jnp

    n = min(args.check_rows, args.batch)
    sub = {k: v[:n] for k, v in batch_np.items()}
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    model = model.float()
    pm, _ = torch_lora_model(torch, model, args)
    set_torch_lora(torch, pm, weights)
    pm.train()
    tb = {k: torch.as_tensor(v, dtype=torch.long, device=dev) for k, v in sub.items()}
    log_pf, log_pterm, log_r = torch_scores(torch, pm, tb, spec.term_ids, args.min_len,
                                            args.torch_slice_logits)
    loss_t = torch_subtb_loss(torch, log_pf, log_pterm, log_r, tb["lengths"], args.min_len,
                              args.subtb_lambda)
    loss_t.backward()

    cfg, params, _ = g.load_hf(hf_dir, "float32")
    lora_cfg = g.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                            targets=lora_patterns(args.lora_targets))
    adapters = adapters_from_numpy(g, jnp, cfg, lora_cfg, params, weights)
    with jax.default_matmul_precision("highest"):
        lg, _ = make_ours_fns(g, cfg, spec, float(adapters["scale"]), args.subtb_lambda, None)
        dev_sub = {k: jnp.asarray(v) for k, v in sub.items()}
        (loss_o, aux), grads = lg(adapters["tree"], params, dev_sub)
        loss_o = float(loss_o)

    def mad(x, y):
        return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))

    out: Dict[str, Any] = {
        "rows": n,
        "loss_ours": loss_o,
        "loss_reference": float(loss_t.detach()),
        "log_pf_max_abs_diff": mad(aux["log_pf"], log_pf.detach().cpu()),
        "log_pterm_max_abs_diff": mad(aux["log_pterm"], log_pterm.detach().cpu()),
        "log_r_max_abs_diff": mad(aux["log_r"], log_r.detach().cpu()),
    }
    out["loss_abs_diff"] = abs(out["loss_ours"] - out["loss_reference"])
    tgrads = torch_lora_tensors(torch, pm, args.lora_targets)
    gd, gmax = 0.0, 0.0
    for t in args.lora_targets:
        group = LORA_TARGETS[t][0]
        leaf = grads["layers"][group][t]["kernel"]
        ta = np.stack([w.grad.detach().cpu().numpy() for w in tgrads[t][0]])  # [L, r, in]
        tb_ = np.stack([w.grad.detach().cpu().numpy() for w in tgrads[t][1]])  # [L, out, r]
        pairs = ((leaf["a"], np.swapaxes(ta, 1, 2)), (leaf["b"], np.swapaxes(tb_, 1, 2)))
        for ours_g, ref_g in pairs:
            gd = max(gd, mad(ours_g, ref_g))
            gmax = max(gmax, float(np.max(np.abs(ref_g))))
    out["grad_max_abs_diff"] = gd
    out["grad_max_abs_reference"] = gmax
    out["grad_rel_diff"] = gd / gmax if gmax > 0 else 0.0

    # Sampler check: the torch loop's recorded log-probs vs our one-pass scorer on its tokens.
    pm.eval()
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    toks, lens, s_pf, s_pterm = torch_sample(torch, pm, tb["prompt_tokens"], tb["prompt_mask"],
                                             args.traj_len, spec.term_ids, args.min_len, gen)
    sampled = dict(sub, tokens=toks.cpu().numpy().astype(np.int32),
                   lengths=lens.cpu().numpy().astype(np.int32))
    with jax.default_matmul_precision("highest"):  # same shapes: no new compile
        dev_sampled = {k: jnp.asarray(v) for k, v in sampled.items()}
        (_, aux_s), _ = lg(adapters["tree"], params, dev_sampled)
    out["sampler_log_pf_max_abs_diff"] = mad(aux_s["log_pf"], s_pf.cpu())
    out["sampler_log_pterm_max_abs_diff"] = mad(aux_s["log_pterm"], s_pterm.cpu())
    out["sampler_mean_length"] = float(np.mean(sampled["lengths"]))
    del model, pm
    return out


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def lora_patterns(targets: Sequence[str]) -> Tuple[str, ...]:
    return tuple(f"layers/{LORA_TARGETS[t][0]}/{t}/kernel" for t in targets)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--traj-len", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1: compile)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help=f"comma list from {','.join(LORA_TARGETS)}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--subtb-lambda", type=float, default=1.0)
    p.add_argument("--min-len", type=int, default=0, help="prefixes shorter cannot terminate")
    p.add_argument("--check-rows", type=int, default=8,
                   help="rows of the batch used by the float32 correctness check")
    p.add_argument("--skip-check", action="store_true", help="no float32 correctness check")
    p.add_argument("--skip-torch", action="store_true", help="ours only (no torch import)")
    p.add_argument("--no-peft", action="store_true", help="hand-written LoRA even if peft exists")
    p.add_argument("--torch-slice-logits", action="store_true",
                   help="reference computes logits only for the T+1 scored positions "
                        "(logits_to_keep); the official code projects every position")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for CPU runs (0 = torch's default); on a busy "
                        "shared CPU, 1 avoids OpenMP oversubscription stalls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    a = p.parse_args(argv)
    for name in ("batch", "prompt_len", "traj_len", "steps", "lora_rank", "check_rows"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.torch_threads < 0:
        p.error(f"--torch-threads must be >= 0, got {a.torch_threads}")
    if a.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first call compiles), got {a.warmup}")
    if not 0 <= a.min_len <= a.traj_len:
        p.error(f"--min-len must be in [0, --traj-len={a.traj_len}], got {a.min_len}")
    if a.subtb_lambda < 0:
        p.error(f"--subtb-lambda must be >= 0, got {a.subtb_lambda}")
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in LORA_TARGETS]
    if not targets or bad:
        p.error(f"--lora-targets: unknown {bad or 'empty list'}; "
                f"choose from {sorted(LORA_TARGETS)}")
    a.lora_targets = tuple(dict.fromkeys(targets))
    return a


def model_config(g: Any, args: argparse.Namespace, dtype: str) -> Any:
    pre = PRESETS[args.preset]
    return g.ModelConfig(
        family="llama", max_seq_len=max(2048, args.prompt_len + args.traj_len),
        norm_eps=NORM_EPS, dtype=dtype, param_dtype=dtype, **pre)


def hf_llama_config(transformers: Any, cfg: Any) -> Any:
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="sdpa",
    )


def check_same_arch(want: Any, got: Any) -> None:
    """Fail loudly if the HF round trip changed the architecture."""
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "rope_theta", "tie_embeddings", "norm_eps", "family", "activation")
    diff = {f: (getattr(want, f), getattr(got, f)) for f in fields
            if getattr(want, f) != getattr(got, f)}
    if diff:
        raise RuntimeError(f"HF round trip changed the architecture (want, got): {diff}")


def fmt_table(res: Dict[str, Any]) -> str:
    """Markdown table: metric | ours | reference | ours/reference."""
    o, r = res["ours"], res.get("reference")

    def cell(x, kind):
        if x is None:
            return "n/a"
        return {"ms": f"{x * 1e3:.2f}", "tps": f"{x:,.0f}", "mib": f"{x / MIB:,.1f}"}[kind]

    rows = [("train step, median ms", "train", "median_s", "ms"),
            ("train tokens/s (B*(P+T))", "train", "tokens_per_s", "tps"),
            ("train peak memory, MiB", "train", "peak_bytes", "mib"),
            ("sampler call, median ms", "sample", "median_s", "ms"),
            ("sampler tokens/s (B*T)", "sample", "tokens_per_s", "tps"),
            ("sampler peak memory, MiB", "sample", "peak_bytes", "mib")]
    lines = ["| metric | ours (JAX) | reference (PyTorch) | ours/reference |",
             "|---|---:|---:|---:|"]
    for label, phase, key, kind in rows:
        a = o[phase][key]
        b = r[phase][key] if r else None
        ratio = f"{a / b:.3f}" if (a is not None and b) else "n/a"
        lines.append(f"| {label} | {cell(a, kind)} | {cell(b, kind)} | {ratio} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    import jax

    if args.dtype == "float32":
        # Full float32 matmuls on both sides (torch's default; XLA:GPU would use TF32).
        jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp

    g = import_gfn_jax()
    if g.import_note:
        print("note:", g.import_note, file=sys.stderr)
    B, P, T = args.batch, args.prompt_len, args.traj_len
    cfg_want = model_config(g, args, "float32")
    term_id = cfg_want.vocab_size - 1
    spec = g.PolicySpec(term_ids=(term_id,), max_len=T, min_len=args.min_len)
    rng = np.random.default_rng(args.seed)
    batch_np = make_batch(rng, B, P, T, cfg_want.vocab_size, term_id)
    weights = make_lora_weights(rng, cfg_want, args.lora_targets, args.lora_rank, b_std=0.02)
    lora_cfg = g.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                            targets=lora_patterns(args.lora_targets))

    result: Dict[str, Any] = {
        "config": {
            "preset": args.preset, **PRESETS[args.preset], "batch": B, "prompt_len": P,
            "traj_len": T, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
            "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_targets": list(args.lora_targets), "subtb_lambda": args.subtb_lambda,
            "min_len": args.min_len, "lr": args.lr, "weight_decay": args.weight_decay,
            "clip_norm": args.clip_norm, "seed": args.seed,
            "torch_slice_logits": args.torch_slice_logits,
        },
        "env": {
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0]),
            "jax_device_kind": jax.devices()[0].device_kind, "gfn_jax_import": g.import_note,
        },
        "reference": None,
        "check": None,
    }

    torch = transformers = None
    tmp = tempfile.TemporaryDirectory(prefix="gfn_bench_")
    try:
        if args.skip_torch:
            cfg = cfg_want.replace(dtype=args.dtype, param_dtype=args.dtype)
            params = g.init_params(cfg, jax.random.PRNGKey(args.seed))
        else:
            import torch
            import transformers

            transformers.utils.logging.disable_progress_bar()
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if args.torch_threads > 0:
                torch.set_num_threads(args.torch_threads)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.manual_seed(args.seed)
            with torch.device(dev):
                base = transformers.LlamaForCausalLM(hf_llama_config(transformers, cfg_want))
            base.save_pretrained(tmp.name)
            cfg, params, _ = g.load_hf(tmp.name, args.dtype)
            check_same_arch(cfg_want, cfg)
            result["env"].update({
                "torch": torch.__version__, "transformers": transformers.__version__,
                "torch_device": str(dev),
                "torch_device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                      else platform.processor()),
                "attn_implementation": base.config._attn_implementation,
                "torch_threads": torch.get_num_threads(),
            })
        adapters = adapters_from_numpy(g, jnp, cfg, lora_cfg, params, weights)
        result["ours"] = bench_ours(g, args, cfg, params, adapters, spec, batch_np)
        del params, adapters
        gc.collect()

        if not args.skip_torch:
            tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
            base = base.to(tdtype)
            pm, lora_kind = torch_lora_model(torch, base, args)
            set_torch_lora(torch, pm, weights)
            result["env"]["lora_impl"] = lora_kind
            result["reference"] = bench_torch(torch, args, pm, spec.term_ids, batch_np, dev)
            del pm, base
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if not args.skip_check:
                result["check"] = correctness_check(g, torch, transformers, args, tmp.name,
                                                    weights, spec, batch_np, dev)
    finally:
        tmp.cleanup()

    if result["reference"]:
        o, r = result["ours"], result["reference"]
        result["ratios"] = {
            f"{ph}_{k}": (o[ph][k] / r[ph][k] if o[ph][k] is not None and r[ph][k] else None)
            for ph in ("train", "sample") for k in ("median_s", "tokens_per_s", "peak_bytes")
        }
        result["first_step_loss_abs_diff_timed_dtype"] = abs(
            o["train"]["first_loss"] - r["train"]["first_loss"])

    env = result["env"]
    print(f"\ngfn-jax vs PyTorch reference: preset {args.preset}, {args.dtype}, batch {B}, "
          f"prompt {P}, traj {T}, LoRA r={args.lora_rank} on {','.join(args.lora_targets)}; "
          f"median of {args.steps} after {args.warmup} warm-up")
    print(f"JAX {env['jax']} on {env['jax_device_kind']} ({env['jax_backend']})"
          + (f"; torch {env['torch']} on {env['torch_device_name'] or env['torch_device']}, "
             f"transformers {env['transformers']}, LoRA: {env.get('lora_impl')}"
             if "torch" in env else "; reference skipped"))
    print(fmt_table(result))
    o = result["ours"]
    print(f"first call (compile + run): ours train {o['train']['first_call_s']:.2f} s, "
          f"sampler {o['sample']['first_call_s']:.2f} s"
          + (f"; reference train {result['reference']['train']['first_call_s']:.2f} s, "
             f"sampler {result['reference']['sample']['first_call_s']:.2f} s"
             if result["reference"] else ""))
    print(f"mean sampled length: ours {o['sample']['mean_length']:.2f}"
          + (f", reference {result['reference']['sample']['mean_length']:.2f}"
             if result["reference"] else ""))
    print("JAX peak memory is the process-lifetime peak_bytes_in_use (sampler ran first); "
          "torch peaks are reset before each phase.")
    if result["reference"]:
        print(f"first-step SubTB loss in {args.dtype}: ours {o['train']['first_loss']:.6g}, "
              f"reference {result['reference']['train']['first_loss']:.6g}, |diff| "
              f"{result['first_step_loss_abs_diff_timed_dtype']:.3g}")
    c = result["check"]
    if c:
        print(f"float32 check on {c['rows']} rows, same weights: SubTB loss ours "
              f"{c['loss_ours']:.8g} vs reference {c['loss_reference']:.8g}, "
              f"max |diff| {c['loss_abs_diff']:.3g}; "
              f"log_pf {c['log_pf_max_abs_diff']:.3g}, "
              f"log_pterm {c['log_pterm_max_abs_diff']:.3g}, "
              f"log_r {c['log_r_max_abs_diff']:.3g}; LoRA grads max |diff| "
              f"{c['grad_max_abs_diff']:.3g} (relative {c['grad_rel_diff']:.3g}); torch sampler "
              f"log-probs vs our scorer {c['sampler_log_pf_max_abs_diff']:.3g} / "
              f"{c['sampler_log_pterm_max_abs_diff']:.3g}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
