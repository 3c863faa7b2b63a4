"""Checkpoints (Orbax) with integrity manifests, and preemption handling.

Layout of one checkpoint directory ``<directory>/<step>/`` (written by
``orbax.checkpoint.CheckpointManager``, committed atomically by a rename of a
``<step>.orbax-checkpoint-tmp-*`` directory)::

    state/            the train-state pytree (StandardSave; PRNG keys stored as key data)
    meta/             JSON: config, schedule/data position, metric-history snapshot
    replay/           the replay buffer's ``state_dict()`` as one uint8 npz blob
    info/             JSON: format version, PRNG-key leaves and their implementation
    gfn_manifest.json size and sha256 of every file above, written *after* the commit

A step counts as complete only once its manifest exists; ``restore`` verifies the
manifest, so a truncated or deleted file raises :class:`CheckpointError` instead of
returning garbage. A save that is interrupted (crash, SIGKILL, preemption) leaves either
an uncommitted temporary directory or a committed directory without a manifest; both are
ignored by :meth:`Checkpointer.latest_step` and the previous checkpoint stays restorable.
Old checkpoints beyond ``keep`` are deleted only after a new one is complete, so a failed
save (disk full: :class:`CheckpointDiskFullError`, one line) never costs an older one.

Restoring the latest step skips corrupt checkpoints (manifest check failed), newest first,
moves them to ``<directory>/corrupt-<step>-<time>/`` and records why in
``Checkpointer.last_fallback``; an explicitly requested step is restored strictly.
:meth:`Checkpointer.restore_subset` restores some top-level state entries (e.g. a
TrainState's ``step``, ``trainable``, ``log_z``) without reading the optimizer state.

Paths are local/POSIX (a shared file system on multi-host runs); the manifest is written
by process 0.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import signal
import threading
import time
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gfn_jax.fileutil import sha256_file
from gfn_jax.rundir import find_os_error, one_line_os_error

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "gfn_manifest.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_PREFIX = "corrupt-"  # corrupt checkpoints moved aside: <directory>/corrupt-<step>-<time>/
_NDARRAY_TAG = "__ndarray__"
_NPSCALAR_TAG = "__npscalar__"
_BLOB_JSON_KEY = "__json__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the expected state."""


class CheckpointWriteError(CheckpointError):
    """Saving failed on a file-system error (message: one line, what and where); the
    previous checkpoints are intact and the failed save's partial files are removed."""


class CheckpointDiskFullError(CheckpointWriteError):
    """Saving failed because the disk (or quota) is full."""


@dataclasses.dataclass
class CorruptCheckpoint:
    """A checkpoint that failed its manifest check during a restore of the latest step."""

    step: int
    reason: str
    moved_to: Optional[str]  # where it was moved aside (None: left in place)


@dataclasses.dataclass
class RestoreFallback:
    """Set on ``Checkpointer.last_fallback`` when the latest checkpoint was corrupt and an
    older intact one was restored instead."""

    restored_step: int
    skipped: List[CorruptCheckpoint]

    @property
    def message(self) -> str:
        parts = []
        for c in self.skipped:
            where = (f"moved aside to {c.moved_to}" if c.moved_to
                     else "left in place (could not be moved aside)")
            parts.append(f"checkpoint step {c.step} is corrupt ({c.reason}); {where}")
        return "; ".join(parts) + f"; resuming from step {self.restored_step}, the newest intact checkpoint"


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _path_str(path: Sequence[Any]) -> str:
    """A pytree key path as ``a/b/0/c`` (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - unknown key kinds
            parts.append(str(k))
    return "/".join(parts)


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(x: Any) -> str:
    impl = jax.random.key_impl(x)
    return str(getattr(impl, "name", impl))


def _to_json(obj: Any, where: str = "meta") -> Any:
    """Convert ``obj`` to plain JSON types (numpy scalars/arrays -> Python); fail loudly."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a string (JSON needs str keys)")
            out[k] = _to_json(v, f"{where}/{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_json(v, f"{where}/{i}") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: value of type {type(obj).__name__} is not JSON-serialisable")


def encode_replay(replay: Optional[Mapping[str, Any]]) -> np.ndarray:
    """Serialise a replay ``state_dict()`` (nested dict of numpy arrays and JSON) to uint8.

    Arrays (numpy or jax, any numeric/bool/str dtype, no objects) go into an ``.npz``;
    the rest of the structure is JSON stored alongside. Tuples come back as lists.
    """
    arrays: Dict[str, np.ndarray] = {}

    def walk(obj: Any, where: str) -> Any:
        if isinstance(obj, np.generic):
            key = f"a{len(arrays)}"
            arrays[key] = np.asarray(obj)
            return {_NPSCALAR_TAG: key}
        if isinstance(obj, (np.ndarray, jax.Array)):
            arr = np.asarray(obj)
            if arr.dtype == object:
                raise TypeError(f"replay{where}: object arrays cannot be checkpointed safely")
            key = f"a{len(arrays)}"
            arrays[key] = arr
            return {_NDARRAY_TAG: key}
        if isinstance(obj, Mapping):
            out = {}
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise TypeError(f"replay{where}: dict key {k!r} is not a string")
                if k in (_NDARRAY_TAG, _NPSCALAR_TAG):
                    raise TypeError(f"replay{where}: key {k!r} is reserved")
                out[k] = walk(v, f"{where}/{k}")
            return out
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{where}/{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"replay{where}: value of type {type(obj).__name__} cannot be stored")

    skeleton = walk(replay, "")
    buf = io.BytesIO()
    payload = dict(arrays)
    payload[_BLOB_JSON_KEY] = np.frombuffer(json.dumps(skeleton).encode("utf-8"), np.uint8)
    np.savez(buf, **payload)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def decode_replay(blob: np.ndarray) -> Optional[Dict[str, Any]]:
    """Inverse of :func:`encode_replay`."""
    with np.load(io.BytesIO(np.asarray(blob, np.uint8).tobytes()), allow_pickle=False) as z:
        skeleton = json.loads(z[_BLOB_JSON_KEY].tobytes().decode("utf-8"))
        arrays = {k: z[k] for k in z.files if k != _BLOB_JSON_KEY}

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {_NDARRAY_TAG}:
                return arrays[obj[_NDARRAY_TAG]]
            if set(obj) == {_NPSCALAR_TAG}:
                return arrays[obj[_NPSCALAR_TAG]][()]
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(skeleton)


def _list_files(root: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------


class Checkpointer:
    """Save / restore ``(state, meta, replay)`` with keep-last-K and integrity checks.

    Args:
      directory: root directory; one sub-directory per step.
      keep: number of most recent checkpoints kept (older ones are deleted).
      save_interval_steps: ``save`` is a no-op (returns False) unless ``step`` is a
        multiple of this, or ``force=True``.
      async_save: write in a background thread; the manifest is written when the save
        is finished (on the next ``save``, ``wait``, ``restore`` or ``close``).
      verify_hashes: check sha256 of every file on restore (sizes are always checked).
    """

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
        verify_hashes: bool = True,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self.verify_hashes = verify_hashes
        self._manager: Optional[ocp.CheckpointManager] = None
        self._pending: List[int] = []
        self._tmp_cleaned = False
        # Set by restore()/restore_subset() of the latest step when corrupt checkpoints were
        # skipped (and moved aside); None otherwise. ``.message`` is one line for the user.
        self.last_fallback: Optional[RestoreFallback] = None

    # -- manager -------------------------------------------------------------------------
    def _get_manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                # retention is ours (_drop_old): only checkpoints with a manifest count, and the
                # oldest is deleted only after the new one is complete (a save that fails on a
                # full disk or is killed never costs an older checkpoint)
                max_to_keep=None,
                save_interval_steps=self.save_interval_steps,
                enable_async_checkpointing=self.async_save,
                cleanup_tmp_directories=False,  # never delete another writer's in-flight save
                create=True,
            )
            handlers = {
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "replay": ocp.StandardCheckpointHandler(),
                "info": ocp.JsonCheckpointHandler(),
            }
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        return self._manager

    def _finalize_pending(self) -> None:
        """Wait for in-flight saves and write their manifests."""
        if self._manager is None:
            return
        pending, self._pending = self._pending, []
        try:
            self._manager.wait_until_finished()
            for step in pending:
                if os.path.isdir(self._step_dir(step)):  # may already be garbage-collected
                    self._write_manifest(step)
            if pending:
                self._drop_old()
        except Exception as e:  # noqa: BLE001
            for step in pending:
                self._abort_save(step)
            raise self._save_error(e, pending[-1] if pending else None) from e

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_manifest(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        root = self._step_dir(step)
        files = {}
        for rel in _list_files(root):
            path = os.path.join(root, rel)
            files[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
        manifest = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "files": files}
        _atomic_write_text(os.path.join(root, MANIFEST_NAME), json.dumps(manifest, indent=1))

    def _remove_stale_tmp(self) -> None:
        """Delete leftovers of interrupted saves (only the writer does this, once)."""
        if self._tmp_cleaned or jax.process_index() != 0:
            return
        self._tmp_cleaned = True
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if TMP_MARKER in name:
                log.warning("removing interrupted checkpoint save %s", os.path.join(self.directory, name))
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- listing -------------------------------------------------------------------------
    def _committed_steps(self) -> List[int]:
        """Step directories orbax considers committed (manifest not required)."""
        if not os.path.isdir(self.directory):
            return []
        names = os.listdir(self.directory)
        return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(self._step_dir(int(n))))

    def all_steps(self) -> List[int]:
        """Complete checkpoints (committed and with a manifest), ascending."""
        self._finalize_pending()
        return self._complete_steps()

    def _complete_steps(self) -> List[int]:
        steps = self._committed_steps()
        return [s for s in steps if os.path.isfile(os.path.join(self._step_dir(s), MANIFEST_NAME))]

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        meta: Optional[Mapping[str, Any]] = None,
        replay: Optional[Mapping[str, Any]] = None,
        force: bool = False,
    ) -> bool:
        """Save a checkpoint for ``step``; returns whether one was written.

        ``state`` is a pytree of arrays (typed PRNG keys are stored as key data and
        re-wrapped on restore); ``meta`` must be JSON-able (numpy scalars are converted);
        ``replay`` is a replay buffer's ``state_dict()``. A step that already has a
        complete checkpoint is not overwritten (returns False).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._finalize_pending()
        manager = self._get_manager()
        self._remove_stale_tmp()
        if not force and step % self.save_interval_steps:
            return False
        if step in self.all_steps():
            log.warning("checkpoint for step %d already exists in %s; not overwriting", step, self.directory)
            return False
        if step in self._committed_steps():  # committed by orbax but no manifest: incomplete
            log.warning("replacing incomplete checkpoint %s", self._step_dir(step))
            manager.reload()
            if step in manager.all_steps():
                manager.delete(step)
            else:
                shutil.rmtree(self._step_dir(step), ignore_errors=True)
        manager.reload()

        keys: Dict[str, str] = {}

        multi_process = jax.process_count() > 1

        def unkey(path, x):
            if _is_prng_key(x):
                keys[_path_str(path)] = _key_impl_name(x)
                x = jax.random.key_data(x)
            if multi_process and isinstance(x, jax.Array) and x.is_fully_addressable:
                # Host-local (e.g. a step counter or key made outside jit): orbax cannot save
                # it across processes; it is assumed identical on every process.
                x = np.asarray(x)
            return x

        plain_state = jax.tree_util.tree_map_with_path(unkey, state)
        info = {"format": FORMAT_VERSION, "prng_keys": keys, "jax_version": jax.__version__}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(plain_state),
            meta=ocp.args.JsonSave(_to_json(dict(meta or {}))),
            replay=ocp.args.StandardSave({"blob": encode_replay(replay)}),
            info=ocp.args.JsonSave(info),
        )
        try:
            saved = bool(manager.save(step, args=args, force=True))
            if saved:
                if self.async_save:
                    self._pending.append(step)
                else:
                    manager.wait_until_finished()
                    self._write_manifest(step)
                    self._drop_old()
        except Exception as e:  # noqa: BLE001
            self._abort_save(step)
            raise self._save_error(e, step) from e
        return saved

    def _drop_old(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep`` (process 0). Each is first
        renamed out of the step listing, so an interrupted deletion never leaves a partial
        checkpoint that looks complete (the leftover is removed with the interrupted saves)."""
        if jax.process_index() != 0:
            return
        complete = self._complete_steps()
        for step in complete[: max(0, len(complete) - self.keep)]:
            doomed = os.path.join(self.directory, f"{step}{TMP_MARKER}-deleting-{os.getpid()}")
            try:
                os.rename(self._step_dir(step), doomed)
            except OSError as e:
                log.warning("could not delete old checkpoint %s: %s", self._step_dir(step), e)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        if self._manager is not None:
            self._manager.reload()

    def _abort_save(self, step: int) -> None:
        """After a failed save of ``step``: remove its partial files (uncommitted temporary
        directory, or committed directory without a manifest), never a complete checkpoint,
        and drop the manager (its state is unknown)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - it re-raises the save's error
                pass
        # Orbax's writer threads of the failed save may still be running: let them finish
        # before removing their directory (else they re-create it, or write into the next save).
        deadline = time.time() + 60.0
        for t in threading.enumerate():
            if type(t).__name__ == "_SignalingThread" and t is not threading.current_thread():
                try:
                    t.join(max(0.0, deadline - time.time()))
                except Exception:  # noqa: BLE001 - orbax's join re-raises the writer's error,
                    pass  # which is the save's error, already being reported
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}{TMP_MARKER}"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        root = self._step_dir(step)
        if os.path.isdir(root) and not os.path.isfile(os.path.join(root, MANIFEST_NAME)):
            shutil.rmtree(root, ignore_errors=True)

    def _save_error(self, e: BaseException, step: Optional[int]) -> BaseException:
        """A one-line CheckpointWriteError for a file-system error, else ``e`` itself."""
        if isinstance(e, CheckpointError):
            return e
        oe = find_os_error(e)
        if oe is None:
            return e
        latest = self.latest_step()
        intact = (f"the previous checkpoints are intact (latest: step {latest})" if latest is not None
                  else "no earlier checkpoint exists")
        what = f"saving checkpoint step {step}" if step is not None else "saving a checkpoint"
        msg = f"{one_line_os_error(oe, what, self.directory, '--workdir')}; {intact}"
        cls = CheckpointDiskFullError if oe.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) \
            else CheckpointWriteError
        return cls(msg)

    def wait(self) -> None:
        """Block until an asynchronous save has finished and is complete on disk."""
        self._finalize_pending()

    # -- restore -------------------------------------------------------------------------
    def _verify(self, step: int) -> None:
        root = self._step_dir(step)
        mpath = os.path.join(root, MANIFEST_NAME)
        try:
            with open(mpath) as f:
                manifest = json.load(f)
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {root}: manifest {MANIFEST_NAME} is unreadable ({e})") from e
        problems = []
        for rel, rec in files.items():
            p = os.path.join(root, rel)
            if not isinstance(rec, dict) or "size" not in rec or "sha256" not in rec:
                problems.append(f"manifest entry for {rel} is malformed")
            elif not os.path.isfile(p):
                problems.append(f"missing file {rel}")
            elif os.path.getsize(p) != rec["size"]:
                problems.append(f"file {rel} has {os.path.getsize(p)} bytes, expected {rec['size']} (truncated?)")
            elif self.verify_hashes and sha256_file(p) != rec["sha256"]:
                problems.append(f"file {rel} has a wrong sha256 (modified or corrupt)")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
            raise CheckpointError(f"checkpoint {root} (step {step}) is corrupt: {shown}")

    def _resolve_verified_step(self, step: Optional[int]) -> int:
        """The step to restore, verified against its manifest.

        An explicit ``step`` must be intact (else CheckpointError). For the latest step,
        corrupt checkpoints are skipped, newest first, until an intact one is found; the
        skipped ones are moved aside to ``<directory>/corrupt-<step>-<time>/`` (outside the
        step listing) and ``self.last_fallback`` says which and why. When none is intact,
        nothing is moved and CheckpointError lists every problem.
        """
        self.last_fallback = None
        if step is not None:
            step = self._resolve_step(step)
            self._verify(step)
            return step
        newest = self._resolve_step(None)
        skipped: List[Tuple[int, str]] = []
        for s in reversed([s for s in self.all_steps() if s <= newest]):
            try:
                self._verify(s)
            except CheckpointError as e:
                skipped.append((s, self._reason(s, e)))
                continue
            if skipped:
                corrupt = [CorruptCheckpoint(c, r, self._move_aside(c)) for c, r in skipped]
                self.last_fallback = RestoreFallback(s, corrupt)
                log.warning("%s", self.last_fallback.message)
                if self._manager is not None:
                    self._manager.reload()
            return s
        shown = "; ".join(f"step {c}: {r}" for c, r in skipped[:5])
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ({shown}); nothing was moved: inspect or "
            f"delete them, or start again in a new --workdir")

    def _reason(self, step: int, e: CheckpointError) -> str:
        msg = str(e)
        for marker in (f"(step {step}) is corrupt: ", f"{self._step_dir(step)}: "):
            if marker in msg:
                return msg.split(marker, 1)[1]
        return msg

    def _move_aside(self, step: int) -> Optional[str]:
        """Rename a corrupt step directory out of the step listing (process 0 only)."""
        if jax.process_index() != 0:
            return None
        base = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        dest, i = base, 1
        while os.path.lexists(dest):
            dest, i = f"{base}-{i}", i + 1
        try:
            os.rename(self._step_dir(step), dest)
        except OSError as e:
            log.warning("could not move corrupt checkpoint %s aside: %s", self._step_dir(step), e)
            return None
        return dest

    def _resolve_step(self, step: Optional[int]) -> int:
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        complete = self.all_steps()
        if step is None:
            if not complete:
                names = sorted(os.listdir(self.directory))
                partial = [n for n in names if TMP_MARKER in n or n.isdigit()]
                if not names:
                    detail = "the directory is empty"
                elif partial:
                    detail = f"only incomplete/interrupted saves found: {partial}"
                else:
                    detail = f"no checkpoint among {names[:10]}"
                raise CheckpointError(f"no complete checkpoint in {self.directory}: {detail}")
            skipped = [s for s in self._committed_steps() if s > complete[-1]]
            if skipped:
                log.warning("skipping incomplete checkpoints %s in %s", skipped, self.directory)
            return complete[-1]
        step = int(step)
        if step in complete:
            return step
        if step in self._committed_steps():
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} (step {step}) is incomplete: it has no "
                f"{MANIFEST_NAME} (the save was interrupted); complete steps: {complete}"
            )
        tmp = [n for n in os.listdir(self.directory) if n.startswith(f"{step}{TMP_MARKER}")]
        if tmp:
            raise CheckpointError(
                f"checkpoint for step {step} in {self.directory} was never committed (uncommitted "
                f"temporary directory {tmp[0]}: the save was interrupted); complete steps: {complete}"
            )
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; complete steps: {complete}")

    def _abstract_for_restore(
        self, step: int, abstract_state: Any, keys: Mapping[str, str], subset: bool = False
    ) -> Any:
        """Check ``abstract_state`` against the stored metadata; key leaves -> key data.

        ``subset``: ``abstract_state`` is a dict of some top-level entries; only those are
        compared (the others are not restored)."""
        stored_tree = self._stored_state_tree(step)
        if subset:
            stored_tree = {k: stored_tree[k] for k in abstract_state}
        stored_leaves = {
            _path_str(p): m
            for p, m in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
            if m is not None
        }

        def to_abstract(path, x):
            ps = _path_str(path)
            sharding = getattr(x, "sharding", None)
            if _is_prng_key(x):
                if ps not in keys:
                    raise CheckpointError(
                        f"checkpoint {self._step_dir(step)}: abstract_state leaf {ps} is a PRNG key "
                        f"but the checkpoint stores plain data there"
                    )
                shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
                if isinstance(sharding, jax.sharding.NamedSharding):
                    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(tuple(sharding.spec)))
                    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
                else:
                    sharding = None
                return jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=sharding)
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                x = np.asarray(x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        target = jax.tree_util.tree_map_with_path(to_abstract, abstract_state)
        want = {_path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
        missing = sorted(set(stored_leaves) - set(want))
        extra = sorted(set(want) - set(stored_leaves))
        problems = []
        if extra:
            problems.append(f"not in checkpoint: {extra[:8]}")
        if missing:
            problems.append(f"in checkpoint but not in abstract_state: {missing[:8]}")
        for ps in sorted(set(want) & set(stored_leaves)):
            m, a = stored_leaves[ps], want[ps]
            if tuple(m.shape) != tuple(a.shape):
                problems.append(f"{ps}: shape {tuple(a.shape)} requested, {tuple(m.shape)} stored")
            elif np.dtype(m.dtype) != np.dtype(a.dtype):
                problems.append(f"{ps}: dtype {np.dtype(a.dtype)} requested, {np.dtype(m.dtype)} stored")
        if problems:
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} (step {step}) does not match abstract_state: "
                + "; ".join(problems[:10])
            )
        return target

    def restore(
        self, step: Optional[int] = None, abstract_state: Any = None
    ) -> Tuple[Any, Dict[str, Any], Optional[Dict[str, Any]]]:
        """Restore ``(state, meta, replay)`` of ``step`` (default: latest complete one).

        ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or of
        arrays) gives the exact tree type (e.g. optax namedtuples) and places every array
        on its sharding; it must match the stored paths, shapes and dtypes. Without it,
        arrays come back with default placement and namedtuples as lists.

        Raises:
          CheckpointError: missing/empty directory, incomplete or corrupt checkpoint,
            or a structure mismatch with ``abstract_state``.
        """
        self._finalize_pending()
        step = self._resolve_verified_step(step)
        manager = self._get_manager()
        manager.reload()
        root = self._step_dir(step)
        keys = self._read_info(step)
        if abstract_state is not None:
            state_args = ocp.args.StandardRestore(self._abstract_for_restore(step, abstract_state, keys))
        else:
            state_args = ocp.args.StandardRestore()
        try:
            # A numpy target keeps the replay blob on the host (never on an accelerator).
            blob_meta = manager.item_metadata(step)["replay"].tree["blob"]
            replay_args = ocp.args.StandardRestore({"blob": np.zeros(tuple(blob_meta.shape), np.uint8)})
            out = manager.restore(
                step,
                args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore(), replay=replay_args),
            )
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            hint = (
                " (pass abstract_state with shardings for the current devices)"
                if abstract_state is None and "topolog" in str(e).lower()
                else ""
            )
            raise CheckpointError(f"checkpoint {root} (step {step}) could not be restored{hint}: {e}") from e

        def rekey(path, x):
            impl = keys.get(_path_str(path))
            return jax.random.wrap_key_data(x, impl=impl) if impl is not None else x

        state = jax.tree_util.tree_map_with_path(rekey, out["state"])
        replay = decode_replay(np.asarray(out["replay"]["blob"]))
        return state, dict(out["meta"] or {}), replay

    def _read_info(self, step: int) -> Dict[str, str]:
        """The checkpoint's info record (format check); returns its PRNG-key leaves."""
        root = self._step_dir(step)
        try:
            info = self._get_manager().restore(
                step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {root}: cannot read info ({e})") from e
        if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {root}: unsupported format {info!r}")
        return info.get("prng_keys", {})

    def restore_subset(
        self,
        step: Optional[int] = None,
        abstract_subset: Optional[Mapping[str, Any]] = None,
        keys: Optional[Iterable[str]] = None,
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Restore only some top-level entries of the saved state, e.g. ``step``,
        ``trainable`` and ``log_z`` of a TrainState, without reading the others (the
        optimizer state is neither read nor allocated). Returns ``(subset, meta)`` where
        ``subset`` is a dict keyed by the requested entry names.

        ``abstract_subset`` maps entry names to abstract subtrees (``jax.ShapeDtypeStruct``
        with shardings, or arrays) that must match what is stored for those entries; ``keys``
        instead names entries restored as stored (shapes and dtypes from the checkpoint,
        on the default device; use ``abstract_subset`` on multi-host runs). The step is
        chosen and verified as in :meth:`restore` (latest with fallback, or explicit and
        strict). PRNG keys come back typed, as in :meth:`restore`.
        """
        if (abstract_subset is None) == (keys is None):
            raise ValueError("pass exactly one of abstract_subset or keys")
        self._finalize_pending()
        step = self._resolve_verified_step(step)
        manager = self._get_manager()
        manager.reload()
        root = self._step_dir(step)
        prng_keys = self._read_info(step)
        stored = self._stored_state_tree(step)
        if not isinstance(stored, Mapping):
            raise CheckpointError(f"checkpoint {root}: the saved state is not a tree of named entries")
        names = list(abstract_subset) if abstract_subset is not None else list(keys or ())
        unknown = [n for n in names if n not in stored]
        if unknown:
            raise CheckpointError(
                f"checkpoint {root} (step {step}) has no state entries {unknown}; it has {sorted(stored)}")
        if abstract_subset is None:
            device = jax.local_devices()[0]
            sharding = jax.sharding.SingleDeviceSharding(device)

            def from_meta(m: Any) -> Any:
                return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

            target = {n: jax.tree_util.tree_map(from_meta, stored[n]) for n in names}
            # stored key data is already uint32: restore it as is, re-wrap below
        else:
            target = self._abstract_for_restore(step, dict(abstract_subset), prng_keys, subset=True)
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
                out = ckptr.restore(
                    os.path.join(root, "state"),
                    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                partial_restore=True),
                )
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {root} (step {step}) could not be restored: {e}") from e

        def rekey(path, x):
            impl = prng_keys.get(_path_str(path))
            return jax.random.wrap_key_data(x, impl=impl) if impl is not None else x

        subset = jax.tree_util.tree_map_with_path(rekey, {n: out[n] for n in names})
        return subset, dict(meta or {})

    def _stored_state_tree(self, step: int) -> Any:
        try:
            stored = self._get_manager().item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds
            raise CheckpointError(f"checkpoint {self._step_dir(step)}: cannot read state metadata ({e})") from e
        tree = getattr(stored, "tree", stored)
        if tree is None:
            raise CheckpointError(f"checkpoint {self._step_dir(step)}: state metadata is missing")
        return tree

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._finalize_pending()
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


class PreemptionHandler:
    """Context manager turning SIGTERM (and optionally SIGINT) into a polled flag.

    ``with PreemptionHandler() as pre: for step ...: if pre.should_stop(step): save; break``

    ``requested`` is this process's flag. ``should_stop(step)`` is what a (multi-host)
    loop should poll: on one process it is ``requested``; on several it is True on every
    process as soon as any process was signalled (flag all-gathered), or when JAX's
    preemption service reports a sync point (``reached_preemption_sync_point``, available
    when ``jax.distributed`` was initialised). All processes must call it at every step.
    A second SIGINT falls through to the previous handler (KeyboardInterrupt by default;
    nothing where SIGINT was ignored).
    Handlers can only be installed from the main thread; the previous ones are restored
    on exit.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), catch_sigint: bool = False) -> None:
        sigs = list(signals)
        if catch_sigint and signal.SIGINT not in sigs:
            sigs.append(signal.SIGINT)
        self._signals = sigs
        self._previous: Dict[int, Any] = {}
        self._event = threading.Event()
        self.received: Optional[int] = None
        self._installed = False

    @property
    def requested(self) -> bool:
        """True once a handled signal was received by this process."""
        return self._event.is_set()

    def request(self) -> None:
        """Set the flag by hand (e.g. from a time limit)."""
        self._event.set()

    def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        if signum == signal.SIGINT and self._event.is_set() and self.received == signal.SIGINT:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
                return
            if prev == signal.SIG_IGN:  # the process was started ignoring Ctrl-C
                return
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()
        log.warning("received signal %d: will checkpoint and stop at the next step", signum)

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be entered from the main thread (signal handlers)")
        for s in self._signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def should_stop(self, step: int) -> bool:
        """Whether the loop should checkpoint and stop now (collective on multi-host)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        stop = False
        sync_point = getattr(multihost_utils, "reached_preemption_sync_point", None)
        if sync_point is not None:
            try:
                stop = bool(sync_point(int(step)))
            except RuntimeError:  # preemption service not initialised
                stop = False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return stop or bool(np.any(flags))
