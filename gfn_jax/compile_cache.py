"""A persistent XLA compilation cache for runs: a resumed, repeated or swept run loads its
compiled programs from disk instead of compiling them again.

A train step of SmolLM2-135M takes ~1-2 minutes to compile on a 2-core CPU and minutes for
billion-parameter models on accelerators; preemption-resume loops (``launch/tpu.sh``,
``launch/slurm.sh``) and sweeps repeat the same programs. ``config.train.compilation_cache``
chooses the directory: ``"auto"`` (the default) uses ``$JAX_COMPILATION_CACHE_DIR`` when set,
otherwise ``$XDG_CACHE_HOME/gfn_jax/xla`` (``~/.cache/gfn_jax/xla``) capped at
:data:`DEFAULT_MAX_BYTES` (least recently used entries go first); ``"none"`` turns it off; any
other value is a directory. JAX keys every entry by the program, the compiler flags, the
JAX/XLA versions and the devices, so a cache never serves a program built for something
else, and a damaged entry is recompiled with a warning, not used.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["DEFAULT_MAX_BYTES", "default_dir", "enable_compilation_cache"]

#: Size cap of the default cache directory (an explicit directory is left uncapped).
DEFAULT_MAX_BYTES = 4 * 1024 ** 3


def default_dir() -> str:
    """``$XDG_CACHE_HOME/gfn_jax/xla`` (``~/.cache/gfn_jax/xla`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gfn_jax", "xla")


def _has_filelock() -> bool:
    import importlib.util

    return importlib.util.find_spec("filelock") is not None


def enable_compilation_cache(setting: str = "auto") -> Optional[str]:
    """Point JAX's persistent compilation cache at the directory ``setting`` names (see the
    module docstring); returns the directory in use, or None when the cache is off.

    Call it before the first compile. A directory already configured in JAX (by the
    environment or by the caller) is kept: ``"auto"`` never overrides a choice made
    elsewhere, and ``JAX_ENABLE_COMPILATION_CACHE=0`` turns every setting off. Raises ``ValueError`` naming the key when the directory cannot be created."""
    import jax

    setting = (setting or "none").strip()
    off = setting.lower() in ("none", "off", "false", "0")
    if off or not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=0
        return None
    current = jax.config.jax_compilation_cache_dir
    if setting.lower() == "auto":
        if current:
            return current
        path, cap = default_dir(), DEFAULT_MAX_BYTES
    else:
        path, cap = os.path.abspath(os.path.expanduser(setting)), -1
    problem = None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        problem = e.strerror or str(e)
    if problem is not None:  # raised outside the handler: the CLI reports this, not the OSError
        raise ValueError(
            f"config.train.compilation_cache: cannot create {path!r} ({problem}); pass "
            f"another directory, or --config.train.compilation_cache=none to compile "
            f"without a cache")
    jax.config.update("jax_compilation_cache_dir", path)
    if cap > 0 and jax.config.jax_compilation_cache_max_size in (-1, None) and _has_filelock():
        jax.config.update("jax_compilation_cache_max_size", cap)  # JAX's LRU needs filelock
    return path
