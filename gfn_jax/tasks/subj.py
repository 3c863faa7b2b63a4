"""Subjectivity classification with a latent rationale (Hu et al. 2024, Sec. 4.3), on the
training harness: an E-step task that samples rationales, an M-step task that classifies.

The three pieces of a SUBJ example (a movie-review snippet and its label) are token lists
that are always joined as token ids, never re-tokenised as one string, so the E-step reward,
the M-step classifier and every evaluation see exactly the same tokens:

* **X** (E-step prompt) ``= encode(question_template.format(text) + reason_prefix)``, by
  default ``"Review: <text>\\nQuestion: does the review state facts (objective) or opinions
  (subjective)?\\nReason: The review"``;
* **Z**: a short rationale the policy writes (``min_len..max_len`` tokens, e.g.
  ``" describes the plot"``), ended (⊤) by a newline (``term_tokens``); tokens containing a
  newline and special tokens cannot appear inside Z;
* **Y**: ``encode(answer_prefix) + encode(label_prefix + label) + encode(label_end)``, by default
  ``"\\nAnswer:"`` + ``" objective"`` + ``"."``. ⊤ itself is not scored: Y follows Z directly
  and Y's first token is the newline, so p(Y | X Z) includes the probability of ending Z.

**E-step** (task ``subj_cot``): the reward of every prefix z_<i is, under the reward model
(the base with adapters off, or ``reward.model``, e.g. the exported M-step model)::

    log R(X z_<i ⊤) = log p(z_<i | X) + log p(Y_gold | X z_<i)
                      - wrong_label_penalty * [some other label scores higher than the gold one]

where "scores higher" compares ``log p(Y_c | X z_<i)`` over ``labels`` (the reward model's own
argmax prediction given the rationale; the release subtracts 50 when it is wrong). One forward
over ``[X | Z]`` for the first term and ONE packed
:func:`~gfn_jax.scoring.score_suffix_prefixes` pass (the candidates stacked along the batch) for
the label terms. :meth:`SubjCotTask.targets` gives "wishful" rationales (``wishful``: short
label-revealing phrases per label, every phrase for every training example) for
``replay.seed_from_data`` (the release pre-seeds 20 per example).

**M-step** (task ``subj_label``): a classifier p(Y | X [Z]) trained with ``objective.name=sft``
on the label tokens. Its prompt is ``X_q [+ reason_prefix + Z] + answer_prefix`` (``X_q`` = the
question without the reason prefix), its actions the label tokens, its ⊤ ``label_end``. With
``rationales_path`` (a JSON-lines file written by ``scripts/subj_em.py`` from a trained E-step
policy) every (training example, sampled rationale) pair is one prompt; without it the task is
the supervised LoRA classification baseline (``configs/subj_classify.py``).

**Prediction** (:func:`candidate_log_probs`, :func:`predict_rows`): the label with the largest
``log p(label_prefix + label + label_end | prompt)`` (one packed forward per prompt scores
every candidate). With rationales: the greedy rationale's prediction, the majority vote of the
predictions of ``k`` sampled rationales (:func:`majority_vote`), and the argmax of the average
over rationales of the candidate-normalised ``p(Y | X Z)`` (:func:`mean_prob_vote`). The
prompting baselines (zero-shot, few-shot with the labelled examples in the prompt) use the same
scorer on the base model (:func:`prompting_prompts`).

**Posterior diagnostics** (:meth:`SubjCotTask.evaluate`, samples with ``log_q`` drawn at
temperature 1): per prompt ``log Ẑ = log mean_j exp(log R_j - log q_j)`` (an unbiased estimate
of Z in expectation, hence a stochastic lower bound of log Z = log Σ_Z R(X Z ⊤)) and the
effective sample size ``(Σ w)² / Σ w²`` of the weights (:func:`importance_log_z`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.logprobs import PolicySpec, gather_logprobs, state_mask
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.models.transformer import apply, positions_from_mask, unembed
from gfn_jax.scoring import score_reward_prefixes, score_suffix_prefixes
from gfn_jax.tasks.base import Batch, Target, Task, importance_log_z
from gfn_jax.tasks.continuation import penalised_token_mask, resolve_data_path

__all__ = [
    "SubjRow", "read_subj_jsonl", "read_rationales", "SubjCotTask", "SubjLabelTask",
    "subj_log_reward", "candidate_log_probs", "majority_vote", "mean_prob_vote",
    "importance_log_z", "predict_rows", "prompting_prompts", "SubjTemplates",
    "DEFAULT_WISHFUL",
]

DEFAULT_TRAIN = "../shared/data/subj/train.10.jsonl"
DEFAULT_TEST = "../shared/data/subj/test.jsonl"
DEFAULT_QUESTION = ("Review: {text}\nQuestion: does the review state facts (objective) or "
                    "opinions (subjective)?")
DEFAULT_REASON = "\nReason: The review"
DEFAULT_ANSWER = "\nAnswer:"
DEFAULT_LABELS = ("objective", "subjective")

DEFAULT_WISHFUL = {
    # short phrases that reveal the label; each continues "Reason: The review"
    "objective": (" describes the plot", " states facts", " tells what happens",
                  " is a summary", " is objective"),
    "subjective": (" gives an opinion", " judges the film", " expresses feelings",
                   " is a critique", " is subjective"),
}

_TEMPLATE_DEFAULTS = {
    "data_path": DEFAULT_TRAIN,  # the k labelled examples (JSON lines: text, label_text)
    "num_train": 0,  # the first N rows of data_path (0 = all)
    "eval_path": DEFAULT_TEST,  # the test set
    "eval_num": 200,  # the first N test rows (0 = all 2,000)
    "question_template": DEFAULT_QUESTION,  # formatted from a row's fields
    "reason_prefix": DEFAULT_REASON,  # between the question and Z
    "answer_prefix": DEFAULT_ANSWER,  # between Z (or the question) and the label
    "label_prefix": " ",  # the label is encoded as label_prefix + label
    "label_end": ".",  # a single token after the label (the classifier's ⊤)
    "labels": DEFAULT_LABELS,  # candidate label texts, in label-index order
    "eval_batch_size": 16,  # rows per scoring call
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SubjRow:
    """One labelled example: the review ``text``, its ``label`` index into the candidate
    labels, and where it came from (file, 1-based line)."""

    text: str
    label: int
    source: str
    line: int

    def fields(self, labels: Sequence[str]) -> Dict[str, Any]:
        return {"text": self.text, "label": self.label, "label_text": labels[self.label]}


def _json_lines(path: str) -> List[Tuple[int, Any]]:
    """(line number, parsed JSON) of the non-blank lines; ValueError naming file:line."""
    out = []
    with open(path, "rb") as f:
        for k, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if k == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{k}: not UTF-8 text (byte 0x{raw[e.start:e.start + 1].hex()}"
                                 f" at byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                out.append((k, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not valid JSON ({e.msg})") from None
    return out


def read_subj_jsonl(path: str, labels: Sequence[str] = DEFAULT_LABELS, num: int = 0,
                    root: str = "") -> List[SubjRow]:
    """Rows of a SUBJ JSON-lines file (``{"text", "label_text"}``, optionally ``"label"``), the
    first ``num`` if > 0. A bad row is a ``ValueError`` naming the file and line: not UTF-8,
    not JSON, not an object, a missing / empty / non-string ``text``, a ``label_text`` that is
    not one of ``labels``, or a ``label`` index that disagrees with ``label_text``."""
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"SUBJ data file not found: {full!r} (relative paths resolve "
                                f"against config.data.root or the working directory; the "
                                f"reference data lives in ../shared/data/subj, see README)")
    rows: List[SubjRow] = []
    for k, obj in _json_lines(full):
        where = f"{full}:{k}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: field 'text' is missing, empty or not a string "
                             f"(fields: {sorted(obj)})")
        lt = obj.get("label_text")
        if lt not in labels:
            raise ValueError(f"{where}: field 'label_text' is {lt!r}, not one of the labels "
                             f"{tuple(labels)} (task.labels)")
        li = list(labels).index(lt)
        if "label" in obj and obj["label"] != li:
            raise ValueError(f"{where}: 'label' {obj['label']!r} disagrees with 'label_text' "
                             f"{lt!r} (index {li} of task.labels)")
        rows.append(SubjRow(text=text, label=li, source=full, line=k))
        if num and len(rows) >= num:
            break
    if not rows:
        raise ValueError(f"SUBJ data file {full!r} has no rows")
    return rows


@dataclasses.dataclass(frozen=True)
class Rationale:
    """A sampled rationale of row ``index`` of the ``split`` ("train" or "test")."""

    split: str
    index: int
    z_tokens: Tuple[int, ...]
    z_text: str
    greedy: bool
    log_q: Optional[float]
    line: int


def read_rationales(path: str, train: Sequence[SubjRow], test: Sequence[SubjRow],
                    root: str = "") -> List[Rationale]:
    """Rationales written by ``scripts/subj_em.py`` (one JSON object a line: ``split``,
    ``index``, ``text`` (the review, checked against the data), ``z_tokens``, ``z_text``,
    optional ``greedy`` and ``log_q``). Bad rows are a ``ValueError`` naming file and line.
    Test rows beyond ``len(test)`` are skipped (a smaller evaluation subset)."""
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"rationales file not found: {full!r} (task.rationales_path; "
                                f"scripts/subj_em.py writes it from a trained E-step run)")
    out = []
    for k, obj in _json_lines(full):
        where = f"{full}:{k}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        split = obj.get("split")
        if split not in ("train", "test"):
            raise ValueError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
        rows = train if split == "train" else test
        idx = obj.get("index")
        if not isinstance(idx, int) or idx < 0:
            raise ValueError(f"{where}: 'index' must be an integer >= 0, got {idx!r}")
        if idx >= len(rows):
            if split == "test":
                continue
            raise ValueError(f"{where}: training row {idx} does not exist (the task has "
                             f"{len(rows)} training rows)")
        if obj.get("text") != rows[idx].text:
            raise ValueError(f"{where}: 'text' does not match {split} row {idx} of the task's "
                             f"data ({rows[idx].source}:{rows[idx].line}); was the file written "
                             f"for other data?")
        zt = obj.get("z_tokens")
        if not isinstance(zt, list) or not all(isinstance(t, int) and t >= 0 for t in zt):
            raise ValueError(f"{where}: 'z_tokens' must be a list of token ids")
        lq = obj.get("log_q")
        out.append(Rationale(split=split, index=idx, z_tokens=tuple(zt),
                             z_text=str(obj.get("z_text", "")), greedy=bool(obj.get("greedy")),
                             log_q=None if lq is None else float(lq), line=k))
    return out


# ---------------------------------------------------------------------------
# Small maths on hand-checkable inputs
# ---------------------------------------------------------------------------
def majority_vote(preds: Sequence[int]) -> Optional[int]:
    """The most frequent prediction; ties go to the one that occurs first. None if empty."""
    if not len(preds):
        return None
    counts = collections.Counter(int(p) for p in preds)
    best = max(counts.values())
    return next(int(p) for p in preds if counts[int(p)] == best)


def candidate_probs(scores: np.ndarray) -> np.ndarray:
    """Softmax over the candidate axis (last) of log-scores: p(Y_c | prompt) renormalised
    over the candidate labels."""
    s = np.asarray(scores, np.float64)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def mean_prob_vote(scores: np.ndarray) -> int:
    """argmax over candidates of the mean over rationales of the candidate-normalised
    probabilities (``scores [k, C]`` log-scores); ties to the lower index."""
    return int(np.argmax(candidate_probs(scores).mean(axis=0)))


# ---------------------------------------------------------------------------
# The E-step reward (pure, jittable)
# ---------------------------------------------------------------------------
def subj_log_reward(cfg: ModelConfig, params: Any, prompt_tokens: jax.Array,
                    prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
                    cand_tokens: jax.Array, cand_mask: jax.Array, gold: jax.Array,
                    term_ids: Sequence[int], penalty: float) -> jax.Array:
    """``log p(z_<i | X) + log p(Y_gold | X z_<i) - penalty * wrong_i`` for every prefix
    i = 0..T, ``[B, T+1]`` (0 beyond each row's length).

    ``cand_tokens/cand_mask [C, S]``: the answer Y of each candidate label, right-padded;
    ``gold [B]`` the gold candidate of each row. ``wrong_i`` is 1 when some candidate c has
    ``log p(Y_c | X z_<i) > log p(Y_gold | X z_<i)`` (ties count as right).
    """
    B, T = tokens.shape
    C = cand_tokens.shape[0]
    r = score_reward_prefixes(cfg, params, prompt_tokens, prompt_mask, tokens, lengths,
                              tuple(term_ids))
    rep = lambda x: jnp.tile(x, (C,) + (1,) * (x.ndim - 1))  # noqa: E731 - candidate-major
    y = score_suffix_prefixes(cfg, params, rep(prompt_tokens), rep(prompt_mask), rep(tokens),
                              rep(lengths), jnp.repeat(cand_tokens, B, axis=0),
                              jnp.repeat(cand_mask, B, axis=0))
    y = y.reshape(C, B, T + 1)
    gold = jnp.asarray(gold, jnp.int32)
    y_gold = jnp.take_along_axis(y, gold[None, :, None], axis=0)[0]  # [B, T+1]
    wrong = jnp.any(y > y_gold[None], axis=0)
    total = r.log_pz + y_gold - jnp.float32(penalty) * wrong.astype(jnp.float32)
    return jnp.where(state_mask(lengths, T), total, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "term_ids", "penalty"))
def _final_reward(params, pt, pm, z, n, ct, cm, gold, *, cfg, term_ids, penalty):
    full = subj_log_reward(cfg, params, pt, pm, z, n, ct, cm, gold, term_ids, penalty)
    return jnp.take_along_axis(full, n[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------
# Scoring candidate continuations (one packed forward per prompt)
# ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def _cand_scores(params, adapters, pt, pm, ct, cm, *, cfg):
    """``[B, C]`` log p(cand_c | prompt) with layout ``[prompt | cand_0 | ... | cand_{C-1}]``:
    block c attends to the real prompt tokens and causally to its own real tokens; its
    positions continue from the prompt's length."""
    B, P = pt.shape
    C, S = ct.shape
    pmb = pm.astype(bool)
    cmb = cm.astype(bool)
    seq = jnp.concatenate([pt, jnp.broadcast_to(ct.reshape(1, C * S), (B, C * S))], axis=1)
    L = P + C * S
    blk = np.concatenate([np.full(P, -1), np.repeat(np.arange(C), S)])
    within = np.concatenate([np.arange(P), np.tile(np.arange(S), C)])
    qi, ki = np.arange(L)[:, None], np.arange(L)[None, :]
    main = (blk[:, None] < 0) & (blk[None, :] < 0) & (ki <= qi)
    to_prompt = (blk[:, None] >= 0) & (blk[None, :] < 0)
    own = (blk[:, None] >= 0) & (blk[:, None] == blk[None, :]) & (within[None, :] <= within[:, None])
    key_ok = jnp.concatenate([pmb, jnp.broadcast_to(cmb.reshape(1, C * S), (B, C * S))], axis=1)
    prompt_ok = jnp.concatenate([pmb, jnp.zeros((B, C * S), bool)], axis=1)
    mask = ((jnp.asarray(main | to_prompt)[None] & prompt_ok[:, None, :])
            | (jnp.asarray(own)[None] & key_ok[:, None, :]))
    plen = jnp.sum(pmb, axis=1).astype(jnp.int32)
    pos = jnp.concatenate([positions_from_mask(pmb),
                           plen[:, None] + jnp.asarray(within[P:], jnp.int32)[None]], axis=1)
    _, _, hidden = apply(cfg, params, seq, pos, mask, None, return_hidden=True,
                         compute_logits=False, adapters=adapters)
    # the logits predicting cand_c[j]: the prompt's last position for j = 0, else block c at j-1
    idx = np.zeros((C, S), np.int32)
    idx[:, 0] = P - 1
    idx[:, 1:] = P + np.arange(C)[:, None] * S + np.arange(S - 1)[None, :]
    logp = jax.nn.log_softmax(unembed(cfg, params, hidden[:, idx]).astype(jnp.float32), -1)
    lp = gather_logprobs(logp, jnp.broadcast_to(ct[None], (B, C, S)))
    return jnp.sum(jnp.where(cmb[None], lp, 0.0), axis=-1)


def candidate_log_probs(cfg: ModelConfig, params: Any, prompt_ids: Sequence[Sequence[int]],
                        candidates: Sequence[Sequence[int]], *, adapters: Any = None,
                        batch_size: int = 16, pad_id: int = 0) -> np.ndarray:
    """``[N, C]``: the model's ``log p(candidate_c | prompt_n)`` (sum of token log-probs; the
    plain LM with ``adapters`` if given, no policy constraints). Fixed shapes: ``batch_size``
    rows per call, prompts left-padded to a multiple of 32 tokens (few recompilations)."""
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    S = max(len(c) for c in candidates)
    ct = np.full((len(candidates), S), pad_id, np.int32)
    cm = np.zeros((len(candidates), S), np.int32)
    for c, ids in enumerate(candidates):
        ct[c, :len(ids)], cm[c, :len(ids)] = ids, 1
    out = []
    B = max(1, int(batch_size))
    for s in range(0, len(prompt_ids), B):
        part = [list(p) for p in prompt_ids[s:s + B]]
        if any(not p for p in part):
            raise ValueError("a prompt encodes to no tokens")
        P = -(-max(len(p) for p in part) // 32) * 32
        if P + len(candidates) * S > cfg.max_seq_len:
            P = max(len(p) for p in part)
        pt = np.full((B, P), pad_id, np.int32)
        pm = np.zeros((B, P), np.int32)
        pt[:, -1], pm[:, -1] = pad_id, 1  # dummy rows
        for r, p in enumerate(part):
            pm[r] = 0
            pt[r, P - len(p):], pm[r, P - len(p):] = p, 1
        v = _cand_scores(params, adapters, *parallel.split_rows(params, pt, pm),
                         jnp.asarray(ct), jnp.asarray(cm), cfg=cfg)
        out.append(parallel.to_host(v)[:len(part)])
    return np.concatenate(out) if out else np.zeros((0, len(candidates)), np.float32)


# ---------------------------------------------------------------------------
# Templates shared by the two tasks
# ---------------------------------------------------------------------------
class SubjTemplates:
    """The token pieces of X, Z and Y (see the module docstring)."""

    def __init__(self, c: Mapping[str, Any]) -> None:
        self.question = str(c["question_template"])
        self.reason_prefix = str(c["reason_prefix"])
        self.answer_prefix = str(c["answer_prefix"])
        self.label_prefix = str(c["label_prefix"])
        self.label_end = str(c["label_end"])
        self.labels = tuple(str(x) for x in c["labels"])
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels must be at least two distinct labels, got {self.labels}")
        if not self.answer_prefix:
            raise ValueError("task.answer_prefix must not be empty")
        self.tok: Optional[Tokenizer] = None

    def setup(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.answer_ids = tok.encode(self.answer_prefix, add_bos=False)
        self.label_ids = [tok.encode(self.label_prefix + l, add_bos=False) for l in self.labels]
        if any(not x for x in self.label_ids):
            raise ValueError("a label encodes to no tokens")
        if len({tuple(x) for x in self.label_ids}) != len(self.label_ids):
            raise ValueError(f"two labels encode to the same tokens: {self.labels}")
        self.end_id = tok.ids_of([self.label_end])[0]
        if any(self.end_id in x for x in self.label_ids):
            raise ValueError(f"task.label_end {self.label_end!r} occurs inside a label")

    def question_text(self, row: SubjRow) -> str:
        try:
            return self.question.format(**row.fields(self.labels))
        except (KeyError, IndexError) as e:
            raise ValueError(f"task.question_template {self.question!r} needs field {e}; "
                             f"rows have text, label, label_text") from None

    def x_text(self, row: SubjRow) -> str:
        """The E-step prompt text (question + reason prefix)."""
        return self.question_text(row) + self.reason_prefix

    def x_ids(self, row: SubjRow) -> List[int]:
        assert self.tok is not None
        return self.tok.encode(self.x_text(row))

    def answer(self, c: int) -> List[int]:
        """Y for candidate c: answer prefix, label, label end."""
        return list(self.answer_ids) + list(self.label_ids[c]) + [self.end_id]

    def label_continuation(self, c: int) -> List[int]:
        """The classifier's action tokens for candidate c plus its ⊤ (``label_end``)."""
        return list(self.label_ids[c]) + [self.end_id]

    def classifier_prompt(self, row: SubjRow, z_tokens: Optional[Sequence[int]] = None
                          ) -> Tuple[str, List[int]]:
        """(text, ids) of ``question [+ reason_prefix + Z] + answer_prefix``; with Z the ids
        are the E-step prompt's ids + Z's tokens + the answer prefix's."""
        assert self.tok is not None
        if z_tokens is None:
            text = self.question_text(row) + self.answer_prefix
            ids = self.tok.encode(self.question_text(row)) + list(self.answer_ids)
        else:
            text = self.x_text(row) + self.tok.decode(list(z_tokens)) + self.answer_prefix
            ids = self.x_ids(row) + list(z_tokens) + list(self.answer_ids)
        return text, ids


def prompting_prompts(t: SubjTemplates, rows: Sequence[SubjRow],
                      shots: Sequence[SubjRow] = ()) -> List[List[int]]:
    """Prompt ids of the prompting baselines: zero-shot ``question + answer_prefix``; few-shot
    the same preceded by each labelled example in ``shots`` written as
    ``question + answer_prefix + label_prefix + label + label_end + "\\n\\n"``."""
    assert t.tok is not None
    demo = "".join(t.question_text(s) + t.answer_prefix + t.label_prefix + t.labels[s.label]
                   + t.label_end + "\n\n" for s in shots)
    dids = t.tok.encode(demo) if demo else []
    out = []
    for r in rows:
        q = (t.tok.encode(t.question_text(r), add_bos=False) if dids
             else t.tok.encode(t.question_text(r)))
        out.append(dids + q + list(t.answer_ids))
    return out


def predict_rows(scores: np.ndarray, groups: Sequence[Sequence[int]],
                 greedy: Optional[Sequence[Optional[int]]] = None) -> Dict[str, np.ndarray]:
    """Per-row predictions from per-prompt candidate scores ``[N, C]``: ``groups[r]`` lists the
    prompts (sampled rationales) of row r; ``greedy[r]`` its greedy-rationale prompt (or None).
    Returns int arrays ``vote``, ``mean_prob`` (and ``greedy`` when given; -1 = none) and the
    per-prompt argmax ``single``."""
    single = np.argmax(scores, axis=1) if len(scores) else np.zeros(0, int)
    out = {"single": single,
           "vote": np.array([majority_vote([single[i] for i in g]) if g else -1
                             for g in groups]),
           "mean_prob": np.array([mean_prob_vote(scores[list(g)]) if g else -1
                                  for g in groups])}
    if greedy is not None:
        out["greedy"] = np.array([-1 if g is None else int(single[g]) for g in greedy])
    return out


# ---------------------------------------------------------------------------
# E-step task
# ---------------------------------------------------------------------------
class SubjCotTask(Task):
    """E-step: sample rationales Z ∝ p(Z Y | X) (minus the wrong-label penalty)."""

    name = "subj_cot"

    DEFAULTS = {
        **_TEMPLATE_DEFAULTS,
        "term_tokens": ("\n",),  # single-token texts that end Z (Y's first token)
        "min_len": 1,
        "max_len": 8,  # tokens of Z (the release: 1..5 GPT-J tokens)
        "wrong_label_penalty": 50.0,  # subtracted from log R when the argmax label is wrong
        "wishful": DEFAULT_WISHFUL,  # label -> phrases; targets() for replay.seed_from_data
        "vote_k": 8,  # evaluate(): rationales per prompt in the vote
        "log_z_prompts": 8,  # evaluate(): prompts with the IW log Z / ESS estimate (0 = off)
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.t = SubjTemplates(c)
        self.term_tokens = tuple(str(x) for x in c["term_tokens"])
        self.min_len, self.max_len = int(c["min_len"]), int(c["max_len"])
        self.penalty = float(c["wrong_label_penalty"])
        self.wishful = {str(k): tuple(str(p) for p in v) for k, v in dict(c["wishful"]).items()}
        self.vote_k = int(c["vote_k"])
        self.log_z_prompts = int(c["log_z_prompts"])
        self.eval_batch_size = int(c["eval_batch_size"])
        if not 0 <= self.min_len <= self.max_len or self.max_len < 1:
            raise ValueError(f"need 0 <= task.min_len <= task.max_len and max_len >= 1, got "
                             f"{self.min_len}, {self.max_len}")
        if self.penalty < 0:
            raise ValueError(f"task.wrong_label_penalty must be >= 0, got {self.penalty}")
        unknown = sorted(set(self.wishful) - set(self.t.labels))
        if unknown:
            raise ValueError(f"task.wishful has phrases for unknown label(s) {unknown}; labels: "
                             f"{self.t.labels}")
        self.train_rows = read_subj_jsonl(c["data_path"], self.t.labels, int(c["num_train"]),
                                          self.data_root)
        self.eval_num = int(c["eval_num"])
        self.eval_path = str(c["eval_path"])
        self._test: Optional[List[SubjRow]] = None
        self._reward_params: Any = None

    # --- data ---------------------------------------------------------------
    def test_rows(self) -> List[SubjRow]:
        if self._test is None:
            self._test = read_subj_jsonl(self.eval_path, self.t.labels, self.eval_num,
                                         self.data_root)
        return self._test

    def build_tokenizer(self) -> Tokenizer:
        from gfn_jax.models.registry import tiny_tokenizer

        return tiny_tokenizer()

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        self.t.setup(tokenizer)
        self.term_ids = tuple(sorted(set(tokenizer.ids_of(self.term_tokens))))
        if self.t.answer_ids[0] not in self.term_ids:
            raise ValueError(f"task.answer_prefix {self.t.answer_prefix!r} must start with a "
                             f"termination token ({self.term_tokens}): Y follows Z directly and "
                             f"its first token is what ends Z")
        V = int(model_config.vocab_size)
        bad = penalised_token_mask(tokenizer, V, self.term_tokens, keep_ids=self.term_ids,
                                   special=True)
        bias = np.where(bad, np.float32(-1e9), np.float32(0.0)).astype(np.float32)
        bias[min(tokenizer.vocab_size, V):] = -1e9
        bias[list(self.term_ids)] = 0.0
        self._bias = bias
        S = max(len(self.t.answer(c)) for c in range(len(self.t.labels)))
        self._cand = np.zeros((len(self.t.labels), S), np.int32)
        self._cand_mask = np.zeros((len(self.t.labels), S), bool)
        for c in range(len(self.t.labels)):
            y = self.t.answer(c)
            self._cand[c, :len(y)], self._cand_mask[c, :len(y)] = y, True
        self._gold = np.array([r.label for r in self.train_rows], np.int32)
        longest = max(len(self.t.x_ids(r)) for r in self.train_rows)
        if longest + self.max_len + S > model_config.max_seq_len:
            raise ValueError(f"prompt ({longest}) + max_len ({self.max_len}) + answer ({S}) "
                             f"tokens exceed the model's context ({model_config.max_seq_len})")

    def train_prompts(self) -> List[str]:
        return [self.t.x_text(r) for r in self.train_rows]

    def eval_prompts(self) -> List[str]:
        return [self.t.x_text(r) for r in self.test_rows()]

    def targets(self) -> List[Target]:
        """Every wishful phrase of each training example's gold label, as a trajectory."""
        assert self.tokenizer is not None, "call setup() first"
        out = []
        for k, r in enumerate(self.train_rows):
            for p in self.wishful.get(self.t.labels[r.label], ()):
                ids = self.tokenizer.encode(p, add_bos=False)
                if not self.min_len <= len(ids) <= self.max_len:
                    raise ValueError(f"wishful rationale {p!r} has {len(ids)} tokens, outside "
                                     f"task.min_len..max_len = {self.min_len}..{self.max_len}")
                if any(self._bias[i] < 0 for i in ids):
                    raise ValueError(f"wishful rationale {p!r} has a token the policy cannot "
                                     f"write (a newline or a special token)")
                out.append(Target(prompt_index=k, tokens=ids))
        return out

    # --- policy -------------------------------------------------------------
    def policy_spec(self) -> PolicySpec:
        return PolicySpec(term_ids=self.term_ids, max_len=self.max_len, min_len=self.min_len)

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        return self._bias

    # --- reward -------------------------------------------------------------
    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        gold = jnp.asarray(self._gold)[batch["prompt_index"]]
        return subj_log_reward(model_config, base_params, batch["prompt_tokens"],
                               batch["prompt_mask"], batch["tokens"], batch["lengths"],
                               jnp.asarray(self._cand), jnp.asarray(self._cand_mask), gold,
                               self.term_ids, self.penalty)

    def bind_reward_params(self, base_params: Any) -> None:
        self._reward_params = base_params

    def _lookup(self) -> Dict[str, Tuple[str, SubjRow]]:
        out: Dict[str, Tuple[str, SubjRow]] = {}
        for r in self.train_rows:
            out.setdefault(self.t.x_text(r), ("train", r))
        for r in self.test_rows():
            out.setdefault(self.t.x_text(r), ("test", r))
        return out

    def final_log_reward(self, rows: Sequence[SubjRow], z: Sequence[Sequence[int]],
                         params: Any = None) -> np.ndarray:
        """Untempered log R of complete rationales ``z`` of ``rows`` (gold labels)."""
        params = self._reward_params if params is None else params
        if params is None:
            raise RuntimeError("no reward parameters: call bind_reward_params first")
        B, T = self.eval_batch_size, self.max_len
        pad = int(self.tokenizer.pad_id or 0)
        out = []
        for s in range(0, len(rows), B):
            part = list(range(s, min(s + B, len(rows))))
            ids = [self.t.x_ids(rows[i]) for i in part]
            P = -(-max(len(p) for p in ids) // 32) * 32
            pt = np.full((B, P), pad, np.int32)
            pm = np.zeros((B, P), np.int32)
            pm[:, -1] = 1
            zt = np.zeros((B, T), np.int32)
            n = np.zeros(B, np.int32)
            gold = np.zeros(B, np.int32)
            for j, (i, p) in enumerate(zip(part, ids)):
                pm[j] = 0
                pt[j, P - len(p):], pm[j, P - len(p):] = p, 1
                zz = list(z[i])[:T]
                zt[j, :len(zz)], n[j], gold[j] = zz, len(zz), rows[i].label
            v = _final_reward(params, jnp.asarray(pt), jnp.asarray(pm), jnp.asarray(zt),
                              jnp.asarray(n), jnp.asarray(self._cand),
                              jnp.asarray(self._cand_mask), jnp.asarray(gold),
                              cfg=self.model_config, term_ids=self.term_ids,
                              penalty=self.penalty)
            out.append(np.asarray(v)[:len(part)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    # --- evaluation ---------------------------------------------------------
    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """Label accuracy when the reward model predicts Y from X and each sampled Z, per split
        (``train_*`` / ``test_*``): ``single_accuracy`` (each rationale), ``vote_accuracy``
        (majority over the first ``vote_k`` rationales of a prompt), ``mean_prob_accuracy``;
        ``mean_length``, ``unique_fraction``; and, for samples with ``log_q`` drawn at
        temperature 1, ``log_z_iw`` / ``ess`` / ``ess_fraction`` (mean over the first
        ``log_z_prompts`` prompts with >= 2 samples) and ``mean_log_r``."""
        lookup = self._lookup()
        groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
        for s in samples:
            if s["prompt"] not in lookup:
                raise ValueError(f"evaluate got a sample for a prompt that is neither a training "
                                 f"nor a test prompt of the task: {s['prompt'][:80]!r}")
            groups.setdefault(s["prompt"], []).append(s)
        m: Dict[str, float] = {"num_samples": float(len(samples))}
        if not samples:
            return m
        m["mean_length"] = float(np.mean([len(s["tokens"]) for s in samples]))
        m["unique_fraction"] = float(np.mean(
            [len({tuple(s["tokens"]) for s in g}) / len(g) for g in groups.values()]))
        if self._reward_params is None:
            return m
        by_split: Dict[str, Dict[str, List[float]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        ids, owner = [], []
        for p, g in groups.items():
            for s in g[:self.vote_k]:
                ids.append(self.t.x_ids(lookup[p][1]) + list(s["tokens"]) + list(self.t.answer_ids))
                owner.append(p)
        cands = [self.t.label_continuation(c) for c in range(len(self.t.labels))]
        scores = candidate_log_probs(self.model_config, self._reward_params, ids, cands,
                                     batch_size=self.eval_batch_size,
                                     pad_id=int(self.tokenizer.pad_id or 0))
        pos: Dict[str, List[int]] = collections.defaultdict(list)
        for i, p in enumerate(owner):
            pos[p].append(i)
        records = []
        for p, rows in pos.items():
            split, row = lookup[p]
            pred = predict_rows(scores, [rows])
            d = by_split[split]
            d["single"] += [float(x == row.label) for x in pred["single"][rows]]
            d["vote"].append(float(pred["vote"][0] == row.label))
            d["mean_prob"].append(float(pred["mean_prob"][0] == row.label))
            records.append({"prompt": p, "split": split, "gold": row.label,
                            "vote": int(pred["vote"][0]),
                            "rationales": [str(s.get("text", "")) for s in groups[p][:self.vote_k]]})
        for split, d in by_split.items():
            m[f"{split}_single_accuracy"] = float(np.mean(d["single"]))
            m[f"{split}_vote_accuracy"] = float(np.mean(d["vote"]))
            m[f"{split}_mean_prob_accuracy"] = float(np.mean(d["mean_prob"]))
            m[f"{split}_num_prompts"] = float(len(d["vote"]))
        m.update(self.posterior_diagnostics(samples))
        if out_dir:
            with open(os.path.join(out_dir, f"subj_votes_{tag or 'eval'}.jsonl"), "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        return m

    def posterior_diagnostics(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, float]:
        """IW log Z and ESS per prompt (see the module docstring); {} when not possible."""
        if (not self.log_z_prompts or self._reward_params is None or not samples
                or any("log_q" not in s for s in samples)
                or any(float(s.get("temperature", 1.0)) != 1.0 for s in samples)):
            return {}
        lookup = self._lookup()
        groups: Dict[str, List[Dict[str, Any]]] = collections.OrderedDict()
        for s in samples:
            groups.setdefault(s["prompt"], []).append(s)
        chosen = [p for p, g in groups.items() if len(g) >= 2][:self.log_z_prompts]
        if not chosen:
            return {}
        rows = [lookup[p][1] for p in chosen for _ in groups[p]]
        zs = [s["tokens"] for p in chosen for s in groups[p]]
        log_r = self.final_log_reward(rows, zs)
        lz, ess, frac, k = [], [], [], 0
        for p in chosen:
            n = len(groups[p])
            a, e = importance_log_z(log_r[k:k + n], [s["log_q"] for s in groups[p]])
            lz.append(a), ess.append(e), frac.append(e / n)
            k += n
        return {"log_z_iw": float(np.mean(lz)), "ess": float(np.mean(ess)),
                "ess_fraction": float(np.mean(frac)), "mean_log_r": float(np.mean(log_r)),
                "log_z_prompts": float(len(chosen))}


# ---------------------------------------------------------------------------
# M-step task (and the supervised classification baseline)
# ---------------------------------------------------------------------------
class SubjLabelTask(Task):
    """M-step: a classifier p(Y | X [Z]) trained with SFT on the label tokens."""

    name = "subj_label"

    DEFAULTS = {
        **_TEMPLATE_DEFAULTS,
        "rationales_path": "",  # JSON lines from scripts/subj_em.py; "" = no rationale
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.t = SubjTemplates(c)
        self.eval_batch_size = int(c["eval_batch_size"])
        self.train_rows = read_subj_jsonl(c["data_path"], self.t.labels, int(c["num_train"]),
                                          self.data_root)
        self.test = read_subj_jsonl(c["eval_path"], self.t.labels, int(c["eval_num"]),
                                    self.data_root)
        self.rationales_path = str(c["rationales_path"] or "")
        self.rationales: List[Rationale] = (
            read_rationales(self.rationales_path, self.train_rows, self.test, self.data_root)
            if self.rationales_path else [])
        if self.rationales_path and not any(r.split == "train" for r in self.rationales):
            raise ValueError(f"{self.rationales_path}: no training rationales")
        self._ids: Dict[str, List[int]] = {}
        self._reward_params: Any = None

    def build_tokenizer(self) -> Tokenizer:
        from gfn_jax.models.registry import tiny_tokenizer

        return tiny_tokenizer()

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        self.t.setup(tokenizer)
        # training prompts: (row, rationale or None)
        if self.rationales:
            self.train_items = [(self.train_rows[r.index], r.z_tokens)
                                for r in self.rationales if r.split == "train"]
        else:
            self.train_items = [(r, None) for r in self.train_rows]
        self._train_prompts = [self._prompt(r, z) for r, z in self.train_items]
        self.max_label = max(len(x) for x in self.t.label_ids)

    def _prompt(self, row: SubjRow, z: Optional[Sequence[int]]) -> str:
        text, ids = self.t.classifier_prompt(row, z)
        while self._ids.setdefault(text, ids) != ids:
            text += "\u200b"  # two token sequences that decode alike: a distinct key each
        return text

    def encode_prompt(self, text: str) -> List[int]:
        """The prompt's token ids as built (X, Z and the answer prefix joined as ids); other
        texts are encoded by the tokenizer."""
        ids = self._ids.get(text)
        return list(ids) if ids is not None else super().encode_prompt(text)

    def train_prompts(self) -> List[str]:
        return list(self._train_prompts)

    def test_items(self) -> Tuple[List[str], List[List[int]], List[Optional[int]]]:
        """(prompts, prompt indices per test row, greedy prompt index per test row) of the
        test set: with test rationales, one prompt per rationale; else one per row."""
        prompts: List[str] = []
        groups: List[List[int]] = [[] for _ in self.test]
        greedy: List[Optional[int]] = [None] * len(self.test)
        test_rats = [r for r in self.rationales if r.split == "test"]
        if test_rats:
            for r in test_rats:
                prompts.append(self._prompt(self.test[r.index], r.z_tokens))
                if r.greedy:
                    greedy[r.index] = len(prompts) - 1
                else:
                    groups[r.index].append(len(prompts) - 1)
        else:
            for i, row in enumerate(self.test):
                prompts.append(self._prompt(row, None))
                groups[i].append(len(prompts) - 1)
        return prompts, groups, greedy

    def eval_prompts(self) -> List[str]:
        return self.test_items()[0]

    def targets(self) -> List[Target]:
        """The gold label's tokens after each training prompt (⊤ = ``label_end``)."""
        return [Target(prompt_index=k, tokens=list(self.t.label_ids[r.label]))
                for k, (r, _) in enumerate(self.train_items)]

    def policy_spec(self) -> PolicySpec:
        # max_len one above the longest label: ⊤ after any label is the model's own p(end)
        return PolicySpec(term_ids=(self.t.end_id,), max_len=self.max_label + 1, min_len=1)

    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """log p(y_<i ⊤ | prompt) under the reward model (for objectives other than SFT)."""
        r = score_reward_prefixes(model_config, base_params, batch["prompt_tokens"],
                                  batch["prompt_mask"], batch["tokens"], batch["lengths"],
                                  (self.t.end_id,))
        return r.log_pz + r.log_pterm

    def bind_reward_params(self, base_params: Any) -> None:
        self._reward_params = base_params

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """For sampled labels (e.g. ``gfn-jax eval``): the fraction of samples whose generated
        tokens are the gold label (``sample_accuracy``) and that are one of the labels
        (``valid_fraction``). The argmax accuracy of a policy is :meth:`evaluate_policy`."""
        gold: Dict[str, int] = {}
        for k, (r, _) in enumerate(self.train_items):
            gold.setdefault(self._train_prompts[k], r.label)
        prompts, groups, greedy = self.test_items()
        for r, g in enumerate(groups):
            for i in g + ([greedy[r]] if greedy[r] is not None else []):
                gold.setdefault(prompts[i], self.test[r].label)
        labels = [list(x) for x in self.t.label_ids]
        ok, valid = [], []
        for s in samples:
            if s["prompt"] not in gold:
                raise ValueError(f"evaluate got a sample for an unknown prompt: {s['prompt'][:80]!r}")
            toks = list(s["tokens"])
            valid.append(float(toks in labels))
            ok.append(float(toks == labels[gold[s["prompt"]]]))
        return {"num_samples": float(len(samples)),
                "sample_accuracy": float(np.mean(ok)) if ok else float("nan"),
                "valid_fraction": float(np.mean(valid)) if valid else float("nan")}

    def evaluate_policy(self, policy: Any, out_path: Optional[str] = None) -> Dict[str, float]:
        """Test accuracy of ``policy`` (the trained classifier; or any model with this task's
        prompts) by the argmax over the candidate labels of log p(label ⊤ | prompt):
        ``accuracy`` without rationales; with them ``greedy_accuracy`` (the greedy rationale),
        ``vote_accuracy`` (majority over the sampled rationales), ``mean_prob_accuracy`` and
        ``single_accuracy``."""
        prompts, groups, greedy = self.test_items()
        ids = [self.encode_prompt(p) for p in prompts]
        cands = [self.t.label_continuation(c) for c in range(len(self.t.labels))]
        scores = candidate_log_probs(policy.model_config, policy.params, ids, cands,
                                     adapters=policy.adapters, batch_size=self.eval_batch_size,
                                     pad_id=int(self.tokenizer.pad_id or 0))
        gold = np.array([r.label for r in self.test])
        have_greedy = any(g is not None for g in greedy)
        pred = predict_rows(scores, groups, greedy if have_greedy else None)
        m: Dict[str, float] = {"num_test_rows": float(len(self.test))}
        has_z = bool(self.rationales) and any(r.split == "test" for r in self.rationales)
        if has_z:
            rows = [r for r, g in enumerate(groups) if g]
            m["vote_accuracy"] = float(np.mean(pred["vote"][rows] == gold[rows]))
            m["mean_prob_accuracy"] = float(np.mean(pred["mean_prob"][rows] == gold[rows]))
            owner = np.array([r for r, g in enumerate(groups) for _ in g], int)
            flat = np.array([i for g in groups for i in g], int)
            m["single_accuracy"] = float(np.mean(pred["single"][flat] == gold[owner]))
            m["rationales_per_row"] = float(np.mean([len(g) for g in groups]))
            if have_greedy:
                gr = [r for r, g in enumerate(greedy) if g is not None]
                m["greedy_accuracy"] = float(np.mean(pred["greedy"][gr] == gold[gr]))
        else:
            m["accuracy"] = float(np.mean(pred["vote"] == gold))
        m["predicted_fraction_" + self.t.labels[1]] = float(np.mean(pred["mean_prob"] == 1))
        if out_path:
            with open(out_path, "w") as f:
                for r in range(len(self.test)):
                    f.write(json.dumps({"index": r, "gold": int(gold[r]),
                                        "vote": int(pred["vote"][r]),
                                        "mean_prob": int(pred["mean_prob"][r]),
                                        "scores": scores[groups[r]].tolist()}) + "\n")
        return m
