"""Cells -> model-ready token batches: choose genes, bin values, mask, then pad or pack.

Input cells are sparse: ``gene_ids`` (vocabulary ids of the measured non-zero genes) and their raw
``counts``. Everything after building the (B, N) batch is vectorised; randomness comes only from
the generator passed in, seeded by the caller from (seed, epoch, rank, worker, step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from scgpt.errors import ConfigError
from scgpt.model.layout import TokenLayout
from scgpt.tokenizer.binning import bin_expression
from scgpt.tokenizer.masking import draw_mask_ratios, random_mask

LAYOUTS = ("padded", "packed")


@dataclass
class CellBatch:
    """A tokenized batch. Per-token tensors are (B, L) when padded, (T,) when packed."""

    gene_ids: Tensor  # long
    values: Tensor  # float: binned input values; mask_value where hidden, pad_value at <cls> and padding
    target_values: Tensor  # float: true binned values
    hidden_mask: Tensor  # bool: values the model must predict
    gen_mask: Tensor  # bool: hidden tokens of generative cells (attend to known genes and themselves)
    generative: Tensor  # (B,) bool: cells trained with the generative attention mask
    padding_mask: Tensor | None = None  # (B, L) bool, padded layout
    cu_seqlens: Tensor | None = None  # (B + 1,) int32, packed layout
    max_seqlen: int = 0
    labels: dict[str, Tensor] = field(default_factory=dict)  # per-cell (B,) long, e.g. cell_type, batch

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(padding_mask=self.padding_mask, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)

    @property
    def n_cells(self) -> int:
        return int(self.generative.numel())

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens, <cls> included."""
        return int(self.gene_ids.numel()) if self.padding_mask is None else int((~self.padding_mask).sum())


@dataclass
class CollatorConfig:
    pad_token_id: int
    cls_token_id: int
    max_seq_len: int = 1200
    n_bins: int = 51
    mask_ratios: Sequence[float] = (0.25, 0.5, 0.75)
    mask_value: float = -1.0
    pad_value: float = -2.0
    include_zero_genes: bool = False
    generative_fraction: float = 0.0
    layout: str = "padded"

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len: is {self.max_seq_len}; needs room for <cls> and one gene (>= 2)")
        if not self.mask_ratios or not all(0.0 <= r <= 1.0 for r in self.mask_ratios):
            raise ConfigError(f"data.mask_ratios: {list(self.mask_ratios)} must be a non-empty list of ratios in [0, 1]")
        if not 0.0 <= self.generative_fraction <= 1.0:
            raise ConfigError(f"data.generative_fraction: {self.generative_fraction} must be in [0, 1]")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout: unknown layout {self.layout!r}; choose padded or packed")


class CellCollator:
    """Turns a list of sparse cells into a :class:`CellBatch`.

    ``gene_universe`` (vocabulary ids of every gene the dataset measures) is needed only with
    ``include_zero_genes``: then every measured gene is a candidate token, with value 0 if unexpressed.
    """

    def __init__(self, cfg: CollatorConfig, gene_universe: np.ndarray | Tensor | None = None) -> None:
        self.cfg = cfg
        if cfg.include_zero_genes and gene_universe is None:
            raise ConfigError("data.include_zero_genes: needs the dataset's gene list (gene_universe)")
        self.gene_universe = None if gene_universe is None else torch.as_tensor(gene_universe, dtype=torch.long)

    def __call__(self, cells: Sequence[dict], generator: torch.Generator) -> CellBatch:
        gene_ids, counts, valid = self._candidates(cells)  # (B, N)
        bins = bin_expression(counts, valid, self.cfg.n_bins, generator)  # (B, N)
        gene_ids, bins, valid = self._choose_genes(gene_ids, bins, valid, generator)  # (B, K)
        batch = self._tokenize(gene_ids, bins, valid, generator)
        batch.labels = {key: torch.as_tensor([c[key] for c in cells], dtype=torch.long)
                        for key in cells[0] if key not in ("gene_ids", "counts")}
        return pack_batch(batch) if self.cfg.layout == "packed" else batch

    def _candidates(self, cells: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor]:
        """Each cell's candidate genes, padded: ids (B, N), raw counts (B, N), valid (B, N)."""
        ids = [torch.as_tensor(c["gene_ids"], dtype=torch.long) for c in cells]
        counts = [torch.as_tensor(c["counts"], dtype=torch.float32) for c in cells]
        if self.cfg.include_zero_genes:
            return self._dense_over_universe(ids, counts)
        lengths = torch.tensor([len(i) for i in ids])
        valid = torch.arange(int(lengths.max())) < lengths[:, None]
        padded_ids = pad_sequence(ids, batch_first=True, padding_value=self.cfg.pad_token_id)
        return padded_ids, pad_sequence(counts, batch_first=True), valid

    def _dense_over_universe(self, ids: list[Tensor], counts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        universe = self.gene_universe
        position = torch.full((int(universe.max()) + 1,), -1, dtype=torch.long)
        position[universe] = torch.arange(universe.numel())
        dense = torch.zeros(len(ids), universe.numel())  # (B, G)
        rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(i) for i in ids]))
        dense[rows, position[torch.cat(ids)]] = torch.cat(counts)
        gene_ids = universe.expand(len(ids), -1)
        return gene_ids, dense, torch.ones_like(dense, dtype=torch.bool)

    def _choose_genes(self, gene_ids: Tensor, bins: Tensor, valid: Tensor, generator: torch.Generator):
        """Keep at most max_seq_len - 1 genes per cell, a uniform random sample when there are more."""
        keep = min(gene_ids.shape[1], self.cfg.max_seq_len - 1)
        keys = torch.rand(gene_ids.shape, generator=generator).masked_fill(~valid, 2.0)  # invalid sort last
        order = keys.argsort(dim=1)[:, :keep]  # (B, K)
        return gene_ids.gather(1, order), bins.gather(1, order), valid.gather(1, order)

    def _tokenize(self, gene_ids: Tensor, bins: Tensor, valid: Tensor, generator: torch.Generator) -> CellBatch:
        """Prepend <cls>, hide values for prediction, mark generative cells -> padded CellBatch."""
        cfg, n_cells = self.cfg, gene_ids.shape[0]
        cls_ids = torch.full((n_cells, 1), cfg.cls_token_id, dtype=torch.long)
        gene_ids = torch.cat([cls_ids, gene_ids], dim=1)  # (B, L)
        target = torch.cat([torch.full((n_cells, 1), cfg.pad_value), bins], dim=1)
        real_gene = torch.cat([torch.zeros(n_cells, 1, dtype=torch.bool), valid], dim=1)
        padding = ~real_gene
        padding[:, 0] = False
        target = target.masked_fill(padding, cfg.pad_value)
        gene_ids = gene_ids.masked_fill(padding, cfg.pad_token_id)
        hidden = random_mask(real_gene, draw_mask_ratios(n_cells, cfg.mask_ratios, generator), generator)
        generative = torch.rand(n_cells, generator=generator) < cfg.generative_fraction  # (B,)
        return CellBatch(
            gene_ids=gene_ids, values=target.masked_fill(hidden, cfg.mask_value), target_values=target,
            hidden_mask=hidden, gen_mask=hidden & generative[:, None], generative=generative,
            padding_mask=padding, max_seqlen=int((~padding).sum(dim=1).max()),
        )


def pack_batch(batch: CellBatch) -> CellBatch:
    """Padded (B, L) -> packed (T,) tokens with cu_seqlens; cells stay in order."""
    real = ~batch.padding_mask
    lengths = real.sum(dim=1)
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return CellBatch(
        gene_ids=batch.gene_ids[real], values=batch.values[real], target_values=batch.target_values[real],
        hidden_mask=batch.hidden_mask[real], gen_mask=batch.gen_mask[real], generative=batch.generative,
        cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()), labels=batch.labels,
    )
