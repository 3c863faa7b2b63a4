"""LoRA adapters as a separate pytree (merged per layer inside the forward pass).

An adapter tree mirrors the parameter tree but holds, for each adapted kernel, a dict
``{"a": [..., n_in, r], "b": [..., r, n_out]}`` where ``n_in``/``n_out`` are the flattened
input/output feature sizes of the kernel (leading ``layers`` axis kept for stacked
layers). Leaves not adapted are absent. ``Adapters = {"scale": f32[], "tree": ...}``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

Params = Dict[str, Any]


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``w + scale * (a @ b)`` reshaped to ``w``'s shape.

    ``w`` has shape ``[*batch, *in, *out]`` where ``batch`` are the leading axes shared
    with ``a`` (``a.ndim - 2`` of them); the split between ``in`` and ``out`` is where the
    product of ``w``'s dims equals ``a.shape[-2]``.
    """
    nb = a.ndim - 2
    dims = w.shape[nb:]
    n_in, acc, split = a.shape[-2], 1, None
    for i, d in enumerate(dims):
        acc *= d
        if acc == n_in:
            split = i + 1
            break
    if split is None:
        raise ValueError(f"adapter a{a.shape} does not match kernel {w.shape}")
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    delta = delta.reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_tree(params: Params, tree: Optional[Params], scale: Any) -> Params:
    """Merge an adapter (sub)tree into a (sub)tree of parameters; returns a new tree."""
    if not tree:
        return params
    out = dict(params)
    for k, sub in tree.items():
        if isinstance(sub, dict) and set(sub) == {"a", "b"}:
            out[k] = merge_kernel(params[k], sub["a"], sub["b"], scale)
        else:
            out[k] = merge_tree(params[k], sub, scale)
    return out
