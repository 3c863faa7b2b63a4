"""Tokenizers: a thin, typed wrapper over HF ``tokenizers`` plus builders.

``Tokenizer.encode(text) -> list[int]`` and ``Tokenizer.decode(ids) -> str``; special ids
(``bos_id``, ``eos_id``, ``pad_id``) may be None. Builders for a Hugging Face directory,
GGUF metadata (see :mod:`gfn_jax.models.gguf`) and tiny character vocabularies for tests
live here or next to the format they read.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

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
