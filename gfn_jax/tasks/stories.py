"""Story infilling (Hu et al. 2024, Sec. 4.2): given the beginning X and the ending Y of a short
story, sample the missing middle sentence Z from the posterior ``p(Z | X, Y) ∝ p(Z Y | X)``.

* Policy prompt (``task.prompt_template``, the release's form):
  ``"Beginning: <beginning>\\nEnding: <ending>\\nMiddle:"``; Z is one sentence of
  ``task.min_len..task.max_len`` tokens ended by a newline (⊤); newlines cannot be inside Z.
* Reward: ``log R(X z_<i ⊤) = log p(z_<i | X_r) + log p(Y | X_r z_<i)`` for every prefix in
  ONE packed suffix pass (:func:`gfn_jax.tasks.infill.infill_log_reward`); ⊤ itself is not
  scored. ``X_r`` is the story so far (``task.reward_template``, default the beginning
  itself) and ``Y = task.suffix_template`` (default ``" <ending>"``): the reward LM reads the
  story as a story. The reward LM is the base model with the adapters off, or a model
  fine-tuned on stories (``reward.model``; recipe: ``configs/sft_stories.py``, exported with
  ``gfn-jax convert``).
* Data, ROCStories: five-sentence stories in the CSV format of the ROCStories release
  (columns ``storyid, storytitle, sentence1 .. sentence5``; :func:`read_rocstories`):
  beginning = sentences 1-3, middle = sentence 4, ending = sentence 5 (the paper's split).
  ROCStories needs a request form and cannot be downloaded offline, so the runs here use a
  **stand-in**: JSON lines with ``beginning``, ``middle``, ``ending`` (one sentence each) cut
  from three-sentence OpenWebText prompts by ``scripts/make_story_standin.py``. The stand-in
  is not a story corpus; results on it are not comparable with the paper's.
* Split: the FIRST ``task.num_eval`` stories are held out (the release evaluates on stories
  0-99 and trains its reward model on the others); the rest are training prompts.
* :meth:`StoriesTask.targets` are the true middles (``task.target_template``): with
  ``objective.name=sft`` the SFT baseline, with ``replay.seed_from_data`` replay seeding.
* Metrics against the true middle (:meth:`StoriesTask.evaluate`): BLEU-4 and GLEU (nltk, as
  the release: whitespace tokens, smoothing method1; a final period is dropped from both
  sides), the embedding diversity of the infills per story, and the continuation metrics
  (``mean_log_p_base`` = mean log R). The prompting baseline is the base model sampled
  under the policy prompt (the ``before`` evaluation of a run, or ``gfn_jax.baselines``).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.tasks.base import Batch, Target
from gfn_jax.tasks.continuation import _group, _missing, resolve_data_path
from gfn_jax.tasks.infill import InfillTask, infill_log_reward, read_jsonl

__all__ = ["StoriesTask", "read_rocstories", "read_story_jsonl", "ROC_COLUMNS",
           "STORY_FIELDS"]

ROC_COLUMNS = ("storyid", "storytitle", "sentence1", "sentence2", "sentence3", "sentence4",
               "sentence5")
STORY_FIELDS = ("beginning", "middle", "ending")
DEFAULT_DATA = "runs/data/story_standin.jsonl"  # made by scripts/make_story_standin.py


def read_rocstories(path: str, num: int = 0, root: str = "") -> List[Dict[str, str]]:
    """Stories of a ROCStories CSV file (header ``storyid, storytitle, sentence1..5``; other
    columns are ignored), the first ``num`` if > 0, as dicts with ``id``, ``title``,
    ``beginning`` (sentences 1-3 joined by spaces), ``middle`` (4) and ``ending`` (5).

    A missing column, a row with the wrong number of fields or an empty sentence is a
    ``ValueError`` naming the file and line."""
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise _missing(full, "ROCStories CSV file")
    out: List[Dict[str, str]] = []
    with open(full, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{full}:1: empty file (expected the header "
                             f"{','.join(ROC_COLUMNS)})") from None
        header = [h.strip() for h in header]
        missing = [c for c in ROC_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{full}:1: the header lacks column(s) {', '.join(missing)} (a "
                             f"ROCStories CSV has {', '.join(ROC_COLUMNS)}; got "
                             f"{', '.join(header)})")
        col = {c: header.index(c) for c in ROC_COLUMNS}
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(f"{full}:{start}: not valid CSV ({e})") from None
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{full}:{start}: {len(row)} field(s), the header has "
                                 f"{len(header)} (a comma inside a sentence must be quoted)")
            s = [row[col[f"sentence{i}"]].strip() for i in range(1, 6)]
            empty = [f"sentence{i + 1}" for i, x in enumerate(s) if not x]
            if empty:
                raise ValueError(f"{full}:{start}: empty {', '.join(empty)}")
            out.append({"id": row[col["storyid"]].strip(), "title": row[col["storytitle"]].strip(),
                        "beginning": " ".join(s[:3]), "middle": s[3], "ending": s[4]})
            if num and len(out) >= num:
                break
    if not out:
        raise ValueError(f"ROCStories file {full!r} has no stories")
    return out


def read_story_jsonl(path: str, num: int = 0, root: str = "") -> List[Dict[str, Any]]:
    """Stories of a JSON-lines file with ``beginning``, ``middle`` and ``ending`` fields (the
    stand-in's format); bad rows are errors naming the file and line."""
    return read_jsonl(path, num, root, required=STORY_FIELDS)


def _strip_period(text: str) -> str:
    t = text.strip()
    return t[:-1].rstrip() if t.endswith(".") else t


class StoriesTask(InfillTask):
    """Story infilling: reward ``log p(Z | X_r) + log p(Y | X_r Z)`` (see the module doc)."""

    name = "infill_stories"

    DEFAULTS = {
        **InfillTask.DEFAULTS,
        "data_path": DEFAULT_DATA,  # ROCStories CSV, or JSON lines (beginning/middle/ending)
        "data_format": "auto",  # auto (by extension: .csv = rocstories) | rocstories | jsonl
        "prompt_template": "Beginning: {beginning}\nEnding: {ending}\nMiddle:",
        "reward_template": "{beginning}",  # the reward LM's context X_r
        "suffix_template": " {ending}",  # Y, scored after Z
        "target_template": " {middle}",  # a true middle as Z (targets, SFT)
        "label_key": "middle",
        "candidate_labels": (),
        "term_tokens": ("\n",),
        "use_eos": False,
        "min_len": 5,
        "max_len": 25,
        "disallow_substrings": ("\n",),
        "penalty": "hard",
        "penalise_reward": False,
        "num_eval": 100,  # the FIRST N stories are held out (the release: stories 0-99)
    }

    def __init__(self, config: Any) -> None:
        c = {**self.DEFAULTS, **dict(config)}
        self.data_format = str(c["data_format"])
        self.reward_template = str(c["reward_template"])
        self.target_template = str(c["target_template"])
        if self.data_format not in ("auto", "rocstories", "jsonl"):
            raise ValueError(f"task.data_format must be auto, rocstories or jsonl, got "
                             f"{self.data_format!r}")
        if int(c["max_prompt_tokens"]):
            raise ValueError("task.max_prompt_tokens is not supported by infill_stories (it "
                             "would change the held-out split); use task.num_prompts")
        if c["candidate_labels"]:
            raise ValueError("task.candidate_labels is not used by infill_stories")
        super().__init__(config)

    # --- data ---------------------------------------------------------------
    def _read_rows(self) -> List[Dict[str, Any]]:
        fmt = self.data_format
        if fmt == "auto":
            fmt = "rocstories" if self.data_path.lower().endswith(".csv") else "jsonl"
        reader = read_rocstories if fmt == "rocstories" else read_story_jsonl
        return reader(self.data_path, self.num_prompts, self.data_root)

    def _load_prompts(self) -> List[str]:
        rows = self._read_rows()
        if self.num_eval >= len(rows):
            raise ValueError(f"task.num_eval={self.num_eval} leaves no training story: "
                             f"{self.data_path!r} gave {len(rows)}")
        # stored order: training stories first (prompt_index k = training story k), then
        # the held-out ones (the first num_eval of the file)
        self.rows = rows[self.num_eval:] + rows[:self.num_eval]
        self.suffixes = [self._format(self.suffix_template, r, k, "suffix_template")
                         for k, r in enumerate(self.rows)]
        self.reward_texts = [self._format(self.reward_template, r, k, "reward_template")
                             for k, r in enumerate(self.rows)]
        self.middles = [self._format(self.target_template, r, k, "target_template")
                        for k, r in enumerate(self.rows)]
        return [self._format(self.prompt_template, r, k, "prompt_template")
                for k, r in enumerate(self.rows)]

    def _select(self, keep: List[int]) -> None:  # pragma: no cover - max_prompt_tokens is off
        raise AssertionError("infill_stories never filters prompts")

    def reward_prompts(self) -> Optional[List[str]]:
        """The reward LM's context of each training story (``task.reward_template``)."""
        return list(self.reward_texts[: self._num_train()])

    def _stream_templates(self) -> Dict[str, str]:
        return {**super()._stream_templates(), "task.reward_template": self.reward_template}

    def stream_reward_prompt(self, record: Mapping[str, Any]) -> Optional[str]:
        """The reward LM's context X_r: ``task.reward_template`` filled from the record."""
        return self._format_record(self.reward_template, record)

    def build_tokenizer(self) -> Optional[Tokenizer]:
        from gfn_jax.models.registry import tiny_tokenizer

        return tiny_tokenizer()

    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        bad = [k for k, t in enumerate(self.reward_texts) if not self.encode_reward_prompt(t)]
        if bad:
            raise ValueError(f"the reward context of story {bad[0]} encodes to no tokens; "
                             f"check task.reward_template {self.reward_template!r}")

    # --- data targets ---------------------------------------------------------
    def targets(self) -> List[Target]:
        """The true middles of the training stories (``task.target_template``), tokenised
        without BOS; stories whose middle is longer than ``task.max_len`` tokens or contains
        a termination token are left out (an error if none is left)."""
        assert self.tokenizer is not None, "call setup() first"
        out: List[Target] = []
        term = set(self.term_ids)
        for k in range(self._num_train()):
            ids = self.tokenizer.encode(self.middles[k], add_bos=False)
            if self.min_len <= len(ids) <= self.max_len and not term.intersection(ids):
                out.append(Target(prompt_index=k, tokens=ids))
        if not out:
            raise ValueError(f"no training story's middle fits task.min_len={self.min_len}.."
                             f"task.max_len={self.max_len} tokens; raise task.max_len")
        return out

    # --- reward -------------------------------------------------------------
    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """``log p(z_<i | X_r) + log p(Y | X_r z_<i)`` for every prefix, ``[B, T+1]``, under
        the reward context ``batch["reward_prompt_tokens"]``."""
        sfx, sm = self.batch_suffix(batch)
        get = getattr(batch, "get", None)
        rt = get("reward_prompt_tokens") if get is not None else None
        if rt is None:
            raise KeyError("infill_stories scores under the reward context: the batch needs "
                           "reward_prompt_tokens / reward_prompt_mask")
        return infill_log_reward(model_config, base_params, rt, batch["reward_prompt_mask"],
                                 batch["tokens"], batch["lengths"], sfx, sm, self.term_ids,
                                 self._reward_bias_array())

    # --- evaluation ---------------------------------------------------------
    def _pack(self, samples: Sequence[Dict[str, Any]], rows: Sequence[int]
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """As the continuation's, but under each story's reward context."""
        as_reward = list(samples)
        for r in rows:
            k = self._row_of[samples[r]["prompt"]]
            as_reward[r] = {**samples[r], "prompt": self.reward_texts[k]}
        return super()._pack(as_reward, rows)

    def true_middle(self, prompt: str) -> str:
        """The true middle sentence of the story whose policy prompt is ``prompt``."""
        return str(self.rows[self._row_of[prompt]]["middle"])

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """The continuation metrics (``mean_log_p_base`` = mean log R, ``logp_mean`` /
        ``logp_max`` per story), ``embedding_diversity`` of the infills per story (with
        ``task.diversity_encoder``), and ``bleu4`` / ``gleu`` of each infill against its
        story's true middle (final periods dropped; averaged over samples)."""
        m = super().evaluate(samples, out_dir, tag)
        if not samples:
            return m
        from gfn_jax.text_metrics import bleu4, gleu

        hyps = [_strip_period(str(s.get("text", ""))) for s in samples]
        refs = [_strip_period(self.true_middle(s["prompt"])) for s in samples]
        m["bleu4"] = bleu4(hyps, refs)
        m["gleu"] = gleu(hyps, refs)
        m["num_stories"] = float(len(_group(samples)))
        return m


def _register() -> None:
    from gfn_jax.tasks import register_task

    register_task(StoriesTask.name, StoriesTask)


_register()
