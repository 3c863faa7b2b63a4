"""Next-sentence continuation (Hu et al. 2024, Sec. 4.1): sample likely *and* diverse
continuations Z of a prompt sentence X.

The reward is the base LM's own likelihood of the terminated continuation,
``log R(X Z ⊤) = log p_base(Z ⊤ | X)``, for every prefix at once via one
:func:`gfn_jax.scoring.score_reward_prefixes` pass (``log_pz + log_pterm``). The trainer
tempers it (``reward.temp_*``): the GFlowNet target is ``q(Z⊤ | X) ∝ p_base(Z⊤ | X)^{1/T}``.
⊤ is a set of tokens (``task.term_tokens``, default newline, plus ``eos`` with
``task.use_eos``).

Tokens that cannot belong to one sentence (text containing one of
``task.disallow_substrings``, or equal to one of ``task.illegal_tokens``; never a ⊤ id) are
penalised in BOTH the policy and the reward, as the paper's release does
(``task.penalty``):

* ``"soft"`` (default, the release's form): ``task.policy_penalty`` (-99) is added to their
  policy logits and ``task.reward_penalty`` (-50) to their logits under the reward LM, which
  is then renormalised: ``log p~(v | s) = log_softmax(logits(s) + penalty)[v]`` and
  ``log R(X z_<i ⊤) = sum_t log p~(z_t | X z_<t) + log p~(⊤ | X z_<i)``;
* ``"hard"``: both are masked (bias -1e9): the reward LM is renormalised over the allowed
  tokens.

``task.penalise_reward=False`` leaves the reward LM unpenalised (the infilling tasks' default);
a negative ``task.disallow_bias`` overrides the policy's penalty (legacy key).

Data split: the first ``task.num_prompts`` lines, of which the LAST ``task.num_eval`` are held
out (:meth:`ContinuationTask.eval_prompts`); the release uses 1,000 lines, 950 / 50. Lines keep
their trailing spaces (``task.keep_trailing_space``): every OpenWebText prompt ends with a
space, which changes the tokenisation of the prompt and of the continuation's first token.

Config keys (``config.task``): ``data_path`` (one prompt per line; relative paths are resolved
against the repository root, default ``../shared/data/openwebtext/prompts.txt``),
``num_prompts`` (0 = all), ``prompt_prefix``/``prompt_suffix`` (wrapped around each line),
``term_tokens``, ``use_eos``, ``min_len``, ``max_len``, ``disallow_substrings``,
``illegal_tokens``, ``penalise_special_tokens``, ``penalty``, ``policy_penalty``,
``reward_penalty``, ``penalise_reward``,
``disallow_bias`` (0 = from ``penalty``), ``max_prompt_tokens`` (0 = no limit; otherwise
longer prompts are dropped at ``setup``, before ``num_prompts`` is applied), ``num_eval``,
``keep_trailing_space``, ``eval_batch_size`` (rows per scoring call in :meth:`evaluate`),
``diversity_encoder`` ("" = no embedding diversity in :meth:`evaluate`; else a name or
directory for :func:`gfn_jax.text_metrics.load_sentence_encoder`).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax import parallel
from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.scoring import RewardScores, score_reward_prefixes
from gfn_jax.tasks.base import Batch, Task

DEFAULT_PROMPTS = "../shared/data/openwebtext/prompts.txt"

__all__ = [
    "ContinuationTask",
    "resolve_data_path",
    "read_prompt_lines",
    "distinct_n",
    "vocab_substring_bias",
    "penalised_token_mask",
    "penalised_reward_prefixes",
    "PENALTIES",
]

PENALTIES = ("soft", "hard")
HARD = -1e9  # a bias at or below logprobs.DISALLOWED: the token is never chosen


def resolve_data_path(path: str, root: str = "") -> str:
    """An absolute path: ``~`` expanded; a relative path is taken from ``root`` (the config's
    ``data.root``) or, when that is empty, from the current working directory -- never from
    where the package is installed."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path
    base = os.path.expanduser(root) if root else os.getcwd()
    return os.path.normpath(os.path.join(os.path.abspath(base), path))


def _missing(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: {path!r} (set config.task.data_path, or config.data.root for "
        f"relative paths, which otherwise resolve against the working directory "
        f"{os.getcwd()!r}; the reference data lives in ../shared/data of the repository, see "
        f"README)")


def _utf8_lines(full: str) -> Iterator[Tuple[int, Optional[str], Optional[str]]]:
    """``(line number, text, error)`` of each line of a file read as UTF-8 (a leading BOM is
    dropped); a line that is not UTF-8 comes back as ``(k, None, "file:k: not UTF-8 ...")``."""
    with open(full, "rb") as f:
        for k, raw in enumerate(f, 1):
            try:
                yield k, raw.decode("utf-8-sig" if k == 1 else "utf-8"), None
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.start + 1]
                yield k, None, (f"{full}:{k}: not UTF-8 text (byte 0x{bad.hex()} at byte "
                                f"{e.start + 1} of the line); save the file as UTF-8")


def _report_skipped(full: str, skipped: List[str]) -> None:
    if skipped:
        import logging

        logging.getLogger(__name__).warning("skipped %d bad row(s) of %s; the first: %s",
                                            len(skipped), full, skipped[0])


def read_prompt_lines(path: str, num: int = 0, root: str = "",
                      skip_bad: bool = False, keep_trailing_space: bool = False) -> List[str]:
    """Non-blank lines of a UTF-8 text file, the first ``num`` if > 0: trailing whitespace
    stripped, or with ``keep_trailing_space`` only the line ending (``\n`` / ``\r\n``), as the
    paper's release reads its prompts. A line that is not UTF-8 is a ``ValueError`` naming the file and line, or, with
    ``skip_bad``, skipped (a warning gives the count)."""
    full = resolve_data_path(path, root)
    if not os.path.isfile(full):
        raise _missing(full, "prompt file")
    out: List[str] = []
    skipped: List[str] = []
    for _, line, err in _utf8_lines(full):
        if err is not None:
            if not skip_bad:
                raise ValueError(err)
            skipped.append(err)
            continue
        line = line.rstrip("\r\n") if keep_trailing_space else line.rstrip()
        if line.strip():
            out.append(line)
            if num and len(out) >= num:
                break
    _report_skipped(full, skipped)
    if not out:
        raise ValueError(f"prompt file {full!r} has no non-empty lines"
                         + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return out


def distinct_n(seqs: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams over ``seqs`` (0 when there are none)."""
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def vocab_substring_bias(tokenizer: Tokenizer, vocab_size: int, substrings: Sequence[str],
                         bias: float, keep_ids: Sequence[int] = ()) -> Optional[np.ndarray]:
    """``[V]`` float32: ``bias`` on tokens whose text contains any of ``substrings`` (except
    ``keep_ids``), 0 elsewhere; model ids the tokenizer does not know are always disallowed.
    None when nothing is biased."""
    subs = [s for s in substrings if s]
    n_tok = min(tokenizer.vocab_size, vocab_size)
    out = np.zeros(vocab_size, np.float32)
    out[n_tok:] = -1e9
    if subs:
        texts = tokenizer.backend.decode_batch([[i] for i in range(n_tok)],
                                               skip_special_tokens=False)
        hit = np.array([any(s in t for s in subs) for t in texts], bool)
        out[:n_tok][hit] = bias
    out[list(keep_ids)] = 0.0
    return out if np.any(out != 0) else None


def penalised_token_mask(tokenizer: Tokenizer, vocab_size: int, substrings: Sequence[str] = (),
                         exact: Sequence[str] = (), keep_ids: Sequence[int] = (),
                         special: bool = False) -> np.ndarray:
    """Bool ``[vocab_size]``: tokenizer ids whose decoded text contains one of ``substrings``
    or equals one of ``exact`` (e.g. ``"<|endoftext|>"``, ``"Mr"``), and with ``special``
    every special token (BOS, EOS, the tokenizer's added special tokens), except
    ``keep_ids``."""
    subs = [x for x in substrings if x]
    ex = {x for x in exact if x}
    n_tok = min(tokenizer.vocab_size, vocab_size)
    out = np.zeros(vocab_size, bool)
    if subs or ex:
        texts = tokenizer.backend.decode_batch([[i] for i in range(n_tok)],
                                               skip_special_tokens=False)
        out[:n_tok] = [t in ex or any(x in t for x in subs) for t in texts]
    if special:
        ids = [i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special]
        ids += [i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None]
        out[[i for i in ids if 0 <= i < n_tok]] = True
    out[list(keep_ids)] = False
    return out


def penalised_reward_prefixes(cfg: ModelConfig, params: Any, prompt_tokens: jax.Array,
                              prompt_mask: jax.Array, tokens: jax.Array, lengths: jax.Array,
                              term_ids: Sequence[int], bias: Optional[jax.Array] = None
                              ) -> RewardScores:
    """:func:`~gfn_jax.scoring.score_reward_prefixes` under the penalised, renormalised LM
    ``p~(v | s) = softmax(logits(s) + bias)[v]``: ``log_pz [B, T+1]`` = log p~(z_<i | X) and
    ``log_pterm [B, T+1]`` = log p~(⊤ | X z_<i) (0 beyond each row's length). One forward
    pass; ``bias=None`` is the plain LM (exactly ``score_reward_prefixes``)."""
    # the scorer computes the vocabulary softmax in chunks of positions: the [B, T+1, V]
    # logits never exist at once
    return score_reward_prefixes(cfg, params, prompt_tokens, prompt_mask, tokens, lengths,
                                 term_ids, logit_bias=bias)


@functools.partial(jax.jit, static_argnames=("cfg", "term_ids"))
def _final_log_reward(params: Any, pt: jax.Array, pm: jax.Array, z: jax.Array,
                      lengths: jax.Array, bias: Optional[jax.Array], *, cfg: ModelConfig,
                      term_ids: Tuple[int, ...]):
    r = penalised_reward_prefixes(cfg, params, pt, pm, z, lengths, term_ids, bias)
    full = r.log_pz + r.log_pterm
    return jnp.take_along_axis(full, lengths[:, None], axis=1)[:, 0]


def _group(samples: Sequence[Dict[str, Any]]) -> Dict[str, List[int]]:
    """Sample indices per prompt, in first-seen prompt order."""
    groups: Dict[str, List[int]] = defaultdict(list)
    for k, s in enumerate(samples):
        groups[s["prompt"]].append(k)
    return groups


class ContinuationTask(Task):
    """Sentence continuation with reward ``p_base(Z ⊤ | X)``."""

    name = "continuation"

    DEFAULTS = {
        "data_path": DEFAULT_PROMPTS,  # one prompt per line
        "num_prompts": 0,  # the first N prompts (after the length filter); 0 = all
        "prompt_prefix": "",
        "prompt_suffix": "",
        "term_tokens": ("\n",),  # texts whose tokens terminate Z (⊤)
        "use_eos": True,  # the tokenizer's EOS terminates too
        "min_len": 1,
        "max_len": 12,
        "disallow_substrings": (),  # tokens containing these cannot be inside Z ...
        "illegal_tokens": (),  # ... nor tokens whose text is exactly one of these
        "penalty": "soft",  # soft (the release: penalty + renormalise) | hard (mask)
        "policy_penalty": -99.0,  # soft: added to those tokens' policy logits
        "reward_penalty": -50.0,  # soft: added to their reward-LM logits (renormalised)
        "penalise_reward": True,  # False: the reward LM is left unpenalised
        "penalise_special_tokens": False,  # also penalise BOS/EOS/added special tokens
        "disallow_bias": 0.0,  # legacy: < 0 overrides the policy's penalty; 0 = from penalty
        "eval_batch_size": 64,
        "max_prompt_tokens": 0,  # drop longer prompts; 0 = keep all
        "num_eval": 0,  # the last N prompts are held out for eval_prompts(); 0 = none
        "keep_trailing_space": True,  # keep each line's trailing spaces (the release does)
        "diversity_encoder": "",  # evaluate(): sentence encoder for embedding diversity
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        c = {**self.DEFAULTS, **dict(config)}
        self.data_path = str(c["data_path"])
        self.num_prompts = int(c["num_prompts"])
        self.prompt_prefix = str(c["prompt_prefix"])
        self.prompt_suffix = str(c["prompt_suffix"])
        self.term_tokens = tuple(c["term_tokens"])
        self.use_eos = bool(c["use_eos"])
        self.min_len = int(c["min_len"])
        self.max_len = int(c["max_len"])
        self.disallow_substrings = tuple(c["disallow_substrings"])
        self.illegal_tokens = tuple(str(x) for x in c["illegal_tokens"])
        self.penalty = str(c["penalty"])
        self.policy_penalty = float(c["policy_penalty"])
        self.reward_penalty = float(c["reward_penalty"])
        self.penalise_reward = bool(c["penalise_reward"])
        self.penalise_special = bool(c["penalise_special_tokens"])
        self.disallow_bias = float(c["disallow_bias"])
        self.eval_batch_size = int(c["eval_batch_size"])
        self.max_prompt_tokens = int(c["max_prompt_tokens"])
        self.num_eval = int(c["num_eval"])
        self.keep_trailing_space = bool(c["keep_trailing_space"])
        self.diversity_encoder = str(c["diversity_encoder"] or "")
        self._encoder: Any = None
        if self.penalty not in PENALTIES:
            raise ValueError(f"task.penalty must be one of {PENALTIES}, got {self.penalty!r}")
        for key in ("policy_penalty", "reward_penalty"):
            if getattr(self, key) > 0:
                raise ValueError(f"task.{key} must be <= 0, got {getattr(self, key)}")
        if self.num_eval < 0:
            raise ValueError(f"task.num_eval must be >= 0, got {self.num_eval}")
        if self.num_prompts < 0:
            raise ValueError(f"task.num_prompts must be >= 0, got {self.num_prompts}")
        if not 0 <= self.min_len <= self.max_len or self.max_len < 1:
            raise ValueError(f"need 0 <= task.min_len <= task.max_len and max_len >= 1, "
                             f"got min_len={self.min_len}, max_len={self.max_len}")
        if self.disallow_bias > 0:
            raise ValueError(f"task.disallow_bias must be <= 0, got {self.disallow_bias}")
        self._prompts: Optional[List[str]] = None
        self._reward_params: Any = None
        # the data file is read (and its absence reported) at construction
        self._prompts = self._load_prompts()

    # --- data ---------------------------------------------------------------
    def _load_prompts(self) -> List[str]:
        # with a token-length filter the first num_prompts are chosen after filtering (setup)
        lines = read_prompt_lines(self.data_path, 0 if self.max_prompt_tokens else
                                  self.num_prompts, self.data_root,
                                  keep_trailing_space=self.keep_trailing_space)
        return [self.prompt_prefix + s + self.prompt_suffix for s in lines]

    def _num_train(self) -> int:
        """How many of the loaded prompts are training prompts (the rest are held out)."""
        assert self._prompts is not None
        n = len(self._prompts)
        if self.num_eval and self.num_eval >= n:
            where = resolve_data_path(self.data_path, self.data_root)
            raise ValueError(f"task.num_eval={self.num_eval} leaves no training prompt: "
                             f"{where!r} gave {n} prompt(s)")
        return n - self.num_eval

    def _select(self, keep: List[int]) -> None:
        """Keep only the prompts at indices ``keep`` (in order)."""
        assert self._prompts is not None
        self._prompts = [self._prompts[k] for k in keep]

    def _filter_by_length(self) -> None:
        if not self.max_prompt_tokens:
            return
        assert self._prompts is not None
        keep = [k for k, p in enumerate(self._prompts)
                if len(self.encode_prompt(p)) <= self.max_prompt_tokens]
        if not keep:
            where = resolve_data_path(self.data_path, self.data_root)
            raise ValueError(f"no prompt in {where!r} has at most "
                             f"task.max_prompt_tokens={self.max_prompt_tokens} tokens")
        self._select(keep[: self.num_prompts] if self.num_prompts else keep)

    STREAM_FIELDS = ("X",)

    def stream_prompt(self, record: Any) -> str:
        """A streamed record's prompt (``data.source``): its X inside ``task.prompt_prefix``
        / ``task.prompt_suffix``, as the lines of ``task.data_path`` are."""
        return self.prompt_prefix + str(record["X"]) + self.prompt_suffix

    def train_prompts(self) -> List[str]:
        """The training prompts: all loaded prompts but the last ``task.num_eval``."""
        assert self._prompts is not None
        return list(self._prompts[: self._num_train()])

    def eval_prompts(self) -> List[str]:
        """The last ``task.num_eval`` loaded prompts (held out), or the training prompts
        when ``num_eval`` is 0."""
        assert self._prompts is not None
        if not self.num_eval:
            return self.train_prompts()
        return list(self._prompts[self._num_train():])

    def build_tokenizer(self) -> Optional[Tokenizer]:
        """For ``model.spec='random'`` (tests): the byte-level tiny tokenizer."""
        from gfn_jax.models.registry import tiny_tokenizer

        return tiny_tokenizer()

    # --- set-up -------------------------------------------------------------
    def setup(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        super().setup(model_config, tokenizer)
        term = list(tokenizer.ids_of(self.term_tokens)) if self.term_tokens else []
        if self.use_eos and tokenizer.eos_id is not None:
            term.append(int(tokenizer.eos_id))
        if not term:
            raise ValueError("the task needs at least one termination token: set "
                             "task.term_tokens or task.use_eos")
        self.term_ids: Tuple[int, ...] = tuple(sorted(set(term)))
        self._filter_by_length()
        if max(self.term_ids) >= model_config.vocab_size:
            raise ValueError(f"termination ids {self.term_ids} do not fit the model's vocabulary "
                             f"({model_config.vocab_size})")
        V = model_config.vocab_size
        self.penalised = penalised_token_mask(tokenizer, V, self.disallow_substrings,
                                              self.illegal_tokens, keep_ids=self.term_ids,
                                              special=self.penalise_special)
        hard = self.penalty == "hard"
        pol = self.disallow_bias if self.disallow_bias < 0 else (
            HARD if hard else self.policy_penalty)
        bias = np.where(self.penalised, np.float32(pol), np.float32(0.0)).astype(np.float32)
        bias[min(tokenizer.vocab_size, V):] = HARD  # ids the tokenizer cannot decode
        bias[list(self.term_ids)] = 0.0
        self._bias = bias if np.any(bias != 0) else None
        rew = HARD if hard else self.reward_penalty
        self._reward_bias = (np.where(self.penalised, np.float32(rew), np.float32(0.0))
                             .astype(np.float32)
                             if self.penalise_reward and self.penalised.any() and rew < 0
                             else None)

    def reward_logit_bias(self) -> Optional[np.ndarray]:
        """The ``[V]`` penalty added to the reward LM's logits before renormalising (None:
        the plain LM)."""
        return self._reward_bias

    def bind_reward_params(self, params: Any) -> None:
        """Give :meth:`evaluate` the base (reward) parameters, to report ``log p_base``."""
        self._reward_params = params

    # --- policy -------------------------------------------------------------
    def policy_spec(self) -> PolicySpec:
        return PolicySpec(term_ids=self.term_ids, max_len=self.max_len, min_len=self.min_len)

    def policy_logit_bias(self) -> Optional[np.ndarray]:
        return self._bias

    # --- reward -------------------------------------------------------------
    def log_reward(self, model_config: ModelConfig, base_params: Any, batch: Batch) -> jax.Array:
        """``log p~(z_<i ⊤ | X)`` for every prefix i, ``[B, T+1]`` (one forward pass; p~ is the
        reward LM with :meth:`reward_logit_bias` added and renormalised)."""
        r = penalised_reward_prefixes(model_config, base_params, batch["prompt_tokens"],
                                      batch["prompt_mask"], batch["tokens"], batch["lengths"],
                                      self.term_ids, self._reward_bias_array())
        return r.log_pz + r.log_pterm

    def _reward_bias_array(self) -> Optional[jax.Array]:
        b = self.reward_logit_bias()
        return None if b is None else jnp.asarray(b)

    # --- evaluation ---------------------------------------------------------
    def _pack(self, samples: Sequence[Dict[str, Any]], rows: Sequence[int]
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Left-padded prompts and right-padded continuations of ``samples[rows]`` (fixed
        shapes: ``eval_batch_size`` rows, prompts padded to a multiple of 16)."""
        assert self.tokenizer is not None
        pids = [self.encode_prompt(samples[r]["prompt"]) for r in rows]
        B, T = self.eval_batch_size, self.max_len
        longest = max(len(p) for p in pids)
        room = self.model_config.max_seq_len - T - self._extra_len()
        P = max(longest, min(max(16, -(-longest // 16) * 16), room))
        pad = self.tokenizer.pad_id or 0
        pt = np.full((B, P), pad, np.int32)
        pm = np.zeros((B, P), np.int32)
        z = np.full((B, T), pad, np.int32)
        n = np.zeros(B, np.int32)
        pt[:, -1], pm[:, -1] = pad, 1  # dummy rows: a one-token prompt, empty Z
        for j, (r, p) in enumerate(zip(rows, pids)):
            toks = list(samples[r]["tokens"])[:T]
            pt[j], pm[j] = pad, 0
            pt[j, P - len(p):], pm[j, P - len(p):] = p, 1
            z[j, :len(toks)], n[j] = toks, len(toks)
        return pt, pm, z, n

    def _extra_len(self) -> int:
        """Tokens the reward appends after Z (none here; the suffix for infilling)."""
        return 0

    def base_log_reward(self, samples: Sequence[Dict[str, Any]]) -> Optional[np.ndarray]:
        """Untempered ``log R`` of each sample's full trajectory under the bound base
        parameters (None if :meth:`bind_reward_params` was never called)."""
        if self._reward_params is None or not samples:
            return None
        out = []
        for s in range(0, len(samples), self.eval_batch_size):
            rows = list(range(s, min(s + self.eval_batch_size, len(samples))))
            pt, pm, z, n = self._pack(samples, rows)
            v = self._final_batch_log_reward(pt, pm, z, n, samples, rows)
            out.append(np.asarray(v)[: len(rows)])
        return np.concatenate(out)

    def _final_batch_log_reward(self, pt: np.ndarray, pm: np.ndarray, z: np.ndarray,
                                n: np.ndarray, samples: Sequence[Dict[str, Any]],
                                rows: Sequence[int]) -> np.ndarray:
        """log R of each packed row's full trajectory (one jitted call, fixed shapes; the
        rows split over the mesh the reward parameters live on)."""
        rows_in = parallel.split_rows(self._reward_params, pt, pm, z, n)
        out = _final_log_reward(self._reward_params, *rows_in, self._reward_bias_array(),
                                cfg=self.model_config, term_ids=self.term_ids)
        return parallel.to_host(out)[:len(pt)]

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """The release's continuation metrics, within each prompt's samples and then averaged
        over prompts:

        * ``logp_mean`` / ``logp_max``: the mean and the max of ``log p~(Z⊤ | X)`` (the
          penalised, renormalised reward LM; untempered) over a prompt's samples (when reward
          parameters are bound); ``mean_log_p_base`` / ``max_log_p_base`` are the mean and
          max over all samples;
        * ``embedding_diversity``: 1 - mean pairwise cosine similarity of the samples' sentence
          embeddings (``task.diversity_encoder``; prompts with one sample are skipped);
        * ``distinct_{1,2,3}`` (token n-grams), ``word_distinct_{1,2}`` (whitespace words),
          ``unique_fraction``; plus ``mean_length`` and ``mean_log_q``.
        """
        m: Dict[str, float] = {"num_samples": float(len(samples))}
        if not samples:
            return m
        groups = _group(samples)
        m["num_prompts"] = float(len(groups))
        toks = [list(s["tokens"]) for s in samples]
        for k in (1, 2, 3):
            m[f"distinct_{k}"] = float(np.mean([distinct_n([toks[i] for i in g], k)
                                                for g in groups.values()]))
        from gfn_jax import text_metrics

        texts = [str(s.get("text", "")) for s in samples]
        for k in (1, 2):
            m[f"word_distinct_{k}"] = float(np.mean(
                [text_metrics.distinct_n([texts[i] for i in g], k) for g in groups.values()]))
        m["unique_fraction"] = float(np.mean(
            [len({tuple(toks[i]) for i in g}) / len(g) for g in groups.values()]))
        m["mean_length"] = float(np.mean([len(t) for t in toks]))
        m["mean_log_q"] = float(np.mean([s.get("log_q", np.nan) for s in samples]))
        lr = self.base_log_reward(samples)
        if lr is not None:
            m["mean_log_p_base"] = float(np.mean(lr))
            m["max_log_p_base"] = float(np.max(lr))
            m["logp_mean"] = float(np.mean([np.mean(lr[g]) for g in groups.values()]))
            m["logp_max"] = float(np.mean([np.max(lr[g]) for g in groups.values()]))
        div = self.embedding_diversity(samples)
        if div is not None:
            m["embedding_diversity"] = div
        return m

    def sentence_encoder(self) -> Any:
        """The sentence encoder named by ``task.diversity_encoder`` (loaded once), or None."""
        if not self.diversity_encoder:
            return None
        if self._encoder is None:
            from gfn_jax.text_metrics import load_sentence_encoder

            self._encoder = load_sentence_encoder(self.diversity_encoder)
        return self._encoder

    def set_sentence_encoder(self, encoder: Any) -> None:
        """Use ``encoder`` (texts -> [n, d]) for embedding diversity (tests, shared models)."""
        self._encoder = encoder
        self.diversity_encoder = self.diversity_encoder or "custom"

    def embedding_diversity(self, samples: Sequence[Dict[str, Any]]) -> Optional[float]:
        """1 - mean pairwise cosine similarity of the sample texts' embeddings within each
        prompt, averaged over prompts with at least two samples (None without an encoder)."""
        enc = self.sentence_encoder()
        if enc is None:
            return None
        from gfn_jax.text_metrics import embedding_diversity

        gs = [[str(samples[i].get("text", "")) for i in g] for g in _group(samples).values()]
        gs = [g for g in gs if len(g) >= 2]
        return embedding_diversity(gs, enc) if gs else None
