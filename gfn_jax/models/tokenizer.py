"""Tokenizers: a thin, typed wrapper over HF ``tokenizers`` plus builders.

``Tokenizer.encode(text) -> list[int]`` and ``Tokenizer.decode(ids) -> str``; special ids
(``bos_id``, ``eos_id``, ``pad_id``) may be None. Builders for a Hugging Face directory,
GGUF metadata (see :mod:`gfn_jax.models.gguf`) and tiny character vocabularies for tests
live here or next to the format they read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import tokenizers


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the special ids the library needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def ids_of(self, texts: Sequence[str]) -> List[int]:
        """Ids of strings that must each encode to exactly one token."""
        out = []
        for t in texts:
            ids = self.encode(t, add_bos=False)
            if len(ids) != 1:
                raise ValueError(f"{t!r} is not a single token for this tokenizer (ids {ids})")
            out.append(ids[0])
        return out

    # --- persistence -------------------------------------------------------
    def save(self, out_dir: str) -> None:
        """Write ``tokenizer.json`` and a minimal ``tokenizer_config.json``."""
        os.makedirs(out_dir, exist_ok=True)
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        tok = lambda i: None if i is None else self.backend.id_to_token(i)
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok(self.bos_id),
            "eos_token": tok(self.eos_id),
            "pad_token": tok(self.pad_id),
            "add_bos_token": self.add_bos,
        }
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_hf_dir(cls, path: str) -> Optional["Tokenizer"]:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a HF directory, or None."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            return None
        backend = tokenizers.Tokenizer.from_file(tj)
        cfg = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                cfg = json.load(f)

        def tid(key: str) -> Optional[int]:
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return backend.token_to_id(v) if v else None

        return cls(
            backend,
            bos_id=tid("bos_token"),
            eos_id=tid("eos_token"),
            pad_id=tid("pad_token"),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------
# Split patterns of byte-level BPE vocabularies, keyed by llama.cpp's ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3", "qwen2")


def _byte_level_pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("default", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # StarCoder-style: every digit is its own pre-token
        return pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(
            f"unsupported byte-level BPE pre-tokenizer {pre!r}; supported: {BPE_PRE_TOKENIZERS}"
        )
    return pt.Sequence(
        [pt.Split(Regex(split), behavior="isolated"),
         pt.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[Tuple[str, str]],
    *,
    pre: str = "default",
    special_tokens: Sequence[str] = (),
    user_tokens: Sequence[str] = (),
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: Optional[int] = None,
    add_bos: bool = False,
) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer from a token list (id = list index) and merges.

    ``tokens`` are spelled in the GPT-2 byte-to-unicode alphabet (``"Ġthe"``) as in
    ``tokenizer.json`` and GGUF files. ``pre`` picks how text is split before BPE (see
    :data:`BPE_PRE_TOKENIZERS`; ``"smollm"`` isolates every digit). ``special_tokens``
    (control tokens such as ``<|im_end|>``) and ``user_tokens`` are matched whole in text.
    """
    from tokenizers import AddedToken, decoders, models

    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    for m in merges:
        if len(m) != 2:
            raise ValueError(f"BPE merge {m!r} is not a pair of tokens")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], fuse_unk=False)
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    if special_tokens:
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special_tokens]
        )
    if user_tokens:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_tokens])
    n = len(tokens)
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if i is not None and not 0 <= i < n:
            raise ValueError(f"{name}={i} is outside the vocabulary of {n} tokens")
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos)


class CharTokenizer(Tokenizer):
    """A :class:`Tokenizer` where every character of an alphabet is one token."""

    def __init__(self, backend: tokenizers.Tokenizer, alphabet: str, **kw: Any) -> None:
        super().__init__(backend, **kw)
        self.alphabet = alphabet

    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        try:
            return super().encode(text, add_bos)
        except Exception as e:
            bad = sorted(set(text) - set(self.alphabet))
            raise ValueError(
                f"text {text!r} has characters outside the alphabet {self.alphabet!r}: {bad}"
            ) from e


def char_tokenizer(
    alphabet: str, specials: Sequence[str] = ("<eos>",), bos: Optional[str] = None
) -> CharTokenizer:
    """Character-level tokenizer: ``alphabet[i]`` has id ``i``; ``specials`` follow in order.

    ``eos_id`` is the first of ``"<eos>"``, ``"<|endoftext|>"``, ``"</s>"`` present in
    ``specials`` (else None); ``pad_id`` is ``"<pad>"`` if present, else eos. Specials are
    matched whole in text (``"ab<eos>"`` -> 3 ids) and decode to their own spelling.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    if not alphabet:
        raise ValueError("char_tokenizer needs a non-empty alphabet")
    if len(set(alphabet)) != len(alphabet):
        dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
        raise ValueError(f"alphabet has repeated characters: {dup}")
    specials = list(specials)
    if len(set(specials)) != len(specials) or any(len(s) < 2 for s in specials):
        raise ValueError(f"specials must be distinct strings of 2+ characters, got {specials}")
    vocab = {c: i for i, c in enumerate(alphabet)}
    for s in specials:
        vocab[s] = len(vocab)
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if specials:
        backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    eos = next((s for s in ("<eos>", "<|endoftext|>", "</s>") if s in specials), None)
    pad = "<pad>" if "<pad>" in specials else eos
    if bos is not None and bos not in specials:
        raise ValueError(f"bos {bos!r} is not one of the specials {specials}")
    idx = lambda s: None if s is None else vocab[s]
    return CharTokenizer(
        backend, alphabet, bos_id=idx(bos), eos_id=idx(eos), pad_id=idx(pad), add_bos=bos is not None
    )
