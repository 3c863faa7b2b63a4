"""Next-sentence continuation (Hu et al. 2024, Sec. 4.1): sample likely *and* diverse
continuations Z of a prompt sentence X.

The reward is the base LM's own likelihood of the terminated continuation,
``log R(X Z ⊤) = log p_base(Z ⊤ | X)``, for every prefix at once via one
:func:`gfn_jax.scoring.score_reward_prefixes` pass (``log_pz + log_pterm``). The trainer
tempers it (``reward.temp_*``): the GFlowNet target is ``q(Z⊤ | X) ∝ p_base(Z⊤ | X)^{1/T}``.
⊤ is a set of tokens (``task.term_tokens``, default newline, plus ``eos`` with
``task.use_eos``); the policy may additionally be barred from (or penalised for) every other
vocabulary token whose text contains one of ``task.disallow_substrings`` (a policy logit
bias, as in the paper: the sentence can only end through a termination token).

Config keys (``config.task``): ``data_path`` (one prompt per line; relative paths are resolved
against the repository root, default ``../shared/data/openwebtext/prompts.txt``),
``num_prompts`` (0 = all), ``prompt_prefix``/``prompt_suffix`` (wrapped around each line),
``term_tokens``, ``use_eos``, ``min_len``, ``max_len``, ``disallow_substrings``,
``disallow_bias`` (<= -1e8 forbids, a finite value only penalises), ``max_prompt_tokens``
(0 = no limit; otherwise longer prompts are dropped at ``setup``, before ``num_prompts`` is
applied), ``eval_batch_size`` (rows per scoring call in :meth:`evaluate`).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.logprobs import PolicySpec
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.scoring import score_reward_prefixes
from gfn_jax.tasks.base import Batch, Task

DEFAULT_PROMPTS = "../shared/data/openwebtext/prompts.txt"

__all__ = [
    "ContinuationTask",
    "resolve_data_path",
    "read_prompt_lines",
    "distinct_n",
    "vocab_substring_bias",
]


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
                      skip_bad: bool = False) -> List[str]:
    """Non-empty lines of a UTF-8 text file (trailing whitespace stripped), the first ``num``
    if > 0. A line that is not UTF-8 is a ``ValueError`` naming the file and line, or, with
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
        line = line.rstrip()
        if line:
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


@functools.partial(jax.jit, static_argnames=("cfg", "term_ids"))
def _final_log_reward(params: Any, pt: jax.Array, pm: jax.Array, z: jax.Array,
                      lengths: jax.Array, *, cfg: ModelConfig, term_ids: Tuple[int, ...]):
    r = score_reward_prefixes(cfg, params, pt, pm, z, lengths, term_ids)
    full = r.log_pz + r.log_pterm
    return jnp.take_along_axis(full, lengths[:, None], axis=1)[:, 0]


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
        "disallow_substrings": (),  # tokens containing these are forbidden inside Z
        "disallow_bias": -1e9,  # logit bias on those tokens (finite: a soft penalty)
        "eval_batch_size": 64,
        "max_prompt_tokens": 0,  # drop longer prompts; 0 = keep all
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
        self.disallow_bias = float(c["disallow_bias"])
        self.eval_batch_size = int(c["eval_batch_size"])
        self.max_prompt_tokens = int(c["max_prompt_tokens"])
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
                                  self.num_prompts, self.data_root)
        return [self.prompt_prefix + s + self.prompt_suffix for s in lines]

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

    def train_prompts(self) -> List[str]:
        assert self._prompts is not None
        return list(self._prompts)

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
        self._bias = vocab_substring_bias(tokenizer, model_config.vocab_size,
                                          self.disallow_substrings, self.disallow_bias,
                                          keep_ids=self.term_ids)

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
        """``log p_base(z_<i ⊤ | X)`` for every prefix i, ``[B, T+1]`` (one forward pass)."""
        r = score_reward_prefixes(model_config, base_params, batch["prompt_tokens"],
                                  batch["prompt_mask"], batch["tokens"], batch["lengths"],
                                  self.term_ids)
        return r.log_pz + r.log_pterm

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
                                rows: Sequence[int]) -> jax.Array:
        """log R of each packed row's full trajectory (one jitted call, fixed shapes)."""
        return _final_log_reward(self._reward_params, jnp.asarray(pt), jnp.asarray(pm),
                                 jnp.asarray(z), jnp.asarray(n), cfg=self.model_config,
                                 term_ids=self.term_ids)

    def evaluate(self, samples: Sequence[Dict[str, Any]], out_dir: Optional[str] = None,
                 tag: str = "") -> Dict[str, float]:
        """Mean length, distinct-1/2/3 and unique fraction (within each prompt's samples,
        averaged over prompts), mean policy log q, and the mean base log-likelihood
        ``log p_base(Z⊤|X)`` when base parameters are bound."""
        m: Dict[str, float] = {"num_samples": float(len(samples))}
        if not samples:
            return m
        groups: Dict[str, List[List[int]]] = defaultdict(list)
        for s in samples:
            groups[s["prompt"]].append(list(s["tokens"]))
        for k in (1, 2, 3):
            m[f"distinct_{k}"] = float(np.mean([distinct_n(g, k) for g in groups.values()]))
        m["unique_fraction"] = float(np.mean(
            [len({tuple(x) for x in g}) / len(g) for g in groups.values()]))
        m["mean_length"] = float(np.mean([len(s["tokens"]) for s in samples]))
        m["mean_log_q"] = float(np.mean([s.get("log_q", np.nan) for s in samples]))
        lr = self.base_log_reward(samples)
        if lr is not None:
            m["mean_log_p_base"] = float(np.mean(lr))
            m["max_log_p_base"] = float(np.max(lr))
        return m
