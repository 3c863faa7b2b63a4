"""Infilling with a fixed suffix (Hu et al. 2024, Sec. 4.2-4.3): sample the middle Z of
``X Z Y`` from the posterior ``p_base(Z | X, Y) ∝ p_base(Z | X) p_base(Y | X Z)``.

The reward is ``log R(X Z ⊤) = log p_base(Z | X) + log p_base(Y | X Z)`` for every prefix
of Z at once: the first term is the cumulative ``log_pz`` of one
:func:`~gfn_jax.scoring.score_reward_prefixes` pass, the second ONE packed
:func:`~gfn_jax.scoring.score_suffix_prefixes` pass. ⊤ itself is not scored by the LM: the
suffix Y follows Z directly (so a suffix that starts with the termination token, e.g. a
newline, makes the end of Z part of the likelihood).

Rows come from a JSON-lines file; each row gives ``X = prompt_template.format(**row)`` and
``Y = suffix_template.format(**row)``. Y is looked up inside the jitted reward from
``batch["prompt_index"]`` in a static ``[num_prompts, S]`` token table (+ mask).

Default formulation, SUBJ (subjectivity of movie-review snippets; the paper's latent
"reasoning then label" set-up, simplified): ``X = "Movie review: <text>\\nThoughts:"``, Z is
a short free-text thought ended by a newline, ``Y = "\\nSo the review is <label_text>."``
(``objective`` / ``subjective``). With ``task.candidate_labels`` set, :meth:`evaluate` also
reports how often the gold label is the most likely suffix after the sampled Z.

Config keys (``config.task``): ``data_path`` (default ``../shared/data/subj/train.20.jsonl``,
relative to the repository root), ``num_prompts`` (0 = all), ``prompt_template``,
``suffix_template``, ``label_key``, ``candidate_labels``, ``term_tokens``, ``use_eos``,
``min_len``, ``max_len``, ``disallow_substrings``, ``illegal_tokens``, ``penalty`` (default
``"hard"``), ``penalise_reward`` (default False: the reward LM is unpenalised),
``disallow_bias``, ``max_prompt_tokens``, ``num_eval``, ``eval_batch_size`` (as in
:mod:`gfn_jax.tasks.continuation`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.models.transformer import forward
from gfn_jax.scoring import score_suffix_prefixes
from gfn_jax.tasks.base import Batch
from gfn_jax.tasks.continuation import (ContinuationTask, _missing, _report_skipped,
                                        _utf8_lines, penalised_reward_prefixes,
                                        resolve_data_path)

DEFAULT_DATA = "../shared/data/subj/train.20.jsonl"
DEFAULT_PROMPT_TEMPLATE = "Movie review: {text}\nThoughts:"
DEFAULT_SUFFIX_TEMPLATE = "\nSo the review is {label_text}."

__all__ = ["InfillTask", "read_jsonl", "infill_log_reward"]


def _row_problem(row: Any, required: Sequence[str]) -> Optional[str]:
    """Why a parsed row is unusable (None when it is fine)."""
    if not isinstance(row, dict):
        return f"each line must be a JSON object, got {type(row).__name__}"
    missing = [k for k in required if k not in row]
    if missing:
        return (f"missing field(s) {', '.join(map(repr, missing))} (the row has "
                f"{', '.join(map(repr, sorted(row))) or 'no fields'})")
    for k in (required or sorted(row)):
        v = row[k]
        if v is None:
            return f"field {k!r} is null"
        if isinstance(v, str) and not v.strip():
            return f"field {k!r} is empty"
    return None


def read_jsonl(path: str, num: int = 0, root: str = "", required: Sequence[str] = (),
               skip_bad: bool = False) -> List[Dict[str, Any]]:
    """Rows (JSON objects) of a UTF-8 JSON-lines file, the first ``num`` good rows if > 0.

    A bad row is a ``ValueError`` naming the file and line: not UTF-8, not JSON, not an
    object, missing one of the ``required`` fields, or a null or empty (blank) value in one
    of them (in any field when ``required`` is empty). With ``skip_bad`` bad rows are skipped
    instead and a warning gives their count. Blank lines are ignored.
    """
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise _missing(full, "infilling data file")
    rows: List[Dict[str, Any]] = []
    skipped: List[str] = []
    for k, line, err in _utf8_lines(full):
        if err is None:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                err = f"{full}:{k}: not valid JSON ({e.msg})"
            else:
                why = _row_problem(row, tuple(required))
                err = None if why is None else f"{full}:{k}: {why}"
        if err is not None:
            if not skip_bad:
                raise ValueError(err)
            skipped.append(err)
            continue
        rows.append(row)
        if num and len(rows) >= num:
            break
    _report_skipped(full, skipped)
    if not rows:
        raise ValueError(f"infilling data file {full!r} has no rows"
                         + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    return rows


def infill_log_reward(cfg: ModelConfig, params: Any, prompt_tokens: jax.Array,
                      prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
                      suffix_tokens: jax.Array, suffix_mask: jax.Array,
                      term_ids: Sequence[int], bias: Optional[jax.Array] = None) -> jax.Array:
    """``log p(z_<i | X) + log p(Y | X z_<i)`` for every prefix i, ``[B, T+1]`` (0 beyond n);
    with ``bias`` the Z tokens are scored under the penalised, renormalised LM (Y never is)."""
    r = penalised_reward_prefixes(cfg, params, prompt_tokens, prompt_mask, tokens, lengths,
                                  term_ids, bias)
    y = score_suffix_prefixes(cfg, params, prompt_tokens, prompt_mask, tokens, lengths,
                              suffix_tokens, suffix_mask)
    return r.log_pz + y


def final_infill_log_reward(cfg: ModelConfig, params: Any, prompt_tokens: jax.Array,
                            prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
                            suffix_tokens: jax.Array, suffix_mask: jax.Array,
                            term_ids: Sequence[int], bias: Optional[jax.Array] = None
                            ) -> jax.Array:
    """:func:`infill_log_reward` of the whole trajectory only, ``[B]``: ``log p(Z | X)`` plus
    ``log p(Y | X Z)`` from ONE forward over ``[X | Z | Y]`` per row (evaluation, replay
    seeding), instead of the packed pass that scores Y after each of the T + 1 prefixes."""
    r = penalised_reward_prefixes(cfg, params, prompt_tokens, prompt_mask, tokens, lengths,
                                  term_ids, bias)
    n = lengths.astype(jnp.int32)
    log_pz = jnp.take_along_axis(r.log_pz, n[:, None], axis=1)[:, 0]
    B, T = tokens.shape
    S = suffix_tokens.shape[1]
    P = prompt_tokens.shape[1]
    j = jnp.arange(T + S)[None, :]
    k = j - n[:, None]  # position within Y
    in_z = j < n[:, None]
    kc = jnp.clip(k, 0, S - 1)
    in_y = (k >= 0) & (k < S) & jnp.take_along_axis(suffix_mask.astype(bool), kc, axis=1)
    z_wide = jnp.pad(tokens, ((0, 0), (0, S)))
    seq = jnp.where(in_z, z_wide, jnp.where(in_y, jnp.take_along_axis(suffix_tokens, kc, 1), 0))
    full = jnp.concatenate([prompt_tokens, seq.astype(prompt_tokens.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), in_z | in_y], axis=1)
    logits = forward(cfg, params, full, mask.astype(jnp.int32))
    logp = jax.nn.log_softmax(logits[:, P - 1:P - 1 + T + S].astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, seq[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_pz + jnp.sum(jnp.where(in_y, tok_lp, 0.0), axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "term_ids"))
def _final_infill(params, pt, pm, z, n, sfx, sm, bias, *, cfg, term_ids):
    return final_infill_log_reward(cfg, params, pt, pm, z, n, sfx, sm, term_ids, bias)


class InfillTask(ContinuationTask):
    """Infilling: reward ``p_base(Z | X) p_base(Y | X Z)`` with a per-prompt suffix Y."""

    name = "infill"
    # streamed records (data.source) carry X and Y; the templates read them by their source
    # column names (data.x_field / data.y_field), e.g. {text} and {label_text}
    STREAM_FIELDS = ("X", "Y")

    DEFAULTS = {
        **ContinuationTask.DEFAULTS,
        "data_path": DEFAULT_DATA,  # JSON lines, one example per line
        "use_eos": False,
        "penalty": "hard",  # tokens matching disallow_substrings are masked in the policy ...
        "penalise_reward": False,  # ... and the reward LM is left as it is
        "prompt_template": DEFAULT_PROMPT_TEMPLATE,  # X, formatted from a row's fields
        "suffix_template": DEFAULT_SUFFIX_TEMPLATE,  # Y, formatted from a row's fields
        "label_key": "label_text",
        "candidate_labels": (),  # evaluation: accuracy of argmax_y p(y | X Z) if given
        # streamed Y (data.source) padded to this many tokens; 0 = the longest suffix of the
        # task's own file (a longer streamed Y is a bad record)
        "max_suffix_len": 0,
    }

    def __init__(self, config: Any) -> None:
        c = {**self.DEFAULTS, **dict(config)}
        self.prompt_template = str(c["prompt_template"])
        self.suffix_template = str(c["suffix_template"])
        self.label_key = str(c["label_key"])
        self.candidate_labels = tuple(str(x) for x in c["candidate_labels"])
        self.max_suffix_len = int(c["max_suffix_len"])
        if self.max_suffix_len < 0:
            raise ValueError(f"task.max_suffix_len must be >= 0, got {self.max_suffix_len}")
        self.rows: List[Dict[str, Any]] = []
        super().__init__(config)

    # --- data ---------------------------------------------------------------
    def _format(self, template: str, row: Dict[str, Any], k: int, what: str) -> str:
        try:
            return template.format(**row)
        except (KeyError, IndexError) as e:
            raise ValueError(f"row {k} of {self.data_path!r} has no field {e} needed by "
                             f"task.{what} {template!r} (fields: {sorted(row)})") from None

    def _template_fields(self, templates: Optional[Sequence[str]] = None) -> List[str]:
        import string

        names = []
        for t in (self.prompt_template, self.suffix_template) if templates is None else templates:
            names += [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(t)
                      if f]
        return sorted(set(names))

    # --- streamed records (data.source) -----------------------------------------
    def _stream_templates(self) -> Dict[str, str]:
        """config key -> template, for what a streamed record must make."""
        return {"task.prompt_template": self.prompt_template,
                "task.suffix_template": self.suffix_template}

    def check_stream_columns(self, fields: Mapping[str, str]) -> None:
        have = set(fields) | set(fields.values())
        for key, t in self._stream_templates().items():
            missing = [f for f in self._template_fields([t]) if f not in have]
            if missing:
                raise ValueError(
                    f"{key} {t!r} needs field(s) {missing} that streamed records do not have "
                    f"(they have {sorted(have)}): name the columns with data.x_field / "
                    f"data.y_field, or use {{X}} / {{Y}} in the template")

    def _format_record(self, template: str, record: Mapping[str, Any]) -> str:
        try:
            return template.format(**record)
        except (KeyError, IndexError) as e:
            raise ValueError(f"a streamed record has no field {e} for the template "
                             f"{template!r} (fields: {sorted(record)})") from None

    def stream_prompt(self, record: Mapping[str, Any]) -> str:
        """``task.prompt_template`` filled from the record's fields."""
        return self._format_record(self.prompt_template, record)

    def stream_suffix(self, record: Mapping[str, Any]) -> Optional[str]:
        """Y: ``task.suffix_template`` filled from the record's fields."""
        return self._format_record(self.suffix_template, record)

    def encode_suffix(self, text: str) -> List[int]:
        """Y's token ids (no BOS: it follows Z)."""
        assert self.tokenizer is not None
        return self.tokenizer.encode(text, add_bos=False)

    def stream_suffix_len(self) -> int:
        """The suffix table's width: ``task.max_suffix_len`` or, if longer, the longest
        suffix of the task's own file."""
        return int(self.suffix_len)

    def _load_prompts(self) -> List[str]:
        # rows missing a field the templates use are reported with file and line
        self.rows = read_jsonl(self.data_path, 0 if self.max_prompt_tokens else
                               self.num_prompts, self.data_root,
                               required=self._template_fields())
        self.suffixes = [self._format(self.suffix_template, r, k, "suffix_template")
                         for k, r in enumerate(self.rows)]
        return [self._format(self.prompt_template, r, k, "prompt_template")
                for k, r in enumerate(self.rows)]

    def _select(self, keep: List[int]) -> None:
        super()._select(keep)
        self.rows = [self.rows[k] for k in keep]
        self.suffixes = [self.suffixes[k] for k in keep]

    def _label_suffix(self, k: int, label: str) -> str:
        return self._format(self.suffix_template, {**self.rows[k], self.label_key: label}, k,
                            "suffix_template")

    # --- set-up -------------------------------------------------------------
    def _suffix_table(self, texts: Sequence[str], S: int) -> Tuple[np.ndarray, np.ndarray]:
        assert self.tokenizer is not None
        pad = self.tokenizer.pad_id or 0
        toks = np.full((len(texts), S), pad, np.int32)
        mask = np.zeros((len(texts), S), bool)
        for k, t in enumerate(texts):
            ids = self.encode_suffix(t)
            toks[k, :len(ids)], mask[k, :len(ids)] = ids, True
        return toks, mask

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        if self.candidate_labels and any(self.label_key not in r for r in self.rows):
            raise ValueError(f"task.candidate_labels needs field {self.label_key!r} "
                             f"(task.label_key) in every row of {self.data_path!r}")
        alts = [self._label_suffix(k, c) for k in range(len(self.rows))
                for c in self.candidate_labels]
        lens = [len(tokenizer.encode(t, add_bos=False)) for t in list(self.suffixes) + alts]
        empty = [k for k, n in enumerate(lens[:len(self.suffixes)]) if n == 0]
        if empty:
            raise ValueError(f"the suffix of row(s) {empty[:5]} encodes to no tokens; "
                             f"check task.suffix_template {self.suffix_template!r}")
        self.suffix_len = max(max(lens), self.max_suffix_len)
        self._sfx_tokens, self._sfx_mask = self._suffix_table(self.suffixes, self.suffix_len)
        longest = max(len(self.encode_prompt(p)) for p in self._prompts or [])
        need = longest + self.max_len + self.suffix_len
        if need > model_config.max_seq_len:
            raise ValueError(
                f"longest prompt ({longest} tokens) + max_len ({self.max_len}) + suffix "
                f"({self.suffix_len}) = {need} tokens exceeds the model's context of "
                f"{model_config.max_seq_len}")
        self._row_of = {}
        for k, p in enumerate(self._prompts or []):
            self._row_of.setdefault(p, k)

    def _extra_len(self) -> int:
        return self.suffix_len

    def suffix_table(self) -> Tuple[np.ndarray, np.ndarray]:
        """The static ``[num_prompts, S]`` suffix tokens and bool mask (row k = prompt k)."""
        return self._sfx_tokens, self._sfx_mask

    # --- reward -------------------------------------------------------------
    def batch_suffix(self, batch: Batch) -> Tuple[jax.Array, jax.Array]:
        """Each row's Y, ``[B, S]`` tokens and bool mask: the batch's own
        (``extras["suffix_tokens"]`` / ``["suffix_mask"]``, streamed prompts) or the task's
        table row of its prompt (``prompt_index``)."""
        extras = getattr(batch, "extras", None) or {}
        if "suffix_tokens" in extras:
            return extras["suffix_tokens"], extras["suffix_mask"].astype(bool)
        idx = batch["prompt_index"]
        return jnp.asarray(self._sfx_tokens)[idx], jnp.asarray(self._sfx_mask)[idx]

    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """``log p_base(z_<i | X) + log p_base(Y | X z_<i)`` for every prefix, ``[B, T+1]``.
        Y is the batch's own (``extras["suffix_tokens"]``, streamed prompts) or the task's
        table row of each prompt."""
        sfx, sm = self.batch_suffix(batch)
        return infill_log_reward(model_config, base_params, batch["prompt_tokens"],
                                 batch["prompt_mask"], batch["tokens"], batch["lengths"],
                                 sfx, sm, self.term_ids, self._reward_bias_array())

    # --- evaluation ---------------------------------------------------------
    def _suffix_rows(self, samples: Sequence[Dict[str, Any]], rows: Sequence[int],
                     texts: Optional[List[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``[eval_batch_size, S]`` suffix tokens and mask: each sample's own suffix, or
        ``texts`` (one per row) when given."""
        B, S = self.eval_batch_size, self.suffix_len
        sfx = np.zeros((B, S), np.int32)
        sm = np.zeros((B, S), bool)
        sm[:, 0] = True  # dummy rows: score one token
        if texts is None:
            ks = [self._row_of[samples[r]["prompt"]] for r in rows]
            sfx[:len(rows)], sm[:len(rows)] = self._sfx_tokens[ks], self._sfx_mask[ks]
        else:
            t, m = self._suffix_table(texts, S)
            sfx[:len(rows)], sm[:len(rows)] = t, m
        return sfx, sm

    def _final_batch_log_reward(self, pt: np.ndarray, pm: np.ndarray, z: np.ndarray,
                                n: np.ndarray, samples: Sequence[Dict[str, Any]],
                                rows: Sequence[int],
                                texts: Optional[List[str]] = None) -> np.ndarray:
        sfx, sm = self._suffix_rows(samples, rows, texts)
        rows_in = parallel.split_rows(self._reward_params, pt, pm, z, n, sfx, sm)
        out = _final_infill(self._reward_params, *rows_in, self._reward_bias_array(),
                            cfg=self.model_config, term_ids=self.term_ids)
        return parallel.to_host(out)[:len(pt)]

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """The continuation metrics (``mean_log_p_base`` is here ``log p(Z|X) + log p(Y|XZ)``),
        plus ``label_accuracy`` when ``task.candidate_labels`` is set and base parameters are
        bound: the fraction of samples after which the gold label's suffix is the most likely."""
        unknown = [s["prompt"] for s in samples if s["prompt"] not in self._row_of]
        if unknown:
            raise ValueError(f"evaluate got samples for a prompt that is not one of the task's "
                             f"prompts: {unknown[0][:80]!r}")
        m = super().evaluate(samples, out_dir, tag)
        if not (self.candidate_labels and samples and self._reward_params is not None):
            return m
        correct = []
        for s in range(0, len(samples), self.eval_batch_size):
            rows = list(range(s, min(s + self.eval_batch_size, len(samples))))
            pt, pm, z, n = self._pack(samples, rows)
            scores = []
            for c in self.candidate_labels:
                texts = [self._label_suffix(self._row_of[samples[r]["prompt"]], c) for r in rows]
                v = self._final_batch_log_reward(pt, pm, z, n, samples, rows, texts)
                scores.append(np.asarray(v)[:len(rows)])
            pred = np.argmax(np.stack(scores, 1), 1)
            gold = [str(self.rows[self._row_of[samples[r]["prompt"]]][self.label_key])
                    for r in rows]
            correct += [self.candidate_labels[p] == g for p, g in zip(pred, gold)]
        m["label_accuracy"] = float(np.mean(correct))
        return m
