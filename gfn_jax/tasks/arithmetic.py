"""Integer arithmetic with a calculator: the rationale Z as a latent variable (Hu et al. 2024,
Sec. 4.4), on the training harness.

* **X** (the policy's prompt): the query, ``"Question: 6 - 0 - 4 - 8 = ? Answer:"``.
* **Z**: the rationale the policy writes, e.g. ``" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"``; the
  numbers after each ``=`` are spliced in by the calculator (:meth:`ArithmeticTask.tool`, see
  :mod:`gfn_jax.tasks.calculator`) and are not policy actions. Z ends (⊤) with ``"."``, the
  first token of the answer template (``term_tokens``), or with EOS (``use_eos``; the release
  ends Z with EOS only). ⊤ itself is not scored by the reward: Y follows Z directly, so with
  ``"."`` the terminating token is scored as Y's first token. Tokens that contain ``"."`` other
  than ⊤ itself are not allowed inside Z.
* **Y**: the answer text of the data, ``". The answer is -6."`` (``str_sol``).
* **Reward**: ``log R(X z_<=i ⊤) = log p~(z_<=i | C X) + log p(Y | C X z_<=i)`` for every prefix
  i, under the frozen base model (adapters off), where C is a frozen few-shot prompt (the first
  ``num_few_shot`` labelled examples, one per line). Z *contains the tool outputs*. ``p~`` is the
  base model with the vocabulary restricted on the rationale positions: ``vocab_penalty``
  (-99, the release's ``vocab_alpha``) is added to the logits of every token whose text is not
  made only of ``vocab_chars`` (digits, ``", . = + -"`` and space; EOS allowed) and the logits
  are renormalised; Y is scored by the unrestricted model (Y contains words). Prefixes shorter
  than ``min_len`` get ``log R = short_log_reward`` (-99), as the release. One forward over
  ``[C X | Z]`` for the first term, ONE packed :func:`~gfn_jax.scoring.score_suffix_prefixes`
  pass for the second. The harness puts ``C X`` in ``batch.reward_prompt_tokens/mask``
  (:meth:`reward_prompts`).
* **Policy**: the same vocabulary penalty as a policy logit bias (the release samples and
  computes log q from the unconstrained logits plus the penalty), ``min_len``/``max_len``.
* **Data**: the first ``num_labelled`` rows of ``train_50`` (with rationales) and the first
  ``num_answer_only`` rows of ``hw`` (answers only). :meth:`targets` gives the labelled
  rationales as tool-on trajectories (``objective.name=sft`` = the SFT baseline,
  ``replay.seed_from_data`` = replay seeded with ground truth).

Prompt weights (labelled 1, answer-only 0.2 in the release). The release draws each training
query with probability proportional to its weight. The harness draws training prompts
uniformly, and the balance objectives ignore ``batch.weight``; scaling log R would change the
target distribution (R^w is a reward temperature), not the sampling. So the weights are
realised as *multiplicities*: the weight ratio ``labelled_weight / answer_only_weight`` is
written as a ratio of small integers p/q (denominator <= 100) and every labelled query appears
p times, every answer-only query q times in :meth:`train_prompts` (1 and 0.2: 5 and 1, so a
labelled query is drawn 5x as often as an answer-only one, exactly the release's
probabilities). Each copy has its own prompt index (and replay buffer); :meth:`targets` emits
one target per copy.

Evaluation (:meth:`eval_prompts` + :meth:`evaluate`): accuracy of the majority vote over the
first ``vote_k`` sampled rationales of each query (the release: 10 samples at T = 0.1).
In distribution (``id``): ``eval_id="generated"`` draws ``eval_id_num`` fresh 3/4-operand
problems with :func:`~gfn_jax.tasks.arithmetic_data.generate_problems` (seed ``eval_seed``)
excluding every query of ``train_50`` and ``hw`` (all rows, not only those trained on);
``eval_id="dedup"`` takes the released ``test_3`` and ``test_4`` files with every query of
``train_50``/``hw`` removed and repeats dropped, then the first ``eval_id_num // 2`` (rounded up)
of ``test_3`` and the rest from ``test_4`` (:attr:`ArithmeticTask.eval_info` records how many
rows remained). Out of distribution (``ood``): the first ``eval_ood_num`` distinct queries of the
5-operand ``test_5`` file (no overlap with training). ``0`` means all rows.

``gfn-jax eval`` samples ``eval.batch_size`` rationales per prompt at temperature 1 (the CLI has
no temperature option); :func:`evaluate_policy` samples ``vote_k`` per query at
``eval_temperature`` (0.1) as the release, and :func:`few_shot_baseline` evaluates the base model
prompted with the few-shot prompt (``python -m gfn_jax.tasks.arithmetic --help``).

Posterior diagnostics (when base parameters are bound and the samples were drawn at
temperature 1, i.e. their ``log_q`` is the proposal's): for the first ``eval_log_z_queries``
queries, the importance-weighted estimate ``log Z ≈ log mean exp(log R - log q)`` (a stochastic
lower bound of ``log sum_Z R``) and the effective sample size fraction
``(sum w)^2 / (n sum w^2)``, averaged over queries.
"""

from __future__ import annotations

import argparse
import collections
import fractions
import functools
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.logprobs import (PolicySpec, gather_logprobs, masked_cumsum, state_mask,
                              token_mask)
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.models.transformer import apply, causal_mask, positions_from_mask, unembed
from gfn_jax.scoring import score_suffix_prefixes
from gfn_jax.tasks import arithmetic_data as ad
from gfn_jax.tasks.base import Batch, Target, Task, importance_log_z
from gfn_jax.tasks.calculator import CalculatorTool, rationale_trajectory

__all__ = [
    "ArithmeticTask",
    "arithmetic_log_reward",
    "parse_answer",
    "majority_vote",
    "rationale_with_results",
    "evaluate_policy",
    "few_shot_policy",
    "few_shot_baseline",
    "TOKENIZER_ALPHABET",
]

TOKENIZER_ALPHABET = ("0123456789+-*()=,.:?! \n"
                      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
"""Characters of the character tokenizer built for ``model.spec="random"`` (tests)."""

_TEMPLATE = re.compile(r"answer is\s*(-?\d+)")
_INT = re.compile(r"-?\d+")
_AFTER_EQ = re.compile(r"\s*(-?\d+)")


# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------
def rationale_with_results(p: ad.ArithmeticProblem) -> str:
    """The rationale as it reads with the calculator on: ``"6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"``."""
    steps, acc = [], p.operands[0]
    for op, b in zip(p.operators, p.operands[1:]):
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc} {op} {b} = {new}")
        acc = new
    return ", ".join(steps)


def parse_answer(text: str) -> Optional[int]:
    """The final answer a rationale states, or None.

    In order: the integer of the last ``"answer is N"`` (the answer template); else, if the
    text has an ``"="``, the integer written right after the last one (what the calculator
    splices; None if there is none, e.g. a failed splice); else the last integer in the text.
    (The release takes ``int(text after the last '=')`` and maps every unparsable text to -1,
    which collides with the real answer -1; here it is None.)
    """
    if not isinstance(text, str):
        return None
    m = _TEMPLATE.findall(text)
    if m:
        return int(m[-1])
    if "=" in text:
        a = _AFTER_EQ.match(text.rsplit("=", 1)[1])
        return int(a.group(1)) if a else None
    ints = _INT.findall(text)
    return int(ints[-1]) if ints else None


def majority_vote(answers: Sequence[Optional[int]]) -> Optional[int]:
    """The most frequent answer; None (unparsable) counts as an answer of its own (it never
    matches a gold answer). Ties go to the answer that occurs first. None for no answers."""
    if not answers:
        return None
    counts = collections.Counter(answers)
    best = max(counts.values())
    for a in answers:  # first occurrence among the most frequent
        if counts[a] == best:
            return a
    return None  # unreachable


def importance_diagnostics(log_r: Sequence[float], log_q: Sequence[float]) -> Tuple[float, float]:
    """(log-mean-exp of ``log R - log q``, effective sample size fraction ``(Σw)² / (n Σw²)``):
    :func:`~gfn_jax.tasks.base.importance_log_z` with the ESS divided by n."""
    log_z, ess = importance_log_z(log_r, log_q)
    return log_z, ess / max(len(log_r), 1)


# ---------------------------------------------------------------------------
# The reward (pure, jittable)
# ---------------------------------------------------------------------------
def arithmetic_log_reward(cfg: ModelConfig, params: Any, context_tokens: jax.Array,
                          context_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
                          suffix_tokens: jax.Array, suffix_mask: jax.Array,
                          z_bias: Optional[jax.Array] = None, min_len: int = 0,
                          short_log_reward: float = -99.0) -> jax.Array:
    """``log p~(z_<i | C X) + log p(Y | C X z_<i)`` for every prefix i = 0..T, ``[B, T+1]``.

    ``context_tokens/mask [B, Pr]``: left-padded reward context ``C X``; ``tokens [B, T]``
    right-padded Z (tool outputs included) with ``lengths [B]``; ``suffix_tokens/mask [B, S]``
    right-padded Y. ``z_bias [V]`` is added to the logits of the Z positions before the
    softmax (the restricted vocabulary); Y is scored without it. Prefixes ``i < min_len`` get
    ``short_log_reward``; values beyond each row's length are 0.
    """
    context_tokens = jnp.asarray(context_tokens, jnp.int32)
    cm = jnp.asarray(context_mask).astype(bool)
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    P = context_tokens.shape[1]
    T = tokens.shape[1]
    zmask = token_mask(lengths, T)
    z = jnp.where(zmask, tokens, 0)
    seq = jnp.concatenate([context_tokens, z], axis=1)
    am = jnp.concatenate([cm, zmask], axis=1)
    _, _, hidden = apply(cfg, params, seq, positions_from_mask(am), causal_mask(am), None,
                         return_hidden=True, compute_logits=False)
    logits = unembed(cfg, params, hidden[:, P - 1:P - 1 + T]).astype(jnp.float32)  # [B, T, V]
    if z_bias is not None:
        logits = logits + jnp.asarray(z_bias, jnp.float32)
    lp = gather_logprobs(jax.nn.log_softmax(logits, axis=-1), z)
    cum = masked_cumsum(lp, zmask, axis=-1)
    log_pz = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum], axis=1)
    log_py = score_suffix_prefixes(cfg, params, context_tokens, cm, tokens, lengths,
                                   suffix_tokens, suffix_mask)
    total = log_pz + log_py
    i = jnp.arange(T + 1)[None, :]
    total = jnp.where(i < min_len, jnp.float32(short_log_reward), total)
    return jnp.where(state_mask(lengths, T), total, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "min_len", "short_log_reward"))
def _final_log_reward(params, ct, cm, z, n, sfx, sm, z_bias, *, cfg, min_len,
                      short_log_reward):
    full = arithmetic_log_reward(cfg, params, ct, cm, z, n, sfx, sm, z_bias, min_len,
                                 short_log_reward)
    return jnp.take_along_axis(full, n[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------
class ArithmeticTask(Task):
    """Integer arithmetic with a calculator tool; reward ``p~(Z | C X) p(Y | C X Z)``."""

    name = "arithmetic"

    DEFAULTS = {
        "data_dir": ad.DEFAULT_DIR,  # the released files (relative: to data.root / the cwd)
        "num_labelled": 10,  # first rows of train_50 (with rationales); the release: 10
        "num_answer_only": 1000,  # first rows of hw (answers only); the release: all 1000
        "labelled_weight": 1.0,  # prompt sampling weights (realised as multiplicities)
        "answer_only_weight": 0.2,
        "num_few_shot": 3,  # reward context: the first rows of train_50; the release: 3
        "few_shot_results": True,  # few-shot rationales with the calculator's results
        "min_len": 5,
        "max_len": 44,  # tokens of Z, policy actions and tool splices together
        "term_tokens": (".",),  # single-token texts that end Z (the answer template's start)
        "use_eos": True,  # EOS ends Z too (the release's only termination)
        "vocab_chars": " ,.0123456789=+-",  # allowed characters of Z's tokens (EOS allowed)
        "vocab_penalty": -99.0,  # logit bias on every other token (policy and reward)
        "reward_vocab_restrict": True,  # the reward scores Z under the restricted vocabulary
        "short_log_reward": -99.0,  # log R of prefixes shorter than min_len
        "tool_max_abs": 9999,  # larger calculator values are not spliced
        "eval_id": "generated",  # generated | dedup
        "eval_id_num": 100,  # in-distribution eval queries (0 = all available for dedup)
        "eval_ood_num": 100,  # 5-operand eval queries (0 = all)
        "eval_seed": 1,  # seed of the generated in-distribution split
        "vote_k": 10,  # samples per query in the majority vote
        "eval_temperature": 0.1,  # evaluate_policy / few_shot_baseline sampling temperature
        "eval_batch_size": 32,  # rows per reward call in evaluate's diagnostics
        "eval_log_z_queries": 8,  # queries with the log Z / ESS estimate (0 = off)
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.data_dir = str(c["data_dir"])
        self.num_labelled = int(c["num_labelled"])
        self.num_answer_only = int(c["num_answer_only"])
        self.labelled_weight = float(c["labelled_weight"])
        self.answer_only_weight = float(c["answer_only_weight"])
        self.num_few_shot = int(c["num_few_shot"])
        self.few_shot_results = bool(c["few_shot_results"])
        self.min_len = int(c["min_len"])
        self.max_len = int(c["max_len"])
        self.term_tokens = tuple(str(t) for t in c["term_tokens"])
        self.use_eos = bool(c["use_eos"])
        self.vocab_chars = str(c["vocab_chars"])
        self.vocab_penalty = float(c["vocab_penalty"])
        self.reward_vocab_restrict = bool(c["reward_vocab_restrict"])
        self.short_log_reward = float(c["short_log_reward"])
        self.tool_max_abs = int(c["tool_max_abs"])
        self.eval_id = str(c["eval_id"])
        self.eval_id_num = int(c["eval_id_num"])
        self.eval_ood_num = int(c["eval_ood_num"])
        self.eval_seed = int(c["eval_seed"])
        self.vote_k = int(c["vote_k"])
        self.eval_temperature = float(c["eval_temperature"])
        self.eval_batch_size = int(c["eval_batch_size"])
        self.eval_log_z_queries = int(c["eval_log_z_queries"])
        self._check_config()

        # --- data (read, and validated row by row, at construction) ----------
        self.train_50 = ad.load_split("train_50", self.data_dir, self.data_root)
        self.hw_all = ad.load_split("hw", self.data_dir, self.data_root)
        if self.num_labelled > len(self.train_50):
            raise ValueError(f"task.num_labelled={self.num_labelled} but the labelled file has "
                             f"{len(self.train_50)} rows")
        if self.num_few_shot > len(self.train_50):
            raise ValueError(f"task.num_few_shot={self.num_few_shot} but the labelled file has "
                             f"{len(self.train_50)} rows")
        self.labelled = self.train_50[:self.num_labelled]
        self.answer_only = self.hw_all[:self.num_answer_only] if self.answer_only_weight > 0 else []
        p, q = self._multiplicities()
        self.labelled_copies, self.answer_only_copies = p, q
        # training prompts: (problem, is_labelled) per prompt index
        self.rows: List[Tuple[ad.ArithmeticProblem, bool]] = []
        for prob in self.labelled:
            self.rows += [(prob, True)] * p
        for prob in self.answer_only:
            self.rows += [(prob, False)] * q
        if not self.rows:
            raise ValueError("the task has no training prompts: set task.num_labelled or "
                             "task.num_answer_only > 0")
        shots = self.train_50[:self.num_few_shot]
        self.few_shot_text = "".join(
            f"{s.query} {rationale_with_results(s) if self.few_shot_results else s.rationale}"
            f"{s.solution}\n" for s in shots)
        self._eval: Optional[Dict[str, List[ad.ArithmeticProblem]]] = None
        self.eval_info: Dict[str, Any] = {}
        self._reward_params: Any = None
        self._tool: Optional[CalculatorTool] = None
        self._targets: Optional[List[Target]] = None

    def _check_config(self) -> None:
        if self.num_labelled < 0 or self.num_answer_only < 0 or self.num_few_shot < 0:
            raise ValueError("task.num_labelled, task.num_answer_only and task.num_few_shot "
                             "must be >= 0")
        if not self.labelled_weight > 0 or self.answer_only_weight < 0:
            raise ValueError(f"need task.labelled_weight > 0 and task.answer_only_weight >= 0, "
                             f"got {self.labelled_weight} and {self.answer_only_weight}")
        if not 0 <= self.min_len <= self.max_len or self.max_len < 1:
            raise ValueError(f"need 0 <= task.min_len <= task.max_len and max_len >= 1, got "
                             f"min_len={self.min_len}, max_len={self.max_len}")
        if self.vocab_penalty > 0:
            raise ValueError(f"task.vocab_penalty must be <= 0, got {self.vocab_penalty}")
        if self.eval_id not in ("generated", "dedup"):
            raise ValueError(f"task.eval_id must be 'generated' or 'dedup', got {self.eval_id!r}")
        if self.eval_id_num < 0 or self.eval_ood_num < 0:
            raise ValueError("task.eval_id_num and task.eval_ood_num must be >= 0")
        if self.eval_id == "generated" and self.eval_id_num == 0:
            raise ValueError("task.eval_id='generated' needs task.eval_id_num > 0")
        if self.vote_k < 1 or self.eval_batch_size < 1 or self.eval_log_z_queries < 0:
            raise ValueError("task.vote_k and task.eval_batch_size must be >= 1, "
                             "task.eval_log_z_queries >= 0")
        if not self.eval_temperature > 0:
            raise ValueError(f"task.eval_temperature must be > 0, got {self.eval_temperature}")

    def _multiplicities(self) -> Tuple[int, int]:
        """Copies (p, q) of each labelled / answer-only query with p / q ≈ the weight ratio."""
        if self.answer_only_weight == 0 or not self.answer_only:
            return 1, 0
        r = fractions.Fraction(self.labelled_weight / self.answer_only_weight).limit_denominator(100)
        if r.numerator == 0:
            raise ValueError(f"task.labelled_weight / task.answer_only_weight = "
                             f"{self.labelled_weight / self.answer_only_weight} rounds to 0")
        return r.numerator, r.denominator

    # --- set-up -------------------------------------------------------------
    def build_tokenizer(self) -> Tokenizer:
        """A character tokenizer (``model.spec="random"``, e.g. tests): one id per character
        of :data:`TOKENIZER_ALPHABET`, then ``<eos>``."""
        from gfn_jax.models.tokenizer import char_tokenizer

        return char_tokenizer(TOKENIZER_ALPHABET, specials=("<eos>",))

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        term = list(tokenizer.ids_of(self.term_tokens)) if self.term_tokens else []
        if self.use_eos:
            if tokenizer.eos_id is None:
                raise ValueError("task.use_eos=True but the tokenizer has no EOS")
            term.append(int(tokenizer.eos_id))
        if not term:
            raise ValueError("Z needs a termination: set task.term_tokens or task.use_eos")
        self.term_ids: Tuple[int, ...] = tuple(sorted(set(term)))
        V = int(model_config.vocab_size)
        if max(self.term_ids) >= V:
            raise ValueError(f"termination ids {self.term_ids} are outside the model's "
                             f"vocabulary ({V})")
        self.allowed = self._allowed_tokens(tokenizer, V)
        self._bias = np.where(self.allowed, 0.0, self.vocab_penalty).astype(np.float32)
        self._tool = CalculatorTool.from_tokenizer(tokenizer, V, term_ids=self.term_ids,
                                                   max_abs=self.tool_max_abs)
        # Y per training prompt
        self.suffixes = [ad.format_solution(p.answer) for p, _ in self.rows]
        enc = {s: tokenizer.encode(s, add_bos=False) for s in set(self.suffixes)}
        self.suffix_len = max(len(v) for v in enc.values())
        self._sfx_tokens, self._sfx_mask = self._suffix_table(self.suffixes)
        longest = max(len(self.encode_reward_prompt(t)) for t in set(self.reward_prompts()))
        need = longest + self.max_len + self.suffix_len  # the last position the reward reads
        if need > model_config.max_seq_len:
            raise ValueError(
                f"reward context ({longest} tokens) + max_len ({self.max_len}) + answer "
                f"({self.suffix_len}) = {need} positions exceeds the model's context of "
                f"{model_config.max_seq_len}; lower task.max_len or task.num_few_shot")
        self._targets = None

    def _allowed_tokens(self, tokenizer: Tokenizer, V: int) -> np.ndarray:
        """bool [V]: the termination ids, and the tokens whose text is non-empty, made only of
        ``vocab_chars`` and contains no termination text (so ``"."`` can only end Z)."""
        n = min(int(tokenizer.vocab_size), V)
        texts = tokenizer.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        chars = set(self.vocab_chars)
        stops = [t for t in self.term_tokens if t]
        ok = np.zeros(V, bool)
        ok[:n] = [bool(t) and all(ch in chars for ch in t) and not any(x in t for x in stops)
                  for t in texts]
        ok[list(self.term_ids)] = True
        return ok

    def _suffix_table(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        assert self.tokenizer is not None
        S = self.suffix_len
        toks = np.zeros((len(texts), S), np.int32)
        mask = np.zeros((len(texts), S), bool)
        for k, t in enumerate(texts):
            ids = self.tokenizer.encode(t, add_bos=False)
            if len(ids) > S:
                raise ValueError(f"the answer text {t!r} has {len(ids)} tokens, more than the "
                                 f"{S} of the training answers")
            toks[k, :len(ids)], mask[k, :len(ids)] = ids, True
        return toks, mask

    # --- data ---------------------------------------------------------------
    def train_prompts(self) -> List[str]:
        return [p.query for p, _ in self.rows]

    def reward_prompts(self) -> List[str]:
        return [self.few_shot_text + p.query for p, _ in self.rows]

    def prompt_weights(self) -> np.ndarray:
        """The release's sampling weight of each training prompt (before the multiplicities)."""
        return np.array([self.labelled_weight if lab else self.answer_only_weight
                         for _, lab in self.rows], np.float32)

    def targets(self) -> List[Target]:
        """Each labelled rationale (with a leading space, as after ``"Answer:"`` in the
        few-shot prompt) as a tool-on trajectory; one per copy of its query."""
        if self._tool is None:
            raise RuntimeError("call setup() before targets()")
        if self._targets is None:
            out = []
            for k, (p, lab) in enumerate(self.rows):
                if not lab:
                    continue
                toks, mask = rationale_trajectory(self._tool, self.tokenizer, " " + p.rationale)
                if not self.min_len <= len(toks) <= self.max_len:
                    raise ValueError(
                        f"the ground-truth rationale of {p.query!r} ({p.source}, line {p.line}) "
                        f"has {len(toks)} tokens with the tool's results, outside "
                        f"task.min_len..task.max_len = {self.min_len}..{self.max_len}")
                out.append(Target(prompt_index=k, tokens=toks, action_mask=mask,
                                  weight=self.labelled_weight))
            self._targets = out
        return list(self._targets)

    # --- evaluation sets ----------------------------------------------------
    def eval_sets(self) -> Dict[str, List[ad.ArithmeticProblem]]:
        """``{"id": [...], "ood": [...]}`` (built once; see the module docstring)."""
        if self._eval is not None:
            return self._eval
        train = {"train_50": self.train_50, "hw": self.hw_all}
        if self.eval_id == "generated":
            ident = ad.generate_problems(self.eval_id_num, (3, 4), self.eval_seed,
                                         exclude=self.train_50 + self.hw_all)
            self.eval_info["id_source"] = (f"generated: {len(ident)} fresh 3/4-operand problems, "
                                           f"seed {self.eval_seed}, disjoint from train_50 and hw")
        else:
            parts, notes = [], []
            for name in ("test_3", "test_4"):
                d = ad.dedup_against(ad.load_split(name, self.data_dir, self.data_root), train,
                                     drop_repeats=True)
                parts.append(d.kept)
                notes.append(f"{name}: {d.summary()}")
                self.eval_info[f"{name}_rows_kept"] = len(d.kept)
            if self.eval_id_num:
                half = (self.eval_id_num + 1) // 2
                ident = parts[0][:half] + parts[1][:self.eval_id_num - min(half, len(parts[0]))]
            else:
                ident = parts[0] + parts[1]
            self.eval_info["id_source"] = "dedup: " + "; ".join(notes)
        d5 = ad.dedup_against(ad.load_split("test_5", self.data_dir, self.data_root), train,
                              drop_repeats=True)
        ood = d5.kept[:self.eval_ood_num] if self.eval_ood_num else d5.kept
        self.eval_info["ood_source"] = f"test_5: {d5.summary()}"
        self.eval_info["id_queries"] = len(ident)
        self.eval_info["ood_queries"] = len(ood)
        self._eval = {"id": list(ident), "ood": list(ood)}
        return self._eval

    def eval_prompts(self) -> List[str]:
        s = self.eval_sets()
        return [p.query for p in s["id"]] + [p.query for p in s["ood"]]

    def _lookup(self) -> Dict[str, Tuple[str, int]]:
        """query -> (split, answer) for training and evaluation queries."""
        out: Dict[str, Tuple[str, int]] = {}
        for p, _ in self.rows:
            out[p.query] = ("train", p.answer)
        for split, probs in self.eval_sets().items():
            for p in probs:
                prev = out.get(p.query)
                if prev is not None and prev[0] != split:
                    raise AssertionError(f"query {p.query!r} is in both {prev[0]} and {split}")
                out[p.query] = (split, p.answer)
        return out

    # --- policy -------------------------------------------------------------
    def policy_spec(self) -> PolicySpec:
        return PolicySpec(term_ids=self.term_ids, max_len=self.max_len, min_len=self.min_len)

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        return self._bias

    def tool(self) -> Optional[CalculatorTool]:
        return self._tool

    # --- reward -------------------------------------------------------------
    def _z_bias(self) -> Optional[np.ndarray]:
        return self._bias if self.reward_vocab_restrict else None

    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """``log p~(z_<=i | C X) + log p(Y | C X z_<=i)`` of every prefix, ``[B, T+1]``, with
        C X from ``batch.reward_prompt_tokens/mask`` and Y looked up by ``prompt_index``."""
        idx = batch["prompt_index"]
        sfx = jnp.asarray(self._sfx_tokens)[idx]
        sm = jnp.asarray(self._sfx_mask)[idx]
        zb = self._z_bias()
        return arithmetic_log_reward(model_config, base_params, batch["reward_prompt_tokens"],
                                     batch["reward_prompt_mask"], batch["tokens"],
                                     batch["lengths"], sfx, sm,
                                     None if zb is None else jnp.asarray(zb), self.min_len,
                                     self.short_log_reward)

    def bind_reward_params(self, params: Any) -> None:
        """The base (reward) parameters, for the diagnostics of :meth:`evaluate`."""
        self._reward_params = params

    def final_log_reward(self, queries: Sequence[str], answers: Sequence[int],
                         trajectories: Sequence[Sequence[int]],
                         params: Any = None) -> np.ndarray:
        """Untempered log R of complete trajectories (tool tokens included) of ``queries``
        whose gold answer is ``answers`` (Y = the answer template), under ``params`` (default:
        the bound base parameters). Fixed shapes: ``eval_batch_size`` rows per call."""
        params = self._reward_params if params is None else params
        if params is None:
            raise RuntimeError("no reward parameters: call bind_reward_params first")
        assert self.tokenizer is not None
        B, T = self.eval_batch_size, self.max_len
        ctx = [self.encode_reward_prompt(self.few_shot_text + q) for q in queries]
        Pr = max(len(c) for c in ctx)
        Pr = -(-Pr // 16) * 16
        pad = int(self.tokenizer.pad_id or 0)
        zb = self._z_bias()
        zb = None if zb is None else jnp.asarray(zb)
        out = []
        for s in range(0, len(queries), B):
            rows = range(s, min(s + B, len(queries)))
            ct = np.full((B, Pr), pad, np.int32)
            cm = np.zeros((B, Pr), np.int32)
            ct[:, -1], cm[:, -1] = pad, 1  # dummy rows
            z = np.zeros((B, T), np.int32)
            n = np.zeros(B, np.int32)
            sfx_texts = [ad.format_solution(answers[r]) for r in rows]
            sfx = np.zeros((B, self.suffix_len), np.int32)
            sm = np.zeros((B, self.suffix_len), bool)
            sm[:, 0] = True
            t, m = self._suffix_table(sfx_texts)
            sfx[:len(t)], sm[:len(t)] = t, m
            for j, r in enumerate(rows):
                c = ctx[r]
                ct[j], cm[j] = pad, 0
                ct[j, Pr - len(c):], cm[j, Pr - len(c):] = c, 1
                traj = list(trajectories[r])[:T]
                z[j, :len(traj)], n[j] = traj, len(traj)
            v = _final_log_reward(params, *parallel.split_rows(params, ct, cm, z, n, sfx, sm),
                                  zb, cfg=self.model_config, min_len=self.min_len,
                                  short_log_reward=self.short_log_reward)
            out.append(parallel.to_host(v)[:len(rows)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    # --- evaluation ---------------------------------------------------------
    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "", *, vote_k: Optional[int] = None) -> Dict[str, float]:
        """Majority-vote accuracy per split (``id``, ``ood``, ``train``) over the first
        ``vote_k`` (default ``task.vote_k``) samples of each query, the mean single-sample accuracy (no voting), the
        parsed fraction, and the posterior diagnostics (see the module docstring). Samples are
        dicts with ``prompt`` (the query), ``text`` (or ``tokens``) and optionally ``log_q``
        and ``temperature``. With ``out_dir``, per-query votes go to
        ``arithmetic_votes_<tag>.jsonl``."""
        lookup = self._lookup()
        groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
        for s in samples:
            q = s["prompt"]
            if q not in lookup:
                raise ValueError(f"evaluate got a sample for a query that is neither a training "
                                 f"nor an evaluation query of the task: {q[:80]!r}")
            groups.setdefault(q, []).append(s)
        k = int(vote_k or self.vote_k)
        m: Dict[str, float] = {"num_samples": float(len(samples)), "vote_k": float(k)}
        if not groups:
            return m
        per_split: Dict[str, Dict[str, List[float]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        records = []
        for q, g in groups.items():
            split, gold = lookup[q]
            g = g[:k]
            answers = [parse_answer(self._text(s)) for s in g]
            vote = majority_vote(answers)
            d = per_split[split]
            d["vote"].append(float(vote == gold))
            d["single"] += [float(a == gold) for a in answers]
            d["parsed"] += [float(a is not None) for a in answers]
            d["n"].append(float(len(g)))
            records.append({"query": q, "split": split, "gold": gold, "vote": vote,
                            "answers": answers, "texts": [self._text(s) for s in g]})
        for split, d in per_split.items():
            m[f"{split}_accuracy"] = float(np.mean(d["vote"]))
            m[f"{split}_sample_accuracy"] = float(np.mean(d["single"]))
            m[f"{split}_parsed_fraction"] = float(np.mean(d["parsed"]))
            m[f"{split}_num_queries"] = float(len(d["vote"]))
            m[f"{split}_min_samples"] = float(np.min(d["n"]))
        m.update(self.posterior_diagnostics(samples))
        if out_dir:
            path = os.path.join(out_dir, f"arithmetic_votes_{tag or 'eval'}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        return m

    def _text(self, s: Dict[str, Any]) -> str:
        if "text" in s:
            return str(s["text"])
        assert self.tokenizer is not None
        return self.tokenizer.decode([t for t in s["tokens"] if t not in self.term_ids])

    def posterior_diagnostics(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, float]:
        """Mean over the first ``eval_log_z_queries`` queries of the importance-weighted
        ``log Z`` estimate and ESS fraction; {} when impossible (no bound parameters, no
        ``log_q``, samples drawn at a temperature other than 1, fewer than 2 per query)."""
        if (self.eval_log_z_queries == 0 or self._reward_params is None or not samples
                or any("log_q" not in s or "tokens" not in s for s in samples)
                or any(float(s.get("temperature", 1.0)) != 1.0 for s in samples)):
            return {}
        lookup = self._lookup()
        groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
        for s in samples:
            groups.setdefault(s["prompt"], []).append(s)
        chosen = [q for q, g in groups.items() if len(g) >= 2][:self.eval_log_z_queries]
        if not chosen:
            return {}
        qs, ans, trajs, owner = [], [], [], []
        for q in chosen:
            for s in groups[q]:
                qs.append(q)
                ans.append(lookup[q][1])
                trajs.append(list(s["tokens"]))
                owner.append(q)
        log_r = self.final_log_reward(qs, ans, trajs)
        log_z, ess = [], []
        for q in chosen:
            rows = [i for i, o in enumerate(owner) if o == q]
            lz, e = importance_diagnostics(log_r[rows], [groups[q][k]["log_q"]
                                                         for k in range(len(rows))])
            log_z.append(lz)
            ess.append(e)
        return {"log_z_iw": float(np.mean(log_z)), "ess_fraction": float(np.mean(ess)),
                "log_z_queries": float(len(chosen))}


# ---------------------------------------------------------------------------
# Evaluation entry points
# ---------------------------------------------------------------------------
def evaluate_policy(task: ArithmeticTask, policy: Any, *, k: Optional[int] = None,
                    temperature: Optional[float] = None, seed: int = 0,
                    prompts: Optional[Sequence[str]] = None, diagnostics: bool = True,
                    out_dir: Optional[str] = None, tag: str = "eval",
                    progress: bool = False) -> Dict[str, float]:
    """Majority-vote accuracy of ``policy`` on ``prompts`` (default: the task's eval queries):
    ``k`` (default ``vote_k``) samples per query at ``temperature`` (default
    ``eval_temperature``). With ``diagnostics`` (and bound reward parameters) another ``k``
    samples of the first ``eval_log_z_queries`` queries are drawn at temperature 1 for the
    log Z / ESS estimate."""
    k = int(k or task.vote_k)
    temp = float(task.eval_temperature if temperature is None else temperature)
    prompts = list(task.eval_prompts() if prompts is None else prompts)
    samples = policy.sample(prompts, n=k, temperature=temp, seed=seed, batch_size=k,
                            progress=progress, desc="arithmetic eval")
    for s in samples:
        s["temperature"] = temp
    metrics = task.evaluate(samples, out_dir=out_dir, tag=tag, vote_k=k)
    metrics["temperature"] = temp
    if diagnostics and task._reward_params is not None and task.eval_log_z_queries and temp != 1:
        diag = policy.sample(prompts[:task.eval_log_z_queries], n=max(k, 2), temperature=1.0,
                             seed=seed + 1, batch_size=max(k, 2))
        metrics.update(task.posterior_diagnostics(diag))
    return metrics


def few_shot_policy(task: ArithmeticTask, model_config: ModelConfig, base_params: Any,
                    tokenizer: Tokenizer) -> Any:
    """The few-shot prompting baseline as a :class:`~gfn_jax.policy.Policy`: the base model
    (no adapters) prompted with the reward's few-shot prompt + the query, with the same
    vocabulary restriction, tool and length limits as the trained policy. Its samples keep the
    bare query as ``prompt``."""
    from gfn_jax.policy import Policy

    return Policy(model_config=model_config, params=base_params, adapters=None,
                  spec=task.policy_spec(), tokenizer=tokenizer,
                  logit_bias=jnp.asarray(task.policy_logit_bias(), jnp.float32),
                  tool=task.tool(),
                  encode_prompt=lambda q: task.encode_reward_prompt(task.few_shot_text + q))


def few_shot_baseline(task: ArithmeticTask, model_config: ModelConfig, base_params: Any,
                      tokenizer: Tokenizer, **kw: Any) -> Dict[str, float]:
    """:func:`evaluate_policy` of :func:`few_shot_policy` (same queries, votes, temperature)."""
    kw.setdefault("tag", "few_shot")
    return evaluate_policy(task, few_shot_policy(task, model_config, base_params, tokenizer),
                           **kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gfn_jax.tasks.arithmetic``: low-temperature majority-vote evaluation of a
    trained run, or the few-shot baseline of a config."""
    ap = argparse.ArgumentParser(prog="python -m gfn_jax.tasks.arithmetic", description=(
        "Majority-vote accuracy (in distribution and 5-operand out of distribution) of a "
        "trained run (--workdir) or of the few-shot prompted base model (--few_shot with "
        "--config or --workdir)."))
    ap.add_argument("--workdir", help="a gfn-jax run directory")
    ap.add_argument("--config", help="a config file (few-shot baseline without a run)")
    ap.add_argument("--few_shot", action="store_true", help="evaluate the few-shot baseline")
    ap.add_argument("--k", type=int, default=0, help="samples per query (default task.vote_k)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature (default task.eval_temperature)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_diagnostics", action="store_true")
    ap.add_argument("--out", help="write the metrics JSON here (default: stdout only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a task key, e.g. --set eval_id=dedup (repeatable)")
    a = ap.parse_args(argv)
    from gfn_jax.policy import load_base_model, load_run
    from gfn_jax.tasks import make_task

    over = {}
    for kv in a.set:
        key, _, val = kv.partition("=")
        try:
            over[key] = json.loads(val)
        except ValueError:
            over[key] = val
    if a.workdir and not a.few_shot:
        config, task, policy, base = load_run(a.workdir)
        if over:
            task = make_task({**config.task.to_dict(), **over}, config.data.root)
            task.setup(policy.model_config, policy.tokenizer)
            from gfn_jax.policy import policy_from_task
            policy = policy_from_task(task, policy.model_config, policy.params, policy.adapters,
                                      policy.tokenizer)
    else:
        if a.workdir:
            from gfn_jax.policy import run_config
            config = run_config(a.workdir)
        elif a.config:
            import runpy
            config = runpy.run_path(a.config)["get_config"]()
        else:
            ap.error("give --workdir, or --few_shot with --config")
        task = make_task({**config.task.to_dict(), **over}, config.data.root)
        model_cfg, base, tok = load_base_model(config, task)
        task.setup(model_cfg, tok)
        policy = few_shot_policy(task, model_cfg, base, tok)
    if not isinstance(task, ArithmeticTask):
        ap.error(f"the run's task is {task.name!r}, not 'arithmetic'")
    task.bind_reward_params(base)
    metrics = evaluate_policy(task, policy, k=a.k or None, temperature=a.temperature or None,
                              seed=a.seed, diagnostics=not a.no_diagnostics,
                              out_dir=a.workdir or (os.path.dirname(os.path.abspath(a.out))
                                                    if a.out else None),
                              tag="few_shot" if a.few_shot else "vote",
                              progress=True)
    metrics.update({f"info_{k}": v for k, v in task.eval_info.items()})
    text = json.dumps(metrics, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    # run the package's copy of this module (the task registry imported it already), so that
    # the task built from a config is an instance of the same ArithmeticTask class
    from gfn_jax.tasks.arithmetic import main as _main

    sys.exit(_main())
