"""Host side of a training step: which prompts, which behaviour, and the batch it produces.

Every choice is seeded by (config.seed, step), so a resumed run (or every host of a
multi-host run) makes exactly the same choices. Batches come from

* the sampler, under the behaviour chosen for the step: the policy itself, a tempered
  policy, an epsilon-uniform mixture (the sampler records the log-probs of the behaviour that
  actually drew each sample);
* the replay buffer of high-reward trajectories (uniform or reward-proportional);
* the task's target sequences (SFT on data).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from gfn_jax.batch import TrainBatch
from gfn_jax.policy import Policy, left_pad
from gfn_jax.replay import ReplayBuffer, collate
from gfn_jax.tasks.base import Target

BEHAVIOURS = ("on_policy", "tempered", "epsilon", "replay", "data")

__all__ = ["BEHAVIOURS", "Rollouts"]


class Rollouts:
    """Prompts, behaviour choice, drawing, replay and data batches for the trainer.

    Args:
      config: the run config.
      prompt_ids: token ids of each training prompt; ``reward_prompt_ids`` those of the
        reward's context (same list when the task scores under the policy's prompt).
      prompt_len, reward_prompt_len: padded lengths (static shapes).
      pad_id: padding token id.
      replay: the replay buffer (host).
      max_len: T.
      targets: the task's target trajectories (for ``data`` batches), or None.

    With a prompt stream (``data.source``) the trainer hands each step's prompts to
    :meth:`use_prompts` before :meth:`make_batch`; the step's rows are then all of them.
    """

    def __init__(self, config: Any, prompt_ids: List[List[int]],
                 reward_prompt_ids: List[List[int]], prompt_len: int, reward_prompt_len: int,
                 pad_id: int, replay: ReplayBuffer, max_len: int,
                 targets: Optional[Sequence[Target]] = None) -> None:
        self.config = config
        self.prompt_ids = prompt_ids
        self.reward_prompt_ids = reward_prompt_ids
        self.prompt_len = prompt_len
        self.reward_prompt_len = reward_prompt_len
        self.pad_id = pad_id
        self.replay = replay
        self.max_len = max_len
        self.targets = list(targets) if targets is not None else None
        # called with the prompt rows of every replay batch before it is drawn (the trainer's
        # lazy seeding of the buffer with the task's targets)
        self.before_replay: Optional[Callable[[Sequence[int]], Any]] = None
        self.streamed = False
        self.suffix_ids: Optional[List[List[int]]] = None  # streamed Y (see use_prompts)
        self.suffix_len = 0

    def use_prompts(self, prompt_ids: List[List[int]],
                    reward_prompt_ids: Optional[List[List[int]]] = None,
                    suffix_ids: Optional[List[List[int]]] = None,
                    suffix_len: int = 0) -> None:
        """Make ``prompt_ids`` (a step's streamed prompts) the prompt table, with the reward's
        contexts (None: the prompts; padded to the prompt length) and the suffixes the reward
        scores after Z (None: none; right-padded to ``suffix_len`` and put in every batch's
        ``extras["suffix_tokens"]`` / ``["suffix_mask"]``); every later step takes all rows."""
        self.prompt_ids = list(prompt_ids)
        self.reward_prompt_ids = self.prompt_ids if reward_prompt_ids is None else list(
            reward_prompt_ids)
        if len(self.reward_prompt_ids) != len(self.prompt_ids):
            raise ValueError(f"{len(self.reward_prompt_ids)} reward contexts for "
                             f"{len(self.prompt_ids)} prompts")
        self.suffix_ids = None
        if suffix_ids is not None:
            if len(suffix_ids) != len(self.prompt_ids) or int(suffix_len) < 1:
                raise ValueError(f"{len(suffix_ids)} suffixes of length {suffix_len} for "
                                 f"{len(self.prompt_ids)} prompts")
            self.suffix_ids, self.suffix_len = list(suffix_ids), int(suffix_len)
        self.streamed = True

    # ------------------------------------------------------------------ helpers
    def pad(self, ids: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
        return left_pad(ids, length, self.pad_id)

    def _prompts_for(self, rows: Sequence[int]) -> Dict[str, np.ndarray]:
        pt, pm = self.pad([self.prompt_ids[i] for i in rows], self.prompt_len)
        rt, rm = self.pad([self.reward_prompt_ids[i] for i in rows], self.reward_prompt_len)
        return {"prompt_tokens": pt, "prompt_mask": pm, "reward_prompt_tokens": rt,
                "reward_prompt_mask": rm}

    def _row_extras(self, rows: Sequence[int]) -> Dict[str, np.ndarray]:
        """Per-row batch extras of the prompt table (streamed suffixes), one row per entry
        of ``rows``."""
        if self.suffix_ids is None:
            return {}
        S = self.suffix_len
        toks = np.full((len(rows), S), self.pad_id, np.int32)
        mask = np.zeros((len(rows), S), bool)
        for r, i in enumerate(rows):
            y = self.suffix_ids[i]
            toks[r, :len(y)], mask[r, :len(y)] = y, True
        return {"suffix_tokens": toks, "suffix_mask": mask}

    def trajectories(self, rows: Sequence[int], seqs: Sequence[Sequence[int]],
                     masks: Sequence[Optional[Sequence[bool]]],
                     weights: Optional[Sequence[float]] = None) -> TrainBatch:
        """A batch of given trajectories (replay, data): no behaviour log-probs."""
        T = self.max_len
        B = len(rows)
        toks = np.full((B, T), self.pad_id, np.int32)
        am = np.zeros((B, T), bool)
        lens = np.zeros(B, np.int32)
        for r, (z, m) in enumerate(zip(seqs, masks)):
            z = np.asarray(z, np.int32)
            if len(z) > T:
                raise ValueError(f"a target / replayed trajectory has {len(z)} tokens, more "
                                 f"than the policy's max_len={T}")
            toks[r, :len(z)] = z
            am[r, :len(z)] = True if m is None else np.asarray(m, bool)[:len(z)]
            lens[r] = len(z)
        p = self._prompts_for(rows)
        return TrainBatch.build(p["prompt_tokens"], p["prompt_mask"], toks, lens, am,
                                np.asarray(rows, np.int32),
                                reward_prompt_tokens=p["reward_prompt_tokens"],
                                reward_prompt_mask=p["reward_prompt_mask"],
                                weight=None if weights is None else np.asarray(weights)
                                ).with_extras(self._row_extras(rows))

    # ------------------------------------------------------------------ choice
    def choose_prompts(self, step: int) -> List[int]:
        if self.streamed:
            return list(range(len(self.prompt_ids)))
        P = int(self.config.train.prompts_per_batch)
        rng = np.random.default_rng([self.config.seed, step, 3])
        n = len(self.prompt_ids)
        return [int(i) for i in rng.choice(n, size=P, replace=n < P)]

    def choose_behaviour(self, step: int, rows: Optional[Sequence[int]] = None
                         ) -> Dict[str, Any]:
        """Stateless (seeded by step) choice of the batch's behaviour policy; replay only
        once the buffers of the step's prompts (``rows``, default all) hold enough."""
        e = self.config.explore
        rng = np.random.default_rng([self.config.seed, step, 17])
        probs = np.array([e.p_on_policy, e.p_tempered, e.p_epsilon, e.p_replay], np.float64)
        if not self.replay_ready(rows):
            probs[3] = 0.0
        if probs.sum() <= 0:
            probs[0] = 1.0
        kind = BEHAVIOURS[int(rng.choice(4, p=probs / probs.sum()))]
        out: Dict[str, Any] = {"kind": kind, "temperature": 1.0, "epsilon": 0.0}
        if kind == "tempered":
            out["temperature"] = float(rng.uniform(e.temp_min, e.temp_max))
        elif kind == "epsilon":
            out["epsilon"] = float(e.epsilon)
        return out

    def replay_ready(self, rows: Optional[Sequence[int]] = None) -> bool:
        """Whether the buffers of ``rows`` (default: every prompt) hold enough trajectories
        (``min(train.samples_per_prompt, replay.min_size)`` each)."""
        need = min(self.config.train.samples_per_prompt, self.config.replay.min_size)
        rows = range(len(self.prompt_ids)) if rows is None else rows
        return len(self.replay) > 0 and all(self.replay.size(str(i)) >= need for i in rows)

    # ------------------------------------------------------------------ batches
    def make_batch(self, step: int, policy: Policy, replay_temperature: Optional[float],
                   source: str = "policy") -> Tuple[TrainBatch, str]:
        """The batch of ``step`` and the name of the behaviour that produced it."""
        if source == "data":
            return self.data_batch(step), "data"
        tc = self.config.train
        rows = self.choose_prompts(step)
        beh = self.choose_behaviour(step, rows)
        if beh["kind"] == "replay":
            batch = self.replay_batch(rows, tc.samples_per_prompt, replay_temperature)
            if batch is not None:
                return batch, "replay"
            beh = {"kind": "on_policy", "temperature": 1.0, "epsilon": 0.0}
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
        return self.draw(policy, key, rows, tc.samples_per_prompt, beh), beh["kind"]

    def draw(self, policy: Policy, rng: jax.Array, rows: Sequence[int], num_samples: int,
             behaviour: Dict[str, Any]) -> TrainBatch:
        """``num_samples`` trajectories of each prompt in ``rows`` under ``behaviour``."""
        p = self._prompts_for(rows)
        out = jax.device_get(policy.draw(
            p["prompt_tokens"], p["prompt_mask"], rng, num_samples,
            temperature=behaviour.get("temperature", 1.0), top_k=int(self.config.explore.top_k),
            top_p=float(self.config.explore.top_p), epsilon=behaviour.get("epsilon", 0.0)))
        rep = lambda x: np.repeat(x, num_samples, 0)  # noqa: E731
        return TrainBatch.build(
            rep(p["prompt_tokens"]), rep(p["prompt_mask"]), out.tokens, out.lengths,
            out.action_mask, np.repeat(np.asarray(rows), num_samples),
            reward_prompt_tokens=rep(p["reward_prompt_tokens"]),
            reward_prompt_mask=rep(p["reward_prompt_mask"]),
            beh_log_pf=out.beh_log_pf, beh_log_pterm=out.beh_log_pterm,
            old_log_pf=out.log_pf, old_log_pterm=out.log_pterm, group_size=num_samples
        ).with_extras(self._row_extras(np.repeat(np.asarray(rows), num_samples)))

    def replay_batch(self, rows: Sequence[int], k: int,
                     temperature: Optional[float]) -> Optional[TrainBatch]:
        """``k`` stored trajectories of each prompt (uniform, or ∝ R^(1/temperature))."""
        if self.before_replay is not None:
            self.before_replay(rows)
        entries, prow = [], []
        for r in rows:
            if self.replay.size(str(r)) == 0:
                return None
            entries += self.replay.sample(str(r), k, temperature=temperature)
            prow += [r] * k
        c = collate(entries, width=self.max_len, pad_id=self.pad_id)
        amask = c.get("action_mask", np.arange(self.max_len)[None, :] < c["lengths"][:, None])
        p = self._prompts_for(prow)
        return TrainBatch.build(p["prompt_tokens"], p["prompt_mask"], c["tokens"], c["lengths"],
                                amask.astype(bool), np.asarray(prow, np.int32),
                                reward_prompt_tokens=p["reward_prompt_tokens"],
                                reward_prompt_mask=p["reward_prompt_mask"], group_size=k
                                ).with_extras(self._row_extras(prow))

    def data_batch(self, step: int) -> TrainBatch:
        """A batch of the task's target trajectories, drawn uniformly (seeded by step)."""
        if not self.targets:
            raise ValueError("this objective trains on the task's target sequences, and the "
                             "task supplied none")
        B = int(self.config.train.prompts_per_batch * self.config.train.samples_per_prompt)
        rng = np.random.default_rng([self.config.seed, step, 5])
        pick = [self.targets[int(i)] for i in rng.integers(0, len(self.targets), size=B)]
        return self.trajectories([t.prompt_index for t in pick], [t.tokens for t in pick],
                                 [t.action_mask for t in pick], [t.weight for t in pick])

    # ------------------------------------------------------------------ replay
    def add_to_replay(self, batch: TrainBatch, log_r_final: np.ndarray) -> None:
        """Offer a batch's trajectories (with their untempered final log R) to the buffer;
        impossible trajectories (non-finite log R) are never replayed."""
        keep = np.isfinite(np.asarray(log_r_final))
        if not keep.any():
            return
        self.replay.add_batch(
            [str(int(i)) for i in np.asarray(batch.prompt_index)[keep]],
            np.asarray(batch.tokens)[keep], np.asarray(log_r_final, np.float64)[keep],
            arrays={"action_mask": np.asarray(batch.action_mask)[keep]},
            lengths=np.asarray(batch.lengths)[keep])
