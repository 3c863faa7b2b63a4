"""One interface for prompt / example data: text files, JSON-lines files and TFDS datasets.

:func:`open_source` turns a spec string into a random-access :class:`Source` of records (dicts
of named fields: ``X``, plus ``Y`` / ``Z`` where a task needs them); :class:`ShardedStream`
walks a source deterministically for one host of a multi-host run.

Specs::

    prompts.txt                     one record per line (the line, without its line break)
    txt:some/file.dat               the same, whatever the extension
    train.jsonl                     one JSON object per line; fields taken by name
    jsonl:some/file.json            the same, whatever the extension
    tfds:NAME[/CONFIG][:VERSION]:SPLIT
                                    a prepared TFDS dataset, read with ``tfds.data_source``
                                    (random access over array_record, no TensorFlow);
                                    SPLIT may be sliced, e.g. ``train[:90%]``

``fields`` names the record keys: a sequence (``("X", "Y")``: each read from the column of the
same name) or a mapping ``{record key: column}`` (``{"X": "sentence", "Y": "label"}``). A text
file has a single column, the line, so ``fields`` must name one key (default ``("X",)``).

Bad rows -- a missing field, ``null`` or empty/blank text, invalid JSON, bytes that are not
UTF-8 -- raise :class:`DataError` naming the file and line (``path:LINE``) or, for TFDS, the
dataset, split and record index. With ``on_bad="skip"`` they are skipped and counted instead
(``Source.num_bad`` / ``Source.bad`` for files, which are checked when opened;
``ShardedStream.skipped`` for TFDS records, which are checked when read).

Relative file paths resolve against ``data_root`` when given, else the current working
directory -- never the package's location. For ``tfds:`` specs ``data_root`` is the TFDS
``data_dir`` (default: TFDS's own, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).

TensorFlow Datasets is optional (``pip install "gfn-jax[data]"``; it brings array_record and
does not pull TensorFlow). When TensorFlow *is* installed, a dataset that ``data_source`` cannot
read (e.g. prepared as TFRecord) falls back to ``tfds.load``, read once into memory.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DataError",
    "Source",
    "ListSource",
    "TfdsSource",
    "ShardedStream",
    "open_source",
    "parse_tfds_spec",
    "resolve_path",
]

Fields = Union[str, Sequence[str], Mapping[str, str]]
Record = Dict[str, Any]

_TFDS_SPEC = re.compile(
    r"^tfds:(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?)"
    r"(?::(?P<version>\d+\.\d+\.\d+))?:(?P<split>.+)$")
_INSTALL_HINT = ('reading "tfds:" data needs TensorFlow Datasets: pip install "gfn-jax[data]" '
                 '(or: pip install tensorflow-datasets; TensorFlow itself is not needed)')


class DataError(ValueError):
    """A bad row (or a bad spec); the message names the file and line, or the record."""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _field_map(fields: Optional[Fields], default: Sequence[str] = ("X",)) -> Dict[str, str]:
    if fields is None:
        fields = tuple(default)
    if isinstance(fields, str):
        fields = (fields,)
    if isinstance(fields, Mapping):
        out = {str(k): str(v) for k, v in fields.items()}
    else:
        out = {str(f): str(f) for f in fields}
    if not out:
        raise DataError("fields must name at least one field")
    return out


def resolve_path(path: str, data_root: Optional[str] = None) -> str:
    """``path`` made absolute: ``~`` expanded, a relative path joined to ``data_root`` if
    given, else to the current working directory."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = os.path.expanduser(data_root) if data_root else os.getcwd()
    return os.path.normpath(os.path.join(os.path.abspath(base), path))


def _check_value(value: Any, key: str, column: str) -> Tuple[Any, Optional[str]]:
    """(value, None) for a usable field value, (None, reason) for a bad one. Bytes are
    decoded as UTF-8; text must not be empty or blank."""
    if value is None:
        return None, f"field {column!r} is null"
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"field {column!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
    if isinstance(value, str) and not value.strip():
        return None, f"field {column!r} is empty"
    if isinstance(value, np.generic):
        value = value.item()
    return value, None


def _record_from(obj: Mapping[str, Any], fmap: Mapping[str, str]) -> Tuple[Optional[Record], Optional[str]]:
    rec: Record = {}
    for key, column in fmap.items():
        if column not in obj:
            have = ", ".join(sorted(map(str, obj))) or "none"
            return None, f"missing field {column!r} (fields present: {have})"
        value, why = _check_value(obj[column], key, column)
        if why:
            return None, why
        rec[key] = value
    return rec, None


# ---------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------
class Source:
    """Random access to records: ``len(src)``, ``src[i]`` (a dict of the named fields, or a
    :class:`DataError` for a bad record), ``src.location(i)`` for messages."""

    name: str = "source"
    fields: Tuple[str, ...] = ()
    #: rows dropped as bad when the source was opened (files, ``on_bad="skip"``)
    num_bad: int = 0
    #: the first few of them, as "location: reason"
    bad: List[str]
    #: bad records met while streaming are skipped (TFDS, ``on_bad="skip"``)
    skip_bad: bool = False

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    def location(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} records, fields={self.fields})"


class ListSource(Source):
    """Records held in memory (text and JSON-lines files); ``lines[i]`` is the 1-based line
    number of record ``i`` in its file."""

    def __init__(self, name: str, records: List[Record], lines: Optional[List[int]] = None,
                 fields: Sequence[str] = (), num_bad: int = 0,
                 bad: Optional[List[str]] = None) -> None:
        self.name = name
        self.records = records
        self.lines = lines
        self.fields = tuple(fields)
        self.num_bad = num_bad
        self.bad = list(bad or [])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return dict(self.records[i])

    def location(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.name}:{self.lines[i]}"
        return super().location(i)


def _read_lines(path: str) -> Iterator[Tuple[int, Union[str, UnicodeDecodeError]]]:
    """(line number, text without the line break) per line; a line that is not UTF-8 gives
    its UnicodeDecodeError instead of text."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path!r} (relative paths resolve "
                                "against the current directory or data_root)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, e


def _open_file(path: str, kind: str, fmap: Dict[str, str], on_bad: str,
               max_bad_listed: int = 20) -> ListSource:
    records: List[Record] = []
    lines: List[int] = []
    bad: List[str] = []
    num_bad = 0

    def reject(n: int, why: str) -> None:
        nonlocal num_bad
        msg = f"{path}:{n}: {why}"
        if on_bad == "error":
            raise DataError(msg + ' (pass on_bad="skip" to skip and count bad rows)')
        num_bad += 1
        if len(bad) < max_bad_listed:
            bad.append(msg)

    if kind == "txt" and len(fmap) != 1:
        raise DataError(f"{path}: a text file has one field per line, but fields names "
                        f"{sorted(fmap)}; use a .jsonl file for several fields")
    for n, text in _read_lines(path):
        if isinstance(text, UnicodeDecodeError):
            reject(n, f"not valid UTF-8 ({text.reason} at byte {text.start} of the line)")
            continue
        if kind == "txt":
            (key,) = fmap
            if not text.strip():
                reject(n, "empty line")
                continue
            rec: Optional[Record] = {key: text}
        else:
            if not text.strip():
                reject(n, "empty line (expected a JSON object)")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                reject(n, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                reject(n, f"expected a JSON object, got {type(obj).__name__}")
                continue
            rec, why = _record_from(obj, fmap)
            if why:
                reject(n, why)
                continue
        records.append(rec)
        lines.append(n)
    if not records:
        raise DataError(f"{path}: no usable rows ({num_bad} bad)")
    return ListSource(path, records, lines, tuple(fmap), num_bad, bad)


def parse_tfds_spec(spec: str) -> Dict[str, Optional[str]]:
    """``tfds:NAME[/CONFIG][:VERSION]:SPLIT`` -> {"name", "version", "split"}; ``name``
    keeps the config (``"glue/sst2"``)."""
    m = _TFDS_SPEC.match(spec.strip())
    if not m:
        raise DataError(f"bad TFDS spec {spec!r}; expected tfds:NAME[/CONFIG][:VERSION]:SPLIT, "
                        "e.g. tfds:glue/sst2:train or tfds:my_prompts:1.0.0:train[:90%]")
    return m.groupdict()


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: F401  (lazy: optional dependency)
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} [{e}]") from e
    return tfds


def _tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


class TfdsSource(Source):
    """A TFDS split: ``tfds.data_source`` (array_record, random access) or, when TensorFlow is
    installed and the data is not in array_record, ``tfds.load`` read into memory. Records are
    checked when read (the dataset may be large), so a bad one raises :class:`DataError`
    naming the dataset, split and index."""

    def __init__(self, spec: str, fmap: Dict[str, str], data_dir: Optional[str] = None,
                 on_bad: str = "error") -> None:
        parts = parse_tfds_spec(spec)
        tfds = _import_tfds()
        self.spec = spec
        self.split = str(parts["split"])
        full_name = parts["name"] + (f":{parts['version']}" if parts["version"] else "")
        self.name = spec
        self.skip_bad = on_bad == "skip"
        self.fmap = fmap
        self.fields = tuple(fmap)
        self.num_bad = 0
        self.bad = []
        self.backend = "data_source"
        data_dir = resolve_path(data_dir) if data_dir else None
        try:
            self._data = tfds.data_source(full_name, split=self.split, data_dir=data_dir)
        except Exception as e:  # not found, not array_record, bad split, ...
            if _tensorflow_installed() and not _not_found(e):
                ds = tfds.load(full_name, split=self.split, data_dir=data_dir,
                               download=False)
                self._data = list(tfds.as_numpy(ds))
                self.backend = "load"
            else:
                where = data_dir or "TFDS's default data_dir"
                hint = ("" if _tensorflow_installed() else
                        "; data_source reads array_record datasets only (prepare with "
                        "file_format='array_record', or install TensorFlow for tfds.load)")
                raise DataError(f"cannot open {spec!r} in {where}: "
                                f"{str(e).splitlines()[0]}{hint}") from e
        self._n = len(self._data)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self._n:
            raise IndexError(i)
        rec, why = _record_from(self._data[i], self.fmap)
        if why:
            raise DataError(f"{self.location(i)}: {why}")
        return rec  # type: ignore[return-value]

    def location(self, i: int) -> str:
        return f"{self.spec} record {i}"


def _not_found(e: Exception) -> bool:
    return type(e).__name__ == "DatasetNotFoundError"


def open_source(spec: str, fields: Optional[Fields] = None, data_root: Optional[str] = None,
                on_bad: str = "error") -> Source:
    """A :class:`Source` for ``spec`` (see the module docstring). ``fields``: the record keys
    (default ``("X",)``); ``data_root``: base of relative file paths, or the TFDS data_dir;
    ``on_bad``: ``"error"`` (default) or ``"skip"``."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f'on_bad must be "error" or "skip", got {on_bad!r}')
    spec = str(spec)
    fmap = _field_map(fields)
    if spec.startswith("tfds:"):
        return TfdsSource(spec, fmap, data_root, on_bad=on_bad)
    kind = None
    for prefix in ("txt:", "jsonl:"):
        if spec.startswith(prefix):
            kind, spec = prefix[:-1], spec[len(prefix):]
    path = resolve_path(spec, data_root)
    if kind is None:
        ext = os.path.splitext(path)[1].lower()
        kind = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(ext)
        if kind is None:
            raise DataError(f"cannot tell the format of {spec!r}: use a .txt or .jsonl file, a "
                            "txt:/jsonl: prefix, or tfds:NAME[/CONFIG]:SPLIT")
    return _open_file(path, kind, fmap, on_bad)


# ---------------------------------------------------------------------------
# stream
# ---------------------------------------------------------------------------
class ShardedStream:
    """Deterministic, resumable walk over a :class:`Source` for one host.

    Every epoch the record indices are permuted with ``np.random.default_rng([seed, epoch])``
    (the same permutation on every host) and host ``process_index`` of ``process_count``
    takes every ``process_count``-th position of it, starting at its own index. With
    ``even=True`` (default) each host gets exactly ``len(source) // process_count`` records
    per epoch (the epoch's last ``len % process_count`` positions are dropped -- different
    records each epoch), so hosts stay in lock-step; with ``even=False`` the hosts' shards
    are an exact partition of the records and may differ in length by one.

    :meth:`state` is a JSON-able dict (epoch, position in this host's shard of the epoch,
    plus what must match on restore); :meth:`restore` continues the identical stream.
    ``num_epochs=None`` repeats forever. Bad TFDS records (opened with ``on_bad="skip"``)
    are skipped and counted in ``skipped`` (also part of the state).
    """

    def __init__(self, source: Source, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, even: bool = True,
                 num_epochs: Optional[int] = None, with_index: bool = False) -> None:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} "
                             f"of {process_count}")
        n = len(source)
        if n < process_count and even:
            raise DataError(f"{source.name}: {n} records cannot feed {process_count} hosts")
        self.source = source
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.even = bool(even)
        self.num_epochs = num_epochs
        self.with_index = with_index
        self.skip_bad = bool(source.skip_bad)
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        self._bad_run = 0
        self._shard_epoch = -1
        self._shard = np.zeros(0, np.int64)

    # -- the shard of one epoch
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The record indices this host reads in ``epoch``, in order."""
        n = len(self.source)
        order = (np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle
                 else np.arange(n))
        if self.even:
            order = order[: (n // self.process_count) * self.process_count]
        return order[self.process_index::self.process_count]

    def __len__(self) -> int:
        """Records per epoch on this host (before skipping bad ones)."""
        n, p = len(self.source), self.process_count
        return n // p if self.even else len(range(self.process_index, n, p))

    def _indices(self) -> np.ndarray:
        if self._shard_epoch != self.epoch:
            self._shard = self.epoch_indices(self.epoch)
            self._shard_epoch = self.epoch
        return self._shard

    # -- iteration
    def __iter__(self) -> "ShardedStream":
        return self

    def __next__(self) -> Union[Record, Tuple[int, Record]]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            idx = self._indices()
            if self.position >= len(idx):
                self.epoch += 1
                self.position = 0
                if len(idx) == 0:
                    raise DataError(f"{self.source.name}: host {self.process_index} has no "
                                    "records")
                continue
            i = int(idx[self.position])
            self.position += 1
            try:
                rec = self.source[i]
            except DataError:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                self._bad_run += 1
                if self._bad_run >= len(idx):  # a whole epoch of bad records: never ends
                    raise DataError(f"{self.source.name}: every record of host "
                                    f"{self.process_index}'s shard is bad ({self._bad_run} "
                                    "skipped in a row)") from None
                continue
            self._bad_run = 0
            return (i, rec) if self.with_index else rec

    def take(self, n: int) -> List[Any]:
        """The next ``n`` items (fewer only when ``num_epochs`` runs out)."""
        out = []
        for _ in range(n):
            try:
                out.append(next(self))
            except StopIteration:
                break
        return out

    # -- checkpointing
    def _identity(self) -> Dict[str, Any]:
        return {"seed": self.seed, "process_index": self.process_index,
                "process_count": self.process_count, "num_records": len(self.source),
                "shuffle": self.shuffle, "even": self.even}

    def state(self) -> Dict[str, Any]:
        """JSON-able position: restore it into a stream over the same data and hosts."""
        return {"epoch": int(self.epoch), "position": int(self.position),
                "skipped": int(self.skipped), **self._identity()}

    def restore(self, state: Mapping[str, Any]) -> "ShardedStream":
        """Continue from ``state`` (from :meth:`state`, possibly via JSON)."""
        mine = self._identity()
        diff = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"cannot restore the data stream over {self.source.name}: {detail}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.epoch_indices(epoch)):
            raise DataError(f"bad stream state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
        self.skipped = int(state.get("skipped", 0))
        return self
