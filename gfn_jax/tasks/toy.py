"""An exactly solvable toy task: strings over {a, b, c} of length 1..3.

log R(Z) = 0.8·#a − 0.6·#c + 1.2·[len(Z) ≥ 2 and Z is a palindrome]; 39 outcomes. The
target distribution is enumerable, so training can be checked in total variation.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.tasks.base import Batch, Target, Task

ALPHABET = "abc"
BOS, EOS = "<s>", "</s>"


def toy_log_reward_text(z: str, w_a: float = 0.8, w_c: float = -0.6, w_pal: float = 1.2) -> float:
    """Closed-form log R of a string (reference used by tests and evaluation)."""
    pal = len(z) >= 2 and z == z[::-1]
    return w_a * z.count("a") + w_c * z.count("c") + w_pal * float(pal)


def toy_target(min_len: int = 1, max_len: int = 3, **weights: float) -> Dict[str, float]:
    """The exact target distribution over all strings, p(Z) ∝ R(Z)."""
    outs = toy_outcomes(min_len, max_len)
    logr = np.array([toy_log_reward_text(z, **weights) for z in outs])
    p = np.exp(logr - logr.max())
    p /= p.sum()
    return dict(zip(outs, p.tolist()))


def toy_outcomes(min_len: int = 1, max_len: int = 3) -> List[str]:
    """Every string over the alphabet with min_len..max_len characters (39 by default)."""
    return ["".join(p) for n in range(min_len, max_len + 1)
            for p in itertools.product(ALPHABET, repeat=n)]


def toy_data_distribution(kind: str, min_len: int = 1, max_len: int = 3,
                          **weights: float) -> Dict[str, float]:
    """A known distribution over the outcomes, for SFT targets: ``"reward"`` (∝ R, the
    GFlowNet target), ``"inverse"`` (∝ 1/R) or ``"uniform"``."""
    if kind == "reward":
        return toy_target(min_len, max_len, **weights)
    outs = toy_outcomes(min_len, max_len)
    if kind == "uniform":
        return {z: 1.0 / len(outs) for z in outs}
    if kind == "inverse":
        logr = -np.array([toy_log_reward_text(z, **weights) for z in outs])
        p = np.exp(logr - logr.max())
        return dict(zip(outs, (p / p.sum()).tolist()))
    raise ValueError(f"task.targets_dist must be 'reward', 'inverse' or 'uniform', got {kind!r}")


def total_variation(p: Dict[str, float], q: Dict[str, float]) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


class ToyTask(Task):
    """Strings over a, b, c with a palindrome bonus; trained from one start token."""

    name = "toy_exact"
    DEFAULTS = {
        "min_len": 1,
        "max_len": 3,
        "w_a": 0.8,  # log R weight of each "a"
        "w_c": -0.6,  # log R weight of each "c"
        "w_pal": 1.2,  # log R bonus of a palindrome of length >= 2
        "targets_num": 0,  # SFT data: this many strings drawn from targets_dist (0: none)
        "targets_dist": "inverse",  # reward | inverse | uniform
        "targets_seed": 0,
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.min_len = int(c["min_len"])
        self.max_len = int(c["max_len"])
        self.w_a = float(c["w_a"])
        self.w_c = float(c["w_c"])
        self.w_pal = float(c["w_pal"])
        self.targets_num = int(c["targets_num"])
        self.targets_dist = str(c["targets_dist"])
        self.targets_seed = int(c["targets_seed"])
        if self.max_len < 1:
            raise ValueError(f"task.max_len must be >= 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"task.min_len must be in [0, task.max_len={self.max_len}], got "
                             f"{self.min_len}")
        if self.targets_num < 0:
            raise ValueError(f"task.targets_num must be >= 0, got {self.targets_num}")
        self.data_distribution()  # validates targets_dist

    def data_distribution(self) -> Dict[str, float]:
        """The known distribution the SFT targets are drawn from."""
        return toy_data_distribution(self.targets_dist, self.min_len, self.max_len,
                                     w_a=self.w_a, w_c=self.w_c, w_pal=self.w_pal)

    def targets(self) -> List[Target]:
        """``task.targets_num`` strings drawn (seeded) from ``task.targets_dist``."""
        if self.targets_num <= 0:
            raise NotImplementedError("the toy task has no target sequences unless "
                                      "task.targets_num > 0")
        dist = self.data_distribution()
        outs = list(dist)
        rng = np.random.default_rng(self.targets_seed)
        idx = rng.choice(len(outs), size=self.targets_num, p=np.asarray(list(dist.values())))
        ids = {c: self.tokenizer.token_to_id(c) for c in ALPHABET}
        return [Target(prompt_index=0, tokens=[ids[ch] for ch in outs[i]]) for i in idx]

    def build_tokenizer(self) -> Tokenizer:
        from gfn_jax.models.registry import char_tokenizer

        return char_tokenizer(ALPHABET, specials=(BOS, EOS))

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        self.char_ids = [tokenizer.token_to_id(c) for c in ALPHABET]
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        if None in self.char_ids or self.bos_id is None or self.eos_id is None:
            raise ValueError("the toy task needs a tokenizer with tokens a, b, c, <s>, </s>")
        V = model_config.vocab_size
        # token id -> (is a, is c) lookup tables for the jitted reward
        self._is_a = np.zeros(V, np.float32)
        self._is_c = np.zeros(V, np.float32)
        self._is_a[self.char_ids[0]] = 1.0
        self._is_c[self.char_ids[2]] = 1.0

    def train_prompts(self) -> List[str]:
        return [BOS]

    def encode_prompt(self, text: str) -> List[int]:
        assert text == BOS, "the toy task has a single prompt: the start token"
        return [self.bos_id]

    def policy_spec(self) -> PolicySpec:
        return PolicySpec(term_ids=(self.eos_id,), max_len=self.max_len, min_len=self.min_len)

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        bias = np.full(self.model_config.vocab_size, -1e9, np.float32)
        bias[self.char_ids] = 0.0
        bias[self.eos_id] = 0.0
        return bias

    def needs_reward_model(self) -> bool:
        return False

    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        z = batch["tokens"]  # [B, T]
        B, T = z.shape
        is_a = jnp.asarray(self._is_a)[z]
        is_c = jnp.asarray(self._is_c)[z]
        zero = jnp.zeros((B, 1), jnp.float32)
        n_a = jnp.concatenate([zero, jnp.cumsum(is_a, 1)], 1)  # [B, T+1] counts per prefix
        n_c = jnp.concatenate([zero, jnp.cumsum(is_c, 1)], 1)
        # palindrome test for every prefix length i: z[k] == z[i-1-k] for k < i
        i = jnp.arange(T + 1)[:, None]
        k = jnp.arange(T)[None, :]
        mirror = jnp.clip(i - 1 - k, 0, T - 1)  # [T+1, T]
        same = (z[:, None, :] == z[:, mirror]) | (k >= i)[None]  # [B, T+1, T]
        pal = jnp.all(same, -1) & (jnp.arange(T + 1) >= 2)[None]
        return self.w_a * n_a + self.w_c * n_c + self.w_pal * pal.astype(jnp.float32)

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        target = toy_target(self.min_len, self.max_len, w_a=self.w_a, w_c=self.w_c,
                            w_pal=self.w_pal)
        counts: Dict[str, float] = {}
        for s in samples:
            counts[s["text"]] = counts.get(s["text"], 0) + 1
        n = max(len(samples), 1)
        emp = {k: v / n for k, v in counts.items()}
        valid = sum(v for k, v in emp.items() if k in target)
        return {"tv_to_target": total_variation(emp, target), "fraction_valid": valid,
                "num_samples": float(len(samples))}
