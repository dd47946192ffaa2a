"""The shuffle buffer's table: blocks read into a reused arena equal the concatenated blocks, row gathers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import anndata as ad
import scipy.sparse as sp

from data_modules.cells import CellTable, CsrArena
from data_modules.store import CellStore, write_store
from scgpt.tokenizer.vocab import GeneVocab


def _table(n_cells, gene_ids, seed):
    rng = np.random.default_rng(seed)
    counts = sp.random(n_cells, len(gene_ids), density=0.3, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.ceil(counts.data * 9)
    return CellTable(counts, np.asarray(gene_ids), {"cell": np.arange(n_cells) + 1000 * seed}, {})


def _into_arena(tables, arena):
    """What a store does with an arena: each block's values copied into the arena's next slots."""
    out = []
    for t in tables:
        data, indices = arena.alloc(t.nnz)
        data[:], indices[:] = t.data, t.indices
        out.append(t)
    return CellTable.from_arena(arena, [np.diff(t.indptr) for t in out], [t.gene_ids for t in out],
                                [t.labels for t in out], {})


def _same(a: CellTable, b: CellTable) -> bool:
    return (np.array_equal(a.gene_ids, b.gene_ids) and (a.counts != b.counts).nnz == 0
            and all(np.array_equal(a.labels[k], b.labels[k]) for k in a.labels))


def test_arena_buffer_equals_concatenated_blocks_for_one_and_for_mixed_gene_spaces():
    arena = CsrArena()  # starts empty: every buffer below grows it while earlier blocks are in it
    same = [_table(30, range(20), 1), _table(25, range(20), 2), _table(40, range(20), 3)]
    assert _same(_into_arena(same, arena), CellTable.concat(same))
    mixed = [_table(30, [5, 9, 2, 7], 4), _table(20, range(12), 5), _table(10, [30, 1], 6)]
    arena.reset()  # reused: the second buffer overwrites the first one's values
    got = _into_arena(mixed, arena)
    assert _same(got, CellTable.concat(mixed)) and got.gene_ids.size == 31  # columns = vocabulary ids


def test_take_returns_the_rows_in_order_as_copies():
    table = _table(50, range(20), 7)
    rows = np.array([7, 3, 49, 3, 0])
    indptr, indices, data = table.take(rows)
    expected = table.counts[rows]
    assert indptr.dtype == np.int64 and np.array_equal(indptr, expected.indptr)
    assert np.array_equal(indices, expected.indices) and np.array_equal(data, expected.data)
    data[:] = -1  # a copy: the table is untouched
    assert table.data.min() >= 0
    assert [c["cell"] for c in table.cells(rows)] == (rows + 7000).tolist()


def test_store_blocks_read_into_an_arena_equal_plain_reads_when_genes_are_dropped(tmp_path):
    rng = np.random.default_rng(0)
    x = sp.random(120, 30, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    adata = ad.AnnData(X=x, var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    write_store(adata, tmp_path / "s.zarr", seed=0)
    store = CellStore(tmp_path / "s.zarr")
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(0, 30, 2)])  # half of the genes: the rest are dropped
    plain = [store.read_block(a, a + 40, [], vocab) for a in (0, 40, 80)]
    arena = CsrArena()
    blocks = [store.read_block(a, a + 40, [], vocab, arena=arena) for a in (0, 40, 80)]
    got = CellTable.from_arena(arena, [np.diff(b.indptr) for b in blocks], [b.gene_ids for b in blocks],
                               [b.labels for b in blocks], {})
    assert arena.used == sum(p.nnz for p in plain) < x.nnz
    assert _same(got, CellTable.concat(plain))
