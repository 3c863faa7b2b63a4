#!/usr/bin/env python
"""gfn-jax's train step vs the paper's OFFICIAL PyTorch pipeline, side by side, per phase.

One run, one CPU, one model (SmolLM2-135M by default: the project's embedded model,
exported with :func:`gfn_jax.models.hf.save_hf` to a Hugging Face directory that the PyTorch
side loads through ``transformers``, so both sides hold identical weights; ``--preset tiny``
uses a random tiny model instead), LoRA r = 64 on q, k, v, o (alpha 16, dropout 0), 16
samples of one prompt, exactly 20 new tokens (min = max length 20), float32.

Settings of issue #10:

* ``A`` (infilling-style): |X| = 59, suffix |Y| = 10. Reward of every prefix
  log p(z_<i | X) + log p(Y | X z_<i) (the official code recomputes it with one full forward
  per prefix: 21 passes);
* ``B`` (next-sentence-style): |X| = 30, reward log p(z_<i ⊤ | X) of every prefix.

**Ours** is the library's own pipeline, built like :class:`gfn_jax.train.Trainer` builds it:
:meth:`gfn_jax.rollout.Rollouts.draw` with a :class:`gfn_jax.policy.Policy` (the jitted
sampler), then the jitted step of :func:`gfn_jax.step.make_train_step` (SubTB, shared-prompt
scoring, LoRA, optax AdamW from :func:`gfn_jax.optim.build_optimizer`, state donated) with the
task rewards :func:`gfn_jax.tasks.infill.infill_log_reward` (A) and
:func:`gfn_jax.tasks.continuation.penalised_reward_prefixes` (B). Its phases are timed as
separate calls: sampling; the reward alone (jitted, same shared-prompt context); the step with
that reward given (policy scoring + loss + backward + update); and, unless ``--no-fused``,
the real fused step (reward + policy + backward + update in one program).

**Official** is the release of Hu et al. (GFNOrg/gfn-lm-tuning), imported from a snapshot
given by ``--official PATH`` (or ``$GFN_JAX_OFFICIAL``), never copied here, and driven
through its own training loops:

* A: ``infill_subj_arithmetic/main.py``'s ``train()`` (the loop of ``python main.py
  +experiment=infilling``) with its ``utils.generate_and_return_eos_logprob`` sampler, the
  reward ``rewards.FrozenModel`` built by ``rewards.load_reward`` (``utils.score_fast``), its
  in-loop modified-SubTB loss, ``backward`` and ``torch.optim.AdamW``;
* B: ``next_sentence/lightning_module.py``'s ``NextSentenceGFNTask`` under a
  ``pytorch_lightning.Trainer`` (``training_step`` -> ``utils.generate_and_return_termination_
  logprob``, reward ``utils.FrozenModelSentenceGivenPrompt`` -> ``utils.score_fast``,
  ``utils.modified_subtb_loss``, Lightning's backward and AdamW step).

Its per-phase times come from wrappers around its sampler and its reward callable (the code
itself is untouched): sampling = time inside the sampler minus the reward calls made from it
(the official sampler also runs the policy forward with autograd: there is no separate
scoring pass); reward = time in the reward calls; the rest of the step = loss + backward +
update + loop overhead. What the benchmark replaces: the replay buffer by an inert one (every
step on-policy, temperature 1; no buffer bookkeeping on either side), and the evaluation /
logging hooks (wandb, rich tables, checkpoint saves, Lightning's baseline evaluation at
``on_train_start``) by no-ops. Packages the imported files need only on paths not driven
(``bitsandbytes``, ``wandb``, ``spacy``, ``sentence_transformers``) are stubbed when missing.

Each side runs in a process of its own (``--ours-process separate``, the default: ours in a
fresh child interpreter driven step by step over a pipe, the official code in this one), so
neither side's host allocations land in the other's heap; ``--ours-process shared`` runs
both in this process, as earlier versions did (sampling alone, below, always runs here).
The two sides alternate step by step (ours, official / official, ours, ...); the first
``--warmup`` steps of each side are not timed (JAX compiles in its first step). The table
gives medians of ``--steps`` steps, the speed-up official/ours, and a rough floor: the
FLOPs of each phase from the model shape (prompt once per group, linear layers, attention,
vocabulary projection of the scored positions, backward = one more forward) divided by the
GFLOP/s of a float32 matmul measured on this CPU.

Example (the full measurement; expect about 30 minutes on a 2-core CPU)::

    python benchmarks/bench_official.py --official /tmp/official --json bench_official.json

Smoke run (tiny random model; ours only without a snapshot)::

    python benchmarks/bench_official.py --preset tiny --steps 1 [--official PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: Dict[str, Dict[str, Any]] = {
    "A": dict(style="infill", samples=16, prompt_len=59, traj_len=20, suffix_len=10),
    "B": dict(style="next_sentence", samples=16, prompt_len=30, traj_len=20, suffix_len=0),
}
PRESETS = ("smollm2-135m", "tiny")
LORA_PATTERN = r"layers/attn/(q|k|v|o)/kernel"
HF_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Modules the official files import at load time but use only on paths this benchmark does
# not drive (4-bit training, wandb logging, the spaCy validator, embedding diversity).
STUBBABLE = {"bitsandbytes": (), "wandb": (), "spacy": (),
             "sentence_transformers": ("util",)}
# Needed for real (pip names in brackets in the error message).
REQUIRED = {"torch": "torch", "transformers": "transformers", "peft": "peft",
            "hydra": "hydra-core", "omegaconf": "omegaconf", "editdistance": "editdistance",
            "pandas": "pandas", "pytorch_lightning": "pytorch-lightning", "tqdm": "tqdm",
            "rich": "rich"}
# Top-level module names of the official files (they import each other by these names).
OFFICIAL_NAMES = ("main", "utils", "rewards", "data", "replay_buffer", "lightning_module",
                  "lightning_data")


# ---------------------------------------------------------------------------
# gfn_jax imports that survive a missing optional dependency (as in bench_step.py)
# ---------------------------------------------------------------------------
def import_gfn_jax() -> types.SimpleNamespace:
    """The library pieces used here; ``import gfn_jax`` may fail for lack of an optional
    package (e.g. ``ml_collections``): then the submodules are imported directly."""
    spec = importlib.util.spec_from_file_location("gfn_jax_bench_step",
                                                  Path(__file__).with_name("bench_step.py"))
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    note = bench_step.import_gfn_jax_package()  # the same fallback as bench_step.py's
    from gfn_jax import parallel
    from gfn_jax.hostmem import keep_freed_memory
    from gfn_jax.logprobs import PolicySpec
    from gfn_jax.models import hf, registry
    from gfn_jax.models.lora import LoraConfig, init_lora
    from gfn_jax.models.transformer import activation_sharding
    from gfn_jax.objective_registry import get_objective
    from gfn_jax.optim import build_optimizer
    from gfn_jax.policy import Policy
    from gfn_jax.rollout import Rollouts
    from gfn_jax.sampling import cache_decode_weights, sample
    from gfn_jax.scoring import prompt_groups
    from gfn_jax.step import StepSpec, TrainState, host_hyper, make_train_step
    from gfn_jax.tasks.continuation import penalised_reward_prefixes
    from gfn_jax.tasks.infill import infill_log_reward

    return types.SimpleNamespace(
        parallel=parallel, PolicySpec=PolicySpec, hf=hf, registry=registry,
        LoraConfig=LoraConfig, init_lora=init_lora, activation_sharding=activation_sharding,
        get_objective=get_objective, build_optimizer=build_optimizer, Policy=Policy,
        Rollouts=Rollouts, prompt_groups=prompt_groups, StepSpec=StepSpec,
        TrainState=TrainState, host_hyper=host_hyper, make_train_step=make_train_step,
        penalised_reward_prefixes=penalised_reward_prefixes,
        infill_log_reward=infill_log_reward, sample=sample, import_note=note,
        cache_decode_weights=cache_decode_weights,
        keep_freed_memory=keep_freed_memory)


# ---------------------------------------------------------------------------
# Model, prompts and the Hugging Face export
# ---------------------------------------------------------------------------
def load_model(g: Any, preset: str) -> Any:
    """(config, float32 params, tokenizer) of the preset, through the project's loader."""
    if preset == "tiny":  # random weights; the context fits setting A's packed suffix pass
        return g.registry.tiny_model("llama", seed=0, max_seq_len=512)
    return g.registry.load("smollm2-135m", dtype="float32")


def term_ids_of(tok: Any, style: str) -> int:
    """The termination token: EOS for infilling (the official infilling code's), the
    token of "." ending a sentence for next-sentence (as the official task picks it)."""
    if style == "infill":
        if tok.eos_id is None:
            raise ValueError("the model's tokenizer has no EOS token (infilling terminates on it)")
        return int(tok.eos_id)
    ids = tok.encode("A sentence.", add_bos=False)
    return int(ids[-1])


def make_ids(rng: np.random.Generator, vocab: int, n: int, avoid: Sequence[int]) -> List[int]:
    """``n`` random token ids, avoiding special / termination ids (and, for a real
    vocabulary, the first 32 ids, where special tokens live)."""
    lo = 32 if vocab > 1000 else 0
    bad = set(int(a) for a in avoid if a is not None)
    pool = np.array([i for i in range(lo, vocab) if i not in bad])
    return [int(x) for x in rng.choice(pool, size=n)]


# ---------------------------------------------------------------------------
# FLOP model of each phase
# ---------------------------------------------------------------------------
def fwd_flops(cfg: Any, rows: int, new: int, before: int, logits: int, lora_r: int) -> float:
    """Forward FLOPs of ``rows`` sequences each adding ``new`` tokens after ``before``
    cached ones (causal attention), with ``logits`` vocabulary projections in all."""
    D, H, KV, Dh, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                          cfg.vocab_size)
    lin = 2.0 * (D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * F)
    lora = 2.0 * lora_r * ((D + H * Dh) + 2 * (D + KV * Dh) + (H * Dh + D)) if lora_r else 0.0
    ctx = rows * (new * before + new * (new + 1) / 2.0)  # (query, key) pairs
    return cfg.n_layers * ((lin + lora) * rows * new + 4.0 * H * Dh * ctx) + 2.0 * D * V * logits


def phase_flops(cfg: Any, s: Dict[str, Any], r: int) -> Dict[str, Dict[str, float]]:
    """FLOPs per phase: ``floor`` (the work of the minimal algorithm, which ours follows:
    the prompt once per group, every prefix in one pass, the suffix after each prefix in one
    packed pass) and ``official`` (what the official loop computes: the prompt per sample,
    every position projected to the vocabulary, one reward pass per prefix in A)."""
    K, P, T, S = s["samples"], s["prompt_len"], s["traj_len"], s["suffix_len"]
    f = functools.partial(fwd_flops, cfg)

    def prompt_and_z(lora: int, z_logits: int) -> float:
        return f(1, P, 0, 1, lora) + f(K, T, P, z_logits, lora)

    floor = {"sampling": prompt_and_z(r, K * T),
             "reward": prompt_and_z(0, K * (T + 1)),
             "policy": 2.0 * prompt_and_z(r, K * (T + 1))}
    if S:
        floor["reward"] += sum(f(K, S, P + i, K * S, 0) for i in range(T + 1))
    if s["style"] == "infill":  # prefill X[:-1], then T one-token steps with grad
        pre, steps, first = P - 1, T, P - 1
        reward = sum(f(K, P + i + S, 0, K * (P + i + S), 0) for i in range(T + 1))
    else:  # prefill X (logits of every position), then T one-token steps
        pre, steps, first = P, T, P
        reward = f(K, P + T, 0, K * (P + T), 0)
    sample_fwd = f(K, pre, 0, K * pre, r) + f(K, steps, first, K * steps, r)
    backward = f(K, pre, 0, 0, r) + f(K, steps, first, K * steps, r)
    official = {"sampling": sample_fwd, "reward": reward, "policy": backward}
    for d in (floor, official):
        d["sampling+policy"] = d["sampling"] + d["policy"]
        d["total"] = d["sampling"] + d["reward"] + d["policy"]
    return {"floor": floor, "official": official}


def matmul_gflops(n: int, torch: Any = None, reps: int = 5) -> Dict[str, float]:
    """GFLOP/s of an ``n`` x ``n`` float32 matmul: XLA (jit) and, if given, torch."""
    import jax
    import jax.numpy as jnp

    out = {}
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    mm(a, a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    out["jax"] = 2.0 * n ** 3 / statistics.median(ts) / 1e9
    if torch is not None:
        x = torch.randn(n, n)
        torch.mm(x, x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(x, x)
            ts.append(time.perf_counter() - t0)
        out["torch"] = 2.0 * n ** 3 / statistics.median(ts) / 1e9
    return out


# ---------------------------------------------------------------------------
# Ours: the library's pipeline, as the Trainer builds it
# ---------------------------------------------------------------------------
def _ns(**kw: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**kw)


class OursSide:
    """Sampler + train step of gfn-jax for one setting; :meth:`step` times one iteration."""

    def __init__(self, g: Any, model: Any, setting: Dict[str, Any], prompt: List[int],
                 suffix: List[int], term: int, args: argparse.Namespace, total: int) -> None:
        import jax
        import jax.numpy as jnp

        self.g, self.fused = g, not args.no_fused
        cfg, params, tok = model.config, model.params, model.tokenizer
        self.cfg = cfg
        K, T = setting["samples"], setting["traj_len"]
        self.K = K
        self.mesh = g.parallel.make_mesh(g.parallel.MeshConfig(data=1, fsdp=1, tensor=1),
                                         jax.devices()[:1])
        rep = g.parallel.replicated(self.mesh)
        bsh = g.parallel.batch_sharding(self.mesh, 1)
        lcfg = g.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0,
                            targets=(LORA_PATTERN,))
        tree = g.init_lora(cfg, params, lcfg, jax.random.PRNGKey(args.seed))["tree"]
        # the Trainer's optimizer: clip + AdamW (constant lr 1e-4), Adam for an (empty) log Z
        config = _ns(optim=_ns(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                               clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8),
                     objective=_ns(log_z_lr=0.1), train=_ns(grad_accum=1),
                     explore=_ns(top_k=0, top_p=1.0))
        tx = g.build_optimizer(config, total)
        tp = {"trainable": tree, "log_z": {}}
        key = jax.random.PRNGKey(args.seed)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        state = g.TrainState(step=jnp.zeros((), jnp.int32), trainable=tree, log_z={},
                             opt_state=tx.init(tp), rng=key)
        self.state = jax.device_put(state, rep)
        self.frozen = jax.device_put({"base": params}, rep)
        # the frozen base laid out for the sampler once, as the Trainer keeps it (CPU)
        self.decode_weights = (g.cache_decode_weights(self.frozen["base"])
                               if args.decode_weights == "keep" else None)
        self.spec = g.PolicySpec(term_ids=(term,), max_len=T, min_len=T)
        term_ids = self.spec.term_ids
        if setting["suffix_len"]:
            sfx = np.asarray([suffix], np.int32)
            smask = np.ones_like(sfx, bool)

            def reward_fn(mcfg, p, batch):  # InfillTask.log_reward with a one-row table
                idx = batch["prompt_index"]
                return g.infill_log_reward(mcfg, p, batch["prompt_tokens"], batch["prompt_mask"],
                                           batch["tokens"], batch["lengths"],
                                           jnp.asarray(sfx)[idx], jnp.asarray(smask)[idx],
                                           term_ids, None)
        else:
            def reward_fn(mcfg, p, batch):  # ContinuationTask.log_reward, no penalty
                r = g.penalised_reward_prefixes(mcfg, p, batch["prompt_tokens"],
                                                batch["prompt_mask"], batch["tokens"],
                                                batch["lengths"], term_ids, None)
                return r.log_pz + r.log_pterm

        self.ss = g.StepSpec(model_cfg=cfg, objective=g.get_objective("subtb"),
                             options={"name": "subtb", "subtb_lambda": 1.0}, spec=self.spec,
                             reward_fn=reward_fn, use_lora=True, lora_scale=float(lcfg.scale),
                             lora_dropout=0.0, num_groups=1, reward_key="base",
                             reference_key="base")
        given = dataclasses.replace(self.ss, reward_fn=lambda mcfg, p, b: b.extras["log_r"])
        self.step_policy = g.make_train_step(given, tx, self.mesh, rep, rep, bsh)
        self.step_fused = g.make_train_step(self.ss, tx, self.mesh, rep, rep, bsh)
        mesh = self.mesh

        def reward_only(frozen, batch):  # the step's reward, alone, same prompt sharing
            k = int(batch.group_size) if cfg.share_prompt else 1
            with g.activation_sharding(mesh, None), g.prompt_groups(k):
                return reward_fn(cfg, frozen["base"], batch).astype(jnp.float32)

        self.reward_jit = jax.jit(reward_only)
        self.hyper = g.host_hyper(1.0, 0.0)
        self.rollouts = g.Rollouts(config, [prompt], [prompt], len(prompt), len(prompt),
                                   int(tok.pad_id or 0), None, T)
        self.tokenizer = tok
        self.key = jax.random.PRNGKey(args.seed + 1)
        self.losses: List[float] = []

    def policy(self) -> Any:
        """The current policy (like ``Trainer.policy``: base weights + current adapters)."""
        return self.g.Policy(model_config=self.cfg, params=self.frozen["base"],
                             adapters=self.ss.adapters(self.state.trainable), spec=self.spec,
                             tokenizer=self.tokenizer, decode_weights=self.decode_weights)

    def step(self, i: int) -> Dict[str, float]:
        import jax

        beh = {"kind": "on_policy", "temperature": 1.0, "epsilon": 0.0}
        t0 = time.perf_counter()
        batch = self.rollouts.draw(self.policy(), jax.random.fold_in(self.key, i), [0], self.K,
                                   beh)
        t1 = time.perf_counter()
        log_r = np.asarray(self.reward_jit(self.frozen, batch.to_device(self.mesh)))
        t2 = time.perf_counter()
        dev = batch.with_extras({"log_r": log_r}).to_device(self.mesh)
        self.state, m, _ = self.step_policy(self.state, self.frozen, dev, self.hyper)
        self.losses.append(float(jax.device_get(m["loss"])))
        t3 = time.perf_counter()
        out = {"sampling": t1 - t0, "reward": t2 - t1, "policy": t3 - t2,
               "mean_length": float(np.mean(batch.lengths))}
        if self.fused:
            self.state, m, _ = self.step_fused(self.state, self.frozen,
                                               batch.to_device(self.mesh), self.hyper)
            jax.block_until_ready(m)
            out["fused"] = time.perf_counter() - t3
        return out


# ---------------------------------------------------------------------------
# Alternation and the official side's timers
# ---------------------------------------------------------------------------
def os_usage() -> Dict[str, float]:
    """This process's CPU time, page faults and peak resident size so far
    (:func:`gfn_jax.hostmem.process_usage`; imported here, after :func:`import_gfn_jax` has
    made ``gfn_jax``'s submodules importable)."""
    from gfn_jax.hostmem import process_usage

    return process_usage()


def os_delta(u0: Dict[str, float]) -> Dict[str, float]:
    """The same counted from ``u0`` (:func:`gfn_jax.hostmem.usage_since`)."""
    from gfn_jax.hostmem import usage_since

    return usage_since(u0)


# ---------------------------------------------------------------------------
# Ours in a process of its own (--ours-process separate)
# ---------------------------------------------------------------------------
WORKER_FLAG = "--ours-worker"


def _send(f: Any, msg: Any) -> None:
    f.write(json.dumps(msg) + "\n")
    f.flush()


def _recv(f: Any, what: str) -> Any:
    line = f.readline()
    if not line:
        raise EOFError(f"{what} closed its pipe")
    return json.loads(line)


def ours_worker(read_fd: int, write_fd: int) -> None:
    """The child side of :class:`OursWorker`: build :class:`OursSide` from the spec sent
    first, then run one step per request and answer with its phase times and this
    process's OS counters for that step."""
    rf, wf = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")
    try:
        spec = _recv(rf, "the benchmark")
        args = argparse.Namespace(**spec["args"])
        g = import_gfn_jax()
        malloc = g.keep_freed_memory(args.malloc)  # before XLA starts its threads
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        ours = OursSide(g, load_model(g, args.preset), SETTINGS[spec["setting"]],
                        spec["prompt"], spec["suffix"], spec["term"], args, spec["total"])
        _send(wf, {"ready": True, "pid": os.getpid(), "malloc": str(malloc)})
        while True:
            req = _recv(rf, "the benchmark")
            if req.get("stop"):
                _send(wf, {"losses": ours.losses})
                return
            u0 = os_usage()
            row = ours.step(int(req["step"]))
            _send(wf, {"row": row, "os": os_delta(u0)})
    except EOFError:
        return
    except BaseException as e:  # reported to the parent, which raises it
        import traceback

        with contextlib.suppress(Exception):
            _send(wf, {"error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()})
        raise SystemExit(1)


class OursWorker:
    """Our side in a child process of its own (a fresh interpreter: no torch in it, its own
    heap), driven one step at a time over a pipe, so the two sides share the CPU but not
    the process. ``step(i)`` returns the phase times measured in the child and leaves the
    child's system time and page faults for that step in ``last_os``."""

    def __init__(self, args: argparse.Namespace, setting: str, prompt: List[int],
                 suffix: List[int], term: int, total: int) -> None:
        p_read, c_write = os.pipe()
        c_read, p_write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                      WORKER_FLAG, str(c_read), str(c_write)],
                                     pass_fds=(c_read, c_write))
        os.close(c_read)
        os.close(c_write)
        self.rf, self.wf = os.fdopen(p_read, "r"), os.fdopen(p_write, "w")
        self.last_os: Dict[str, float] = {}
        self.losses: List[float] = []
        keys = ("preset", "lora_rank", "lora_alpha", "no_fused", "seed", "malloc", "decode_weights")
        _send(self.wf, {"args": {k: getattr(args, k) for k in keys}, "setting": setting,
                        "prompt": prompt, "suffix": suffix, "term": term, "total": total})
        ready = self._answer()
        self.pid, self.malloc = int(ready["pid"]), ready["malloc"]

    def _answer(self) -> Dict[str, Any]:
        try:
            msg = _recv(self.rf, "our side's process")
        except EOFError:
            rc = self.proc.wait()
            raise RuntimeError(f"our side's process exited (code {rc}) without an answer; "
                               "its error is printed above") from None
        if "error" in msg:
            self.proc.wait()
            raise RuntimeError(f"our side's process failed: {msg['error']}\n"
                               f"{msg['traceback']}")
        return msg

    def step(self, i: int) -> Dict[str, float]:
        _send(self.wf, {"step": i})
        msg = self._answer()
        self.last_os = msg["os"]
        return msg["row"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, EOFError, RuntimeError):
                _send(self.wf, {"stop": True})
                self.losses = self._answer()["losses"]
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.rf, self.wf):
            with contextlib.suppress(OSError):
                f.close()


class Alternator:
    """Runs our step next to each official step, alternating which goes first, and
    collects the official step's phase times from the wrappers."""

    def __init__(self, ours_step: Callable[[int], Dict[str, float]],
                 ours_os: Optional[Callable[[], Dict[str, float]]] = None) -> None:
        self.ours_step = ours_step
        # the OS counters of our step when it runs elsewhere (OursWorker.last_os)
        self.ours_os_of = ours_os
        self.ours: List[Dict[str, float]] = []
        self.official: List[Dict[str, float]] = []
        # the process's system CPU time and minor page faults during each step of each side
        self.ours_os: List[Dict[str, float]] = []
        self.official_os: List[Dict[str, float]] = []
        self.os0: Dict[str, float] = {}
        self.cur: Optional[Dict[str, float]] = None
        self.t0 = 0.0
        self.official_losses: List[float] = []

    def add(self, what: str, dt: float) -> None:
        if self.cur is not None:
            self.cur[what] += dt
            self.cur[what + "_calls"] += 1

    def run_ours(self, s: int) -> None:
        """One step of ours, with its wall times per phase and its OS counters."""
        u0 = os_usage()
        self.ours.append(self.ours_step(s))
        self.ours_os.append(self.ours_os_of() if self.ours_os_of else os_delta(u0))

    def begin(self, s: int) -> None:
        if s % 2 == 1:
            self.run_ours(s)
        self.cur = {"generate": 0.0, "reward": 0.0, "generate_calls": 0, "reward_calls": 0}
        self.os0 = os_usage()
        self.t0 = time.perf_counter()

    def end(self, s: int) -> None:
        total = time.perf_counter() - self.t0
        self.official_os.append(os_delta(self.os0))
        c, self.cur = self.cur, None
        if c is None or not c["generate_calls"]:
            raise RuntimeError("the official step ran without calling its sampler: the "
                               "benchmark's wrapper was bypassed")
        self.official.append({"sampling": c["generate"] - c["reward"], "reward": c["reward"],
                              "policy": total - c["generate"], "total": total,
                              "reward_calls": c["reward_calls"]})
        if s % 2 == 0:
            self.run_ours(s)


def timed_sampler(fn: Callable, alt: Alternator) -> Callable:
    """``fn`` (an official sampler taking ``reward_fn=``) with its total time and the time
    of the reward calls it makes recorded; arguments and results pass through unchanged."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        rf = kw.get("reward_fn")
        if rf is not None:
            def timed_reward(*ra: Any, **rk: Any) -> Any:
                t = time.perf_counter()
                try:
                    return rf(*ra, **rk)
                finally:
                    alt.add("reward", time.perf_counter() - t)

            kw["reward_fn"] = timed_reward
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            alt.add("generate", time.perf_counter() - t)

    return wrapper


class InertBuffer:
    """Replay buffer stand-in: nothing stored, nothing sampled (every step on-policy)."""

    def add_batch(self, *a: Any, **k: Any) -> None:
        return None

    def sample(self, *a: Any, **k: Any):
        return None, None

    def save(self, *a: Any, **k: Any) -> None:
        return None


def _noop(*a: Any, **k: Any) -> None:
    return None


# ---------------------------------------------------------------------------
# Importing the official snapshot
# ---------------------------------------------------------------------------
def check_official(path: str) -> Optional[str]:
    """Why the snapshot at ``path`` cannot be used (None when it can)."""
    if not path:
        return ("no snapshot of the official code: pass --official PATH or set "
                "$GFN_JAX_OFFICIAL (see benchmarks/README.md)")
    for sub in ("infill_subj_arithmetic/main.py", "next_sentence/lightning_module.py"):
        if not os.path.isfile(os.path.join(path, sub)):
            return f"--official {path!r} is not a work tree of GFNOrg/gfn-lm-tuning (no {sub})"
    missing = [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return ("the official code needs packages that are not installed: "
                f"pip install {' '.join(missing)}")
    return None


def snapshot_commit(path: str) -> str:
    """The snapshot's commit: ``PATH/.commit`` (written when extracting), else git."""
    f = os.path.join(path, ".commit")
    if os.path.isfile(f):
        return open(f).read().strip()
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _stub_module(name: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def missing(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*a: Any, **k: Any) -> Any:
            raise RuntimeError(f"{name}.{attr} is a benchmark stub ({name} is not installed)")

        return unavailable

    m.__getattr__ = missing  # type: ignore[attr-defined]
    return m


@contextlib.contextmanager
def official_imports(subdir: str) -> Iterator[List[str]]:
    """``subdir`` first on ``sys.path`` with the official files' top-level names free;
    missing modules of :data:`STUBBABLE` stubbed; everything restored on exit (the imported
    official modules keep their references)."""
    saved = {n: sys.modules.pop(n) for n in OFFICIAL_NAMES if n in sys.modules}
    stubbed: List[str] = []
    for name, subs in STUBBABLE.items():
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub_module(name)
            stubbed.append(name)
            for s in subs:
                sys.modules[f"{name}.{s}"] = _stub_module(f"{name}.{s}")
    sys.path.insert(0, subdir)
    try:
        yield stubbed
    finally:
        sys.path.remove(subdir)
        for n in OFFICIAL_NAMES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        for name in stubbed:
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]


def preimport_torch_stack(next_sentence: bool) -> None:
    """Import what the official files use before any stub exists (so e.g. accelerate's
    checks for wandb never see a stub)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    with contextlib.suppress(ImportError):
        from transformers import BitsAndBytesConfig  # noqa: F401
    if next_sentence:
        import pytorch_lightning  # noqa: F401
        with contextlib.suppress(ImportError):
            import sentence_transformers.util  # noqa: F401


def hf_policy(hf_dir: str, args: argparse.Namespace) -> Any:
    """The official loaders' model, in float32: ``from_pretrained`` + peft LoRA (no task
    type, bias none, as both official loaders), dropout 0."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lcfg = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                           target_modules=list(HF_LORA_MODULES), lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(model, lcfg)
    for mod in model.modules():  # as next_sentence/train.py's get_model does
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def load_official(official: str, subdir: str, names: Sequence[str], hf_dir: str,
                  args: argparse.Namespace) -> Tuple[List[Any], List[str], Any, Any]:
    """(the official modules ``names`` imported from ``official/subdir``, the stubbed
    module names, the peft policy, the exported tokenizer): the start of both drivers."""
    import transformers

    preimport_torch_stack(subdir == "next_sentence")
    with official_imports(os.path.join(official, subdir)) as stubbed:
        mods = [importlib.import_module(n) for n in names]
    return (mods, stubbed, hf_policy(hf_dir, args),
            transformers.AutoTokenizer.from_pretrained(hf_dir))


def run_official_infill(official: str, hf_dir: str, setting: Dict[str, Any], prompt: List[int],
                        suffix: List[int], args: argparse.Namespace, n: int,
                        alt: Alternator) -> Dict[str, Any]:
    """Setting A through ``infill_subj_arithmetic/main.py``'s ``train()``."""
    import torch
    from omegaconf import OmegaConf

    (main, rewards), stubbed, model, tokenizer = load_official(
        official, "infill_subj_arithmetic", ("main", "rewards"), hf_dir, args)
    if tokenizer.eos_token_id is None:
        raise ValueError("the exported tokenizer has no EOS token")
    K, T = setting["samples"], setting["traj_len"]
    x = torch.tensor([prompt], dtype=torch.long)
    y = torch.tensor([suffix], dtype=torch.long)
    dataset = {"encoded_train_queries": [x], "encoded_train_sols": [y],
               "encoded_test_queries": [x], "train_weight": np.array([1.0]),
               "test_num_sols": None, "test_queries": ["X"], "train_queries": ["X"],
               "train_sols": ["Y"]}
    # configs/reward/without_prompt.yaml (the infilling experiment's reward), no constraint
    rcfg = OmegaConf.create({"impose_vocab_constraint": False, "reward_name": "FrozenModel",
                             "reward_config": {"temperature": 1, "solution_beta": 1,
                                               "len_beta": 0, "vocab_alpha": -99}})
    rew, vocab_nice_list = rewards.load_reward(rcfg, model, tokenizer, dataset, T)
    big = 10 ** 9  # evaluation / logging intervals: only at step 0, where hooks are no-ops
    config = _ns(
        model=_ns(device="cpu"), logZ_init=0.0, use_4bit=False, lr=1e-4, lr_logZ=1.0,
        train_steps=n, batch_size=K, grad_acc=1, pf_temp_high=1.0, pf_temp_low=1.0,
        subtb_lambda=1.0, max_len=T, max_eval_len=T, min_len=T, loss_type="modified_subtb",
        reward_sched=_ns(start=1.0, end=1.0, horizon=1), use_tools=False,
        limit_capability=-1, operators=["+", "-"], log_interval=big, full_eval_interval=big,
        eval_interval=big, eval_temp=1.0)

    class Loop:  # stands in for tqdm(range(train_steps)) in train(): marks step boundaries
        def __init__(self, it: Any) -> None:
            self.it = it

        def __iter__(self) -> Iterator[int]:
            for s in self.it:
                alt.begin(s)
                yield s
                alt.end(s)

        def set_description(self, *a: Any, **k: Any) -> None:
            return None

    main.tqdm = Loop
    def wandb_log(d: Dict[str, Any], **k: Any) -> None:  # train()'s per-step log: keep the loss
        if "loss" in d:
            alt.official_losses.append(float(d["loss"]))

    main.wandb = _ns(log=wandb_log, run=_ns(name="bench"))
    main.print = _noop
    main.test = lambda *a, **k: 0
    main.generate_examples = lambda *a, **k: ([], [])
    main.print_table = _noop
    main.generate_and_return_eos_logprob = timed_sampler(main.generate_and_return_eos_logprob,
                                                         alt)
    model.save_pretrained = _noop  # train() saves the adapters at step 0
    main.seed_everything(args.seed)
    main.train(config, model, tokenizer, vocab_nice_list, rew, InertBuffer(), dataset)
    return {"entry": "infill_subj_arithmetic/main.py:train", "stubbed": stubbed,
            "sampler": "utils.generate_and_return_eos_logprob",
            "reward": "rewards.load_reward -> rewards.FrozenModel.score -> utils.score_fast "
                      "(via train()'s reward_fn with utils.append_sol_and_remove_eos)",
            "loss": "train()'s modified_subtb branch, backward, torch.optim.AdamW"}


def run_official_next_sentence(official: str, hf_dir: str, setting: Dict[str, Any],
                               prompt: List[int], args: argparse.Namespace, n: int,
                               alt: Alternator) -> Dict[str, Any]:
    """Setting B through ``NextSentenceGFNTask`` under a ``pytorch_lightning.Trainer``."""
    import torch

    (lm, outils), stubbed, model, tokenizer = load_official(
        official, "next_sentence", ("lightning_module", "utils"), hf_dir, args)
    import pytorch_lightning as pl
    T = setting["traj_len"]
    vocab = model.get_input_embeddings().weight.shape[0]
    illegal = np.zeros(vocab, dtype=bool)  # no penalised tokens (ours: no logit bias)
    probe = lm.NextSentenceGFNTask  # its own pick of the termination token, checked below
    reward = outils.FrozenModelSentenceGivenPrompt(
        sentence_token_id=tokenizer.encode("A sentence.", add_special_tokens=False)[-1],
        min_len=T, vocab_alpha=-50, vocab_naughty_mask=illegal)
    task = probe(model=model, tokenizer=tokenizer, reward=reward, reward_buffer=InertBuffer(),
                 n_samples=setting["samples"], lr=1e-4, subtb_lambda=1.0, pf_temp_high=1.0,
                 pf_temp_low=1.0, pf_temp_prob=0.0, use_buffer_prob=0.0, min_sentence_len=T,
                 max_sentence_len=T, reward_temp_start=1.0, reward_temp_end=1.0,
                 reward_temp_horizon=1, illegal_token_mask=illegal, train_probes=None,
                 val_probes=None, diversity_metric=None, use_4bit=False)
    task.on_train_start = _noop  # baseline evaluation (beam search etc.) on the val set
    lm.generate_and_return_termination_logprob = timed_sampler(
        lm.generate_and_return_termination_logprob, alt)

    class Marks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            alt.begin(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            alt.end(batch_idx)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            alt.official_losses.append(float(loss))

    x = torch.tensor([prompt], dtype=torch.long)

    class Prompts(torch.utils.data.Dataset):  # what PromptDataPipe yields: [1, P] ids
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> Any:
            return x

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=n, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, accumulate_grad_batches=1, callbacks=[Marks()])
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(
            Prompts(), batch_size=None, shuffle=False, num_workers=0))
    return {"entry": "next_sentence/lightning_module.py:NextSentenceGFNTask "
                     "(pytorch_lightning.Trainer.fit)", "stubbed": stubbed,
            "sampler": "utils.generate_and_return_termination_logprob",
            "reward": "utils.FrozenModelSentenceGivenPrompt.score -> utils.score_fast",
            "loss": "utils.modified_subtb_loss, Lightning's backward + AdamW step",
            "termination_token_id": int(task.end_of_sentence_token_id)}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def sampler_vs_generate(g: Any, model: Any, hf_dir: Optional[str], args: argparse.Namespace,
                        torch: Any, peak: float) -> Dict[str, Any]:
    """Sampling alone, setting A's shape (16 samples of one 59-token prompt, exactly 20 new
    tokens, LoRA r on q/k/v/o with non-zero B on both sides): our jitted ``sample`` against
    ``transformers`` ``generate(do_sample=True)`` on the official loaders' peft model,
    alternating, median of ``--steps`` after ``--warmup``. The floor is the decode's FLOPs at
    the measured matmul rate (prefill once, then 20 steps of 16 rows)."""
    import jax
    import jax.numpy as jnp

    s = SETTINGS["A"]
    K, P, T = s["samples"], s["prompt_len"], s["traj_len"]
    cfg, params, tok = model.config, model.params, model.tokenizer
    term = term_ids_of(tok, "infill")
    rng = np.random.default_rng([args.seed, 7])
    prompt = make_ids(rng, cfg.vocab_size, P, [term, tok.eos_id, tok.pad_id, tok.bos_id])
    lcfg = g.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0,
                        targets=(LORA_PATTERN,))
    ad = g.init_lora(cfg, params, lcfg, jax.random.PRNGKey(args.seed))
    # B = 0 at init would let either side skip nothing, but make the adapters non-trivial
    ad["tree"] = jax.tree_util.tree_map(lambda x: x + 1e-3, ad["tree"])
    spec = g.PolicySpec(term_ids=(term,), max_len=T, min_len=T)
    toks = jnp.asarray([prompt], jnp.int32)
    mask = jnp.ones_like(toks)

    def ours(i: int) -> float:
        t = time.perf_counter()
        out = g.sample(cfg, params, jax.random.PRNGKey(i), toks, mask, spec, num_samples=K,
                       adapters=ad)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t

    hf_gen: Optional[Callable[[int], float]] = None
    if hf_dir is not None and torch is not None:
        pol = hf_policy(hf_dir, args)
        with torch.no_grad():
            for mod in pol.modules():
                if hasattr(mod, "lora_B"):
                    for lin in mod.lora_B.values():
                        lin.weight.add_(1e-3)
        pol.eval()
        ids = torch.tensor([prompt])

        def generate(i: int) -> float:
            torch.manual_seed(i)
            t = time.perf_counter()
            with torch.no_grad():
                out = pol.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   do_sample=True, num_return_sequences=K, max_new_tokens=T,
                                   min_new_tokens=T, top_k=0, top_p=1.0, temperature=1.0,
                                   pad_token_id=int(tok.pad_id or 0))
            assert out.shape == (K, P + T), out.shape
            return time.perf_counter() - t

        hf_gen = generate

    times: Dict[str, List[float]] = {"ours": [], "generate": []}
    for i in range(args.warmup + args.steps):
        times["ours"].append(ours(i))
        if hf_gen is not None:
            times["generate"].append(hf_gen(i))
    med = {k: float(np.median(v[args.warmup:])) if v[args.warmup:] else None
           for k, v in times.items()}
    decode = fwd_flops(cfg, K, T, P, K * T, args.lora_rank)
    prefill = fwd_flops(cfg, 1, P, 0, 1, args.lora_rank)
    floor_s = (decode + prefill) / (peak * 1e9)
    res = {"shape": {"samples": K, "prompt_len": P, "new_tokens": T}, "times_s": times,
           "median_s": med, "flops": decode + prefill, "floor_s": floor_s,
           "first_call_s": {k: (v[0] if v else None) for k, v in times.items()}}
    if med["generate"]:
        res["speedup"] = med["generate"] / med["ours"]
    print(f"\n## sampling alone: {K} x {T} new tokens from a {P}-token prompt, LoRA "
          f"r={args.lora_rank} on q,k,v,o")
    print(f"ours {med['ours']:.2f} s ({med['ours'] / T * 1e3:.0f} ms per decode step)"
          + (f"; transformers generate {med['generate']:.2f} s: {res['speedup']:.2f}x"
             if med["generate"] else "; generate not run (official side skipped)")
          + f"; floor {floor_s:.2f} s ({(decode + prefill) / 1e9:.1f} GFLOP at {peak:.1f} "
          f"GFLOP/s; weights are read once per step on top of that)")
    return res


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="smollm2-135m",
                   help="smollm2-135m: the embedded model (real weights); tiny: random")
    p.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["A", "B"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    p.add_argument("--official", default=os.environ.get("GFN_JAX_OFFICIAL", ""),
                   help="work tree of a GFNOrg/gfn-lm-tuning snapshot ($GFN_JAX_OFFICIAL)")
    p.add_argument("--skip-official", action="store_true", help="ours only (no torch)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--no-fused", action="store_true",
                   help="skip the fused step (ours: phases only)")
    p.add_argument("--no-sampler", action="store_true",
                   help="skip sampling alone (ours vs transformers generate)")
    p.add_argument("--decode-weights", choices=("keep", "per-call"), default="keep",
                   help="keep: our sampler decodes with the frozen base laid out once "
                   "(gfn_jax.DecodeWeights, as the Trainer does); per-call: laid out on "
                   "every sampler call")
    p.add_argument("--matmul-size", type=int, default=1024,
                   help="n of the n x n matmul whose GFLOP/s sets the floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("keep", "system"), default=None,
                   help="keep: glibc keeps freed memory in the process for reuse, for both "
                   "sides (what the gfn-jax command does; gfn_jax.hostmem); system: glibc's "
                   "defaults (default: $GFN_JAX_MALLOC, else keep)")
    p.add_argument("--ours-process", choices=("separate", "shared"), default="separate",
                   help="separate: our side runs in a child process of its own (each side "
                   "its own process and heap, as in real use), driven step by step; shared: "
                   "both sides in this process (their host allocations share one heap)")
    p.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    a = p.parse_args(argv)
    for name in ("steps", "warmup", "lora_rank", "torch_threads", "matmul_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


def os_line(ours: List[Dict[str, float]], official: List[Dict[str, float]]) -> str:
    """Medians of the system CPU time and minor page faults per step, both sides."""
    def one(rows: List[Dict[str, float]]) -> str:
        return (f"{statistics.median(r['system_cpu_s'] for r in rows):.2f} s, "
                f"{statistics.median(r['minor_faults'] for r in rows):,.0f} faults")

    return ("system CPU time and minor page faults per step (median): ours " + one(ours)
            + (f"; official {one(official)}" if official else ""))


def _median(rows: List[Dict[str, float]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def summarise(ours: List[Dict[str, float]], official: List[Dict[str, float]],
              flops: Dict[str, Dict[str, float]], gflops: float) -> Dict[str, Any]:
    """Medians per phase (seconds), ratios official/ours, floors."""
    for r in ours:
        r["sampling+policy"] = r["sampling"] + r["policy"]
        r["total"] = r["sampling"] + (r["fused"] if "fused" in r else r["reward"] + r["policy"])
    for r in official:
        r["sampling+policy"] = r["sampling"] + r["policy"]
    rows = {}
    for ph in ("sampling", "reward", "policy", "sampling+policy", "fused", "total"):
        o = _median(ours, ph)
        f = _median(official, ph) if official else None
        rows[ph] = {"ours_s": o, "official_s": f,
                    "speedup": (f / o) if (o and f) else None,
                    "floor_gflop": flops["floor"].get(ph, 0.0) / 1e9 if ph != "fused" else None,
                    "official_gflop": flops["official"].get(ph, 0.0) / 1e9
                    if ph != "fused" else None}
        if rows[ph]["floor_gflop"] is not None:
            rows[ph]["floor_s"] = rows[ph]["floor_gflop"] / gflops
    return rows


LABELS = {
    "sampling": "sampling (official: + policy forward with autograd)",
    "reward": "reward of every prefix",
    "policy": "policy scoring + loss + backward + update (official: loss + backward + update)",
    "sampling+policy": "sampling + policy + backward + update",
    "fused": "ours: reward + policy + backward + update, one fused step",
    "total": "train step (sampling + reward + policy + backward + update)",
}


def fmt_table(rows: Dict[str, Any]) -> str:
    def ms(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{1e3 * x:,.1f}"

    out = ["| phase | ours, median ms | official, median ms | official / ours | floor GFLOP "
           "| floor ms | official's GFLOP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for ph, r in rows.items():
        if r["ours_s"] is None and r["official_s"] is None:
            continue
        sp = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        fg = "" if r["floor_gflop"] is None else f"{r['floor_gflop']:.2f}"
        og = "" if r["official_gflop"] is None else f"{r['official_gflop']:.2f}"
        out.append(f"| {LABELS[ph]} | {ms(r['ours_s'])} | {ms(r['official_s'])} | {sp} | {fg} "
                   f"| {ms(r.get('floor_s')) if 'floor_s' in r else ''} | {og} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    g = import_gfn_jax()
    if g.import_note:
        print("note:", g.import_note, file=sys.stderr)
    # before any computation starts XLA's threads; the whole process, so both sides
    try:  # None: the library reads $GFN_JAX_MALLOC, as the gfn-jax command does
        malloc = g.keep_freed_memory(args.malloc)
    except ValueError as e:
        sys.exit(f"error: {e}")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 on both sides

    why = "--skip-official" if args.skip_official else check_official(args.official)
    torch = None
    if why is None:
        # torch's OpenMP threads spin while waiting by default; on a CPU shared with other
        # jobs a descheduled thread then stalls the others (tiny next-sentence step on the
        # 2-core development host: 13 s with spinning threads, 0.14 s passive). Set before
        # torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        import transformers

        torch.set_num_threads(args.torch_threads)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        print(f"official side skipped: {why}", file=sys.stderr)
    model = load_model(g, args.preset)
    cfg = model.config
    n = args.warmup + args.steps
    gf = matmul_gflops(args.matmul_size, torch)
    peak = max(gf.values())
    result: Dict[str, Any] = {
        "config": {"preset": args.preset, "steps": args.steps, "warmup": args.warmup,
                   "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                   "lora_targets": HF_LORA_MODULES, "dtype": "float32", "seed": args.seed,
                   "ours_process": args.ours_process,
                   "model": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers",
                                                          "n_heads", "n_kv_heads", "d_ff")}},
        "env": {"python": platform.python_version(), "jax": jax.__version__,
                "jax_device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
                "load_average_start": os.getloadavg(), "gfn_jax_import": g.import_note,
                "matmul_gflops": gf, "matmul_size": args.matmul_size, "malloc": str(malloc)},
        "official": None if why else {"path": os.path.abspath(args.official),
                                      "commit": snapshot_commit(args.official)},
        "official_skipped": why, "settings": {}}
    if torch is not None:
        import transformers
        import peft

        result["env"].update(torch=torch.__version__, transformers=transformers.__version__,
                             peft=peft.__version__, torch_threads=torch.get_num_threads(),
                             omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    print(f"# JAX {jax.__version__} on {jax.devices()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; matmul {args.matmul_size}^3 float32: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gf.items())
          + (f"; torch {torch.__version__} ({torch.get_num_threads()} threads, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})" if torch else ""))
    print(f"# preset {args.preset}, float32, LoRA r={args.lora_rank} alpha={args.lora_alpha:g} "
          f"on q,k,v,o; median of {args.steps} steps after {args.warmup} warm-up, sides "
          f"alternating; malloc {malloc}; ours in "
          + ("a process of its own" if args.ours_process == "separate" else "this process")
          + (f"; official snapshot {result['official']['commit'][:12]}"
             if result["official"] else "; official side skipped"))

    tmp = tempfile.TemporaryDirectory(prefix="gfn_bench_official_")
    stack = contextlib.ExitStack()  # closes the worker processes on any exit
    try:
        hf_dir = None
        if why is None:
            hf_dir = os.path.join(tmp.name, "hf")
            g.hf.save_hf(cfg, model.params, hf_dir, model.tokenizer)
        for name in args.setting:
            s = SETTINGS[name]
            rng = np.random.default_rng([args.seed, ord(name)])
            tok = model.tokenizer
            term = term_ids_of(tok, s["style"])
            avoid = [term, tok.eos_id, tok.pad_id, tok.bos_id]
            prompt = make_ids(rng, cfg.vocab_size, s["prompt_len"], avoid)
            suffix = make_ids(rng, cfg.vocab_size, s["suffix_len"], avoid)
            worker: Optional[OursWorker] = None
            if why is None and args.ours_process == "separate":
                worker = OursWorker(args, name, prompt, suffix, term, n)
                stack.callback(worker.close)
                alt = Alternator(worker.step, lambda w=worker: w.last_os)
            else:
                ours = OursSide(g, model, s, prompt, suffix, term, args, n)
                alt = Alternator(ours.step)
            info: Dict[str, Any] = {}
            t_start = time.perf_counter()
            if why is None:
                torch.manual_seed(args.seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    if s["style"] == "infill":
                        info = run_official_infill(args.official, hf_dir, s, prompt, suffix,
                                                   args, n, alt)
                    else:
                        info = run_official_next_sentence(args.official, hf_dir, s, prompt,
                                                          args, n, alt)
                if info.get("termination_token_id", term) != term:
                    raise RuntimeError(f"termination ids differ: ours {term}, official "
                                       f"{info['termination_token_id']}")
            else:
                for i in range(n):
                    alt.run_ours(i)
            wall = time.perf_counter() - t_start
            if worker is not None:
                worker.close()
                ours_losses = worker.losses
                where = f"a process of its own (pid {worker.pid}, malloc {worker.malloc})"
            else:
                ours_losses = ours.losses
                where = "this process" + (" (with the official side)" if why is None else "")
            if len(alt.ours) != n or (why is None and len(alt.official) != n):
                raise RuntimeError(f"expected {n} steps per side, got ours {len(alt.ours)}, "
                                   f"official {len(alt.official)}")
            flops = phase_flops(cfg, s, args.lora_rank)
            rows = summarise(alt.ours[args.warmup:], alt.official[args.warmup:], flops, peak)
            res = {"setting": s, "termination_id": term, "official_driver": info,
                   "ours_steps": alt.ours, "official_steps": alt.official,
                   "first_step_s": {"ours": alt.ours[0], "official": alt.official[0]
                                    if alt.official else None},
                   "phases": rows, "flops": flops, "wall_s": wall,
                   "ours_losses": ours_losses, "official_losses": alt.official_losses,
                   "ours_process": where,
                   "os_per_step": {"ours": alt.ours_os, "official": alt.official_os}}
            result["settings"][name] = res
            print(f"\n## setting {name} ({s['style']}-style): {s['samples']} samples of one "
                  f"prompt, |X| = {s['prompt_len']}, |Z| = {s['traj_len']} (min = max)"
                  + (f", |Y| = {s['suffix_len']}" if s["suffix_len"] else ""))
            if info:
                print(f"official: {info['entry']}; sampler {info['sampler']}; reward "
                      f"{info['reward']}; {info['loss']}"
                      + (f"; stubbed (not installed, unused): {', '.join(info['stubbed'])}"
                         if info["stubbed"] else ""))
                print(f"official reward calls per step: {alt.official[-1]['reward_calls']}")
            print(f"ours ran in {where}")
            print(fmt_table(rows))
            print(f"first step (ours: compiles): ours "
                  f"{sum(v for k, v in alt.ours[0].items() if k != 'mean_length'):.2f} s"
                  + (f", official {alt.official[0]['total']:.2f} s" if alt.official else "")
                  + f"; mean sampled length ours {alt.ours[-1]['mean_length']:.1f}; "
                  f"wall {wall:.1f} s")
            print(os_line(alt.ours_os[args.warmup:], alt.official_os[args.warmup:]))
            print("SubTB loss per step (different samples on each side): ours "
                  + ", ".join(f"{x:.4g}" for x in ours_losses)
                  + ("; official " + ", ".join(f"{x:.4g}" for x in alt.official_losses)
                     if alt.official_losses else ""))
        if not args.no_sampler:
            result["sampler"] = sampler_vs_generate(g, model, hf_dir, args, torch, peak)
    finally:
        stack.close()
        tmp.cleanup()
    result["env"]["load_average_end"] = os.getloadavg()
    print(f"\nfloor: FLOPs of the minimal algorithm / {peak:.1f} GFLOP/s (the faster matmul "
          f"above); load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == WORKER_FLAG:
        ours_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
