"""A block of cells in memory: CSR raw counts with vocabulary gene ids and integer-coded labels.

Cell stores read into this shape a block at a time; the collator only ever sees cells as
``{"gene_ids", "counts", <label>: int}`` dicts produced by :meth:`CellTable.cells`, or a batch's CSR rows
from :meth:`CellTable.take`.

A table keeps its CSR as three numpy arrays (``indptr``, ``indices``, ``data``); the scipy matrix
``counts`` is built from them on first use, without copying the values. A streaming shuffle buffer is
one table whose ``indices``/``data`` live in a reusable :class:`CsrArena`, so the blocks of a buffer are
read straight into one allocation instead of being concatenated.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class CsrArena:
    """Reusable ``data``/``indices`` buffers that the blocks of a shuffle buffer are read into, one after
    the other (a bump allocator, reset for each buffer; store blocks are float32 values, int32 indices). Reusing the allocation spares each buffer the
    page faults of fresh multi-MB arrays. A buffer's arrays are views: they are valid until the next
    :meth:`reset`, so whatever leaves the stream must be a copy (batches are: fancy-indexed rows)."""

    def __init__(self, data_dtype=np.float32, index_dtype=np.int32) -> None:
        self.data = np.empty(0, data_dtype)
        self.indices = np.empty(0, index_dtype)
        self.used = 0

    def reset(self, capacity: int = 0) -> None:
        self.used = 0
        if capacity > self.data.size:
            self._grow(capacity)

    def take_slots(self, n: int) -> int:
        """Room for ``n`` more values in one piece (growing to exactly that if needed): their first offset."""
        if self.used + n > self.data.size:
            self._grow(self.used + n)
        first, self.used = self.used, self.used + n
        return first

    def release(self, n: int) -> None:
        """Give back the last ``n`` values of the latest allocation (values dropped after reading it)."""
        self.used -= n

    def filled(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data[:self.used], self.indices[:self.used]

    def _grow(self, capacity: int) -> None:
        data, indices = np.empty(capacity, self.data.dtype), np.empty(capacity, self.indices.dtype)
        data[:self.used], indices[:self.used] = self.data[:self.used], self.indices[:self.used]
        self.data, self.indices = data, indices


class CellTable:
    """Cells x genes raw counts (CSR) whose column j is gene ``gene_ids[j]``, with integer-coded labels."""

    def __init__(self, counts: sp.csr_matrix | None = None, gene_ids: np.ndarray | None = None,
                 labels: dict[str, np.ndarray] | None = None, label_names: dict[str, list[str]] | None = None,
                 *, csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Either ``counts`` (a scipy CSR matrix) or ``csr=(indptr, indices, data)`` over ``gene_ids``."""
        if (counts is None) == (csr is None):
            raise TypeError("CellTable takes counts or csr=(indptr, indices, data), not both or neither")
        if counts is not None:
            counts = counts if isinstance(counts, sp.csr_matrix) else sp.csr_matrix(counts)
            csr = (counts.indptr, counts.indices, counts.data)
        self.indptr, self.indices, self.data = csr
        self.gene_ids = np.asarray(gene_ids)  # (genes,) vocabulary id of each column
        self.labels = {} if labels is None else labels  # name -> (cells,) int codes
        self.label_names = {} if label_names is None else label_names  # name -> category names
        self._counts = counts

    def __repr__(self) -> str:
        return f"CellTable(n_cells={self.n_cells}, nnz={self.nnz}, genes={self.gene_ids.size}, labels={list(self.labels)})"

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1] - self.indptr[0])

    @property
    def counts(self) -> sp.csr_matrix:
        """(cells, genes) raw counts as scipy CSR, sharing the arrays (built once)."""
        if self._counts is None:
            self._counts = sp.csr_matrix((self.data, self.indices, self.indptr),
                                         shape=(self.n_cells, self.gene_ids.size))
        return self._counts

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The CSR ``(indptr, indices, data)`` of ``rows`` in the given order (copies; int64 indptr): one
        row-gather pass in scipy's compiled code over the table's (shared, never copied) arrays, measured
        faster here than a flat numpy fancy index or per-row slice copies (rows hold ~10^3 values)."""
        block = self.counts[np.asarray(rows, dtype=np.int64)]
        return block.indptr.astype(np.int64, copy=False), block.indices, block.data

    def cells(self, rows: np.ndarray) -> list[dict]:
        """The given rows as collator input, in the given order."""
        indptr, indices, data = self.take(rows)
        out = []
        for i, row in enumerate(rows):
            start, end = indptr[i], indptr[i + 1]
            cell = {"gene_ids": self.gene_ids[indices[start:end]], "counts": data[start:end]}
            cell.update({name: int(codes[row]) for name, codes in self.labels.items()})
            out.append(cell)
        return out

    def in_vocabulary_columns(self, vocab_size: int) -> "CellTable":
        """The same cells with column j = vocabulary id j, so tables of different gene spaces can stack."""
        return CellTable(gene_ids=np.arange(vocab_size), labels=self.labels, label_names=self.label_names,
                         csr=(self.indptr, self.gene_ids[self.indices], self.data))

    @classmethod
    def concat(cls, tables: list["CellTable"]) -> "CellTable":
        """Rows of several tables over the same genes, in order."""
        if len(tables) == 1:
            return tables[0]
        if any(not np.array_equal(t.gene_ids, tables[0].gene_ids) for t in tables):
            size = int(max(t.gene_ids.max(initial=0) for t in tables)) + 1
            tables = [t.in_vocabulary_columns(size) for t in tables]
        lengths = np.concatenate([np.diff(t.indptr) for t in tables])
        indptr = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate([t.indices[t.indptr[0]:t.indptr[-1]] for t in tables])
        data = np.concatenate([t.data[t.indptr[0]:t.indptr[-1]] for t in tables])
        return cls(gene_ids=tables[0].gene_ids, csr=(indptr, indices, data), label_names=tables[0].label_names,
                   labels={k: np.concatenate([t.labels[k] for t in tables]) for k in tables[0].labels})

    @classmethod
    def from_arena(cls, arena: CsrArena, lengths: list[np.ndarray], gene_ids: list[np.ndarray],
                   labels: list[dict[str, np.ndarray]], label_names: dict[str, list[str]]) -> "CellTable":
        """The blocks read one after the other into ``arena`` (block i: ``lengths[i]`` values per cell over
        ``gene_ids[i]``) as one table; blocks over different gene spaces get vocabulary-id columns."""
        data, indices = arena.filled()
        counts = np.concatenate(lengths)
        indptr = np.zeros(counts.size + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        columns = gene_ids[0]
        if any(not np.array_equal(g, columns) for g in gene_ids):  # as in_vocabulary_columns, block by block
            offset = 0
            for n, ids in zip(lengths, gene_ids):
                size = int(n.sum())
                indices[offset:offset + size] = ids[indices[offset:offset + size]]
                offset += size
            columns = np.arange(int(max(g.max(initial=0) for g in gene_ids)) + 1)
        return cls(gene_ids=columns, csr=(indptr, indices, data), label_names=label_names,
                   labels={k: np.concatenate([t[k] for t in labels]) for k in labels[0]})
