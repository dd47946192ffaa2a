"""Where each token sits: padded ``(B, L)`` rows, or packed ``(T,)`` tokens in one of two orders.

- packed (``cu_seqlens``): each cell's tokens together, cells in order.
- packed known-first (``cu_known`` and ``cu_gen``): every cell's known tokens (cells in order, ``<cls>``
  first in its cell), then every cell's generated tokens (cells in order). The generative attention
  then reads its two parts as slices, without permuting tokens (attention.py, :class:`GenerativeSplit`).

Everything per-token in the model (embeddings, projections, FFN, decoders) works on any leading
shape; only attention and per-cell pooling need to know the layout, and they ask this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def cumulative(counts: Tensor) -> Tensor:
    """(B,) counts -> (B + 1,) int32 offsets, starting at 0."""
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = counts.cumsum(0)
    return cu


def _counts(cu: Tensor) -> Tensor:
    return (cu[1:] - cu[:-1]).long()  # (B,)


@dataclass
class TokenLayout:
    """Padded when ``padding_mask`` is set, packed when ``cu_seqlens`` is set, packed known-first when
    ``cu_known`` and ``cu_gen`` are set (exactly one of the three)."""

    padding_mask: Tensor | None = None  # (B, L) bool, True at padding
    cu_seqlens: Tensor | None = None  # (B + 1,) int32, token offsets of each cell
    max_seqlen: int = 0  # longest cell (packed layouts)
    cu_known: Tensor | None = None  # (B + 1,) int32 known-first: offsets of each cell's known tokens in [0, n_known)
    cu_gen: Tensor | None = None  # (B + 1,) int32 known-first: offsets of each cell's generated tokens, after n_known
    max_known: int = 0  # known-first: most known tokens of a cell
    max_gen: int = 0  # known-first: most generated tokens of a cell
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # lengths, seq_ids, order

    def __post_init__(self) -> None:
        if sum(t is not None for t in (self.padding_mask, self.cu_seqlens, self.cu_known)) != 1:
            raise ValueError("TokenLayout needs exactly one of padding_mask, cu_seqlens or cu_known")
        if (self.cu_known is None) != (self.cu_gen is None):
            raise ValueError("TokenLayout: cu_known and cu_gen come together")

    @property
    def is_packed(self) -> bool:
        return self.padding_mask is None

    @property
    def is_known_first(self) -> bool:
        return self.cu_known is not None

    @property
    def n_cells(self) -> int:
        if self.padding_mask is not None:
            return self.padding_mask.shape[0]
        return (self.cu_seqlens if self.cu_known is None else self.cu_known).numel() - 1

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.padding_mask, self.cu_seqlens, self.cu_known) if t is not None).device

    def _cached(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def lengths(self) -> Tensor:  # (B,) tokens per cell, <cls> included; computed once per layout
        def compute():
            if self.is_known_first:
                return _counts(self.cu_known) + _counts(self.cu_gen)
            return _counts(self.cu_seqlens) if self.is_packed else (~self.padding_mask).sum(dim=1)
        return self._cached("lengths", compute)

    @property
    def n_known(self) -> int:
        """Known-first: the known tokens, every cell's, that come first (all tokens otherwise)."""
        return self._cached("n_known", lambda: int(self.cu_known[-1]) if self.is_known_first else self.n_tokens)

    @property
    def seq_ids(self) -> Tensor:  # (T,) cell index of each packed token, in any packed order; computed once
        def compute():
            cells = torch.arange(self.n_cells, device=self.device)
            if not self.is_known_first:
                return torch.repeat_interleave(cells, self.lengths, output_size=self.n_tokens)
            known = torch.repeat_interleave(cells, _counts(self.cu_known), output_size=self.n_known)  # (Tk,)
            gen = torch.repeat_interleave(cells, _counts(self.cu_gen), output_size=self.n_tokens - self.n_known)
            return torch.cat([known, gen])
        return self._cached("seq_ids", compute)

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens, <cls> included."""
        def compute():
            if self.is_known_first:
                return int(self.cu_known[-1]) + int(self.cu_gen[-1])
            return int(self.cu_seqlens[-1]) if self.is_packed else int((~self.padding_mask).sum())
        return self._cached("n_tokens", compute)

    @property
    def cell_offsets(self) -> Tensor:
        """(B + 1,) int32 offsets of each cell's tokens once they are together (:attr:`cell_order`)."""
        if self.cu_seqlens is not None:
            return self.cu_seqlens
        return self._cached("cell_offsets", lambda: cumulative(self.lengths))

    @property
    def cell_order(self) -> Tensor | None:
        """(T,) the layout positions of cell 0's tokens (known ones first), then cell 1's, ...: the order
        in which each cell's tokens are together; None when they already are."""
        if not self.is_known_first or self.n_known == self.n_tokens:
            return None
        return self._cached("cell_order", lambda: torch.argsort(self.seq_ids, stable=True))

    def token_mask(self) -> Tensor:
        """True for real tokens: (B, L) padded, (T,) packed."""
        if self.is_packed:
            return torch.ones(self.n_tokens, dtype=torch.bool, device=self.device)
        return ~self.padding_mask

    @property
    def first_positions(self) -> Tensor:
        """(B,) packed position of each cell's first token, its ``<cls>`` (known, so first in known-first)."""
        return (self.cu_known if self.is_known_first else self.cu_seqlens)[:-1].long()

    def first_tokens(self, x: Tensor) -> Tensor:
        """The ``<cls>`` position of each cell: (B, L, D) or (T, D) -> (B, D)."""
        return x[self.first_positions] if self.is_packed else x[:, 0]

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
    return x[~padding_mask], TokenLayout(cu_seqlens=cumulative(lengths), max_seqlen=int(lengths.max()))


def unpack_to_padded(x: Tensor, padding_mask: Tensor, fill: float = 0.0) -> Tensor:
    """(T, ...) packed -> (B, L, ...) padded, ``fill`` at padding."""
    out = x.new_full((*padding_mask.shape, *x.shape[1:]), fill)
    out[~padding_mask] = x
    return out
