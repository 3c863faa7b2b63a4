"""The task interface: everything task-specific that the generic trainer needs.

A task never touches the train step. It supplies prompts, the policy's termination set
and length limits (:class:`~gfn_jax.logprobs.PolicySpec`), an optional policy logit bias,
an optional tool, the log-reward of every prefix as a pure jittable function, and
evaluation metrics.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer

Batch = Any  # a gfn_jax.batch.TrainBatch (also readable as batch["tokens"], ...)


@dataclasses.dataclass(frozen=True)
class Target:
    """A ground-truth trajectory from a task's data: the prompt it continues, its generated
    token ids Z (without ⊤), tool-splice mask (None: every token is an action) and weight."""

    prompt_index: int
    tokens: Sequence[int]
    action_mask: Optional[Sequence[bool]] = None
    weight: float = 1.0


class Task(abc.ABC):
    """Base class for GFlowNet fine-tuning tasks.

    ``log_reward`` receives the *base* model (adapters off) and a batch dict with
    ``prompt_tokens [B,P]``, ``prompt_mask [B,P]``, ``tokens [B,T]``, ``lengths [B]``,
    ``action_mask [B,T]`` and ``prompt_index [B]``, and returns the untempered
    ``log R(X z_<=i ⊤)`` for every prefix ``i = 0..T`` as ``[B, T+1]`` float32 (values
    beyond each row's length are ignored).
    """

    name: str = "task"
    DEFAULTS: ClassVar[Dict[str, Any]] = {}
    """The task's config schema: every ``config.task`` key with its default."""
    STREAM_FIELDS: ClassVar[Tuple[str, ...]] = ()
    """Record fields the task takes from a streamed ``data.source`` (``("X",)``: the prompt
    text); empty: its prompts come only from its own files (e.g. with per-prompt data indexed
    by ``prompt_index``) and ``data.source`` is refused."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer: Optional[Tokenizer] = None
        # relative data paths resolve against this (config.data.root), else the working dir
        self.data_root = str(getattr(config, "data_root", "") or "")

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

    def stream_prompt(self, record: Mapping[str, Any]) -> str:
        """The training prompt of one streamed record (``data.source``; the fields named in
        ``STREAM_FIELDS``, also under their source column names): its X."""
        return str(record["X"])

    def stream_reward_prompt(self, record: Mapping[str, Any]) -> Optional[str]:
        """The reward's context for a streamed record when it differs from the policy's
        prompt (see :meth:`reward_prompts`); None = the prompt."""
        return None

    def stream_suffix(self, record: Mapping[str, Any]) -> Optional[str]:
        """The text the reward scores after Z for a streamed record (infilling's Y), carried
        in the batch as ``extras["suffix_tokens"]`` / ``["suffix_mask"]``; None = none."""
        return None

    def stream_suffix_len(self) -> int:
        """The padded length (tokens) of :meth:`stream_suffix`; a longer one is a bad record."""
        return 0

    def check_stream_columns(self, fields: Mapping[str, str]) -> None:
        """Raise ``ValueError`` naming what is missing when records with ``fields`` (record
        key -> source column) cannot make this task's prompts; called when the stream opens."""

    def eval_prompts(self) -> List[str]:
        return self.train_prompts()

    def encode_prompt(self, text: str) -> List[int]:
        assert self.tokenizer is not None
        return self.tokenizer.encode(text)

    def reward_prompts(self) -> Optional[List[str]]:
        """The context under which the reward scores Z (and Y) for each training prompt, when
        it differs from the policy's prompt (e.g. a frozen few-shot prompt); None = the same.
        The reward then reads ``batch.reward_prompt_tokens`` / ``reward_prompt_mask``."""
        return None

    def encode_reward_prompt(self, text: str) -> List[int]:
        return self.encode_prompt(text)

    def targets(self) -> List[Target]:
        """Ground-truth trajectories from the task's data (for SFT on data and replay
        seeding); tasks without data raise ``NotImplementedError``."""
        raise NotImplementedError(
            f"task {self.name!r} supplies no target sequences (needed by objective.name=sft "
            f"with objective.sft_source='data' and by replay.seed_from_data)")

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
    def evaluate_policy(self, policy: Any) -> Optional[Dict[str, float]]:
        """Metrics that need the policy itself (e.g. label scoring, majority votes at a low
        temperature); ``gfn-jax eval`` and training's evaluations use them instead of
        sampling when a task returns a dict. Default: None (sample, then :meth:`evaluate`)."""
        return None

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """Task metrics for a list of samples (dicts with ``prompt``, ``tokens``, ``text``,
        ``log_q``); may write plots into ``out_dir``."""
        return {}


def importance_log_z(log_r: Sequence[float], log_q: Sequence[float]) -> Tuple[float, float]:
    """``(log mean_j exp(log R_j - log q_j), ESS = (Σ w)² / Σ w²)`` of samples Z_j ~ q.

    ``exp`` of the first is an unbiased estimate of Z = Σ_Z R(Z), so by Jensen its log is a
    lower bound of log Z in expectation. ESS is in [1, n]; n when every weight is equal."""
    lw = np.asarray(log_r, np.float64) - np.asarray(log_q, np.float64)
    if lw.size == 0 or not np.all(np.isfinite(lw)):
        return float("nan"), float("nan")
    m = lw.max()
    w = np.exp(lw - m)
    return float(m + math.log(w.mean())), float(w.sum() ** 2 / (w ** 2).sum())
