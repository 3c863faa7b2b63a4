"""Models: pure-functional decoder-only transformers, checkpoints and tokenizers."""

from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import (
    CopyBlockMask,
    KVCache,
    PromptKV,
    apply,
    causal_mask,
    continuation_forward,
    continuation_mask,
    decode_layout,
    decode_step,
    decode_weights,
    forward,
    init_cache,
    init_params,
    param_axes,
    param_shapes,
    positions_from_mask,
    prefill,
    prompt_forward,
    unembed,
)
from gfn_jax.models.hf import load_hf, save_hf
from gfn_jax.models.gguf import load_gguf
from gfn_jax.models.registry import Model, load

__all__ = [
    "ModelConfig", "CopyBlockMask", "KVCache", "PromptKV", "apply", "causal_mask", "continuation_forward",
    "continuation_mask", "decode_layout", "decode_step", "decode_weights",
    "forward", "init_cache", "init_params", "param_axes",
    "param_shapes", "positions_from_mask", "prefill", "prompt_forward", "unembed",
    "load_hf", "save_hf", "load_gguf", "Model", "load",
]
