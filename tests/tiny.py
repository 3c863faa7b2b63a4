"""A tiny Llama config, numpy-initialised parameters and an LM loss shared by the
parallelism tests (single-process and multi-process)."""

import contextlib
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from gfn_jax.models import ModelConfig, forward, param_shapes

CFG = ModelConfig(
    family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, d_ff=64, max_seq_len=16, tie_embeddings=False,
)


def np_params(seed: int = 0):
    """Random float32 parameters built in numpy (no per-leaf eager JAX compiles)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        x = rng.normal(0.0, 0.2, s.shape).astype(np.float32)
        return 1.0 + x if "scale" in jax.tree_util.keystr(path) else x

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(CFG))


def lm_loss(params, tokens, mask):
    """Mean next-token log-likelihood over real (unpadded) target positions."""
    logits = forward(CFG, params, tokens, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return jnp.sum(jnp.where(valid, tok_lp, 0.0)) / jnp.sum(valid)


def toy_config(**overrides):
    """``configs/toy_exact.py`` without evaluation, with dotted-key ``overrides``
    (e.g. ``toy_config(**{"objective.name": "tb"})``)."""
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = runpy.run_path(os.path.join(root, "configs", "toy_exact.py"))["get_config"]()
    c.eval.num_samples = 0
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def xla_flags(devices: int = 1, processes: int = 1) -> str:
    """XLA_FLAGS for a process a test starts: ``devices`` virtual CPU devices. A lone process
    with one device also gets XLA:CPU's faster-compiling elemental emitters, which are safe
    there (no collectives) and must not be used where programs span several devices, in this
    process or across ``processes`` (see conftest.py)."""
    if devices > 1:
        return f"--xla_force_host_platform_device_count={devices}"
    if processes != 1 or not elemental_emitters():
        return ""
    return "--xla_cpu_use_fusion_emitters=false"


def elemental_emitters() -> bool:
    """Whether the tests may ask XLA:CPU for its elemental emitters: off when
    GFN_JAX_TEST_ELEMENTAL_EMITTERS=0, which conftest.py also sets when this jaxlib has no
    such option (0.11: an unknown flag in XLA_FLAGS would abort a process)."""
    return os.environ.get("GFN_JAX_TEST_ELEMENTAL_EMITTERS", "1") == "1"


@contextlib.contextmanager
def temporary_files_in(path):
    """``tempfile``'s default directory is ``path`` inside the block: TFDS leaves an empty
    ``mkdtemp`` directory in the system's temporary directory each time it creates the
    builder of a dataset not yet prepared (its ``initialize_from_bucket``)."""
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = old
