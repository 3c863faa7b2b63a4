"""LoRA adapters as a separate pytree (merged per layer inside the forward pass).

An adapter tree mirrors the parameter tree but holds, for each adapted kernel, a dict
``{"a": [..., n_in, r], "b": [..., r, n_out]}`` where ``n_in``/``n_out`` are the flattened
input/output feature sizes of the kernel (leading ``layers`` axis kept for stacked
layers). Leaves not adapted are absent. ``Adapters = {"scale": f32[], "tree": ...}``.

Public API: :class:`LoraConfig`, :func:`init_lora`, :func:`lora_axes`, :func:`merge_lora`,
:func:`lora_trainable_mask`, :func:`num_params`, :func:`split_axes` (the in/out rule), and
the typed :class:`~gfn_jax.models.adapters.Adapters` value with the low-level
:func:`merge_kernel` / :func:`merge_tree` (defined in :mod:`gfn_jax.models.adapters`, which
the transformer imports, so this module and the transformer do not import each other).

LoRA dropout: :func:`with_dropout` adds ``dropout_rng``/``dropout_rate`` entries to an
adapter dict; the transformer then keeps the per-layer adapter path unmerged and computes
``x @ W + scale * dropout(x) @ A @ B`` (training only; sampling and export use the merged
form). Adapters on top-level leaves (embedding, head) are always merged, without dropout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.models.adapters import Adapters, as_adapters, merge_kernel, merge_tree  # noqa: F401
from gfn_jax.models.config import ModelConfig
from gfn_jax.models.transformer import param_axes

Params = Dict[str, Any]


# ---------------------------------------------------------------------------
# Configuration, initialisation, logical axes, export
# ---------------------------------------------------------------------------
LORA_AXIS = "lora"
"""Logical axis name of the adapter rank dimension."""

DEFAULT_TARGETS: Tuple[str, ...] = (
    r"layers/attn/(q|k|v|o)/kernel",
    r"layers/mlp/(gate|up|down)/kernel",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters and how big they are.

    Attributes:
      rank: adapter rank ``r``.
      alpha: the adapter path is scaled by ``alpha / rank``.
      dropout: LoRA dropout on the adapter path's input during training (see
        :func:`with_dropout`); 0 keeps the cheaper merged-in-scan form.
      targets: regular expressions, each ``re.fullmatch``-ed against '/'-joined
        parameter paths such as ``"layers/attn/q/kernel"`` or ``"lm_head/kernel"``.
        Every pattern must match at least one kernel.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise TypeError("LoraConfig.targets must be a tuple of regex strings, not a str")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: no kernel would be adapted")
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be finite, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for pat in self.targets:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"LoraConfig.targets: invalid regex {pat!r}: {e}") from None

    @property
    def scale(self) -> float:
        """The adapter scale ``alpha / rank``."""
        return float(self.alpha) / float(self.rank)


def _path_str(path: Tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def split_axes(path: str, axes: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    """Split a kernel's logical axes into ``(batch, inputs, outputs)``.

    Rule: leading ``layers`` axes are batch axes (one adapter per layer). Of the rest,
    the ``embed`` axis decides the direction: if it comes first it is the input and all
    later axes are outputs (q, k, v, gate, up, lm_head); otherwise it must be the last
    axis and is the output, every axis before it being an input (o, down, embeddings).
    A leaf without an ``embed`` axis, or with nothing on one side, cannot be adapted.
    """
    axes = tuple(axes)
    nb = 0
    while nb < len(axes) and axes[nb] == "layers":
        nb += 1
    batch, feat = axes[:nb], axes[nb:]
    if "embed" not in feat or len(feat) < 2:
        raise ValueError(
            f"cannot adapt {path!r} with logical axes {axes}: LoRA needs a kernel with an "
            "'embed' axis and at least one other feature axis (biases and norm scales "
            "cannot be adapted)"
        )
    if feat[0] == "embed":
        return batch, feat[:1], feat[1:]
    if feat[-1] == "embed":
        return batch, feat[:-1], feat[-1:]
    raise ValueError(
        f"cannot adapt {path!r}: its 'embed' axis is neither its first nor last feature axis {axes}"
    )


def _targets(cfg: ModelConfig, lora_cfg: LoraConfig) -> Dict[str, Tuple[str, ...]]:
    """'/'-path -> logical axes for every parameter leaf matched by ``lora_cfg.targets``."""

    axes_tree = param_axes(cfg)
    flat = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    all_paths = {_path_str(p): ax for p, ax in flat}
    chosen: Dict[str, Tuple[str, ...]] = {}
    for pat in lora_cfg.targets:
        hits = [p for p in all_paths if re.fullmatch(pat, p)]
        if not hits:
            kernels = sorted(p for p in all_paths if p.endswith("kernel"))
            raise ValueError(
                f"LoRA target pattern {pat!r} matches no parameter of this {cfg.family} model "
                f"(patterns are re.fullmatch-ed against paths such as {kernels})"
            )
        for p in hits:
            chosen[p] = all_paths[p]
    for p, ax in chosen.items():
        split_axes(p, ax)  # validates
    return chosen


def _set(tree: Dict[str, Any], path: str, value: Any) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: Any, path: str) -> Any:
    for k in path.split("/"):
        if not isinstance(tree, dict) or k not in tree:
            raise ValueError(f"parameter tree has no leaf {path!r}")
        tree = tree[k]
    return tree


def _adapter_shapes(
    shape: Tuple[int, ...], axes: Tuple[str, ...], path: str, rank: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    batch, ins, outs = split_axes(path, axes)
    if len(shape) != len(axes):
        raise ValueError(f"parameter {path!r} has shape {shape} but logical axes {axes}")
    nb, ni = len(batch), len(ins)
    n_in = int(np.prod(shape[nb : nb + ni]))
    n_out = int(np.prod(shape[nb + ni :]))
    return shape[:nb] + (n_in, rank), shape[:nb] + (rank, n_out)


def init_lora(
    cfg: ModelConfig,
    params_or_shapes: Params,
    lora_cfg: LoraConfig,
    rng: jax.Array,
    dtype: Any = jnp.float32,
) -> Params:
    """Fresh adapters ``{"scale": f32[], "tree": {...}}`` for the targeted kernels.

    ``a`` is drawn U(-1/sqrt(n_in), 1/sqrt(n_in)) independently per layer (the usual
    Kaiming-uniform LoRA init), ``b`` is zero, so the adapted model starts exactly equal
    to the base. ``params_or_shapes`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves
    (e.g. :func:`~gfn_jax.models.transformer.param_shapes`); only shapes are read.
    """
    chosen = sorted(_targets(cfg, lora_cfg).items())
    shapes = []
    for path, axes in chosen:
        shape = tuple(_get(params_or_shapes, path).shape)
        shapes.append(_adapter_shapes(shape, axes, path, lora_cfg.rank))

    def draw(rng: jax.Array) -> Params:  # one program for every adapter
        keys = jax.random.split(rng, max(len(chosen), 1))
        tree: Dict[str, Any] = {}
        for key, (path, _), (a_shape, b_shape) in zip(keys, chosen, shapes):
            bound = 1.0 / math.sqrt(a_shape[-2])
            a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
            _set(tree, path, {"a": a, "b": jnp.zeros(b_shape, dtype)})
        return {"scale": jnp.asarray(lora_cfg.scale, jnp.float32), "tree": tree}

    return jax.jit(draw)(rng)


def lora_axes(cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """Logical axis names for the adapters, same structure as :func:`init_lora`'s output.

    ``a`` gets ``(*layers, IN, "lora")`` and ``b`` gets ``(*layers, "lora", OUT)`` where a
    flattened group of several axes is named by joining them with ``"_x_"``, e.g. the o
    projection's ``a`` is ``("layers", "heads_x_head_dim", "lora")`` and q's ``b`` is
    ``("layers", "lora", "heads_x_head_dim")``; ``scale`` gets ``()``.
    """
    tree: Dict[str, Any] = {}
    for path, axes in sorted(_targets(cfg, lora_cfg).items()):
        batch, ins, outs = split_axes(path, axes)
        tree_in, tree_out = "_x_".join(ins), "_x_".join(outs)
        _set(tree, path, {"a": batch + (tree_in, LORA_AXIS), "b": batch + (LORA_AXIS, tree_out)})
    return {"scale": (), "tree": tree}


def merge_lora(params: Params, adapters: Params) -> Params:
    """Base parameters with the adapters folded in (``W + scale * A @ B`` per kernel).

    Equal to what the transformer computes inside its layer scan; use it for export.
    """
    if isinstance(adapters, dict) and set(adapters) != {"scale", "tree"}:
        raise ValueError(
            f"adapters must be a dict with keys 'scale' and 'tree', got keys {sorted(adapters)}"
        )
    a = as_adapters(adapters)
    return merge_tree(params, a.tree, a.scale)


def lora_trainable_mask(adapters: Params) -> Params:
    """Bool tree over ``adapters``: True for every ``a``/``b`` leaf, False for ``scale``.

    The scale gets no gradient (see :func:`merge_kernel`), but optimizers with weight
    decay would still shrink it; freeze it, e.g. with
    ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)`` (note that
    ``optax.masked(tx, mask)`` alone passes masked-out updates through unchanged).
    """
    return {
        "scale": False,
        "tree": jax.tree_util.tree_map(lambda _: True, adapters["tree"]),
    }


def num_params(tree: Any) -> int:
    """Total number of elements over all array leaves of ``tree`` (shape-only leaves too)."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def with_dropout(adapters: Any, rate: float, rng: Optional[jax.Array]) -> Any:
    """The adapters in training mode: dropout ``rate`` on the adapter input, masks drawn
    from ``rng`` (one key per call; layers and projections get their own streams).
    ``rate == 0`` or ``rng is None`` returns ``adapters`` unchanged (merged form). Works on
    an :class:`Adapters` value or the ``{"scale", "tree"}`` dict (returned as the same kind)."""
    if rng is None or rate <= 0.0:
        return adapters
    if isinstance(adapters, Adapters):
        return adapters.replace(dropout_rng=rng, dropout_rate=jnp.float32(rate))
    return dict(adapters, dropout_rng=rng, dropout_rate=jnp.float32(rate))
