"""Random-number generation, the paper's motivating example.

Prompt: "The following is a random integer drawn uniformly between 0 and 100: ". Reward:
high (log R = 0) for a canonical integer 0..99 (no leading zero) followed by termination,
low (``invalid_log_reward``) for anything else. The GFlowNet optimum is then (nearly)
uniform over the 100 valid integers, which a reward-maximiser or the base LM is not. By
default (``digits_only``) the policy acts on the ten digit tokens and termination; with
``invalid_log_reward = -8`` the optimum then puts about 99.7% of its mass on valid
integers (1011 invalid strings of length <= 3 share e^-8 each).

The reward is exact and jittable because SmolLM2's tokenizer splits digits individually:
an integer is a run of single-digit tokens, found with a [V] lookup table.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.tasks.base import Batch, Task

DEFAULT_PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "


def parse_valid_integer(text: str, low: int = 0, high: int = 99) -> Optional[int]:
    """The integer a completion denotes if it is canonical and in [low, high], else None."""
    if not text or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return None
    v = int(text)
    return v if low <= v <= high else None


class RandomNumberTask(Task):
    """Uniform random integers 0..99 from an LM."""

    name = "rng"

    DEFAULTS = {
        "prompt": DEFAULT_PROMPT,
        "max_len": 3,
        "invalid_log_reward": -8.0,  # log R of strings that are not integers 0..99
        "term_tokens": ("\n",),
        "use_eos": True,
        # Over the whole vocabulary the target p(Z) ∝ R(Z) is dominated by the ~V^max_len
        # invalid strings unless log R(invalid) < -max_len*log(V): restrict the policy's
        # actions to the ten digit tokens and termination (a policy logit bias) instead.
        "digits_only": True,
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.prompt = str(c["prompt"])
        self.max_len = int(c["max_len"])
        if self.max_len < 1:
            raise ValueError(f"task.max_len must be >= 1, got {self.max_len}")
        self.invalid_log_reward = float(c["invalid_log_reward"])
        self.term_tokens = tuple(c["term_tokens"])
        self.use_eos = bool(c["use_eos"])
        self.digits_only = bool(c["digits_only"])

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        V = model_config.vocab_size
        digit = np.full(V, -1, np.int32)
        for d in range(10):
            ids = tokenizer.encode(str(d), add_bos=False)
            if len(ids) != 1:
                raise ValueError(
                    "the rng task needs a tokenizer that encodes each digit as one token"
                )
            digit[ids[0]] = d
        self.digit_of = digit
        term = list(tokenizer.ids_of(self.term_tokens))
        if self.use_eos and tokenizer.eos_id is not None:
            term.append(tokenizer.eos_id)
        self.term_ids = tuple(sorted(set(term)))

    def train_prompts(self) -> List[str]:
        return [self.prompt]

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        if not self.digits_only:
            return None
        bias = np.full(self.model_config.vocab_size, -1e9, np.float32)
        bias[self.digit_of >= 0] = 0.0
        bias[list(self.term_ids)] = 0.0
        return bias

    def policy_spec(self) -> PolicySpec:
        return PolicySpec(term_ids=self.term_ids, max_len=self.max_len, min_len=0)

    def needs_reward_model(self) -> bool:
        return False

    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        z = batch["tokens"]  # [B, T]
        B, T = z.shape
        d = jnp.asarray(self.digit_of)[z]  # [B, T], -1 for non-digits
        i = jnp.arange(T + 1)[None, :]  # prefix lengths
        is_digit = d >= 0
        # all of z[:i] are digits  <=>  cumulative count of digits == i
        n_digits = jnp.concatenate([jnp.zeros((B, 1), jnp.int32),
                                    jnp.cumsum(is_digit.astype(jnp.int32), 1)], 1)
        all_digits = n_digits == i
        first_nonzero = (d[:, :1] != 0)  # no leading zero
        valid = all_digits & ((i == 1) | ((i == 2) & first_nonzero))
        return jnp.where(valid, 0.0, self.invalid_log_reward).astype(jnp.float32)

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        counts = np.zeros(100, np.int64)
        invalid = 0
        for s in samples:
            v = parse_valid_integer(s["text"])
            if v is None:
                invalid += 1
            else:
                counts[v] += 1
        n = max(len(samples), 1)
        p = counts / n
        tv = 0.5 * (np.abs(p - 0.01).sum() + invalid / n)
        valid_p = counts / max(counts.sum(), 1)
        tv_valid = 0.5 * np.abs(valid_p - 0.01).sum()
        metrics = {
            "fraction_valid": float(counts.sum() / n),
            "tv_to_uniform": float(tv),
            "tv_to_uniform_among_valid": float(tv_valid),
            "distinct_valid": float((counts > 0).sum()),
            "num_samples": float(len(samples)),
        }
        if out_dir:
            from gfn_jax.metrics import plot_histogram

            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"rng_histogram{('_' + tag) if tag else ''}.png")
            plot_histogram(
                np.append(counts, invalid),
                [str(k) for k in range(100)] + ["invalid"],
                path,
                f"{tag or 'samples'}: valid {metrics['fraction_valid']:.3f}, "
                f"TV to uniform {metrics['tv_to_uniform']:.3f}",
                ylabel=f"number of samples (of {len(samples)})",
                xlabel="sampled integer",
            )
            np.save(os.path.join(out_dir, f"rng_counts{('_' + tag) if tag else ''}.npy"),
                    np.append(counts, invalid))
            before = os.path.join(out_dir, "rng_counts_before.npy")
            if tag == "after" and os.path.exists(before):
                # one picture a person can compare at a glance
                n_before = np.load(before)
                tot_before = max(n_before.sum(), 1)
                plot_histogram(
                    {"before": n_before[:100] / tot_before, "after": counts / n},
                    [str(k) for k in range(100)],
                    os.path.join(out_dir, "rng_histogram.png"),
                    "fraction of all samples per integer (uniform = 0.01); invalid: before "
                    f"{n_before[100] / tot_before:.2%}, after {invalid / n:.2%}",
                    ylabel="fraction of all samples", xlabel="sampled integer")
        return metrics
