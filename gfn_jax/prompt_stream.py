"""Training prompts streamed from a data source (``data.source``) instead of a task's list.

With ``config.data.source`` set (a spec of :func:`gfn_jax.data.open_source`: a ``.txt`` /
``.jsonl`` file or ``tfds:NAME[/CONFIG][:VERSION]:SPLIT``), every training step takes
``train.prompts_per_batch`` fresh prompts from a :class:`gfn_jax.data.ShardedStream` over it:

* records are read with the field names ``data.x_field`` (the prompt text; ignored for text
  files, whose line is the prompt) and, for tasks that read them, ``data.y_field`` /
  ``data.z_field``; the task sees each record under both its keys (X, Y, Z) and its source
  column names, and turns it into prompt text (:meth:`Task.stream_prompt`) and, where it has
  them, a reward context (:meth:`Task.stream_reward_prompt`, padded like the prompt) and a
  suffix the reward scores after Z (:meth:`Task.stream_suffix`: infilling's Y, right-padded to
  :meth:`Task.stream_suffix_len` and carried in the batch's extras);
* each host reads its own shard (``jax.process_index()`` of ``jax.process_count()``), shuffled
  per epoch with ``config.seed`` (``data.shuffle``); each takes ``prompts_per_batch /
  process_count`` prompts per step and the hosts' prompts are all-gathered (host-major), so
  every host builds the same global batch, as with a task's own prompts;
* prompts are left-padded to ``data.max_prompt_len`` tokens (a static shape, required); a
  longer or empty prompt is an error naming the record, or skipped and counted with
  ``data.on_bad="skip"`` (which also skips bad rows);
* :meth:`PromptStream.state` (every host's epoch, position and skip counts) is saved in each
  checkpoint's meta and :meth:`PromptStream.restore` continues the identical stream.

Only tasks that declare ``STREAM_FIELDS`` accept a stream (their reward reads the prompt, the
reward context and Y from the batch, not per-prompt tables indexed by ``prompt_index``):
continuation (X) and infilling (X, Y; stories also make their reward context from the record);
replay buffers (per prompt) and
SFT on the task's targets need the task's fixed prompt set and are refused with a stream.
Evaluation keeps using the task's own evaluation prompts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from gfn_jax.data import DataError, ShardedStream, open_source, parse_tfds_spec

__all__ = ["FIELD_KEYS", "PromptStream", "StreamRows", "check_data_config", "field_map"]

#: record key -> the config key naming its column in the source
FIELD_KEYS = {"X": "data.x_field", "Y": "data.y_field", "Z": "data.z_field"}
_FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}

Gather = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- config
def _source_kind(spec: str) -> str:
    """``tfds``, ``txt`` or ``jsonl`` for a ``data.source`` spec; ``ValueError`` naming the
    key and the accepted forms otherwise."""
    if spec.startswith("tfds:"):
        try:
            parse_tfds_spec(spec)
        except DataError as e:
            raise ValueError(f"data.source={spec!r}: {e}") from None
        return "tfds"
    for kind in ("txt", "jsonl"):
        if spec.startswith(kind + ":"):
            if not spec[len(kind) + 1:].strip():
                raise ValueError(f"data.source={spec!r} names no file: use {kind}:PATH")
            return kind
    prefix = spec.split(":", 1)[0]
    if ":" in spec and prefix.isalpha() and len(prefix) > 1:
        raise ValueError(f"data.source={spec!r}: unknown kind {prefix + ':'!r}; use a .txt or "
                         ".jsonl file, txt:PATH / jsonl:PATH, or tfds:NAME[/CONFIG]:SPLIT")
    kind = _FILE_KINDS.get(os.path.splitext(spec)[1].lower())
    if kind is None:
        raise ValueError(f"data.source={spec!r}: cannot tell its format; use a .txt or .jsonl "
                         "file, txt:PATH / jsonl:PATH, or tfds:NAME[/CONFIG]:SPLIT")
    return kind


def field_map(config: Any) -> Dict[str, str]:
    """``{record key: column}`` for the stream: X always, Y / Z when their key is set."""
    d = config.data
    out = {"X": str(d.x_field)}
    for key in ("Y", "Z"):
        column = str(d.get(FIELD_KEYS[key].split(".")[1], "") or "")
        if column:
            out[key] = column
    return out


def check_data_config(config: Any) -> None:
    """Check the ``data.source`` keys (and what a stream excludes) without opening the data;
    ``ValueError`` naming the key and what to do."""
    d = config.data
    spec = str(d.get("source", "") or "").strip()
    if not spec:
        return
    kind = _source_kind(spec)
    if kind == "tfds" and importlib.util.find_spec("tensorflow_datasets") is None:
        raise ValueError(f'data.source={spec!r} needs TensorFlow Datasets: pip install '
                         f'"gfn-jax[data]" (TensorFlow itself is not needed)')
    if d.on_bad not in ("error", "skip"):
        raise ValueError(f"data.on_bad must be 'error' or 'skip', got {d.on_bad!r}")
    if not str(d.x_field).strip():
        raise ValueError("data.x_field must name the column holding the prompt text")
    if int(d.max_prompt_len) < 1:
        raise ValueError(f"data.source={spec!r} streams prompts, padded to a fixed length: set "
                         "data.max_prompt_len (tokens, e.g. --config.data.max_prompt_len=64)")
    from gfn_jax.tasks import _factory

    name = config.task.name
    accepts = tuple(getattr(_factory(name), "STREAM_FIELDS", ()) or ())
    if not accepts:
        raise ValueError(f"task {name!r} reads its prompts (and per-prompt data) from its own "
                         f"files and cannot take data.source; unset data.source")
    for key in field_map(config):
        if key not in accepts:
            raise ValueError(f"{FIELD_KEYS[key]} is set but task {name!r} reads only "
                             f"{', '.join(accepts)} from streamed records; unset it")
    c = config
    if c.explore.p_replay > 0 or c.replay.always_fill or c.replay.seed_from_data:
        raise ValueError("replay buffers keep trajectories per prompt of a fixed prompt set: "
                         "with data.source set explore.p_replay=0, replay.always_fill=False and "
                         "replay.seed_from_data=False")
    from gfn_jax.objective_registry import get_objective

    if get_objective(c.objective.name).source_for(c.objective.to_dict()) == "data":
        raise ValueError(f"objective {c.objective.name!r} with objective.sft_source='data' "
                         "trains on the task's own targets, not on data.source; unset "
                         "data.source or set objective.sft_source='policy'")


# ---------------------------------------------------------------------------- the stream
def _jax_gather(x: np.ndarray) -> np.ndarray:
    """``[process_count, *x.shape]``: every host's ``x`` (one host: ``x[None]``)."""
    import jax

    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


@dataclasses.dataclass(frozen=True)
class StreamRows:
    """One step's streamed prompts of every host (host-major), as token ids: the policy's
    prompts, the reward's contexts (None: the prompts) and the suffixes (None: the task has
    none); ``records`` are their record indices."""

    prompts: List[List[int]]
    reward_prompts: Optional[List[List[int]]]
    suffixes: Optional[List[List[int]]]
    records: List[int]


class PromptStream:
    """The training prompts of every step, from a :class:`ShardedStream` on each host.

    Args:
      stream: this host's stream (``with_index=True``).
      make_prompt: record -> prompt text (the task's :meth:`stream_prompt`).
      encode: prompt text -> token ids (the task's ``encode_prompt``).
      per_host: prompts this host reads per step.
      max_prompt_len: the padded prompt length; longer prompts (and reward contexts) are bad
        records.
      skip_bad: skip (and count) prompts that are too long or encode to nothing.
      spec, fields: the source and field map (saved with the state, to tell a changed source).
      gather: stacks every host's array (default: ``jax`` all-gather; tests pass their own).
      make_reward_prompt, encode_reward: record -> reward context text or None (the prompt),
        and its encoder (default ``encode``).
      make_suffix, encode_suffix, suffix_len: record -> the text the reward scores after Z,
        its encoder, and its padded length (0: no suffix).
    """

    def __init__(self, stream: ShardedStream, make_prompt: Callable[[Mapping[str, Any]], str],
                 encode: Callable[[str], List[int]], per_host: int, max_prompt_len: int,
                 skip_bad: bool, spec: str, fields: Mapping[str, str],
                 gather: Optional[Gather] = None,
                 make_reward_prompt: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None,
                 encode_reward: Optional[Callable[[str], List[int]]] = None,
                 make_suffix: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None,
                 encode_suffix: Optional[Callable[[str], List[int]]] = None,
                 suffix_len: int = 0) -> None:
        self.stream = stream
        self.make_prompt = make_prompt
        self.encode = encode
        self.per_host = int(per_host)
        self.max_prompt_len = int(max_prompt_len)
        self.skip_bad = bool(skip_bad)
        self.spec = spec
        self.fields = dict(fields)
        self.gather = gather or _jax_gather
        self.make_reward_prompt = make_reward_prompt
        self.encode_reward = encode_reward or encode
        self.suffix_len = int(suffix_len)
        self.make_suffix = make_suffix if self.suffix_len > 0 else None
        self.encode_suffix = encode_suffix
        if self.make_suffix is not None and encode_suffix is None:
            raise ValueError("a stream with suffixes needs their encoder (encode_suffix)")
        self.skipped_prompts = 0  # too long / no tokens, skipped (on_bad="skip")
        self.last_records: List[int] = []  # the record indices of the last step, all hosts

    @classmethod
    def open(cls, config: Any, task: Any, process_index: Optional[int] = None,
             process_count: Optional[int] = None, gather: Optional[Gather] = None
             ) -> "PromptStream":
        """The stream ``config.data`` describes, for this host (default: the JAX process),
        making the ``task``'s prompts (and reward contexts and suffixes, where it has them;
        the task must be set up)."""
        import jax

        pi = jax.process_index() if process_index is None else int(process_index)
        pc = jax.process_count() if process_count is None else int(process_count)
        d = config.data
        spec = str(d.source).strip()
        P = int(config.train.prompts_per_batch)
        if P % pc:
            raise ValueError(f"train.prompts_per_batch={P} must be a multiple of the "
                             f"{pc} processes (each reads its share of data.source)")
        fields = field_map(config)
        task.check_stream_columns(fields)
        kind = _source_kind(spec)
        root = str(d.get("tfds_dir", "") or "") if kind == "tfds" else str(d.root or "")
        try:
            source = open_source(spec, fields=fields if kind != "txt" else ("X",),
                                 data_root=root or None, on_bad=str(d.on_bad))
        except ImportError as e:
            raise ValueError(f"data.source={spec!r}: {str(e).split(' [')[0]}") from None
        except (FileNotFoundError, DataError) as e:
            msg = str(e).replace('pass on_bad="skip"', "set data.on_bad=skip").replace(
                "or data_root", "or data.root")
            raise DataError(f"data.source={spec!r}: {msg}") from None
        stream = ShardedStream(source, seed=int(config.seed), process_index=pi,
                               process_count=pc, shuffle=bool(d.shuffle), with_index=True)
        return cls(stream, task.stream_prompt, task.encode_prompt, P // pc,
                   int(d.max_prompt_len), str(d.on_bad) == "skip", spec, fields, gather,
                   make_reward_prompt=task.stream_reward_prompt,
                   encode_reward=task.encode_reward_prompt,
                   make_suffix=task.stream_suffix,
                   encode_suffix=getattr(task, "encode_suffix", None),
                   suffix_len=int(task.stream_suffix_len()))

    # -- prompts
    def _why_bad(self, what: str, toks: Sequence[int], limit: int, key: str,
                 label: str = "") -> str:
        if not toks:
            return f"the {what} encodes to no tokens (set data.on_bad=skip to skip it)"
        if len(toks) > limit:
            return (f"the {what} has {len(toks)} tokens, more than {label or key}={limit} "
                    f"(raise {key}, or set data.on_bad=skip)")
        return ""

    def _record(self, rec: Mapping[str, Any]) -> Tuple[List[int], List[int], List[int], str]:
        """A record's prompt, reward context ([] = the prompt) and suffix token ids, and why
        it is a bad record ("" if it is not)."""
        # the task reads a field by its key (X) or by its source column name (text)
        rec = {**{self.fields[k]: v for k, v in rec.items() if k in self.fields}, **rec}
        L = self.max_prompt_len
        toks = list(self.encode(self.make_prompt(rec)))
        why = self._why_bad("prompt", toks, L, "data.max_prompt_len")
        rtoks: List[int] = []
        if not why and self.make_reward_prompt is not None:
            text = self.make_reward_prompt(rec)
            if text is not None:
                rtoks = list(self.encode_reward(text))
                why = self._why_bad("reward context", rtoks, L, "data.max_prompt_len")
        stoks: List[int] = []
        if not why and self.make_suffix is not None:
            stoks = list(self.encode_suffix(self.make_suffix(rec) or ""))
            why = self._why_bad("suffix Y", stoks, self.suffix_len, "task.max_suffix_len",
                                "the suffix width (task.max_suffix_len or the longest Y of "
                                "task.data_path)")
        return toks, rtoks, stoks, why

    def _local(self) -> Tuple[List[int], List[Tuple[List[int], List[int], List[int]]]]:
        """This host's next ``per_host`` (record index, (prompt, reward context, suffix))."""
        records: List[int] = []
        rows: List[Tuple[List[int], List[int], List[int]]] = []
        src = self.stream.source
        while len(rows) < self.per_host:
            try:
                i, rec = next(self.stream)
            except DataError as e:  # a bad TFDS record (files are checked when opened)
                raise DataError(f"data.source={self.spec!r}: {e} (set data.on_bad=skip to "
                                "skip and count bad records)") from None
            try:
                toks, rtoks, stoks, why = self._record(rec)
            except ValueError as e:  # a template naming a field the record lacks
                raise DataError(f"{src.location(i)}: {e}") from None
            if why:
                if not self.skip_bad:
                    raise DataError(f"{src.location(i)}: {why}")
                self.skipped_prompts += 1
                continue
            records.append(int(i))
            rows.append((toks, rtoks, stoks))
        return records, rows

    def next_rows(self) -> StreamRows:
        """The next step's prompts (and reward contexts and suffixes) of every host,
        host-major; the same on every host."""
        records, rows = self._local()
        L, S = self.max_prompt_len, self.suffix_len
        W = 4 + 2 * L + S  # [record, |prompt|, |reward|, |suffix|, prompt, reward, suffix]
        packed = np.zeros((self.per_host, W), np.int64)
        for r, (i, (t, rt, st)) in enumerate(zip(records, rows)):
            packed[r, :4] = i, len(t), len(rt), len(st)
            packed[r, 4:4 + len(t)] = t
            packed[r, 4 + L:4 + L + len(rt)] = rt
            packed[r, 4 + 2 * L:4 + 2 * L + len(st)] = st
        every = self.gather(packed).reshape(-1, W)
        self.last_records = [int(x) for x in every[:, 0]]

        def ids(row, start, n):
            return [int(x) for x in row[start:start + int(n)]]

        prompts = [ids(row, 4, row[1]) for row in every]
        reward = None
        if (every[:, 2] > 0).any():
            reward = [ids(row, 4 + L, row[2]) if row[2] else p for row, p in zip(every, prompts)]
        suffixes = [ids(row, 4 + 2 * L, row[3]) for row in every] if S else None
        return StreamRows(prompts, reward, suffixes, list(self.last_records))

    def next_prompts(self) -> List[List[int]]:
        """The next step's prompts (token ids) of every host, host-major (see
        :meth:`next_rows`); their record indices are in ``last_records``."""
        return self.next_rows().prompts

    # -- checkpointing
    def state(self) -> Dict[str, Any]:
        """JSON-able: the source, and every host's stream state (index = process index)."""
        mine = self.stream.state()
        counts = np.array([mine["epoch"], mine["position"], mine["skipped"],
                           self.skipped_prompts], np.int64)
        hosts = self.gather(counts).reshape(-1, 4)
        ident = {k: v for k, v in mine.items()
                 if k not in ("epoch", "position", "skipped", "process_index")}
        return {"source": self.spec, "fields": dict(self.fields), **ident,
                "hosts": [{"epoch": int(h[0]), "position": int(h[1]), "skipped": int(h[2]),
                           "skipped_prompts": int(h[3])} for h in hosts]}

    def restore(self, saved: Optional[Mapping[str, Any]]) -> Optional[str]:
        """Continue from :meth:`state`. Returns None, or why the stream starts afresh (no saved
        state, or another source / fields / seed / shuffle: changes ``--allow_config_change``
        let through). The same source with other data or another number of hosts is an
        error."""
        if not saved:
            return "the checkpoint has no data-stream position; the stream starts at its beginning"
        mine = self.stream.state()
        for key, now in (("source", self.spec), ("fields", self.fields), ("seed", mine["seed"]),
                         ("shuffle", mine["shuffle"])):
            if saved.get(key) != now:
                return (f"data stream: {key} changed (saved {saved.get(key)!r}, now {now!r}); "
                        "the stream starts at its beginning")
        hosts = list(saved.get("hosts") or [])
        if len(hosts) != self.stream.process_count:
            raise DataError(f"the checkpoint's data stream was read by {len(hosts)} process(es), "
                            f"this run has {self.stream.process_count}: resume with "
                            f"{len(hosts)}, or train in a new --workdir")
        h = hosts[self.stream.process_index]
        self.stream.restore({**{k: saved[k] for k in ("num_records", "even", "process_count")
                                if k in saved},
                             "epoch": h["epoch"], "position": h["position"],
                             "skipped": h.get("skipped", 0)})
        self.skipped_prompts = int(h.get("skipped_prompts", 0))
        return None

    def metrics(self) -> Dict[str, float]:
        """This host's position: epoch, index within the epoch, skipped records."""
        s = self.stream
        return {"data_epoch": float(s.epoch), "data_position": float(s.position),
                "data_skipped": float(s.skipped + self.skipped_prompts)}
