"""GGUF import, GGUF tokenizer, registry: tiny hand-written GGUF files vs. transformers."""

from __future__ import annotations

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
import torch

from gfn_jax.models import registry
from gfn_jax.models.gguf import GGUFError, load_gguf
from gfn_jax.models.tokenizer import char_tokenizer
from gfn_jax.models.transformer import forward

Q = gguf.GGMLQuantizationType
D, H, K, DH, F, L = 64, 4, 2, 16, 96, 2
EPS, THETA, CTX = 1e-5, 500.0, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("1", "2")]


# ---------------------------------------------------------------------------
# Independent references: GPT-2 byte alphabet, naive BPE, llama.cpp's q/k permutation
# ---------------------------------------------------------------------------
def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable-unicode map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


B2U = bytes_to_unicode()
GPT2_PAT = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def naive_bpe_encode(text: str, vocab: dict, merges: list) -> list:
    """SmolLM-style encode: digits isolated, GPT-2 regex, then greedy lowest-rank merges."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = []
    for seg in regex.split(r"(\p{N})", text):
        if seg:
            pieces += GPT2_PAT.findall(seg)
    ids = []
    for p in pieces:
        word = [B2U[b] for b in p.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
        ids += [vocab[w] for w in word]
    return ids


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Forward transform of llama.cpp's converter: HF rotate_half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    alphabet = [B2U[b] for b in range(256)]
    tokens = SPECIALS + alphabet + [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def hf_weights(rng: np.random.Generator, vocab: int, tied: bool) -> dict:
    """Random Llama weights in HF naming/layout ([out, in])."""
    n = lambda *s: (0.15 * rng.standard_normal(s)).astype(np.float32)
    sd = {"model.embed_tokens.weight": n(vocab, D), "model.norm.weight": 1 + n(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": n(H * DH, D),
            p + "self_attn.k_proj.weight": n(K * DH, D),
            p + "self_attn.v_proj.weight": n(K * DH, D),
            p + "self_attn.o_proj.weight": n(D, H * DH),
            p + "mlp.gate_proj.weight": n(F, D),
            p + "mlp.up_proj.weight": n(F, D),
            p + "mlp.down_proj.weight": n(D, F),
            p + "input_layernorm.weight": 1 + n(D),
            p + "post_attention_layernorm.weight": 1 + n(D),
        })
    if not tied:
        sd["lm_head.weight"] = n(vocab, D)
    return sd


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path: str, sd: dict, quant: dict, arch: str = "llama") -> dict:
    """Write ``sd`` as a llama GGUF; ``quant`` maps GGUF tensor name -> quant type.

    Returns the HF state dict the file really encodes (quantized tensors round-tripped).
    """
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    effective = {}
    for name, arr in sd.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            g = f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"
        data = arr
        if g.endswith("attn_q.weight"):
            data = llamacpp_permute(arr, H)
        elif g.endswith("attn_k.weight"):
            data = llamacpp_permute(arr, K)
        qt = quant.get(g)
        if qt is None:
            w.add_tensor(g, np.ascontiguousarray(data))
            effective[name] = arr
        else:
            qdata = gguf.quants.quantize(np.ascontiguousarray(data), qt)
            w.add_tensor(g, qdata, raw_dtype=qt)
            deq = gguf.quants.dequantize(qdata, qt).reshape(arr.shape)
            # what the file means in HF layout: invert the forward permutation by argsort
            if g.endswith("attn_q.weight") or g.endswith("attn_k.weight"):
                n = H if "attn_q" in g else K
                src = llamacpp_permute(np.arange(arr.shape[0])[:, None], n)[:, 0]
                deq = deq[np.argsort(src)]
            effective[name] = deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return effective


def hf_logits(sd: dict, vocab: int, tied: bool, ids: np.ndarray) -> np.ndarray:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=K, head_dim=DH, rms_norm_eps=EPS,
        rope_theta=THETA, max_position_embeddings=CTX, tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=not tied)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    V = len(tiny_vocab()[0])
    rng = np.random.default_rng(0)
    out = {}
    sd = hf_weights(rng, V, tied=False)
    out["f32"] = (str(d / "f32.gguf"), write_gguf(str(d / "f32.gguf"), sd, {}), False)
    sd = hf_weights(rng, V, tied=True)
    quant = {"token_embd.weight": Q.Q8_0}
    for i in range(L):
        quant[f"blk.{i}.attn_q.weight"] = Q.Q8_0
        quant[f"blk.{i}.attn_k.weight"] = Q.Q4_1
        quant[f"blk.{i}.ffn_down.weight"] = Q.Q4_1
    out["quant"] = (str(d / "q.gguf"), write_gguf(str(d / "q.gguf"), sd, quant), True)
    return out


@pytest.fixture(scope="module")
def ids():
    V = len(tiny_vocab()[0])
    return np.random.default_rng(1).integers(0, V, size=(2, 11)).astype(np.int64)


_fwd = jax.jit(forward, static_argnums=0)


# ---------------------------------------------------------------------------
# Model import
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["f32", "quant"])
def test_logits_match_transformers(files, ids, kind):
    path, sd, tied = files[kind]
    cfg, params, tok = load_gguf(path)
    V = len(tiny_vocab()[0])
    assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers) == ("llama", V, D, L)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (H, K, DH, F)
    assert cfg.max_seq_len == CTX and cfg.rope_theta == THETA
    assert cfg.norm_eps == pytest.approx(EPS) and cfg.tie_embeddings == tied
    assert ("lm_head" in params) == (not tied)
    ours = np.asarray(_fwd(cfg, params, jnp.asarray(ids)))
    ref = hf_logits(sd, V, tied, ids)
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_quantized_tensors_really_quantized(files):
    """The quant file differs from its float source, so the match above is not vacuous."""
    reader = gguf.GGUFReader(files["quant"][0])
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["token_embd.weight"] == Q.Q8_0 and kinds["blk.0.ffn_down.weight"] == Q.Q4_1


def test_left_padding_and_bfloat16(files, ids):
    path, _, _ = files["f32"]
    cfg, params, _ = load_gguf(path)
    full = np.asarray(_fwd(cfg, params, jnp.asarray(ids[:1, 3:])))
    padded = ids[:1].copy()
    padded[:, :3] = 0
    mask = np.ones_like(padded)
    mask[:, :3] = 0
    got = np.asarray(_fwd(cfg, params, jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(got[:, 3:], full, atol=1e-5)
    cfg16, p16, _ = load_gguf(path, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and cfg16.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))


# ---------------------------------------------------------------------------
# Tokenizer from metadata
# ---------------------------------------------------------------------------
def test_tokenizer_from_metadata(files):
    _, _, tok = load_gguf(files["f32"][0])
    tokens, _ = tiny_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    assert tok.vocab_size == len(tokens)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    # digits are isolated before BPE, even though the merge "1 2" exists
    assert tok.encode("123") == [vocab["1"], vocab["2"], vocab["3"]]
    assert tok.encode(" the") == [vocab["Ġthe"]]
    assert tok.encode("the") == [vocab["t"], vocab["he"]]
    assert tok.encode("<|im_start|>in<|im_end|>") == [1, vocab["in"], 2]
    for s in ["the thin 12in 2024 x", "héllo wörld ✓ 日本\n\n\tthe  end ", "a'll 3.14, -7"]:
        ids = tok.encode(s)
        assert ids == naive_bpe_encode(s, vocab, MERGES), s
        assert tok.decode(ids) == s


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(str(p))
    p2 = tmp_path / "truncated.gguf"
    p2.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(GGUFError, match="could not parse"):
        load_gguf(str(p2))


def test_other_architecture(tmp_path):
    p = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(p, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        load_gguf(p)
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        registry.load(p)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def test_registry_unknown_name_lists_names():
    with pytest.raises(ValueError, match="registered names:.*smollm2-135m.*tiny-llama"):
        registry.load("no-such-model")


def test_registry_gguf_path(files):
    m = registry.load(files["quant"][0])
    assert isinstance(m, registry.Model) and m.config.tie_embeddings and m.tokenizer is not None
    # host=True (the trainer's path): the same values as numpy arrays, in the asked dtype
    for dtype in (None, "bfloat16"):
        h = registry.load(files["quant"][0], dtype=dtype, host=True)
        d = registry.load(files["quant"][0], dtype=dtype)
        # the config and tokenizer alone, from the metadata (no tensor read): the same
        cfg, tok = registry.load_config(files["quant"][0], dtype=dtype)
        assert cfg == d.config and tok.vocab_size == d.tokenizer.vocab_size
        assert tok.encode("a b 12") == d.tokenizer.encode("a b 12")
        for a, b in zip(jax.tree_util.tree_leaves(h.params), jax.tree_util.tree_leaves(d.params)):
            assert type(a) is np.ndarray and a.dtype == b.dtype
            np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_tiny_models(family):
    a = registry.load(f"tiny-{family}")
    b = registry.load(f"TINY-{family}", host=True)
    assert all(type(x) is np.ndarray for x in jax.tree_util.tree_leaves(b.params))
    assert a.config.family == family and a.config.d_model <= 64 and a.config.n_layers <= 2
    assert a.config.vocab_size == a.tokenizer.vocab_size == 257
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    s = "héllo ✓ 12<|endoftext|>"
    ids = a.tokenizer.encode(s)
    assert len(ids) == len("héllo ✓ 12".encode()) + 1 and ids[-1] == a.tokenizer.eos_id
    assert a.tokenizer.decode(ids) == s
    logits = _fwd(a.config, a.params, jnp.asarray([ids]))
    assert logits.shape == (1, len(ids), 257) and bool(jnp.all(jnp.isfinite(logits)))


def test_char_tokenizer():
    tok = char_tokenizer("abc", specials=("<eos>", "<pad>"))
    assert tok.vocab_size == 5 and (tok.eos_id, tok.pad_id) == (3, 4)
    assert tok.encode("abca<eos>") == [0, 1, 2, 0, 3]
    assert tok.ids_of(["a", "b", "c", "<eos>"]) == [0, 1, 2, 3]
    assert tok.decode([2, 1, 0, 3]) == "cba<eos>"
    assert tok.decode([2, 1, 3], skip_special_tokens=True) == "cb"
    with pytest.raises(ValueError, match=r"outside the alphabet.*\['d'\]"):
        tok.encode("abd")
    with pytest.raises(ValueError, match="repeated"):
        char_tokenizer("aba")
    sp = char_tokenizer(" \n.x")
    assert sp.encode("x. \n") == [3, 2, 0, 1] and sp.decode([3, 2, 0, 1]) == "x. \n"


def test_smollm2_cache_flow(files, tmp_path, monkeypatch):
    """Convert-and-cache path of the named model, driven by a tiny local GGUF (no network)."""
    path = files["f32"][0]
    monkeypatch.setenv("GFN_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GFN_JAX_SMOLLM2_GGUF", path)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        registry.load("smollm2-135m")
    monkeypatch.setattr(registry, "SMOLLM2_GGUF_SHA256", registry.sha256_file(path))
    first = registry.load("smollm2-135m")
    cached = [d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]
    assert len(cached) == 1 and not [d for d in os.listdir(tmp_path / "cache") if d.startswith(".")]
    monkeypatch.delenv("GFN_JAX_SMOLLM2_GGUF")
    second = registry.load("smollm2-135m-instruct", dtype="bfloat16")  # from the cache only
    assert first.config == second.config.replace(dtype="float32", param_dtype="float32")
    for x, y in zip(jax.tree_util.tree_leaves(first.params), jax.tree_util.tree_leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(x).astype(jnp.bfloat16), np.asarray(y))
    assert second.tokenizer.encode("the 123") == first.tokenizer.encode("the 123")
    assert second.tokenizer.eos_id == 2


def test_registry_hf_directory(tmp_path):
    """A directory spec goes through gfn_jax.models.hf.load_hf (round trip via save_hf)."""
    from gfn_jax.models.hf import save_hf

    m = registry.load("tiny-llama")
    save_hf(m.config, m.params, str(tmp_path / "hf"), m.tokenizer)
    back = registry.load(str(tmp_path / "hf"))
    assert back.config.family == "llama" and back.config.vocab_size == 257
    ids = jnp.asarray([m.tokenizer.encode("hi there")])
    np.testing.assert_allclose(
        np.asarray(_fwd(back.config, back.params, ids)), np.asarray(_fwd(m.config, m.params, ids)),
        atol=1e-5,
    )
    assert back.tokenizer is not None and back.tokenizer.encode("hi 1") == m.tokenizer.encode("hi 1")
