"""Host-side replay buffer of high-reward trajectories, per prompt (numpy only).

For every prompt key the buffer keeps the top ``capacity`` *distinct* trajectories by
untempered final log R. A trajectory is its generated token ids ``Z`` (without the
terminal ⊤), its ``log_r``, optional per-step arrays (first axis of length ``len(Z)`` or
``len(Z) + 1``, e.g. a tool-splice ``action_mask`` or prefix log R) and a small
JSON-able dict of extras.

Deduplication: an exact duplicate is never stored twice, and with ``dedup_fraction > 0``
two trajectories whose token edit (Levenshtein) distance is below
``dedup_fraction * max(len_a, len_b)`` are near-duplicates; of such a pair only the one
with the higher log R is kept (on a tie, the one already stored).

Sampling draws uniformly or proportionally to ``exp(log_r / temperature)`` (the stored
untempered log R re-tempered with the current reward temperature), with or without
replacement, from a seeded ``numpy.random.Generator`` whose state is part of the
serialised state, so sampling after a reload continues identically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["ReplayEntry", "ReplayBuffer", "edit_distances", "edit_distance_lower_bounds", "collate"]

_FORMAT_VERSION = 1


@dataclasses.dataclass
class ReplayEntry:
    """One stored trajectory."""

    tokens: np.ndarray  # int32 [n], the Z part without the terminal token
    log_r: float  # untempered final-state log R
    arrays: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    extras: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# ---------------------------------------------------------------------------
# Edit distance
# ---------------------------------------------------------------------------
def edit_distances(a: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """Levenshtein distances between token sequence ``a`` and each of ``others``.

    One dynamic-programming pass over ``a``'s tokens, vectorised over all ``others`` at
    once (padded to a common length; a column depends only on earlier columns, so the
    padding never affects the entries read back). Insertions along a row are resolved
    with a running minimum: ``cur[j] = min_k<=j (tmp[k] + j - k)``.
    """
    a = np.asarray(a, np.int64).reshape(-1)
    m = len(others)
    if m == 0:
        return np.zeros((0,), np.int64)
    lens = np.array([len(o) for o in others], np.int64)
    width = int(lens.max()) if m else 0
    B = np.full((m, width), -1, np.int64)  # -1 never equals a token id (>= 0)
    for i, o in enumerate(others):
        B[i, : len(o)] = o
    cols = np.arange(width + 1, dtype=np.int64)
    prev = np.broadcast_to(cols, (m, width + 1)).copy()
    for i, tok in enumerate(a, start=1):
        sub = prev[:, :-1] + (B != tok)  # substitute / match
        tmp = np.empty_like(prev)
        tmp[:, 0] = i
        tmp[:, 1:] = np.minimum(prev[:, 1:] + 1, sub)  # delete from a, or substitute
        prev = np.minimum.accumulate(tmp - cols, axis=1) + cols  # insert into a
    return prev[np.arange(m), lens]


def _multiset_keys(tokens: np.ndarray) -> np.ndarray:
    """Unique int64 keys (token, occurrence number) so that multiset intersections are
    plain set intersections."""
    t = np.sort(np.asarray(tokens, np.int64))
    first = np.searchsorted(t, t, side="left")
    return t * (1 << 24) + (np.arange(len(t)) - first)


def edit_distance_lower_bounds(a: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """Cheap lower bounds ``max(len_a, len_b) - |multiset(a) & multiset(b)|`` on the
    Levenshtein distances (an alignment matches at most that many equal tokens and
    every unmatched token of the longer sequence costs at least one edit)."""
    ka = _multiset_keys(a)
    out = np.empty(len(others), np.int64)
    for i, o in enumerate(others):
        common = len(np.intersect1d(ka, _multiset_keys(o), assume_unique=True))
        out[i] = max(len(ka), len(o)) - common
    return out


# ---------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------
def _check_tokens(tokens: Any, where: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{where}: tokens must be a 1-D array of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: tokens must have an integer dtype, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: token ids must lie in [0, 2**31), got {arr.min()}..{arr.max()}")
    return arr.astype(np.int32, copy=True)


def _check_log_r(log_r: Any, where: str) -> float:
    arr = np.asarray(log_r)
    if arr.shape != () or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{where}: log_r must be a real scalar, got {log_r!r}")
    val = float(arr)
    if not math.isfinite(val):
        raise ValueError(f"{where}: log_r must be finite, got {val}")
    return val


def _check_extras(extras: Optional[Mapping[str, Any]], where: str) -> Dict[str, Any]:
    if extras is None:
        return {}
    if not isinstance(extras, Mapping):
        raise TypeError(f"{where}: extras must be a dict, got {type(extras).__name__}")
    try:
        return json.loads(json.dumps(dict(extras)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: extras must be JSON-serialisable: {e}") from None


# ---------------------------------------------------------------------------
# The buffer
# ---------------------------------------------------------------------------
class ReplayBuffer:
    """Top-K distinct trajectories per prompt key, with tempered sampling.

    Args:
      capacity: K, the number of trajectories kept per prompt key.
      dedup_fraction: near-duplicate threshold in [0, 1); 0 keeps only exact dedup.
      seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int, dedup_fraction: float = 0.0, seed: int = 0) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not 0.0 <= dedup_fraction < 1.0:
            raise ValueError(f"dedup_fraction must be in [0, 1), got {dedup_fraction!r}")
        self.capacity = int(capacity)
        self.dedup_fraction = float(dedup_fraction)
        self.rng = np.random.default_rng(seed)
        # per key: entries sorted by log_r descending (stable: older first on ties)
        self._entries: Dict[str, List[ReplayEntry]] = {}
        self._array_spec: Dict[str, Tuple[int, str, Tuple[int, ...]]] = {}  # name -> (offset, dtype, tail)

    # --- inspection --------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def size(self, prompt_key: str) -> int:
        """Number of trajectories stored for ``prompt_key`` (0 if unknown)."""
        return len(self._entries.get(prompt_key, ()))

    def keys(self) -> List[str]:
        """Prompt keys with at least one stored trajectory, in first-seen order."""
        return [k for k, v in self._entries.items() if v]

    def entries(self, prompt_key: str) -> List[ReplayEntry]:
        """The stored trajectories of ``prompt_key``, best log R first (a copy of the list)."""
        return list(self._entries.get(prompt_key, ()))

    def stats(self, prompt_key: Optional[str] = None) -> Dict[str, Union[int, float]]:
        """``count``, ``best_log_r``, ``mean_log_r`` (NaN when empty) and ``num_keys``,
        over one key or, by default, the whole buffer."""
        if prompt_key is None:
            rows = [e for v in self._entries.values() for e in v]
        else:
            rows = self._entries.get(prompt_key, [])
        lr = np.array([e.log_r for e in rows], np.float64)
        return {
            "count": len(rows),
            "num_keys": len(self.keys()) if prompt_key is None else int(bool(rows)),
            "best_log_r": float(lr.max()) if len(lr) else float("nan"),
            "mean_log_r": float(lr.mean()) if len(lr) else float("nan"),
        }

    # --- insertion ---------------------------------------------------------
    def _check_arrays(
        self, arrays: Optional[Mapping[str, Any]], n: int, where: str
    ) -> Dict[str, np.ndarray]:
        if arrays is None:
            return {}
        if not isinstance(arrays, Mapping):
            raise TypeError(f"{where}: arrays must be a dict of per-step arrays")
        out = {}
        for name, x in arrays.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"{where}: array name {name!r} must be a non-empty str without '/'")
            arr = np.array(x, copy=True)
            if arr.ndim < 1 or arr.shape[0] not in (n, n + 1):
                raise ValueError(
                    f"{where}: per-step array {name!r} has shape {arr.shape}; its first axis must "
                    f"have length len(tokens)={n} or len(tokens)+1={n + 1}"
                )
            if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
                raise TypeError(f"{where}: per-step array {name!r} has non-numeric dtype {arr.dtype}")
            spec = (arr.shape[0] - n, arr.dtype.str, arr.shape[1:])
            known = self._array_spec.get(name)
            if known is not None and known != spec:
                raise ValueError(
                    f"{where}: per-step array {name!r} has (length - len(tokens), dtype, trailing "
                    f"shape) = {spec} but earlier rows had {known}"
                )
            out[name] = arr
        for name, arr in out.items():  # commit specs only once the whole row is valid
            self._array_spec.setdefault(name, (arr.shape[0] - n, arr.dtype.str, arr.shape[1:]))
        return out

    def add(
        self,
        prompt_key: str,
        tokens: Any,
        log_r: Any,
        arrays: Optional[Mapping[str, Any]] = None,
        extras: Optional[Mapping[str, Any]] = None,
    ) -> bool:
        """Offer one trajectory; returns True iff it is stored (it may evict others)."""
        if not isinstance(prompt_key, str):
            raise TypeError(f"prompt_key must be a str, got {type(prompt_key).__name__}")
        where = f"replay row for prompt {prompt_key!r}"
        toks = _check_tokens(tokens, where)
        lr = _check_log_r(log_r, where)
        ex = _check_extras(extras, where)
        arrs = self._check_arrays(arrays, len(toks), where)
        entry = ReplayEntry(toks, lr, arrs, ex)
        rows = self._entries.setdefault(prompt_key, [])
        # near (or exact) duplicates among the stored rows
        if rows:
            same_len = np.array([len(e) == len(toks) for e in rows])
            exact = np.array(
                [s and np.array_equal(e.tokens, toks) for s, e in zip(same_len, rows)]
            )
            near = exact.copy()
            if self.dedup_fraction > 0:
                lens = np.array([len(e) for e in rows])
                thr = self.dedup_fraction * np.maximum(lens, len(toks))
                cand = np.flatnonzero(~exact & (np.abs(lens - len(toks)) < thr))
                if len(cand):
                    lb = edit_distance_lower_bounds(toks, [rows[i].tokens for i in cand])
                    cand = cand[lb < thr[cand]]
                if len(cand):
                    d = edit_distances(toks, [rows[i].tokens for i in cand])
                    near[cand[d < thr[cand]]] = True
            idx = np.flatnonzero(near)
            if len(idx) and max(rows[i].log_r for i in idx) >= lr:
                return False
            for i in sorted(idx, reverse=True):  # the newcomer beats all its neighbours
                del rows[i]
        if len(rows) >= self.capacity and rows[-1].log_r >= lr:
            return False
        pos = len(rows)
        while pos > 0 and rows[pos - 1].log_r < lr:
            pos -= 1
        rows.insert(pos, entry)
        del rows[self.capacity :]
        return True

    def add_batch(
        self,
        prompt_keys: Union[str, Sequence[str]],
        sequences: Sequence[Any],
        log_rs: Sequence[Any],
        arrays: Optional[Mapping[str, Sequence[Any]]] = None,
        extras: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
        lengths: Optional[Sequence[int]] = None,
    ) -> np.ndarray:
        """Offer a batch; returns a bool array, True where the row was stored.

        ``sequences`` is a list of 1-D token arrays or a padded 2-D array together with
        ``lengths`` (row ``i`` is ``sequences[i, :lengths[i]]``; per-step arrays are then
        cut to ``lengths[i]`` plus their own offset of 0 or 1 — the offset is inferred from
        a row's width: width ``W`` of tokens means arrays of width ``W`` or ``W + 1``).
        ``prompt_keys`` is one key for all rows or one per row; ``arrays`` maps a name to a
        per-row sequence; ``extras`` is one dict (or None) per row.
        """
        n = len(sequences)
        keys = [prompt_keys] * n if isinstance(prompt_keys, str) else list(prompt_keys)
        if len(keys) != n or len(log_rs) != n:
            raise ValueError(
                f"add_batch: got {n} sequences, {len(keys)} prompt keys and {len(log_rs)} log_rs"
            )
        if extras is not None and len(extras) != n:
            raise ValueError(f"add_batch: got {len(extras)} extras for {n} sequences")
        arrays = dict(arrays or {})
        for name, col in arrays.items():
            if len(col) != n:
                raise ValueError(f"add_batch: array {name!r} has {len(col)} rows for {n} sequences")
        if lengths is not None:
            seq2d = np.asarray(sequences)
            if seq2d.ndim != 2 or len(lengths) != n:
                raise ValueError("add_batch: with lengths, sequences must be a 2-D [n, W] array")
            W = seq2d.shape[1]
            offs = {}
            for name, col in arrays.items():
                w = np.asarray(col).shape[1] if np.asarray(col).ndim >= 2 else -1
                if w not in (W, W + 1):
                    raise ValueError(
                        f"add_batch: padded array {name!r} has width {w}; expected {W} or {W + 1}"
                    )
                offs[name] = w - W
            lengths = [int(x) for x in lengths]
            if any(not 0 <= L <= W for L in lengths):
                raise ValueError(f"add_batch: lengths must lie in [0, {W}], got {lengths}")
            sequences = [seq2d[i, : lengths[i]] for i in range(n)]
            arrays = {
                name: [np.asarray(col)[i, : lengths[i] + offs[name]] for i in range(n)]
                for name, col in arrays.items()
            }
        out = np.zeros(n, bool)
        for i in range(n):
            row_arrays = {name: col[i] for name, col in arrays.items()}
            out[i] = self.add(
                keys[i], sequences[i], log_rs[i], row_arrays or None,
                None if extras is None else extras[i],
            )
        return out

    def seed(
        self,
        prompt_key: str,
        sequences: Sequence[Any],
        log_rs: Sequence[Any],
        arrays: Optional[Mapping[str, Sequence[Any]]] = None,
        extras: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    ) -> np.ndarray:
        """Seed ``prompt_key`` with given trajectories (same rules as :meth:`add_batch`)."""
        return self.add_batch(prompt_key, sequences, log_rs, arrays, extras)

    # --- sampling ----------------------------------------------------------
    def probabilities(
        self, prompt_key: str, temperature: Optional[float] = None
    ) -> np.ndarray:
        """Sampling distribution over :meth:`entries` order: uniform when ``temperature`` is
        None, else proportional to ``exp(log_r / temperature)``."""
        rows = self._entries.get(prompt_key, [])
        if not rows:
            raise KeyError(f"replay buffer has no trajectories for prompt {prompt_key!r}")
        if temperature is None:
            return np.full(len(rows), 1.0 / len(rows))
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        z = np.array([e.log_r for e in rows], np.float64) / float(temperature)
        w = np.exp(z - z.max())
        return w / w.sum()

    def sample_indices(
        self,
        prompt_key: str,
        n: int,
        temperature: Optional[float] = None,
        replace: bool = True,
    ) -> np.ndarray:
        """Indices into :meth:`entries` (see :meth:`sample`)."""
        if int(n) != n or n < 0:
            raise ValueError(f"number of samples must be a non-negative integer, got {n!r}")
        p = self.probabilities(prompt_key, temperature)
        if not replace and n > len(p):
            raise ValueError(
                f"cannot draw {n} trajectories without replacement: prompt {prompt_key!r} has "
                f"only {len(p)}"
            )
        if not replace:
            p = np.maximum(p, 0.0)
            if np.count_nonzero(p) < n:  # exp underflow: fall back to ranking order ties
                p = p + 1e-300
                p = p / p.sum()
        return self.rng.choice(len(p), size=int(n), replace=replace, p=p)

    def sample(
        self,
        prompt_key: str,
        n: int,
        temperature: Optional[float] = None,
        replace: bool = True,
    ) -> List[ReplayEntry]:
        """Draw ``n`` stored trajectories of ``prompt_key``: uniformly if ``temperature``
        is None, else with probability proportional to ``R^(1/T) = exp(log_r / T)``."""
        rows = self._entries.get(prompt_key, [])
        return [rows[i] for i in self.sample_indices(prompt_key, n, temperature, replace)]

    # --- serialisation -----------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """``{"meta": JSON-able dict, "arrays": {name: np.ndarray}}``.

        Rows are concatenated: ``tokens`` with ``token_offsets`` [N+1]; ``log_r`` [N];
        ``key_index`` [N] (into ``meta["keys"]``); and per named per-step array
        ``array/<name>`` with ``array_offsets/<name>`` [N+1] and ``array_present/<name>`` [N].
        """
        keys = list(self._entries)
        rows = [(ki, e) for ki, k in enumerate(keys) for e in self._entries[k]]
        tok_off = np.zeros(len(rows) + 1, np.int64)
        tok_off[1:] = np.cumsum([len(e) for _, e in rows])
        arrays: Dict[str, np.ndarray] = {
            "tokens": np.concatenate([e.tokens for _, e in rows]).astype(np.int32)
            if rows
            else np.zeros((0,), np.int32),
            "token_offsets": tok_off,
            "log_r": np.array([e.log_r for _, e in rows], np.float64),
            "key_index": np.array([ki for ki, _ in rows], np.int64),
        }
        for name, (_, dtype, tail) in self._array_spec.items():
            parts = [e.arrays[name] for _, e in rows if name in e.arrays]
            off = np.zeros(len(rows) + 1, np.int64)
            off[1:] = np.cumsum([e.arrays[name].shape[0] if name in e.arrays else 0 for _, e in rows])
            arrays[f"array/{name}"] = (
                np.concatenate(parts) if parts else np.zeros((0,) + tuple(tail), np.dtype(dtype))
            )
            arrays[f"array_offsets/{name}"] = off
            arrays[f"array_present/{name}"] = np.array([name in e.arrays for _, e in rows], bool)
        meta = {
            "format_version": _FORMAT_VERSION,
            "capacity": self.capacity,
            "dedup_fraction": self.dedup_fraction,
            "keys": keys,
            "extras": [e.extras for _, e in rows],
            "array_spec": {
                k: [off, dt, list(tail)] for k, (off, dt, tail) in self._array_spec.items()
            },
            "rng_state": _rng_state_to_json(self.rng.bit_generator.state),
        }
        return {"meta": meta, "arrays": arrays}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ReplayBuffer":
        """Rebuild a buffer (rows, order and sampling-generator state) from :meth:`state_dict`."""
        try:
            meta, arrays = state["meta"], state["arrays"]
        except (KeyError, TypeError):
            raise ValueError("replay state must be a dict with 'meta' and 'arrays'") from None
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"unsupported replay state format {meta.get('format_version')!r} "
                f"(expected {_FORMAT_VERSION})"
            )
        buf = cls(meta["capacity"], meta["dedup_fraction"])
        buf.rng.bit_generator.state = _rng_state_from_json(meta["rng_state"])
        buf._array_spec = {
            k: (int(v[0]), str(v[1]), tuple(int(t) for t in v[2]))
            for k, v in meta["array_spec"].items()
        }
        keys = list(meta["keys"])
        tokens = np.asarray(arrays["tokens"], np.int32)
        tok_off = np.asarray(arrays["token_offsets"], np.int64)
        log_r = np.asarray(arrays["log_r"], np.float64)
        key_index = np.asarray(arrays["key_index"], np.int64)
        n = len(log_r)
        if len(tok_off) != n + 1 or len(key_index) != n or len(meta["extras"]) != n:
            raise ValueError("replay state is inconsistent: row counts differ between fields")
        buf._entries = {k: [] for k in keys}
        for i in range(n):
            arrs = {}
            for name, (_, dtype, _) in buf._array_spec.items():
                off = np.asarray(arrays[f"array_offsets/{name}"], np.int64)
                if bool(arrays[f"array_present/{name}"][i]):
                    arrs[name] = np.asarray(arrays[f"array/{name}"][off[i] : off[i + 1]], np.dtype(dtype)).copy()
            e = ReplayEntry(
                tokens[tok_off[i] : tok_off[i + 1]].copy(), float(log_r[i]), arrs, dict(meta["extras"][i])
            )
            buf._entries[keys[int(key_index[i])]].append(e)
        return buf

    def save(self, path: str) -> None:
        """Write the state to one ``.npz`` file (metadata as a JSON string inside)."""
        state = self.state_dict()
        payload = {f"a:{k}": v for k, v in state["arrays"].items()}
        payload["meta_json"] = np.array(json.dumps(state["meta"]))
        tmp = path + ".tmp.npz"
        np.savez(tmp, **payload)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ReplayBuffer":
        """Read a buffer written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("a:")}
        return cls.from_state_dict({"meta": meta, "arrays": arrays})


def _rng_state_to_json(state: Mapping[str, Any]) -> Dict[str, Any]:
    """numpy bit-generator state -> JSON (big ints as decimal strings, arrays as lists)."""

    def enc(x):
        if isinstance(x, dict):
            return {k: enc(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.str}
        if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            return {"__int__": str(int(x))}
        return x

    return enc(dict(state))


def _rng_state_from_json(state: Mapping[str, Any]) -> Dict[str, Any]:
    def dec(x):
        if isinstance(x, dict):
            if "__int__" in x:
                return int(x["__int__"])
            if "__ndarray__" in x:
                return np.array(x["__ndarray__"], np.dtype(x["dtype"]))
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(dict(state))


def collate(
    entries: Sequence[ReplayEntry], width: Optional[int] = None, pad_id: int = 0
) -> Dict[str, np.ndarray]:
    """Right-pad sampled entries into a batch.

    Returns ``tokens`` int32 [n, W], ``lengths`` int32 [n], ``log_r`` float32 [n], and for
    each per-step array present in every entry ``<name>`` [n, W + offset, ...] (zero
    padded). ``width`` defaults to the longest entry; a shorter ``width`` raises.
    """
    n = len(entries)
    longest = max((len(e) for e in entries), default=0)
    W = longest if width is None else int(width)
    if W < longest:
        raise ValueError(f"collate: width={W} is shorter than the longest trajectory ({longest})")
    tokens = np.full((n, W), pad_id, np.int32)
    for i, e in enumerate(entries):
        tokens[i, : len(e)] = e.tokens
    out = {
        "tokens": tokens,
        "lengths": np.array([len(e) for e in entries], np.int32),
        "log_r": np.array([e.log_r for e in entries], np.float32),
    }
    names = set(entries[0].arrays) if entries else set()
    for e in entries[1:]:
        names &= set(e.arrays)
    for name in sorted(names):
        first = entries[0].arrays[name]
        off = first.shape[0] - len(entries[0])
        arr = np.zeros((n, W + off) + first.shape[1:], first.dtype)
        for i, e in enumerate(entries):
            arr[i, : e.arrays[name].shape[0]] = e.arrays[name]
        out[name] = arr
    return out
