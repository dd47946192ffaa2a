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

from scgpt.errors import ConfigError
from scgpt.model.layout import TokenLayout
from scgpt.tokenizer.binning import bin_rows
from scgpt.tokenizer.masking import draw_mask_ratios, mask_rows

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
    """Turns sparse cells into a :class:`CellBatch`, vectorised over the whole CSR block (numpy inside:
    collation runs on CPU in data-loader workers, where numpy's row sorts are much faster than torch's).

    ``gene_universe`` (vocabulary ids of every gene the dataset measures) is needed only with
    ``include_zero_genes``: then every measured gene is a candidate token, with value 0 if unexpressed.
    """

    def __init__(self, cfg: CollatorConfig, gene_universe: np.ndarray | Tensor | None = None) -> None:
        self.cfg = cfg
        if cfg.include_zero_genes and gene_universe is None:
            raise ConfigError("data.include_zero_genes: needs the dataset's gene list (gene_universe)")
        self.gene_universe = None if gene_universe is None else np.asarray(gene_universe, dtype=np.int64)

    def __call__(self, cells: Sequence[dict], generator: torch.Generator) -> CellBatch:
        """Cells as dicts: ``gene_ids`` and ``counts`` arrays, plus integer labels."""
        lengths = [len(c["gene_ids"]) for c in cells]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gene_ids = np.concatenate([np.asarray(c["gene_ids"], dtype=np.int64) for c in cells])
        counts = np.concatenate([np.asarray(c["counts"], dtype=np.float32) for c in cells])
        labels = {k: np.array([c[k] for c in cells]) for k in cells[0] if k not in ("gene_ids", "counts")}
        return self.collate_csr(indptr, gene_ids, counts, labels, generator)

    def collate_table(self, table, rows: np.ndarray, generator: torch.Generator) -> CellBatch:
        """Rows of a :class:`~data_modules.cells.CellTable` (one fancy-indexed CSR slice, no per-cell work)."""
        block = table.counts[rows]
        labels = {k: codes[rows] for k, codes in table.labels.items()}
        return self.collate_csr(block.indptr.astype(np.int64), table.gene_ids[block.indices], block.data, labels,
                                generator)

    def collate_csr(self, indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray,
                    labels: dict[str, np.ndarray], generator: torch.Generator) -> CellBatch:
        """indptr (B + 1,), gene_ids and counts (nnz,) of B cells -> CellBatch."""
        ids, values, valid = self._candidates(indptr, gene_ids, counts.astype(np.float32))  # (B, N)
        uniform = torch.rand(values.shape, generator=generator).numpy()
        bins = bin_rows(values, valid, self.cfg.n_bins, uniform)  # (B, N)
        ids, bins, valid = self._choose_genes(ids, bins, valid, generator)  # (B, K)
        batch = self._tokenize(ids, bins, valid, generator)
        batch.labels = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in labels.items()}
        return pack_batch(batch) if self.cfg.layout == "packed" else batch

    def _candidates(self, indptr, gene_ids, counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each cell's candidate genes, padded: ids (B, N), raw counts (B, N), valid (B, N)."""
        lengths = np.diff(indptr)
        rows = np.repeat(np.arange(len(lengths)), lengths)  # (nnz,) cell of each value
        if self.cfg.include_zero_genes:
            universe = self.gene_universe
            position = np.full(int(max(universe.max(), gene_ids.max(initial=0))) + 1, -1, dtype=np.int64)
            position[universe] = np.arange(universe.size)
            dense = np.zeros((len(lengths), universe.size), dtype=np.float32)  # (B, G)
            known = position[gene_ids] >= 0
            dense[rows[known], position[gene_ids[known]]] = counts[known]
            return np.broadcast_to(universe, dense.shape), dense, np.ones(dense.shape, dtype=bool)
        width = int(lengths.max(initial=0))
        cols = np.arange(len(gene_ids)) - indptr[rows]  # (nnz,) position within its cell
        ids = np.full((len(lengths), width), self.cfg.pad_token_id, dtype=np.int64)
        values = np.zeros((len(lengths), width), dtype=np.float32)
        ids[rows, cols], values[rows, cols] = gene_ids, counts
        return ids, values, np.arange(width) < lengths[:, None]

    def _choose_genes(self, ids, bins, valid, generator: torch.Generator):
        """Keep at most max_seq_len - 1 genes per cell, a uniform random sample when there are more."""
        keep = self.cfg.max_seq_len - 1
        if ids.shape[1] <= keep:  # every cell fits: no sampling (token order carries no meaning)
            return ids, bins, valid
        keys = np.where(valid, torch.rand(ids.shape, generator=generator).numpy(), 2.0)  # invalid sort last
        chosen = np.argpartition(keys, keep - 1, axis=1)[:, :keep]  # the `keep` smallest keys, any order
        chosen = np.take_along_axis(chosen, np.argsort(np.take_along_axis(keys, chosen, 1), axis=1), 1)
        return tuple(np.take_along_axis(a, chosen, 1) for a in (ids, bins, valid))

    def _tokenize(self, ids, bins, valid, generator: torch.Generator) -> CellBatch:
        """Prepend <cls>, hide values for prediction, mark generative cells -> padded CellBatch."""
        cfg, n_cells = self.cfg, ids.shape[0]
        real_gene = np.concatenate([np.zeros((n_cells, 1), dtype=bool), valid], axis=1)  # (B, L)
        padding = ~real_gene
        padding[:, 0] = False  # <cls>
        gene_ids = np.concatenate([np.full((n_cells, 1), cfg.cls_token_id), ids], axis=1)
        gene_ids = np.where(padding, cfg.pad_token_id, gene_ids)
        target = np.concatenate([np.full((n_cells, 1), cfg.pad_value, dtype=np.float32), bins], axis=1)
        target = np.where(padding, np.float32(cfg.pad_value), target)
        ratios = draw_mask_ratios(n_cells, cfg.mask_ratios, generator).numpy()
        hidden = mask_rows(real_gene, ratios, torch.rand(real_gene.shape, generator=generator).numpy())
        generative = (torch.rand(n_cells, generator=generator) < cfg.generative_fraction).numpy()  # (B,)
        values = np.where(hidden, np.float32(cfg.mask_value), target)
        as_tensor = torch.from_numpy
        return CellBatch(
            gene_ids=as_tensor(np.ascontiguousarray(gene_ids)), values=as_tensor(values), target_values=as_tensor(target),
            hidden_mask=as_tensor(hidden), gen_mask=as_tensor(hidden & generative[:, None]),
            generative=as_tensor(generative), padding_mask=as_tensor(padding),
            max_seqlen=int((~padding).sum(axis=1).max()),
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
