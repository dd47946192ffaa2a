"""A block of cells in memory: CSR raw counts with vocabulary gene ids and integer-coded labels.

Cell stores read into this shape a block at a time; the collator only ever sees cells as
``{"gene_ids", "counts", <label>: int}`` dicts produced by :meth:`CellTable.cells`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp



@dataclass
class CellTable:
    counts: sp.csr_matrix  # (cells, genes) raw counts, columns are the genes below
    gene_ids: np.ndarray  # (genes,) vocabulary id of each column
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (cells,) int codes
    label_names: dict[str, list[str]] = field(default_factory=dict)  # name -> category names

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    def cells(self, rows: np.ndarray) -> list[dict]:
        """The given rows as collator input, in the given order."""
        block = self.counts[rows]
        out = []
        for i, row in enumerate(rows):
            start, end = block.indptr[i], block.indptr[i + 1]
            cell = {"gene_ids": self.gene_ids[block.indices[start:end]], "counts": block.data[start:end]}
            cell.update({name: int(codes[row]) for name, codes in self.labels.items()})
            out.append(cell)
        return out

    def in_vocabulary_columns(self, vocab_size: int) -> "CellTable":
        """The same cells with column j = vocabulary id j, so tables of different gene spaces can stack."""
        counts = sp.csr_matrix((self.counts.data, self.gene_ids[self.counts.indices], self.counts.indptr),
                               shape=(self.n_cells, vocab_size))
        return CellTable(counts, np.arange(vocab_size), self.labels, self.label_names)

    @classmethod
    def concat(cls, tables: list["CellTable"]) -> "CellTable":
        """Rows of several tables over the same genes, in order."""
        if len(tables) == 1:
            return tables[0]
        if any(not np.array_equal(t.gene_ids, tables[0].gene_ids) for t in tables):
            size = int(max(t.gene_ids.max(initial=0) for t in tables)) + 1
            tables = [t.in_vocabulary_columns(size) for t in tables]
        return cls(counts=sp.vstack([t.counts for t in tables], format="csr"), gene_ids=tables[0].gene_ids,
                   labels={k: np.concatenate([t.labels[k] for t in tables]) for k in tables[0].labels},
                   label_names=tables[0].label_names)
