"""Run directories and output paths that never lose or mix data.

- :class:`RunLock`: one writer per run directory (lock file with pid, host, start time and
  command; ``O_EXCL`` creation plus ``fcntl.flock``; stale-lock take-over).
- :func:`prepare_fresh_run`: a fresh run in a directory that holds one either refuses or
  moves the whole old run aside (one atomic rename), never a mixture.
- :func:`check_config_change`: which config differences a resumed run accepts.
- :func:`check_output_dir` / :func:`atomic_output_dir` / :func:`atomic_write_file` /
  :func:`check_writable`: outputs are checked before any expensive work and appear
  complete or not at all.
- :func:`one_line_os_error`: ENOSPC / EACCES / EROFS / ENOENT as one actionable line.

Pure Python (no JAX import), so the CLI can use it before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = "gfn-jax.lock"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
# What a run writes into its directory (anything of these makes a directory "hold a run").
RUN_ARTIFACTS = (CONFIG_NAME, CHECKPOINT_DIR, "metrics.jsonl", "summary.json", "tb")


class RunDirError(RuntimeError):
    """A run directory or output path cannot be used as asked; the message says why and what to do."""


class RunDirLocked(RunDirError):
    """Another live process holds the run directory's lock."""

    def __init__(self, message: str, holder: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class ExistingRunError(RunDirError):
    """A fresh run was asked for in a directory that already holds a run."""


class ConfigChangeError(RunDirError):
    """Resuming with a config whose changes are refused."""


class OutputPathError(RunDirError):
    """An output path is unusable (not writable, non-empty, inside a run directory, ...)."""


# --------------------------------------------------------------------------------------
# OS errors as one line
# --------------------------------------------------------------------------------------

_ERRNO_TEXT = (
    (errno.ENOSPC, "No space left on device"),
    (errno.EACCES, "Permission denied"),
    (errno.EROFS, "Read-only file system"),
    (errno.ENOENT, "No such file or directory"),
)
if hasattr(errno, "EDQUOT"):
    _ERRNO_TEXT = _ERRNO_TEXT + ((errno.EDQUOT, "Disk quota exceeded"),)


def find_os_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc`` (itself, its cause/context chain, exception groups), or one
    rebuilt from the text of errors that only carry it in their message (tensorstore/orbax)."""
    seen = set()
    stack = [exc]
    texts = []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        texts.append(str(e))
        stack.extend([e.__cause__, e.__context__])
        stack.extend(getattr(e, "exceptions", ()) or ())
    joined = " ".join(texts)
    for code, text in _ERRNO_TEXT:
        if text.lower() in joined.lower() or errno.errorcode.get(code, "?") in joined:
            return OSError(code, text)
    return None


def one_line_os_error(e: BaseException, what: str, path: Optional[str] = None,
                      flag: Optional[str] = None) -> str:
    """One actionable line for a file-system error.

    ``what`` is the action (``"saving checkpoint step 100"``), ``path`` where (default: the
    error's filename), ``flag`` the option that chooses the location (``"--workdir"``).
    Example: ``disk full while saving checkpoint step 100 to runs/x/checkpoints; free space or
    point --workdir elsewhere``.
    """
    oe = e if isinstance(e, OSError) else find_os_error(e)
    code = getattr(oe, "errno", None)
    path = path if path is not None else (getattr(oe, "filename", None) or "")
    path = os.fspath(path) if path else ""
    where = f" to {path}" if path else ""
    elsewhere = f"point {flag} elsewhere" if flag else "choose another location"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        kind = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        msg = f"{kind} while {what}{where}; free space or {elsewhere}"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied while {what}{where}; fix the permissions or {elsewhere}"
    elif code == errno.EROFS:
        msg = f"read-only file system while {what}{where}; {elsewhere} (a writable location)"
    elif code == errno.ENOENT:
        msg = f"no such file or directory while {what}" + (f": {path}" if path else "") + \
            "; check the path"
    elif oe is not None:
        reason = getattr(oe, "strerror", None) or str(oe)
        msg = f"{reason} while {what}" + (f": {path}" if path else "")
    else:
        msg = f"{type(e).__name__} while {what}" + (f" ({path})" if path else "") + f": {e}"
    return " ".join(msg.split())  # one line


# --------------------------------------------------------------------------------------
# Run directory lock
# --------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _proc_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    return rest[0] if rest else None


def pid_alive(pid: int, start_time: Optional[str] = None) -> bool:
    """Whether process ``pid`` (on this host) is running and, if ``start_time`` is given
    (from :func:`_proc_start_time`), is the same process and not a reused pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _proc_state(pid) == "Z":  # exited, not yet reaped
        return False
    if start_time is not None:
        now = _proc_start_time(pid)
        if now is not None and now != start_time:
            return False
    return True


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _describe_holder(h: Mapping[str, Any]) -> str:
    since = h.get("since")
    since_s = _fmt_time(float(since)) if isinstance(since, (int, float)) else "an unknown time"
    cmd = h.get("command")
    cmd_s = f" ({cmd if len(str(cmd)) <= 200 else str(cmd)[:200] + '...'})" if cmd else ""
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} since {since_s}{cmd_s}"


class RunLock:
    """Exclusive lock on a run directory, held by one process (process 0 of a multi-host run).

    ``with RunLock(workdir): ...`` creates ``workdir`` if needed and the lock file
    ``workdir/gfn-jax.lock`` (JSON: pid, host, since, command) with ``O_CREAT | O_EXCL``, and
    holds ``fcntl.flock`` on it while the lock is held. Another process gets
    :class:`RunDirLocked` naming the holder. A lock left by a dead process is taken over:

    - same host: taken over when the holder's pid is no longer running (or was reused);
    - another host (its pid cannot be checked; ``flock`` over network file systems may not be
      seen across hosts): refused unless the lock was last refreshed (:meth:`heartbeat`) more
      than ``stale_after_s`` seconds ago, or ``force=True``.

    ``took_over`` holds the previous holder's record after a take-over (for the CLI to print).
    ``is_primary=False`` makes the lock a no-op (non-zero processes of a multi-host run).
    ``force_hint`` (e.g. ``"--force_unlock"``) is named in the refusal message.
    """

    def __init__(self, workdir: Union[str, os.PathLike], *, is_primary: bool = True,
                 stale_after_s: Optional[float] = None, force: bool = False,
                 command: Optional[str] = None, force_hint: Optional[str] = None) -> None:
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.is_primary = is_primary
        self.stale_after_s = stale_after_s
        self.force = force
        self.command = command if command is not None else " ".join(sys.argv)
        self.force_hint = force_hint
        self.took_over: Optional[Dict[str, Any]] = None
        self._fd: Optional[int] = None
        self._token: Optional[str] = None

    # -- public --------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if not self.is_primary or self.held:
            return self
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise OutputPathError(one_line_os_error(e, "creating the run directory",
                                                    self.workdir, "--workdir")) from e
        for _ in range(50):
            if self._try_acquire():
                return self
            time.sleep(0.1)
        raise RunDirLocked(f"could not take the lock {self.path}: it keeps changing "
                           f"(several processes starting at once?); try again")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._still_ours(fd):
                os.unlink(self.path)  # unlink before unlocking: a waiter re-checks the inode
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def heartbeat(self) -> None:
        """Refresh the lock file's mtime (lets other hosts tell a live run from a dead one)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def holder(self) -> Optional[Dict[str, Any]]:
        """The record in the lock file now (whoever holds it), or None."""
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "null")
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------
    def _record(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "proc_start": _proc_start_time(os.getpid()), "command": self.command,
                "token": self._token, "flock": fcntl is not None}

    def _write_record(self, fd: int) -> None:
        self._token = uuid.uuid4().hex
        data = json.dumps(self._record(), indent=1).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    @staticmethod
    def _flock(fd: int) -> Optional[bool]:
        """True: locked; False: someone else holds it; None: flock unavailable here."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            return None  # ENOLCK / EOPNOTSUPP: file system without flock

    def _same_inode(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def _still_ours(self, fd: int) -> bool:
        if not self._same_inode(fd):
            return False
        rec = self.holder()
        return rec is not None and rec.get("token") == self._token

    def _read_fd(self, fd: int) -> Optional[Dict[str, Any]]:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        try:
            rec = json.loads(b"".join(chunks).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) else None

    def _try_acquire(self) -> bool:
        """One attempt; True when held, False to retry; raises RunDirLocked when refused."""
        created = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return False  # released meanwhile
        except OSError as e:
            raise OutputPathError(one_line_os_error(e, "creating the run lock", self.path,
                                                    "--workdir")) from e
        keep = False
        try:
            got = self._flock(fd)
            if got is False:
                raise self._refusal(self._read_fd(fd), "it is running")
            if not self._same_inode(fd):
                return False  # replaced or removed between open and flock
            if created:
                self._write_record(fd)
                keep = True
                return True
            rec = self._read_fd(fd)
            age = time.time() - os.fstat(fd).st_mtime
            if rec is None:
                if age < 10.0:
                    return False  # its creator is still writing it
                log.warning("taking over unreadable lock file %s", self.path)
                self.took_over = {}
            else:
                stale, why = self._is_stale(rec, age, got)
                if not stale:
                    raise self._refusal(rec, why)
                log.warning("taking over the lock of %s: %s", _describe_holder(rec), why)
                self.took_over = dict(rec, reason=why)
            self._write_record(fd)
            keep = True
            return True
        finally:
            if keep:
                self._fd = fd
            else:
                os.close(fd)

    def _is_stale(self, rec: Mapping[str, Any], age: float, flocked: Optional[bool]) -> Tuple[bool, str]:
        host = socket.gethostname()
        if rec.get("host") == host:
            pid = int(rec.get("pid") or 0)
            start = rec.get("proc_start")
            if not pid_alive(pid, start if isinstance(start, str) else None):
                return True, f"process {pid} is no longer running"
            if pid == os.getpid():
                return False, "this process already holds it"
            return False, "it is running"
        if self.force:
            return True, "forced"
        if self.stale_after_s is not None and age > self.stale_after_s:
            return True, f"not refreshed for {age:.0f} s (> {self.stale_after_s:g} s)"
        return False, "it is on another host, so it cannot be checked from here"

    def _refusal(self, rec: Optional[Mapping[str, Any]], why: str) -> RunDirLocked:
        who = _describe_holder(rec) if rec else "another process"
        what_to_do = "wait for it to finish or stop it, or use another --workdir"
        stale = (f"if that process is gone, delete {self.path}"
                 + (f" or pass {self.force_hint}" if self.force_hint else ""))
        return RunDirLocked(
            f"run directory {self.workdir} is locked by {who} ({why}); {what_to_do}; {stale}",
            dict(rec or {}))

    def _moved(self, moved_dir: str) -> None:
        """After the whole locked directory was renamed to ``moved_dir`` (its lock file with
        it): lock the re-created ``self.workdir`` again, then drop our lock file from the
        moved run. If another process took the new directory meanwhile, RunDirLocked."""
        old_fd, old_token = self._fd, self._token
        self._fd = None
        try:
            self.acquire()
        finally:
            moved_lock = os.path.join(moved_dir, LOCK_NAME)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                with open(moved_lock) as f:
                    if json.loads(f.read() or "null").get("token") == old_token:
                        os.unlink(moved_lock)
            if old_fd is not None:
                os.close(old_fd)


# --------------------------------------------------------------------------------------
# fresh runs in a used directory
# --------------------------------------------------------------------------------------


def run_artifacts(path: Union[str, os.PathLike]) -> List[str]:
    """Which of the files a run writes (config.json, checkpoints/, metrics.jsonl, ...) exist."""
    path = os.fspath(path)
    return [n for n in RUN_ARTIFACTS if os.path.exists(os.path.join(path, n))]


def is_run_dir(path: Union[str, os.PathLike]) -> bool:
    """A directory holding a run: ``checkpoints/``, or a ``config.json`` that is a run's
    config (not a Hugging Face export's, which names ``model_type`` / ``architectures``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return True
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return True  # unreadable: treat as a run, never overwrite it
    return not (isinstance(d, dict) and ("model_type" in d or "architectures" in d))


def _checkpoint_steps(path: str) -> List[int]:
    d = os.path.join(path, CHECKPOINT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _describe_contents(path: str, names: Sequence[str]) -> str:
    parts = []
    for n in names[:8]:
        p = os.path.join(path, n)
        if n == CHECKPOINT_DIR:
            steps = _checkpoint_steps(path)
            parts.append(f"{n}/ (steps {steps})" if steps else f"{n}/")
        elif os.path.isdir(p):
            parts.append(n + "/")
        else:
            parts.append(n)
    if len(names) > 8:
        parts.append(f"... ({len(names)} entries)")
    return ", ".join(parts)


def _aside_name(workdir: str, now: Optional[float] = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    base = f"{workdir}.old-{stamp}"
    cand, i = base, 1
    while os.path.lexists(cand):
        cand = f"{base}-{i}"
        i += 1
    return cand


def prepare_fresh_run(workdir: Union[str, os.PathLike], mode: str = "refuse",
                      lock: Optional[RunLock] = None) -> Optional[str]:
    """Make ``workdir`` ready for a fresh run (``train --noresume``); never mixes two runs.

    - empty or missing directory (a lock file alone counts as empty): nothing to do, None;
    - ``mode="refuse"``: :class:`ExistingRunError` listing what is there and what to do;
    - ``mode="move_aside"``: rename the whole directory (one atomic rename) to
      ``<workdir>.old-<YYYYmmdd-HHMMSS>`` next to it and return that path; ``workdir`` is
      re-created empty. A directory with no run files in it is never moved (refused).

    Call it while holding ``lock`` (the :class:`RunLock` of ``workdir``); the lock moves with
    the old run and is taken again on the new empty directory.
    """
    if mode not in ("refuse", "move_aside"):
        raise ValueError(f"mode must be 'refuse' or 'move_aside', got {mode!r}")
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.exists(workdir):
        return None
    if not os.path.isdir(workdir):
        raise ExistingRunError(f"--workdir {workdir} is a file, not a directory; pass another --workdir")
    names = sorted(n for n in os.listdir(workdir) if n != LOCK_NAME)
    if not names:
        return None
    found = run_artifacts(workdir)
    if mode == "refuse" or not found:
        what = "a run" if found else "files that are not from a gfn-jax run"
        how = ("pass a new --workdir, resume it (drop --noresume), or pass --move_aside to "
               "rename the old run to <workdir>.old-<time> and start fresh"
               if found else "pass a new or empty --workdir")
        raise ExistingRunError(
            f"--workdir {workdir} already holds {what} ({_describe_contents(workdir, names)}); "
            f"a fresh run never mixes with it: {how}")
    if lock is not None and lock.held and lock.workdir != workdir:
        raise ValueError(f"lock is for {lock.workdir}, not {workdir}")
    dest = _aside_name(workdir)
    try:
        os.rename(workdir, dest)
    except OSError as e:
        raise ExistingRunError(one_line_os_error(e, f"moving the old run {workdir} aside", dest,
                                                 "--workdir")) from e
    log.warning("moved the previous run in %s to %s", workdir, dest)
    if lock is not None and lock.held:
        lock._moved(dest)
    else:
        os.makedirs(workdir, exist_ok=True)
    return dest


# --------------------------------------------------------------------------------------
# config changes on resume
# --------------------------------------------------------------------------------------

MISSING = "<missing>"

# Changing these is allowed on resume (they do not change what the run computes).
HARMLESS_KEYS = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                 "train.on_nan", "eval.*", "progress", "mesh.*", "model.share_prompt",
                 "model.decode_chunk", "model.decode_layers", "model.cache_decode_weights", "train.profile_start",
                 "train.profile_steps")
# Changing these makes the saved state unusable (other shapes/tree): a new workdir is needed.
STRUCTURAL_KEYS = ("model.spec", "model.random.*", "model.param_dtype", "lora.enabled",
                   "lora.rank", "lora.targets", "objective.log_z")
# Every other key (seed, optim.*, objective.*, model.*, task.*, lora.*, reward.*, data.*,
# explore.*, replay.*, train.<batch shape>, ...) changes the run's meaning.


def _matches(key: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.endswith(".*"):
            if key == p[:-2] or key.startswith(p[:-1]):
                return True
        elif key == p:
            return True
    return False


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _get(d: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return MISSING
        d = d[part]
    return dict(d) if isinstance(d, Mapping) else d


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = dict(v) if isinstance(v, Mapping) else v
    return out


@dataclasses.dataclass
class ConfigChange:
    """Differences between a run's saved config and the one it is resumed with.

    Each list holds ``(dotted.key, old, new)``; ``old``/``new`` is ``MISSING`` for a key that
    only one side has.
    """

    harmless: List[Tuple[str, Any, Any]]
    meaning: List[Tuple[str, Any, Any]]
    structural: List[Tuple[str, Any, Any]]
    allowed: List[Tuple[str, Any, Any]]  # meaning changes the caller explicitly allowed

    @property
    def refused(self) -> List[Tuple[str, Any, Any]]:
        return self.structural + self.meaning

    @property
    def ok(self) -> bool:
        return not self.refused

    def message(self, allow_flag: str = "--allow_config_change") -> str:
        """What is refused and what to do (empty when nothing is)."""
        def fmt(items: List[Tuple[str, Any, Any]]) -> str:
            return ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in items[:8]) + (
                f", ... ({len(items)} keys)" if len(items) > 8 else "")
        if self.structural:
            return (f"the config changes the shape of the saved state ({fmt(self.structural)}); "
                    f"the checkpoints cannot be resumed with it: use a new --workdir")
        if self.meaning:
            return (f"the config changes what the run computes ({fmt(self.meaning)}); resuming "
                    f"would mix two runs: use a new --workdir, or pass {allow_flag} to resume "
                    f"with the change anyway")
        return ""

    def raise_if_refused(self, allow_flag: str = "--allow_config_change") -> None:
        if not self.ok:
            raise ConfigChangeError(self.message(allow_flag))


def check_config_change(old: Mapping[str, Any], new: Mapping[str, Any],
                        allow: Union[bool, Iterable[str]] = False) -> ConfigChange:
    """Classify the differences between the saved config ``old`` and ``new`` (nested dicts).

    - harmless (:data:`HARMLESS_KEYS`: steps, intervals, eval, mesh) are accepted; but
      ``train.steps`` changes the learning-rate schedule unless ``optim.schedule`` is
      ``"constant"``, and then counts as a meaning change;
    - structural (:data:`STRUCTURAL_KEYS`, or a section that became a value or vice versa):
      always refused (use a new workdir);
    - every other key changes the run's meaning: refused unless ``allow`` is True or lists
      the key (patterns like ``"optim.*"`` allowed); allowed ones go to ``.allowed``.

    Lists and tuples compare equal (JSON turns tuples into lists).
    """
    fo, fn = _flatten(old), _flatten(new)
    harmless, meaning, structural, allowed = [], [], [], []
    allow_all = allow is True
    allow_keys = () if isinstance(allow, bool) else tuple(allow)
    schedule = fn.get("optim.schedule", fo.get("optim.schedule", "constant"))

    def is_section(key: str, flat: Mapping[str, Any]) -> bool:
        return any(k.startswith(key + ".") for k in flat)

    def under_leaf(key: str, flat: Mapping[str, Any]) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in flat for i in range(1, len(parts)))

    for key in sorted(set(fo) | set(fn)):
        o, n = fo.get(key, MISSING), fn.get(key, MISSING)
        if _norm(o) == _norm(n):
            continue
        item = (key, o, n)
        if (key not in fo and under_leaf(key, fo)) or (key not in fn and under_leaf(key, fn)):
            continue  # reported at the shorter key (a value on one side, a section on the other)
        if (key in fo and key not in fn and is_section(key, fn)) or \
                (key in fn and key not in fo and is_section(key, fo)):
            structural.append((key, _get(old, key), _get(new, key)))
        elif _matches(key, STRUCTURAL_KEYS):
            structural.append(item)
        elif _matches(key, HARMLESS_KEYS) and not (key == "train.steps" and schedule != "constant"):
            harmless.append(item)
        elif allow_all or _matches(key, allow_keys):
            allowed.append(item)
        else:
            meaning.append(item)
    return ConfigChange(harmless, meaning, structural, allowed)


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


def _is_within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_writable(path: Union[str, os.PathLike], *, is_dir: bool = False,
                   flag: Optional[str] = None, min_free_bytes: int = 0) -> str:
    """Fail early (before expensive work) if ``path`` cannot be written.

    For a file (``is_dir=False``) its directory is created if missing and a probe file is
    created and removed there; for a directory, the directory it will live in is probed. An
    existing ``path`` of the wrong kind is refused. Returns the absolute path.
    Raises :class:`OutputPathError` with one line naming ``flag`` (e.g. ``"--output"``).
    """
    path = os.path.abspath(os.fspath(path))
    name = flag or "output"
    if os.path.isdir(path) and not is_dir:
        raise OutputPathError(f"{name} {path} is a directory; give a file path")
    if os.path.exists(path) and not os.path.isdir(path) and is_dir:
        raise OutputPathError(f"{name} {path} is a file; give a directory path")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=parent)
        os.close(fd)
        os.unlink(probe)
        if os.path.isfile(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied", path)
    except OSError as e:
        where = e.filename if getattr(e, "filename", None) else parent
        raise OutputPathError(one_line_os_error(e, f"checking that {name} can be written",
                                                where, flag)) from e
    if min_free_bytes:
        free = shutil.disk_usage(parent).free
        if free < min_free_bytes:
            raise OutputPathError(
                f"only {free / 2**20:.0f} MiB free in {parent} for {name} (needs about "
                f"{min_free_bytes / 2**20:.0f} MiB); free space or "
                + (f"point {flag} elsewhere" if flag else "choose another location"))
    return path


def _contains_run_dir(path: str, limit: int = 10000) -> Optional[str]:
    n = 0
    for dirpath, dirnames, _ in os.walk(path):
        if is_run_dir(dirpath):
            return dirpath
        n += 1
        if n > limit:
            return None
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return None


def check_output_dir(out: Union[str, os.PathLike], overwrite: bool = False,
                     forbid_inside: Sequence[Union[str, os.PathLike]] = (),
                     flag: str = "--out") -> str:
    """Check, before any expensive work, that directory ``out`` may be written; returns it
    absolute. Refused (:class:`OutputPathError`): ``out`` is, is inside, or contains a run
    directory (or one of ``forbid_inside``); ``out`` is a file; ``out`` is non-empty and not
    ``overwrite``; its parent is not writable."""
    out = os.path.abspath(os.fspath(out))
    for root in forbid_inside:
        root = os.path.abspath(os.fspath(root))
        if _is_within(out, root):
            raise OutputPathError(f"{flag} {out} is inside the run directory {root}; writing "
                                  f"there would break the run: choose a directory outside it")
        if _is_within(root, out):
            raise OutputPathError(f"{flag} {out} contains the run directory {root}; choose "
                                  f"another directory")
    p = out
    while True:
        if is_run_dir(p):
            raise OutputPathError(f"{flag} {out} is {'' if p == out else 'inside '}the run "
                                  f"directory {p}; writing there would break the run: choose "
                                  f"a directory outside it")
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise OutputPathError(f"{flag} {out} is a file; give a directory path")
        entries = os.listdir(out)
        if entries:
            run = _contains_run_dir(out)
            if run:
                raise OutputPathError(f"{flag} {out} contains the run directory {run}; "
                                      f"choose another directory")
            if not overwrite:
                raise OutputPathError(
                    f"{flag} {out} is not empty ({len(entries)} entries, e.g. "
                    f"{sorted(entries)[:3]}); pass --overwrite to replace it or choose a new "
                    f"directory")
    check_writable(out, is_dir=True, flag=flag)
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Union[str, os.PathLike], overwrite: bool = False,
                      forbid_inside: Sequence[Union[str, os.PathLike]] = (),
                      flag: str = "--out") -> Iterator[str]:
    """Write a directory atomically: ``with atomic_output_dir(out) as tmp: write into tmp``.

    Checks as :func:`check_output_dir`, then yields a new temporary directory next to
    ``out``. On success it takes ``out``'s place (an old ``out`` is removed only then, so
    nothing of it is left mixed in); on an exception ``out`` is untouched and the temporary
    directory removed.
    """
    out = check_output_dir(out, overwrite=overwrite, forbid_inside=forbid_inside, flag=flag)
    parent, base = os.path.split(out)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _fsync_tree(tmp)
        old = None
        if os.path.exists(out):
            if os.listdir(out) and not overwrite:  # appeared meanwhile
                raise OutputPathError(f"{flag} {out} was filled by someone else meanwhile; "
                                      f"the new output is in {tmp}")
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(out, os.path.join(old, base))
        os.rename(tmp, out)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputPathError(one_line_os_error(e, f"writing {flag}", out, flag)) from e


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_write_file(path: Union[str, os.PathLike], mode: str = "w",
                      encoding: Optional[str] = "utf-8", flag: Optional[str] = None) -> Iterator[Any]:
    """``with atomic_write_file(p) as f: f.write(...)``: the file appears complete or not at
    all (temporary file next to it, flush, fsync, ``os.replace``); on an exception the old
    file (if any) is untouched. OS errors become :class:`OutputPathError` (one line)."""
    if "w" not in mode:
        raise ValueError(f"mode must be a write mode, got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent)
    except OSError as e:
        raise OutputPathError(one_line_os_error(e, f"writing {flag or 'output'}", path, flag)) from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputPathError(one_line_os_error(e, f"writing {flag or 'output'}", path, flag)) from e
        raise
