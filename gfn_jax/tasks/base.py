"""The task interface: everything task-specific that the generic trainer needs.

A task never touches the train step. It supplies prompts, the policy's termination set
and length limits (:class:`~gfn_jax.logprobs.PolicySpec`), an optional policy logit bias,
an optional tool, the log-reward of every prefix as a pure jittable function, and
evaluation metrics.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer

Batch = Dict[str, jax.Array]


class Task(abc.ABC):
    """Base class for GFlowNet fine-tuning tasks.

    ``log_reward`` receives the *base* model (adapters off) and a batch dict with
    ``prompt_tokens [B,P]``, ``prompt_mask [B,P]``, ``tokens [B,T]``, ``lengths [B]``,
    ``action_mask [B,T]`` and ``prompt_index [B]``, and returns the untempered
    ``log R(X z_<=i ⊤)`` for every prefix ``i = 0..T`` as ``[B, T+1]`` float32 (values
    beyond each row's length are ignored).
    """

    name: str = "task"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer: Optional[Tokenizer] = None

    # --- set-up -------------------------------------------------------------
    def build_tokenizer(self) -> Optional[Tokenizer]:
        """A tokenizer for tasks whose model has none (toy tasks); None otherwise."""
        return None

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        """Called once with the loaded model's config and tokenizer."""
        self.tokenizer = tokenizer
        self.model_config = model_config

    # --- data ---------------------------------------------------------------
    @abc.abstractmethod
    def train_prompts(self) -> List[str]:
        """Prompts (raw text) to train on."""

    def eval_prompts(self) -> List[str]:
        return self.train_prompts()

    def encode_prompt(self, text: str) -> List[int]:
        assert self.tokenizer is not None
        return self.tokenizer.encode(text)

    # --- policy -------------------------------------------------------------
    @abc.abstractmethod
    def policy_spec(self) -> PolicySpec:
        """Termination ids and length limits of the policy."""

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        """Additive [V] bias that is part of the policy (e.g. -inf on forbidden tokens)."""
        return None

    def tool(self) -> Any:
        """An optional sampler tool (see :mod:`gfn_jax.sampling`)."""
        return None

    # --- reward -------------------------------------------------------------
    @abc.abstractmethod
    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """Untempered log R of every prefix, [B, T+1]; pure and jittable."""

    def bind_reward_params(self, base_params: Any) -> None:
        """Receive the reward model's (base) parameters for use in :meth:`evaluate`
        (e.g. scoring samples under the base LM). Default: ignored."""

    def needs_reward_model(self) -> bool:
        """False when the reward ignores the LM (then base params are not passed)."""
        return True

    # --- evaluation ---------------------------------------------------------
    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """Task metrics for a list of samples (dicts with ``prompt``, ``tokens``, ``text``,
        ``log_q``); may write plots into ``out_dir``."""
        return {}
