"""Hugging Face checkpoint import/export (``config.json`` + safetensors).

:func:`load_hf` reads a ``transformers`` causal-LM directory (model types ``gpt2``,
``llama``, ``mistral``, ``qwen2``, ``gptj``) into a :class:`ModelConfig` and the param
tree of :mod:`gfn_jax.models.config`; :func:`save_hf` writes the inverse, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``.

Weights are read tensor by tensor from memory-mapped safetensors files (single file or
sharded with ``model.safetensors.index.json``) straight into preallocated stacked
``[layers, ...]`` host arrays, so peak host memory is about one copy of the model.

Name maps (HF -> ours; ``i`` = layer, stacked on the leading ``layers`` axis):

* gpt2 (Conv1D weights are ``[in, out]``): ``wte``/``wpe`` -> ``embed``/``pos_embed``;
  ``h.i.attn.c_attn`` fused ``[D, 3D]`` -> q/k/v ``[D, H, Dh]`` (+ biases ``[H, Dh]``);
  ``attn.c_proj`` -> o ``[H, Dh, D]``; ``mlp.c_fc``/``mlp.c_proj`` -> up/down;
  ``ln_1``/``ln_2``/``ln_f`` -> attn_norm/mlp_norm/final_norm.
* llama family (``nn.Linear`` weights are ``[out, in]``): ``q_proj`` ``[H*Dh, D]`` ->
  ``[D, H, Dh]``; ``o_proj`` ``[D, H*Dh]`` -> ``[H, Dh, D]``; gate/up/down_proj
  transposed; ``input_layernorm``/``post_attention_layernorm``/``norm``. HF checkpoints
  already use the rotate-half rotary layout, so no q/k permutation is needed.
* gptj: ``q/k/v/out_proj`` as llama; ``mlp.fc_in``/``fc_out`` (+ bias) -> up/down;
  ``lm_head`` weight transposed, with its bias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from gfn_jax.models.config import ModelConfig
from gfn_jax.models.tokenizer import Tokenizer
from gfn_jax.models.transformer import param_shapes

Params = Dict[str, Any]
Path = Tuple[str, ...]

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gptj")
_ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "gptj": ("GPTJForCausalLM", "GPTJModel"),
}
_ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")
_DTYPES = ("float32", "bfloat16", "float16")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_REQUIRED = object()


# ---------------------------------------------------------------------------
# Config translation
# ---------------------------------------------------------------------------
def _get(hf: Dict[str, Any], *names: str, default: Any = _REQUIRED) -> Any:
    """First present (non-None) key among ``names``; raise naming it if required."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    if default is _REQUIRED:
        raise ValueError(f"config.json is missing required key {names[0]!r}")
    return default


def _rope_theta(hf: Dict[str, Any]) -> float:
    """rope_theta from ``rope_parameters`` (transformers >= 5) or legacy keys; reject
    any rope scaling other than none/default."""
    for key in ("rope_scaling", "rope_parameters"):
        rp = hf.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            raise ValueError(f"malformed config.json: {key!r} must be an object, got {rp!r}")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"unsupported rope_scaling type {kind!r} in config.json ({key}); only the "
                "default (unscaled) rotary embedding is supported"
            )
        factor = rp.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor={factor} for a llama-family model")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(
            f"unsupported partial_rotary_factor={hf['partial_rotary_factor']} for a llama-family model"
        )
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)) or 10000.0)


def _checkpoint_dtype(hf: Dict[str, Any]) -> str:
    d = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    d = str(d).replace("torch.", "")
    return d if d in _DTYPES else "float32"


def config_from_hf(hf: Dict[str, Any], dtype: Optional[str] = None) -> ModelConfig:
    """Translate a ``transformers`` ``config.json`` dict into a :class:`ModelConfig`.

    ``dtype`` sets both the parameter and compute dtype; None keeps the checkpoint's
    (``dtype``/``torch_dtype`` key, float32 when absent or unusual).
    """
    if not isinstance(hf, dict):
        raise ValueError(f"malformed config.json: expected a JSON object, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {mt!r} in config.json; supported: {SUPPORTED_MODEL_TYPES}"
        )
    archs = hf.get("architectures")
    if archs:
        bad = [a for a in archs if a not in _ARCHITECTURES[mt]]
        if bad:
            raise ValueError(
                f"unsupported architecture {bad} for model_type {mt!r}; supported: "
                f"{_ARCHITECTURES[mt]}"
            )
    if dtype is None:
        dtype = _checkpoint_dtype(hf)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    common = dict(dtype=dtype, param_dtype=dtype)

    if mt in ("gpt2", "gptj"):
        d = int(_get(hf, "n_embd", "hidden_size"))
        act = _get(hf, "activation_function", default="gelu_new")
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size")),
            d_model=d,
            n_layers=int(_get(hf, "n_layer", "num_hidden_layers")),
            n_heads=int(_get(hf, "n_head", "num_attention_heads")),
            d_ff=int(_get(hf, "n_inner", default=4 * d)),
            max_seq_len=int(_get(hf, "n_positions", "max_position_embeddings")),
            norm_eps=float(_get(hf, "layer_norm_epsilon", default=1e-5)),
            activation=act,
        )
        if mt == "gpt2":
            if not hf.get("scale_attn_weights", True):
                raise ValueError("unsupported gpt2 option scale_attn_weights=false")
            if hf.get("scale_attn_by_inverse_layer_idx", False):
                raise ValueError("unsupported gpt2 option scale_attn_by_inverse_layer_idx=true")
            if hf.get("add_cross_attention", False):
                raise ValueError("unsupported gpt2 option add_cross_attention=true")
            kw.update(tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        else:
            if hf.get("tie_word_embeddings", False):
                raise ValueError("unsupported gptj option tie_word_embeddings=true")
            kw.update(rotary_dim=hf.get("rotary_dim"), tie_embeddings=False)
    else:
        if hf.get("mlp_bias", False):
            raise ValueError(f"unsupported {mt} option mlp_bias=true")
        if mt != "qwen2" and hf.get("attention_bias", False):
            raise ValueError(
                f"unsupported {mt} option attention_bias=true (biased o_proj is not supported)"
            )
        d = int(_get(hf, "hidden_size"))
        n_heads = int(_get(hf, "num_attention_heads"))
        max_len = int(_get(hf, "max_position_embeddings", default=2048))
        sliding = hf.get("sliding_window")
        if sliding and (mt == "mistral" or hf.get("use_sliding_window", False)):
            # Within the window, sliding-window attention equals full attention.
            max_len = min(max_len, int(sliding))
        kw = dict(
            vocab_size=int(_get(hf, "vocab_size")),
            d_model=d,
            n_layers=int(_get(hf, "num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(_get(hf, "num_key_value_heads", default=n_heads)),
            head_dim=int(_get(hf, "head_dim", default=d // n_heads)),
            d_ff=int(_get(hf, "intermediate_size")),
            max_seq_len=max_len,
            norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
            rope_theta=_rope_theta(hf),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            activation=_get(hf, "hidden_act", default="silu"),
            qkv_bias=(mt == "qwen2"),
        )
    if kw["activation"] not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {kw['activation']!r} in config.json; supported: {_ACTIVATIONS}"
        )
    family = "llama" if mt in ("llama", "mistral", "qwen2") else mt
    try:
        return ModelConfig(family=family, **kw, **common)
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed config.json: {e}") from e


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """A ``transformers``-loadable ``config.json`` dict for ``cfg`` (raises when the
    configuration has no HF equivalent)."""
    out: Dict[str, Any] = {"torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype}
    if cfg.family in ("gpt2", "gptj"):
        if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError(
                f"cannot export {cfg.family}: HF {cfg.family} needs n_kv_heads == n_heads and "
                f"head_dim * n_heads == d_model (got n_heads={cfg.n_heads}, "
                f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, d_model={cfg.d_model})"
            )
        out.update(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=cfg.activation,
        )
        if cfg.family == "gpt2":
            out.update(
                architectures=["GPT2LMHeadModel"],
                model_type="gpt2",
                n_ctx=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings,
            )
        else:
            if cfg.rope_theta != 10000.0:
                raise ValueError(
                    f"cannot export gptj with rope_theta={cfg.rope_theta}: HF GPT-J fixes it to 10000"
                )
            out.update(
                architectures=["GPTJForCausalLM"],
                model_type="gptj",
                rotary_dim=cfg.rotary_dim,
                tie_word_embeddings=False,
            )
    else:
        mt = "qwen2" if cfg.qkv_bias else "llama"
        out.update(
            architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
            model_type=mt,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            hidden_act=cfg.activation,
            rope_theta=cfg.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings,
        )
        if mt == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out.update(use_sliding_window=False, sliding_window=None)
    return out


# ---------------------------------------------------------------------------
# Tensor name maps
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Rule:
    """One HF tensor <-> one or more of our leaves.

    ``hf`` may contain ``{i}`` (per-layer rule; ``paths`` are then under ``layers``).
    ``to_ours`` maps the HF array to one array per path; ``from_ours`` is its inverse.
    """

    hf: str
    shape: Tuple[int, ...]
    paths: Tuple[Path, ...]
    to_ours: Callable[[np.ndarray], Sequence[np.ndarray]]
    from_ours: Callable[[Sequence[np.ndarray]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _copy(path: Path, hf: str, shape: Tuple[int, ...]) -> _Rule:
    return _Rule(hf, shape, (path,), lambda x: [x], lambda xs: xs[0])


def _linear(path: Path, hf: str, out_shape: Tuple[int, ...], in_shape: Tuple[int, ...]) -> _Rule:
    """torch ``nn.Linear`` weight ``[prod(out), prod(in)]`` <-> kernel ``[*in, *out]``."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return _Rule(
        hf,
        (n_out, n_in),
        (path,),
        lambda x: [x.T.reshape(in_shape + out_shape)],
        lambda xs: xs[0].reshape(n_in, n_out).T,
    )


def _conv1d(path: Path, hf: str, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> _Rule:
    """GPT-2 ``Conv1D`` weight ``[prod(in), prod(out)]`` <-> kernel ``[*in, *out]``."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return _Rule(
        hf,
        (n_in, n_out),
        (path,),
        lambda x: [x.reshape(in_shape + out_shape)],
        lambda xs: xs[0].reshape(n_in, n_out),
    )


def _rules(cfg: ModelConfig, prefix: str) -> List[_Rule]:
    """All name-map rules for ``cfg``; ``prefix`` is the base-model prefix
    (``transformer.`` / ``model.`` or empty)."""
    D, H, K, Dh, F, V = (
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size,
    )
    p = prefix
    r: List[_Rule] = []
    if cfg.family == "gpt2":
        L = f"{p}h.{{i}}."
        r.append(_copy(("embed", "embedding"), f"{p}wte.weight", (V, D)))
        r.append(_copy(("pos_embed", "embedding"), f"{p}wpe.weight", (cfg.max_seq_len, D)))
        for ours, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            r.append(_copy((ours, "scale"), f"{L}{hf}.weight", (D,)))
            r.append(_copy((ours, "bias"), f"{L}{hf}.bias", (D,)))
        qkv = tuple(("attn", n, "kernel") for n in "qkv")
        r.append(
            _Rule(
                f"{L}attn.c_attn.weight",
                (D, 3 * D),
                qkv,
                lambda x: [w.reshape(D, H, Dh) for w in np.split(x, 3, axis=1)],
                lambda xs: np.concatenate([w.reshape(D, D) for w in xs], axis=1),
            )
        )
        r.append(
            _Rule(
                f"{L}attn.c_attn.bias",
                (3 * D,),
                tuple(("attn", n, "bias") for n in "qkv"),
                lambda x: [b.reshape(H, Dh) for b in np.split(x, 3)],
                lambda xs: np.concatenate([b.reshape(D) for b in xs]),
            )
        )
        r.append(_conv1d(("attn", "o", "kernel"), f"{L}attn.c_proj.weight", (H, Dh), (D,)))
        r.append(_copy(("attn", "o", "bias"), f"{L}attn.c_proj.bias", (D,)))
        r.append(_conv1d(("mlp", "up", "kernel"), f"{L}mlp.c_fc.weight", (D,), (F,)))
        r.append(_copy(("mlp", "up", "bias"), f"{L}mlp.c_fc.bias", (F,)))
        r.append(_conv1d(("mlp", "down", "kernel"), f"{L}mlp.c_proj.weight", (F,), (D,)))
        r.append(_copy(("mlp", "down", "bias"), f"{L}mlp.c_proj.bias", (D,)))
        r.append(_copy(("final_norm", "scale"), f"{p}ln_f.weight", (D,)))
        r.append(_copy(("final_norm", "bias"), f"{p}ln_f.bias", (D,)))
        if not cfg.tie_embeddings:
            r.append(_linear(("lm_head", "kernel"), "lm_head.weight", (V,), (D,)))
    elif cfg.family == "gptj":
        L = f"{p}h.{{i}}."
        r.append(_copy(("embed", "embedding"), f"{p}wte.weight", (V, D)))
        r.append(_copy(("attn_norm", "scale"), f"{L}ln_1.weight", (D,)))
        r.append(_copy(("attn_norm", "bias"), f"{L}ln_1.bias", (D,)))
        for n in "qkv":
            r.append(_linear(("attn", n, "kernel"), f"{L}attn.{n}_proj.weight", (H, Dh), (D,)))
        r.append(_linear(("attn", "o", "kernel"), f"{L}attn.out_proj.weight", (D,), (H, Dh)))
        r.append(_linear(("mlp", "up", "kernel"), f"{L}mlp.fc_in.weight", (F,), (D,)))
        r.append(_copy(("mlp", "up", "bias"), f"{L}mlp.fc_in.bias", (F,)))
        r.append(_linear(("mlp", "down", "kernel"), f"{L}mlp.fc_out.weight", (D,), (F,)))
        r.append(_copy(("mlp", "down", "bias"), f"{L}mlp.fc_out.bias", (D,)))
        r.append(_copy(("final_norm", "scale"), f"{p}ln_f.weight", (D,)))
        r.append(_copy(("final_norm", "bias"), f"{p}ln_f.bias", (D,)))
        r.append(_linear(("lm_head", "kernel"), "lm_head.weight", (V,), (D,)))
        r.append(_copy(("lm_head", "bias"), "lm_head.bias", (V,)))
    else:  # llama family
        L = f"{p}layers.{{i}}."
        r.append(_copy(("embed", "embedding"), f"{p}embed_tokens.weight", (V, D)))
        r.append(_copy(("attn_norm", "scale"), f"{L}input_layernorm.weight", (D,)))
        r.append(_copy(("mlp_norm", "scale"), f"{L}post_attention_layernorm.weight", (D,)))
        for n, heads in (("q", H), ("k", K), ("v", K)):
            r.append(
                _linear(("attn", n, "kernel"), f"{L}self_attn.{n}_proj.weight", (heads, Dh), (D,))
            )
            if cfg.qkv_bias:
                r.append(
                    _Rule(
                        f"{L}self_attn.{n}_proj.bias",
                        (heads * Dh,),
                        (("attn", n, "bias"),),
                        lambda x, h=heads: [x.reshape(h, Dh)],
                        lambda xs: xs[0].reshape(-1),
                    )
                )
        r.append(_linear(("attn", "o", "kernel"), f"{L}self_attn.o_proj.weight", (D,), (H, Dh)))
        r.append(_linear(("mlp", "gate", "kernel"), f"{L}mlp.gate_proj.weight", (F,), (D,)))
        r.append(_linear(("mlp", "up", "kernel"), f"{L}mlp.up_proj.weight", (F,), (D,)))
        r.append(_linear(("mlp", "down", "kernel"), f"{L}mlp.down_proj.weight", (D,), (F,)))
        r.append(_copy(("final_norm", "scale"), f"{p}norm.weight", (D,)))
        if not cfg.tie_embeddings:
            r.append(_linear(("lm_head", "kernel"), "lm_head.weight", (V,), (D,)))
    return r


def _default_prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.family == "llama" else "transformer."


# ---------------------------------------------------------------------------
# Reading safetensors
# ---------------------------------------------------------------------------
class _Reader:
    """Lazy, memory-mapped access to the tensors of one or several safetensors files."""

    def __init__(self, files: Dict[str, str], stack: contextlib.ExitStack) -> None:
        self._files = files  # tensor name -> file path
        self._stack = stack
        self._handles: Dict[str, Any] = {}

    def names(self) -> List[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def _handle(self, path: str) -> Any:
        if path not in self._handles:
            if not os.path.exists(path):
                raise FileNotFoundError(f"weights shard listed in the index is missing: {path}")
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[path]

    def get(self, name: str, checkpoint: str) -> np.ndarray:
        if name not in self._files:
            raise ValueError(f"checkpoint {checkpoint} is missing tensor {name!r}")
        path = self._files[name]
        try:
            return self._handle(path).get_tensor(name)
        except (TypeError, ValueError):
            # Older safetensors/numpy cannot hold bf16: go through the flax reader.
            with safe_open(path, framework="flax") as f:
                return np.asarray(jax.device_get(f.get_tensor(name)))


def _weight_files(path: str) -> Dict[str, str]:
    """Map each tensor name to the safetensors file that holds it."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed weights index {index}: {e!r}") from e
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(
        f"no weights file in {path}: expected model.safetensors or model.safetensors.index.json"
    )


def _read_config(path: str) -> Dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed config.json in {path}: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"malformed config.json in {path}: expected a JSON object")
    return hf


def _set_path(tree: Params, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get_path(tree: Params, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def read_hf_config(path: str, dtype: Optional[str] = None
                   ) -> Tuple[ModelConfig, Optional[Tokenizer]]:
    """The :class:`ModelConfig` and tokenizer that :func:`load_hf` would return, from
    ``config.json`` and ``tokenizer.json`` alone: no weight is read."""
    return config_from_hf(_read_config(path), dtype), Tokenizer.from_hf_dir(path)


def load_hf(
    path: str, dtype: Optional[str] = None, host: bool = False
) -> Tuple[ModelConfig, Params, Optional[Tokenizer]]:
    """Load a Hugging Face causal-LM directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), optionally ``tokenizer.json``.
      dtype: parameter and compute dtype (float32 / bfloat16 / float16); None keeps the
        checkpoint's dtype.
      host: return the params as numpy arrays in host memory (for ``jax.device_put`` with
        their shardings: no device ever holds the whole model); default jax arrays.

    Returns ``(config, params, tokenizer_or_None)``.
    """
    hf = _read_config(path)
    cfg = config_from_hf(hf, dtype)
    files = _weight_files(path)
    shapes = param_shapes(cfg)
    np_dtype = np.dtype(cfg.params_dtype)
    params: Params = {}
    for leaf_path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(k.key for k in leaf_path)
        _set_path(params, keys, np.empty(s.shape, np_dtype))

    embed_name = "wte.weight" if cfg.family != "llama" else "embed_tokens.weight"
    prefix = _default_prefix(cfg)
    if prefix + embed_name not in files and embed_name in files:
        prefix = ""
    used = set()
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        for rule in _rules(cfg, prefix):
            layers = range(cfg.n_layers) if rule.per_layer else [None]
            for i in layers:
                name = rule.hf.format(i=i)
                x = reader.get(name, path)
                if tuple(x.shape) != rule.shape:
                    raise ValueError(
                        f"tensor {name!r} in {path} has shape {tuple(x.shape)}, expected "
                        f"{rule.shape} for this config.json"
                    )
                used.add(name)
                for p_, y in zip(rule.paths, rule.to_ours(x)):
                    if i is None:
                        _get_path(params, p_)[...] = y
                    else:
                        _get_path(params["layers"], p_)[i] = y
    unused = [
        n for n in files
        if n not in used
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_embeddings)
    ]
    if unused:
        warnings.warn(f"load_hf: ignoring {len(unused)} unmapped tensors in {path}: {unused[:5]}")
    if not host:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return cfg, params, Tokenizer.from_hf_dir(path)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def _check_params(cfg: ModelConfig, params: Params) -> None:
    expected = {
        jax.tree_util.keystr(p): s.shape
        for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    }
    got = {
        jax.tree_util.keystr(p): tuple(np.shape(x))
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"save_hf: params are missing leaves {missing} for this config")
    for k, shape in expected.items():
        if got[k] != tuple(shape):
            raise ValueError(f"save_hf: param {k} has shape {got[k]}, expected {tuple(shape)}")


def hf_state_dict(cfg: ModelConfig, params: Params) -> Dict[str, np.ndarray]:
    """HF-named host arrays (in ``cfg.param_dtype``) for ``params``."""
    _check_params(cfg, params)
    np_dtype = np.dtype(cfg.params_dtype)
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)).astype(np_dtype), params)
    if cfg.family == "gpt2" and not cfg.qkv_bias:  # HF c_attn always has a bias
        layers = dict(host["layers"])
        attn = {n: dict(v) for n, v in layers["attn"].items()}
        for n, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
            attn[n]["bias"] = np.zeros((cfg.n_layers, heads, cfg.head_dim), np_dtype)
        layers["attn"] = attn
        host = dict(host, layers=layers)
    out: Dict[str, np.ndarray] = {}
    for rule in _rules(cfg, _default_prefix(cfg)):
        if rule.per_layer:
            for i in range(cfg.n_layers):
                xs = [_get_path(host["layers"], p_)[i] for p_ in rule.paths]
                out[rule.hf.format(i=i)] = np.ascontiguousarray(rule.from_ours(xs))
        else:
            xs = [_get_path(host, p_) for p_ in rule.paths]
            out[rule.hf] = np.ascontiguousarray(rule.from_ours(xs))
    return out


def _save_safetensors(tensors: Dict[str, np.ndarray], file: str) -> None:
    from safetensors.numpy import save_file

    try:
        save_file(tensors, file, metadata={"format": "pt"})
    except (TypeError, ValueError):
        # Older safetensors cannot write numpy bf16: use the flax writer.
        from safetensors.flax import save_file as save_flax

        save_flax({k: jnp.asarray(v) for k, v in tensors.items()}, file, metadata={"format": "pt"})


def save_hf(
    config: ModelConfig,
    params: Params,
    out_dir: str,
    tokenizer: Optional[Tokenizer] = None,
) -> str:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer if given) to
    ``out_dir`` in the ``transformers`` layout; returns ``out_dir``.

    Llama-family configs with q/k/v biases are written as ``qwen2``. Params must be the
    plain tree of ``config`` (merge LoRA adapters first).
    """
    hf_cfg = config_to_hf(config)
    tensors = hf_state_dict(config, params)
    if tokenizer is not None:
        for key, tid in (
            ("bos_token_id", tokenizer.bos_id),
            ("eos_token_id", tokenizer.eos_id),
            ("pad_token_id", tokenizer.pad_id),
        ):
            if tid is not None:
                hf_cfg[key] = int(tid)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    _save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir
