"""HF checkpoint import/export against the PyTorch ``transformers`` models themselves."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gfn_jax.models import ModelConfig, forward, init_params
from gfn_jax.models.hf import load_hf, save_hf
from gfn_jax.models.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
V = 61  # vocab
TOL = 1e-4

# Left-padded batch: rows of lengths 7, 4 and 1.
TOKENS = np.random.RandomState(0).randint(0, V, size=(3, 7))
MASK = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1], [0] * 6 + [1]])
_forward = jax.jit(forward, static_argnums=0)  # one compile per config


def _hf_configs() -> Dict[str, transformers.PretrainedConfig]:
    llama = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
    )
    return {
        "gpt2": transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=24,
            bos_token_id=0, eos_token_id=1,
        ),
        "llama_tied": transformers.LlamaConfig(
            **llama, tie_word_embeddings=True, rope_theta=500.0
        ),
        "llama_untied": transformers.LlamaConfig(**llama, tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(**llama, tie_word_embeddings=False),
        "mistral": transformers.MistralConfig(
            **dict(llama, max_position_embeddings=64), sliding_window=16, tie_word_embeddings=False
        ),
        "gptj": transformers.GPTJConfig(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=24,
            bos_token_id=0, eos_token_id=1,
        ),
    }


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (norm scales and biases too) so no map is trivially zero/one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _torch_logits(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        )
    return out.logits.float().numpy()


def _max_err(a: np.ndarray, b: np.ndarray, mask: np.ndarray = MASK) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> Dict[str, Tuple[torch.nn.Module, str]]:
    out = {}
    for i, (name, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        model.eval()
        _randomize(model, seed=100 + i)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, path)
    return out


# ---------------------------------------------------------------------------
# Import parity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_hf_configs()))
def test_load_logit_parity(hf_models, name):
    model, path = hf_models[name]
    cfg, params, tok = load_hf(path)
    assert tok is None
    assert cfg.dtype == "float32" and cfg.n_layers == 2
    logits = _forward(cfg, params, TOKENS, MASK)
    ref = _torch_logits(model, TOKENS, MASK)
    assert ref.std() > 0.1  # not trivially flat
    assert _max_err(logits, ref) <= TOL


def test_config_translation(hf_models):
    cfg = load_hf(hf_models["llama_tied"][1])[0]
    assert (cfg.family, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == ("llama", 2, 8, True)
    assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5 and not cfg.qkv_bias
    assert load_hf(hf_models["qwen2"][1])[0].qkv_bias
    assert load_hf(hf_models["mistral"][1])[0].max_seq_len == 16  # capped at the window
    gptj = load_hf(hf_models["gptj"][1])[0]
    assert (gptj.rotary_dim, gptj.head_dim, gptj.tie_embeddings) == (4, 8, False)
    gpt2 = load_hf(hf_models["gpt2"][1])[0]
    assert (gpt2.max_seq_len, gpt2.d_ff, gpt2.activation) == (24, 128, "gelu_new")


def test_sharded_checkpoint(hf_models, tmp_path):
    model, path = hf_models["llama_untied"]
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="8KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    cfg, params, _ = load_hf(str(tmp_path))
    _, params_single, _ = load_hf(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_single)
    assert _max_err(_forward(cfg, params, TOKENS, MASK), _torch_logits(model, TOKENS, MASK)) <= TOL


def test_bfloat16_checkpoint(hf_models, tmp_path):
    model, _ = hf_models["gpt2"]
    bf = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    bf.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg, params, _ = load_hf(str(tmp_path))
    assert cfg.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == jnp.bfloat16
    ref = bf.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), ref)
    cfg32, params32, _ = load_hf(str(tmp_path), dtype="float32")
    assert params32["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
    # host=True (the trainer's path): the same values as numpy arrays, never on a device;
    # the config alone (no weight read) is the loaded one's
    from gfn_jax.models.hf import read_hf_config

    assert read_hf_config(str(tmp_path))[0] == cfg
    assert read_hf_config(str(tmp_path), dtype="float32")[0] == cfg32
    for kw in ({}, {"dtype": "float32"}):
        _, host, _ = load_hf(str(tmp_path), host=True, **kw)
        dev = params if not kw else params32
        for a, b in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(dev)):
            assert type(a) is np.ndarray and a.dtype == b.dtype
            np.testing.assert_array_equal(a, np.asarray(b))
    # bf16 weights upcast to f32 match the bf16 torch model run in f32.
    ref_logits = _torch_logits(bf.float(), TOKENS, MASK)
    assert _max_err(_forward(cfg32, params32, TOKENS, MASK), ref_logits) <= TOL


# ---------------------------------------------------------------------------
# Export round trip
# ---------------------------------------------------------------------------
_EXPORT = {
    "gpt2": ModelConfig("gpt2", V, 32, 2, 4, 64, 24),
    "llama_untied": ModelConfig(
        "llama", V, 32, 2, 4, 48, 32, n_kv_heads=1, head_dim=16, tie_embeddings=False
    ),
    "qwen2_tied": ModelConfig(
        "llama", V, 32, 2, 4, 48, 32, n_kv_heads=2, qkv_bias=True, tie_embeddings=True,
        rope_theta=1000.0,
    ),
    "gptj": ModelConfig("gptj", V, 32, 2, 4, 64, 24, rotary_dim=4),
}


def _random_params(cfg: ModelConfig, seed: int):
    """init_params(std=0.2) with every leaf (scales, biases too) perturbed."""
    params = init_params(cfg, jax.random.key(seed, impl="unsafe_rbg"), std=0.2)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + np.float32(0.1) * rng.standard_normal(x.shape).astype(np.float32),
        params,
    )


@pytest.mark.parametrize("name", list(_EXPORT))
def test_export_round_trip(name, tmp_path):
    cfg = _EXPORT[name]
    params = _random_params(cfg, seed=len(name))
    out = save_hf(cfg, params, str(tmp_path))
    hf_cfg = json.load(open(tmp_path / "config.json"))
    assert hf_cfg["torch_dtype"] == "float32"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    expected_arch = {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM", "qwen2_tied": "Qwen2ForCausalLM"}
    assert type(model).__name__ == expected_arch.get(name, "LlamaForCausalLM")
    ours = _forward(cfg, params, TOKENS, MASK)
    assert _max_err(ours, _torch_logits(model, TOKENS, MASK)) <= TOL
    # ... and it reads back to the same config and params.
    cfg2, params2, _ = load_hf(out)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_export_with_tokenizer(tmp_path):
    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<s>": V - 3, "</s>": V - 2, "<pad>": V - 1})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, bos_id=V - 3, eos_id=V - 2, pad_id=V - 1)
    cfg = _EXPORT["gpt2"]
    save_hf(cfg, _random_params(cfg, 0), str(tmp_path), tokenizer=tok)
    hf_cfg = json.load(open(tmp_path / "config.json"))
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (58, 59, 60)
    _, _, tok2 = load_hf(str(tmp_path))
    assert tok2 is not None and (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (58, 59, 60)
    assert tok2.encode("w3 w17 w5") == [3, 17, 5]


def test_export_bad_params(tmp_path):
    cfg = _EXPORT["gpt2"]
    params = _random_params(cfg, 0)
    del params["final_norm"]["bias"]
    with pytest.raises(ValueError, match=r"missing leaves.*final_norm.*bias"):
        save_hf(cfg, params, str(tmp_path))
    params = _random_params(cfg, 0)
    params["embed"]["embedding"] = params["embed"]["embedding"][:5]
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\] has shape \(5, 32\)"):
        save_hf(cfg, params, str(tmp_path))
    bad = ModelConfig("gpt2", V, 32, 2, 4, 64, 24, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_kv_heads == n_heads"):
        save_hf(bad, init_params(bad, jax.random.key(0, impl="unsafe_rbg")), str(tmp_path))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(hf_models, tmp_path):
    """A writable copy of the tiny llama (untied) checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_models["llama_untied"][1], dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.load(open(d / "config.json"))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(d / "config.json", "w"))


def test_error_missing_paths(ckpt_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf(str(tmp_path / "nope"))
    os.remove(ckpt_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_hf(str(ckpt_copy))
    os.remove(ckpt_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(ckpt_copy))


def test_error_missing_shard(hf_models, tmp_path):
    hf_models["gpt2"][0].save_pretrained(str(tmp_path), max_shard_size="8KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match="shard listed in the index is missing"):
        load_hf(str(tmp_path))


def test_error_malformed_config(ckpt_copy):
    (ckpt_copy / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match="malformed config.json"):
        load_hf(str(ckpt_copy))
    (ckpt_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="malformed config.json"):
        load_hf(str(ckpt_copy))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "bert"}, "unsupported model_type 'bert'"),
        ({"model_type": None}, "unsupported model_type None"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "unsupported architecture"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         "unsupported rope_scaling type 'linear'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope_scaling type 'dynamic'"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"hidden_act": "swish_plus"}, "unsupported activation 'swish_plus'"),
        ({"num_key_value_heads": 3}, "malformed config.json.*not a multiple"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_error_bad_config(ckpt_copy, changes, match):
    _edit_config(ckpt_copy, **changes)
    with pytest.raises(ValueError, match=match):
        load_hf(str(ckpt_copy))


def test_error_bad_dtype(ckpt_copy):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_hf(str(ckpt_copy), dtype="int8")


def test_error_bad_tensors(ckpt_copy):
    file = ckpt_copy / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    save_file(missing, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_hf(str(ckpt_copy))
    wrong = dict(tensors, **{name: np.zeros((8, 32), np.float32)})
    save_file(wrong, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{name}'.*has shape \(8, 32\), expected \(16, 32\)"):
        load_hf(str(ckpt_copy))
    # A config that disagrees with the weights names the first mismatching tensor.
    save_file(tensors, str(file), metadata={"format": "pt"})
    _edit_config(ckpt_copy, vocab_size=V + 1)
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight'.*expected \(62, 32\)"):
        load_hf(str(ckpt_copy))


def test_unprefixed_gpt2_names(hf_models, tmp_path):
    """Checkpoints saved from the bare ``GPT2Model`` have no ``transformer.`` prefix."""
    _, path = hf_models["gpt2"]
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors)
    bare = {k[len("transformer."):]: v for k, v in tensors.items()}
    save_file(bare, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, params, _ = load_hf(str(tmp_path))
    _, ref, _ = load_hf(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
