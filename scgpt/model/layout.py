"""Where each token sits: padded ``(B, L)`` rows or packed ``(T,)`` tokens with ``cu_seqlens``.

Everything per-token in the model (embeddings, projections, FFN, decoders) works on any leading
shape; only attention and per-cell pooling need to know the layout, and they ask this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Padded when ``padding_mask`` is set, packed when ``cu_seqlens`` is set (exactly one)."""

    padding_mask: Tensor | None = None  # (B, L) bool, True at padding
    cu_seqlens: Tensor | None = None  # (B + 1,) int32, token offsets of each cell
    max_seqlen: int = 0  # longest cell (packed layout)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # lengths, seq_ids

    def __post_init__(self) -> None:
        if (self.padding_mask is None) == (self.cu_seqlens is None):
            raise ValueError("TokenLayout needs exactly one of padding_mask or cu_seqlens")

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def n_cells(self) -> int:
        return self.cu_seqlens.numel() - 1 if self.is_packed else self.padding_mask.shape[0]

    @property
    def lengths(self) -> Tensor:  # (B,) tokens per cell, <cls> included; computed once per layout
        if "lengths" not in self._cache:
            self._cache["lengths"] = ((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long() if self.is_packed
                                      else (~self.padding_mask).sum(dim=1))
        return self._cache["lengths"]

    @property
    def seq_ids(self) -> Tensor:  # (T,) cell index of each packed token; computed once per layout
        if "seq_ids" not in self._cache:
            cells = torch.arange(self.n_cells, device=self.cu_seqlens.device)
            self._cache["seq_ids"] = torch.repeat_interleave(cells, self.lengths, output_size=self.n_tokens)
        return self._cache["seq_ids"]

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens, <cls> included."""
        if "n_tokens" not in self._cache:
            self._cache["n_tokens"] = int(self.cu_seqlens[-1]) if self.is_packed else int((~self.padding_mask).sum())
        return self._cache["n_tokens"]

    def token_mask(self) -> Tensor:
        """True for real tokens: (B, L) padded, (T,) packed."""
        if self.is_packed:
            return torch.ones(self.n_tokens, dtype=torch.bool, device=self.cu_seqlens.device)
        return ~self.padding_mask

    def first_tokens(self, x: Tensor) -> Tensor:
        """The ``<cls>`` position of each cell: (B, L, D) or (T, D) -> (B, D)."""
        return x[self.cu_seqlens[:-1].long()] if self.is_packed else x[:, 0]

    def weighted_mean(self, x: Tensor, weights: Tensor) -> Tensor:
        """Per-cell mean of token states weighted by ``weights`` (zero at padding) -> (B, D)."""
        if self.is_packed:
            total = x.new_zeros(self.n_cells, x.shape[-1]).index_add_(0, self.seq_ids, x * weights[:, None])
            norm = x.new_zeros(self.n_cells).index_add_(0, self.seq_ids, weights)
        else:
            total = (x * weights[..., None]).sum(dim=1)  # (B, D)
            norm = weights.sum(dim=1)  # (B,)
        return total / norm.clamp_min(torch.finfo(x.dtype).tiny)[:, None]

    def broadcast(self, per_cell: Tensor) -> Tensor:
        """Repeat a per-cell tensor (B, D) onto its tokens: (B, 1, D) padded or (T, D) packed."""
        return per_cell[self.seq_ids] if self.is_packed else per_cell[:, None]


def pack_padded(x: Tensor, padding_mask: Tensor) -> tuple[Tensor, TokenLayout]:
    """(B, L, ...) padded -> (T, ...) packed with its layout. Cells keep their order."""
    lengths = (~padding_mask).sum(dim=1)
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return x[~padding_mask], TokenLayout(cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))


def unpack_to_padded(x: Tensor, padding_mask: Tensor, fill: float = 0.0) -> Tensor:
    """(T, ...) packed -> (B, L, ...) padded, ``fill`` at padding."""
    out = x.new_full((*padding_mask.shape, *x.shape[1:]), fill)
    out[~padding_mask] = x
    return out
