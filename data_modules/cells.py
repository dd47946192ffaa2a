"""An in-memory table of cells: CSR raw counts with vocabulary gene ids and integer-coded labels.

The streaming Zarr store reads into the same shape a block at a time; the collator only ever sees
cells as ``{"gene_ids", "counts", <label>: int}`` dicts produced by :meth:`CellTable.cells`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scgpt.errors import DataError
from scgpt.tokenizer.vocab import GeneVocab


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

    @classmethod
    def from_anndata(cls, adata, vocab: GeneVocab, label_keys: list[str], source: str,
                     min_vocab_overlap: float = 0.5) -> "CellTable":
        """Map ``adata``'s genes to the vocabulary, keep the known ones, code the label columns."""
        ids = vocab.encode(list(adata.var_names))
        known = ids >= 0
        if known.mean() < min_vocab_overlap:
            missing = list(adata.var_names[~known][:3])
            raise DataError(f"{source}: only {int(known.sum())} of {len(ids)} genes are in the vocabulary "
                            f"(e.g. missing {missing}); pass a vocabulary built from these genes")
        counts = sp.csr_matrix(adata.X)[:, np.flatnonzero(known)].astype(np.float32)
        labels, names = {}, {}
        for key in label_keys:
            if key not in adata.obs:
                raise DataError(f"{source}: obs has no column {key!r}; available: {', '.join(adata.obs.columns)}")
            codes, categories = _codes(adata.obs[key])
            labels[key], names[key] = codes, categories
        return cls(counts=counts, gene_ids=ids[known], labels=labels, label_names=names)


def _codes(column) -> tuple[np.ndarray, list[str]]:
    categorical = column.astype("category")
    return categorical.cat.codes.to_numpy().astype(np.int64), [str(c) for c in categorical.cat.categories]
