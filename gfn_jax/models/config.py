"""Model configuration shared by every architecture family.

One decoder-only transformer covers three families:

* ``gpt2``  -- learned positions, LayerNorm (with bias), GELU MLP, sequential residual
  blocks, biases on every projection, head tied to the token embedding.
* ``llama`` -- RMSNorm, rotary embeddings (HF "rotate_half" convention), SwiGLU MLP,
  grouped-query attention, no biases, tied or untied head.
* ``gptj``  -- one LayerNorm per block feeding attention and MLP *in parallel*,
  partial interleaved rotary (``rotary_dim`` of each head), GELU MLP with biases,
  no biases on q/k/v/o, untied head with a bias.

Parameter pytree (plain nested ``dict`` of arrays; per-layer leaves are stacked on a
leading ``layers`` axis so the block stack runs under ``lax.scan``)::

    embed/embedding            [V, D]          (vocab, embed)
    pos_embed/embedding        [P, D]          (gpt2 only)
    layers/attn_norm/scale     [L, D]          (+ bias for gpt2/gptj)
    layers/attn/q/kernel       [L, D, H, Dh]   (layers, embed, heads, head_dim)
    layers/attn/k/kernel       [L, D, K, Dh]   (layers, embed, kv_heads, head_dim)
    layers/attn/v/kernel       [L, D, K, Dh]
    layers/attn/o/kernel       [L, H, Dh, D]   (layers, heads, head_dim, embed)
    layers/attn/{q,k,v}/bias   [L, H|K, Dh]    (gpt2 only); layers/attn/o/bias [L, D] (gpt2)
    layers/mlp_norm/scale      [L, D]          (gpt2, llama; + bias for gpt2)
    layers/mlp/gate/kernel     [L, D, F]       (llama only)
    layers/mlp/up/kernel       [L, D, F]       (layers, embed, mlp)   (+ bias [L, F] gpt2/gptj)
    layers/mlp/down/kernel     [L, F, D]       (layers, mlp, embed)   (+ bias [L, D] gpt2/gptj)
    final_norm/scale           [D]             (+ bias for gpt2/gptj)
    lm_head/kernel             [D, V]          (untied only; + bias [V] for gptj)

``gfn_jax.models.transformer.param_axes(config)`` returns the same tree with a tuple of
logical axis names per leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

FAMILIES = ("gpt2", "llama", "gptj")

#: Rematerialisation policies of the layer scan (``ModelConfig.remat_policy``):
#: ``none`` stores every activation the backward pass needs; ``full`` stores only each
#: layer's input (the carry) and recomputes the block (``jax.checkpoint_policies.
#: nothing_saveable``); ``dots_saveable`` keeps every matmul output, recomputes the rest;
#: ``dots_with_no_batch_dims_saveable`` keeps the weight matmuls (not the attention
#: score/value products, which have batch dims); ``save_qkv_proj`` keeps only the q/k/v
#: projections; ``save_attn_out`` keeps q/k/v and the attention output (before ``o``);
#: ``save_mlp_hidden`` keeps the MLP's activated hidden layer.
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_qkv_proj",
    "save_attn_out",
    "save_mlp_hidden",
)

#: ``ModelConfig.decode_layers``: the decode loop's layers unrolled over a per-layer copy of
#: the weights (faster on CPU, one more copy of the layer weights in memory) or scanned over
#: the stacked weights (no copy).
DECODE_LAYERS = ("unrolled", "scanned")

#: ``ModelConfig.logits_chunk == 0`` (auto): the scorers split the positions into chunks so
#: that one chunk's float32 logits, over the whole batch, take at most this many bytes.
AUTO_LOGITS_CHUNK_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static (hashable) description of a decoder-only transformer."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: Optional[int] = None  # gptj: rotary applied to the first rotary_dim dims
    tie_embeddings: bool = True
    activation: str = ""  # "" -> family default (gelu_new for gpt2/gptj, silu for llama)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass (= remat_policy "full")
    remat_policy: str = ""  # "" -> "full" if remat else "none"; see REMAT_POLICIES
    # Vocabulary log-softmax of the scorers, in chunks of positions: 0 = auto (chunks of at
    # most AUTO_LOGITS_CHUNK_BYTES of float32 logits; one chunk when they all fit), -1 = never
    # chunk (the whole [B, N, V] at once), k > 0 = k positions per chunk.
    logits_chunk: int = 0
    qkv_bias: Optional[bool] = None  # None -> family default (gpt2: True, else False)
    # The train step's scorers run the prompt shared by a group of samples once (keys/values
    # of every layer) and the samples against it; False = every row recomputes its prompt.
    share_prompt: bool = True
    # The sampler's decode loop runs in chunks of this many steps (a fixed-trip inner loop)
    # and tests "every row done?" once per chunk, then step by step for the last steps. Same
    # samples; at most decode_chunk - 1 wasted steps once all rows are done. On a GPU each
    # test of a while loop's condition copies it to the host and waits for the device.
    decode_chunk: int = 1
    # How the decoders (sampler, beam search) run the layers in their decode loop:
    # "unrolled" splits the stacked layer weights into one array per layer once per call (a
    # copy of every layer weight, held through the loop) and runs the layers unrolled, each
    # weight read in place; "scanned" runs them under lax.scan over the stacked weights, with
    # the cache updated in place, and copies no weight (one layer's slice at a time), for
    # models whose second copy of the layer weights would not fit (DECODE_LAYERS).
    decode_layers: str = "unrolled"
    # The sampler's decode loop on a mesh with fsdp > 1: False reads the fsdp-sharded weights
    # as the train state holds them, so XLA all-gathers them on every decode step (inside
    # the loop); True gathers them once before the loop (held whole over fsdp through it:
    # the weights' bytes x (1 - 1/fsdp) more per device while sampling). No effect without
    # fsdp. ``gfn-jax plan`` prints both the traffic per decode step and the memory.
    decode_gather_weights: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"unsupported architecture family {self.family!r}; expected one of {FAMILIES}"
            )
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.family == "gptj" and self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.family == "gptj" and self.tie_embeddings:
            object.__setattr__(self, "tie_embeddings", False)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.family == "gpt2")
        if not self.activation:
            object.__setattr__(
                self, "activation", "silu" if self.family == "llama" else "gelu_new"
            )
        if self.remat_policy and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES} (or '' to follow remat), got "
                f"{self.remat_policy!r}"
            )
        if int(self.logits_chunk) != self.logits_chunk or self.logits_chunk < -1:
            raise ValueError(
                f"logits_chunk must be -1 (never chunk), 0 (auto) or a positive number of "
                f"positions, got {self.logits_chunk!r}"
            )
        if int(self.decode_chunk) != self.decode_chunk or self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive number of decode steps, got "
                             f"{self.decode_chunk!r}")
        if self.decode_layers not in DECODE_LAYERS:
            raise ValueError(f"decode_layers must be one of {DECODE_LAYERS}, got "
                             f"{self.decode_layers!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16")

    # --- derived properties -------------------------------------------------
    @property
    def uses_rope(self) -> bool:
        return self.family in ("llama", "gptj")

    @property
    def effective_remat_policy(self) -> str:
        """The layer scan's policy: ``remat_policy``, or ``"full"``/``"none"`` from ``remat``."""
        return self.remat_policy or ("full" if self.remat else "none")

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)
