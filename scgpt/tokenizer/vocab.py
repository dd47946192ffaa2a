"""Gene vocabulary: token <-> integer id, compatible with the original scGPT ``vocab.json``."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from scgpt.errors import DataError
from scgpt.io import write_text_atomic

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")
PAD_TOKEN, CLS_TOKEN, EOC_TOKEN = SPECIAL_TOKENS


class GeneVocab:
    """A mapping from gene symbols and special tokens to unique non-negative integer ids."""

    def __init__(self, token_to_id: dict[str, int]) -> None:
        ids = list(token_to_id.values())
        for token, idx in token_to_id.items():
            if not isinstance(token, str):
                raise DataError(f"vocabulary token {token!r} is not a string; use string gene names")
            if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or idx < 0:
                raise DataError(
                    f"vocabulary id {idx!r} for token {token!r} is not a non-negative integer; fix the id"
                )
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise DataError(f"vocabulary id {dup} is used by more than one token; give each token its own id")
        self._token_to_id: dict[str, int] = {t: int(i) for t, i in token_to_id.items()}
        self._id_to_token: dict[int, str] = {i: t for t, i in self._token_to_id.items()}

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str], specials: Sequence[str] = SPECIAL_TOKENS) -> GeneVocab:
        """Genes get ids ``0..n-1`` in order; specials follow (the original scGPT layout)."""
        genes = [str(g) for g in genes]
        if not genes:
            raise DataError("empty gene list given to GeneVocab.from_genes; pass at least one gene name")
        counts = Counter(genes)
        if len(counts) != len(genes):
            dup = next(g for g, c in counts.items() if c > 1)
            raise DataError(f"duplicate gene name {dup!r} in the gene list; make gene names unique")
        mapping = {g: i for i, g in enumerate(genes)}
        for tok in specials:
            if tok not in mapping:
                mapping[tok] = len(mapping)
        return cls(mapping)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Read a JSON object ``{token: id}``; missing special tokens are appended with the next free id."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: vocabulary file not found; pass the path of an existing vocab.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); provide a JSON object mapping token to id") from None
        if not isinstance(data, dict) or not data:
            raise DataError(f"{path}: expected a non-empty JSON object mapping token to integer id")
        bad = next((t for t, i in data.items() if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
        if bad is not None:
            raise DataError(
                f"{path}: id {data[bad]!r} of token {bad!r} is not a non-negative integer; fix the vocabulary"
            )
        try:
            vocab = cls(data)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        next_id = vocab.size
        for tok in SPECIAL_TOKENS:
            if tok not in vocab._token_to_id:
                data[tok] = next_id
                next_id += 1
        return cls(data) if len(data) != len(vocab) else vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``{token: id}`` sorted by id, atomically (temporary file + rename)."""
        ordered = dict(sorted(self._token_to_id.items(), key=lambda kv: kv[1]))
        write_text_atomic(path, json.dumps(ordered, indent=1, ensure_ascii=False) + "\n")

    # lookup -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._token_to_id)

    def __contains__(self, token: object) -> bool:
        return token in self._token_to_id

    def __getitem__(self, token: str) -> int:
        return self._token_to_id[token]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneVocab):
            return NotImplemented
        return self._token_to_id == other._token_to_id

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"GeneVocab(n_tokens={len(self)}, size={self.size})"

    def id_to_token(self, i: int) -> str:
        """The token with id ``i`` (KeyError if none)."""
        return self._id_to_token[int(i)]

    @property
    def size(self) -> int:
        """Embedding table size: max id + 1."""
        return max(self._id_to_token) + 1 if self._id_to_token else 0

    @property
    def pad_id(self) -> int:
        return self._token_to_id[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self._token_to_id[CLS_TOKEN]

    @property
    def eoc_id(self) -> int:
        return self._token_to_id[EOC_TOKEN]

    @property
    def genes(self) -> list[str]:
        """Non-special tokens in id order."""
        return [t for _, t in sorted(self._id_to_token.items()) if t not in SPECIAL_TOKENS]

    @property
    def token_to_id(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def encode(self, genes: Sequence[str]) -> np.ndarray:
        """Ids of ``genes`` as int64; ``-1`` for genes not in the vocabulary."""
        lookup = self._token_to_id.get
        return np.fromiter((lookup(g, -1) for g in genes), dtype=np.int64, count=len(genes))
