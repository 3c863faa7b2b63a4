"""Import Llama-family GGUF checkpoints (llama.cpp format) as gfn-jax parameters.

:func:`load_gguf` reads hyper-parameters from the ``llama.*`` metadata, dequantizes every
tensor to float32 with ``gguf.quants.dequantize`` and maps llama.cpp tensor names onto the
parameter tree of :mod:`gfn_jax.models.transformer`. The tokenizer is rebuilt from the
``tokenizer.ggml.*`` metadata (byte-level BPE, see
:func:`gfn_jax.models.tokenizer.byte_level_bpe`).

Layout notes:

* GGUF lists tensor dims fastest-first, i.e. reversed relative to numpy; the reader's
  arrays (and ``dequantize``'s output) already have numpy order, which for a linear layer
  is the HF/PyTorch ``[out, in]`` layout.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` from HF's
  ``rotate_half`` layout (first half / second half of each head) to interleaved pairs;
  :func:`unpermute_qk` undoes it so :func:`gfn_jax.models.transformer._rope_llama` applies.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer, byte_level_bpe

Params = Dict[str, Any]

GGUF_MAGIC = b"GGUF"
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class GGUFError(ValueError):
    """A GGUF file that cannot be imported (wrong family, missing metadata or tensors)."""


# ---------------------------------------------------------------------------
# Low-level reading
# ---------------------------------------------------------------------------
def _open(path: str):
    """Open ``path`` with ``gguf.GGUFReader`` after checking it exists and is GGUF."""
    import gguf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not os.path.isfile(path):
        raise GGUFError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})"
        )
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated / corrupt files raise assorted errors
        raise GGUFError(f"could not parse GGUF file {path}: {type(e).__name__}: {e}") from e


def read_metadata(reader: Any) -> Dict[str, Any]:
    """All key/value metadata of an open reader as Python values (lists for arrays)."""
    out: Dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # pragma: no cover - exotic value types we do not need
            continue
    return out


def _require(meta: Dict[str, Any], key: str, path: str) -> Any:
    if key not in meta:
        raise GGUFError(f"{path}: required metadata key {key!r} is missing")
    return meta[key]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation.

    ``w`` is ``[n_heads * head_dim, in]`` with each head's rows in interleaved-pair order
    (row ``2i + j`` holds HF row ``j * head_dim/2 + i``); returns HF ``rotate_half`` order.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"q/k weight with {rows} rows cannot split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_metadata(meta: Dict[str, Any], n_vocab: int, path: str = "<gguf>") -> ModelConfig:
    """Build a llama :class:`ModelConfig` from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' is supported"
        )
    p = "llama."
    req = lambda k: _require(meta, p + k, path)
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    d_model = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = int(meta.get(p + "attention.head_count_kv", n_heads))
    head_dim = int(meta.get(p + "attention.key_length", d_model // n_heads))
    rope_dims = meta.get(p + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise GGUFError(
            f"{path}: partial rotary (rope.dimension_count={rope_dims}, head_dim={head_dim}) "
            "is not supported for llama"
        )
    ff = req("feed_forward_length")
    if isinstance(ff, list):
        raise GGUFError(f"{path}: per-layer feed_forward_length is not supported")
    return ModelConfig(
        family="llama",
        vocab_size=int(n_vocab),
        d_model=d_model,
        n_layers=int(req("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=int(ff),
        max_seq_len=int(req("context_length")),
        norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
    )


def tokenizer_from_metadata(meta: Dict[str, Any], path: str = "<gguf>") -> Optional[Tokenizer]:
    """Rebuild the tokenizer from ``tokenizer.ggml.*`` metadata (``gpt2`` BPE only).

    Returns None when the file carries no token list.
    """
    tokens: Optional[List[str]] = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer model {model!r} is not supported; only byte-level BPE 'gpt2'"
        )
    merges = meta.get("tokenizer.ggml.merges") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    get = lambda k: None if meta.get(k) is None else int(meta[k])
    return byte_level_bpe(
        tokens,
        [tuple(m.split(" ", 1)) for m in merges],
        pre=meta.get("tokenizer.ggml.pre", "default"),
        special_tokens=special,
        user_tokens=user,
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------
def load_gguf(
    path: str, dtype: Optional[str] = None, host: bool = False
) -> Tuple[ModelConfig, Params, Optional[Tokenizer]]:
    """Load a Llama-family GGUF file.

    Args:
      path: the ``.gguf`` file.
      dtype: parameter and compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
        None keeps float32. Quantized tensors are dequantized to float32 first.
      host: keep the params as numpy arrays in host memory (for ``jax.device_put`` with
        their shardings: no device ever holds the whole model); default jax arrays.

    Returns ``(config, params, tokenizer)``; params are jax arrays in the layout of
    :func:`gfn_jax.models.transformer.init_params` (tokenizer None if the file has none).
    """
    import gguf

    path = os.fspath(path)
    reader = _open(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' is supported"
        )
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32)
        want = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are fastest-first
        if arr.shape != want:
            arr = arr.reshape(want)
        return arr

    embed = get("token_embd.weight")  # [V, D]
    cfg = config_from_metadata(meta, _n_vocab(meta, embed.shape[0]), path)
    if embed.shape != (cfg.vocab_size, cfg.d_model):
        raise GGUFError(
            f"{path}: token_embd.weight has shape {embed.shape}, expected "
            f"(vocab={cfg.vocab_size}, d_model={cfg.d_model})"
        )
    D, H, K, Dh, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers

    def check(name: str, arr: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
        if arr.shape != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {arr.shape}, expected {shape}")
        return arr

    per_layer: Dict[str, List[np.ndarray]] = {}

    def put(key: str, arr: np.ndarray) -> None:
        per_layer.setdefault(key, []).append(arr)

    for i in range(L):
        b = f"blk.{i}."
        wq = check(b + "attn_q.weight", get(b + "attn_q.weight"), (H * Dh, D))
        wk = check(b + "attn_k.weight", get(b + "attn_k.weight"), (K * Dh, D))
        wv = check(b + "attn_v.weight", get(b + "attn_v.weight"), (K * Dh, D))
        wo = check(b + "attn_output.weight", get(b + "attn_output.weight"), (D, H * Dh))
        wq, wk = unpermute_qk(wq, H), unpermute_qk(wk, K)
        put("attn_norm", check(b + "attn_norm.weight", get(b + "attn_norm.weight"), (D,)))
        put("q", wq.T.reshape(D, H, Dh))
        put("k", wk.T.reshape(D, K, Dh))
        put("v", wv.T.reshape(D, K, Dh))
        put("o", wo.T.reshape(H, Dh, D))
        put("mlp_norm", check(b + "ffn_norm.weight", get(b + "ffn_norm.weight"), (D,)))
        put("gate", check(b + "ffn_gate.weight", get(b + "ffn_gate.weight"), (cfg.d_ff, D)).T)
        put("up", check(b + "ffn_up.weight", get(b + "ffn_up.weight"), (cfg.d_ff, D)).T)
        put("down", check(b + "ffn_down.weight", get(b + "ffn_down.weight"), (D, cfg.d_ff)).T)
        for bias in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
            if b + bias in tensors:
                raise GGUFError(f"{path}: q/k/v biases ({b + bias}) are not supported")

    st = lambda key: np.ascontiguousarray(np.stack(per_layer[key]))
    params: Params = {
        "embed": {"embedding": embed},
        "layers": {
            "attn_norm": {"scale": st("attn_norm")},
            "attn": {
                "q": {"kernel": st("q")},
                "k": {"kernel": st("k")},
                "v": {"kernel": st("v")},
                "o": {"kernel": st("o")},
            },
            "mlp_norm": {"scale": st("mlp_norm")},
            "mlp": {
                "gate": {"kernel": st("gate")},
                "up": {"kernel": st("up")},
                "down": {"kernel": st("down")},
            },
        },
        "final_norm": {"scale": check("output_norm.weight", get("output_norm.weight"), (D,))},
    }
    tied = "output.weight" not in tensors
    if not tied:
        head = check("output.weight", get("output.weight"), (cfg.vocab_size, D))
        params["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}
    cfg = cfg.replace(tie_embeddings=tied)
    if dtype is not None:
        name = dtype_name(dtype)
        cfg = cfg.replace(dtype=name, param_dtype=name)
    params = cast_params(params, cfg.params_dtype, host=host)
    tokenizer = tokenizer_from_metadata(meta, path)
    return cfg, params, tokenizer


def _n_vocab(meta: Dict[str, Any], embed_rows: int) -> int:
    tok_list = meta.get("tokenizer.ggml.tokens")
    return len(tok_list) if tok_list else int(meta.get("llama.vocab_size", embed_rows))


def read_config(path: str, dtype: Optional[str] = None
                ) -> Tuple[ModelConfig, Optional[Tokenizer]]:
    """The :class:`ModelConfig` and tokenizer that :func:`load_gguf` would return, from the
    file's metadata and tensor table alone: no tensor is read or dequantized."""
    path = os.fspath(path)
    reader = _open(path)
    meta = read_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
    cfg = config_from_metadata(meta, _n_vocab(meta, shapes["token_embd.weight"][0]), path)
    cfg = cfg.replace(tie_embeddings="output.weight" not in shapes)
    if dtype is not None:
        name = dtype_name(dtype)
        cfg = cfg.replace(dtype=name, param_dtype=name)
    return cfg, tokenizer_from_metadata(meta, path)


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"bfloat16"``...) of a dtype given as a string or numpy/jax type."""
    import jax.numpy as jnp

    try:
        return jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e


def cast_params(params: Params, dtype: Any, host: bool = False) -> Params:
    """Every leaf of a nested-dict parameter tree as a jax array of ``dtype`` (with ``host``,
    a numpy array in host memory: nothing is placed on a device)."""
    import jax
    import jax.numpy as jnp

    if host:
        dt = np.dtype(jnp.dtype(dtype))  # bfloat16 through ml_dtypes
        return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dt, copy=False), params)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params)
