"""The typed LoRA adapters value and the merge maths shared by the model and LoRA code.

:class:`Adapters` is what the model functions take: the adapter tree (for each adapted
kernel ``{"a": [..., n_in, r], "b": [..., r, n_out]}``, leading ``layers`` axis kept), the
constant scale ``alpha / r``, and in training mode a dropout rate and key. The serialisable
form produced by :func:`gfn_jax.models.lora.init_lora` is the dict ``{"scale", "tree"}``;
:func:`as_adapters` accepts either. This module imports no other model module, so
``transformer`` and ``lora`` both depend on it and not on each other.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp

Params = Dict[str, Any]

__all__ = ["Adapters", "as_adapters", "merge_kernel", "merge_tree"]


@flax.struct.dataclass
class Adapters:
    """LoRA adapters for the model functions.

    Attributes:
      tree: adapter pytree mirroring the adapted parameters.
      scale: float32 scalar alpha / r (a constant: no gradient flows to it).
      dropout_rate: LoRA dropout rate (training only; 0 = merged form).
      dropout_rng: PRNG key for the dropout masks, or None (merged form).
    """

    tree: Params
    scale: Any
    dropout_rate: Any = 0.0
    dropout_rng: Optional[jax.Array] = None

    @property
    def training(self) -> bool:
        """True when per-layer adapters stay unmerged for dropout."""
        return self.dropout_rng is not None

    def to_dict(self) -> Params:
        """The serialisable ``{"scale", "tree"}`` form (dropout dropped)."""
        return {"scale": self.scale, "tree": self.tree}


def as_adapters(x: Any) -> Optional[Adapters]:
    """``None``, an :class:`Adapters`, or a ``{"scale", "tree"[, "dropout_rng",
    "dropout_rate"]}`` dict, as :class:`Adapters`."""
    if x is None or isinstance(x, Adapters):
        return x
    if isinstance(x, Mapping):
        extra = set(x) - {"scale", "tree", "dropout_rng", "dropout_rate"}
        if "tree" not in x or "scale" not in x or extra:
            raise ValueError("adapters must be an Adapters value or a dict with keys 'scale' "
                             f"and 'tree' (optionally 'dropout_rng', 'dropout_rate'); got keys "
                             f"{sorted(x)}")
        return Adapters(tree=x["tree"], scale=x["scale"],
                        dropout_rate=x.get("dropout_rate", 0.0),
                        dropout_rng=x.get("dropout_rng"))
    raise TypeError(f"adapters must be an Adapters value or a dict, got {type(x).__name__}")


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``w + scale * (a @ b)`` reshaped to ``w``'s shape.

    ``w`` has shape ``[*batch, *in, *out]`` where ``batch`` are the leading axes shared
    with ``a`` (``a.ndim - 2`` of them); the split between ``in`` and ``out`` is where the
    product of ``w``'s dims equals ``a.shape[-2]``. ``scale`` is a constant: no gradient
    flows to it (so training the adapter dict leaves it fixed up to weight decay).
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
    scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    delta = delta.reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


#: Key of a projection's weight stored feature-major ([out, in], 2-D) in place of
#: ``"kernel"`` (``gfn_jax.models.transformer.decode_layout`` on CPU).
FM_KERNEL = "kernel_fm"


def merge_tree(params: Params, tree: Optional[Params], scale: Any) -> Params:
    """Merge an adapter (sub)tree into a (sub)tree of parameters; returns a new tree."""
    if not tree:
        return params
    out = dict(params)
    for k, sub in tree.items():
        if isinstance(sub, dict) and set(sub) == {"a", "b"}:
            if k == "kernel" and k not in params and FM_KERNEL in params:
                wt = params[FM_KERNEL]  # [out, in]: merge the transposed delta
                out[FM_KERNEL] = merge_kernel(wt.T, sub["a"].reshape(wt.shape[1], -1),
                                              sub["b"].reshape(-1, wt.shape[0]), scale).T
                continue
            out[k] = merge_kernel(params[k], sub["a"], sub["b"], scale)
        else:
            out[k] = merge_tree(params[k], sub, scale)
    return out
