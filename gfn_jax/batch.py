"""The training batch: one typed structure that knows its own shardings.

A :class:`TrainBatch` holds B trajectories (rows) as they enter the jitted train step: the
policy's prompt, the reward's context (usually the same prompt), the generated tokens, which of
them were policy actions, and the log-probabilities under the behaviour that produced them.
Every field has the batch dimension first, so one rule shards the whole structure over the
mesh's batch axes (``data`` x ``fsdp``). Host code builds it with numpy; the step receives it
as device arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from gfn_jax import parallel

__all__ = ["TrainBatch", "concat_batches"]


@flax.struct.dataclass
class TrainBatch:
    """B trajectories, P prompt positions, at most T generated tokens.

    Attributes:
      prompt_tokens, prompt_mask: int32 [B, P] left-padded policy prompt X (mask 1 = real).
      reward_prompt_tokens, reward_prompt_mask: int32 [B, Pr] the context under which the
        reward scores Z (and Y); equal to the policy prompt unless the task scores under a
        different context (e.g. a frozen few-shot prompt).
      tokens: int32 [B, T] generated tokens (pad after each row's end).
      lengths: int32 [B] number of generated tokens n.
      action_mask: bool [B, T] True where the policy chose the token (False: tool splices).
      prompt_index: int32 [B] index of each row's prompt in the task's prompt list.
      beh_log_pf, beh_log_pterm: float32 [B, T] / [B, T+1] log-probs of the behaviour that
        produced each row (the sampler's tempered / epsilon-mixed distribution; the policy
        itself for on-policy rows). Only meaningful where ``has_behaviour`` is True.
      old_log_pf, old_log_pterm: the untempered policy's log-probs at sampling time.
      has_behaviour: bool [B] False for rows whose behaviour log-probs are unknown (replay,
        data targets).
      weight: float32 [B] per-row loss weight (1 by default; data targets may weigh less).
      extras: per-row arrays an objective computes once per rollout (see
        :attr:`gfn_jax.objective_registry.Objective.prepare`), e.g. PPO advantages.
      group_size: static (not an array): the rows come in consecutive groups of this many
        with the same prompt and reward prompt (K samples of each prompt, prompt-major), so
        the step's scorers may run each prompt once (:func:`gfn_jax.scoring.prompt_groups`);
        1 = no such structure. A row selection (:meth:`take`) resets it to 1.
    """

    prompt_tokens: Any
    prompt_mask: Any
    reward_prompt_tokens: Any
    reward_prompt_mask: Any
    tokens: Any
    lengths: Any
    action_mask: Any
    prompt_index: Any
    beh_log_pf: Any
    beh_log_pterm: Any
    old_log_pf: Any
    old_log_pterm: Any
    has_behaviour: Any
    weight: Any
    extras: Dict[str, Any] = flax.struct.field(default_factory=dict)
    group_size: int = flax.struct.field(pytree_node=False, default=1)

    # -- dict-style access, so task rewards written against ``batch["tokens"]`` keep working
    def __getitem__(self, key: str) -> Any:
        if key in self.extras:
            return self.extras[key]
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    @property
    def size(self) -> int:
        """Number of rows B."""
        return int(np.shape(self.tokens)[0])

    @property
    def max_len(self) -> int:
        """T, the padded number of generated positions."""
        return int(np.shape(self.tokens)[1])

    @classmethod
    def build(
        cls,
        prompt_tokens: np.ndarray,
        prompt_mask: np.ndarray,
        tokens: np.ndarray,
        lengths: np.ndarray,
        action_mask: np.ndarray,
        prompt_index: np.ndarray,
        *,
        reward_prompt_tokens: Optional[np.ndarray] = None,
        reward_prompt_mask: Optional[np.ndarray] = None,
        beh_log_pf: Optional[np.ndarray] = None,
        beh_log_pterm: Optional[np.ndarray] = None,
        old_log_pf: Optional[np.ndarray] = None,
        old_log_pterm: Optional[np.ndarray] = None,
        weight: Optional[np.ndarray] = None,
        group_size: int = 1,
    ) -> "TrainBatch":
        """A host (numpy) batch with the right dtypes; missing behaviour log-probs are zeros
        and flagged by ``has_behaviour = False``. ``group_size``: see the class docstring (the
        caller guarantees the grouping)."""
        B, T = np.shape(tokens)
        if group_size < 1 or B % group_size:
            raise ValueError(f"group_size={group_size} must be >= 1 and divide the {B} rows")
        has = beh_log_pf is not None
        zeros_pf = np.zeros((B, T), np.float32)
        zeros_pt = np.zeros((B, T + 1), np.float32)
        if reward_prompt_tokens is None:
            reward_prompt_tokens, reward_prompt_mask = prompt_tokens, prompt_mask
        return cls(
            prompt_tokens=np.asarray(prompt_tokens, np.int32),
            prompt_mask=np.asarray(prompt_mask, np.int32),
            reward_prompt_tokens=np.asarray(reward_prompt_tokens, np.int32),
            reward_prompt_mask=np.asarray(reward_prompt_mask, np.int32),
            tokens=np.asarray(tokens, np.int32),
            lengths=np.asarray(lengths, np.int32),
            action_mask=np.asarray(action_mask, bool),
            prompt_index=np.asarray(prompt_index, np.int32),
            beh_log_pf=np.asarray(beh_log_pf if has else zeros_pf, np.float32),
            beh_log_pterm=np.asarray(beh_log_pterm if has else zeros_pt, np.float32),
            old_log_pf=np.asarray(old_log_pf if old_log_pf is not None else zeros_pf, np.float32),
            old_log_pterm=np.asarray(
                old_log_pterm if old_log_pterm is not None else zeros_pt, np.float32),
            has_behaviour=np.full((B,), has, bool),
            weight=np.asarray(np.ones(B) if weight is None else weight, np.float32),
            extras={},
            group_size=int(group_size),
        )

    def map(self, fn: Callable[[Any], Any]) -> "TrainBatch":
        """Apply ``fn`` to every array (e.g. ``np.asarray``, a row selection)."""
        return jax.tree_util.tree_map(fn, self)

    def take(self, rows: Sequence[int]) -> "TrainBatch":
        """The rows ``rows`` (host arrays); no group structure is assumed for them."""
        idx = np.asarray(rows)
        return self.map(lambda x: np.asarray(x)[idx]).replace(group_size=1)

    def with_extras(self, extras: Mapping[str, Any]) -> "TrainBatch":
        """A copy with ``extras`` merged in."""
        return self.replace(extras={**self.extras, **dict(extras)})

    def shardings(self, mesh: Mesh, rules: Any = parallel.DEFAULT_RULES) -> "TrainBatch":
        """Every field sharded along its batch dimension over the mesh's batch axes."""
        return jax.tree_util.tree_map(
            lambda x: parallel.batch_sharding(mesh, np.ndim(x), rules), self)

    def step_input(self, mesh: Mesh, rules: Any = parallel.DEFAULT_RULES) -> "TrainBatch":
        """The batch as a jitted step whose batch ``in_shardings`` are set takes it: in one
        process, numpy leaves that the call itself places (~5x less host time than a
        ``device_put`` first, which counts when a rollout runs many small minibatch calls);
        with several processes, global arrays of this host's rows (:meth:`to_device`)."""
        if jax.process_count() > 1:
            return self.to_device(mesh, rules)
        self._check_divisible(mesh)
        return self.map(np.asarray)

    def _check_divisible(self, mesh: Mesh) -> None:
        B = self.size
        n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
        if B % n_dev:
            raise ValueError(f"a batch of {B} rows is not divisible by the mesh's batch axes "
                             f"data*fsdp = {n_dev}; change train.prompts_per_batch, "
                             f"train.samples_per_prompt or mesh.data/mesh.fsdp")

    def to_device(self, mesh: Mesh, rules: Any = parallel.DEFAULT_RULES) -> "TrainBatch":
        """Place a host batch on ``mesh``. With several processes, every host built the same
        global batch (seeded by step) and feeds its own rows of it."""
        B = self.size
        self._check_divisible(mesh)
        if jax.process_count() > 1:
            rows = parallel.process_batch_slice(mesh, B)
            return parallel.global_batch_from_local(self.map(lambda x: np.asarray(x)[rows]), mesh)
        # one batched transfer for the whole tree (a device_put per leaf costs ~0.4 ms each)
        return jax.device_put(self.map(np.asarray), self.shardings(mesh, rules))


def concat_batches(batches: Sequence[TrainBatch]) -> TrainBatch:
    """Row-wise concatenation of host batches with the same shapes (other than B); the
    group size is kept when every part has the same one."""
    sizes = {b.group_size for b in batches}
    k = sizes.pop() if len(sizes) == 1 else 1
    batches = [b.replace(group_size=k) for b in batches]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                  *batches)


def as_numpy(tree: Any) -> Any:
    """numpy copies of every leaf."""
    return jax.tree_util.tree_map(np.asarray, tree)
