"""The shuffle buffer's table: blocks read into a reused arena equal the concatenated blocks, row gathers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import anndata as ad
import scipy.sparse as sp

from data_modules.cells import CellTable, CsrArena
from data_modules.convert import write_store
from data_modules.store import CellStore, read_blocks
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
        first = arena.take_slots(t.nnz)
        arena.data[first:first + t.nnz], arena.indices[first:first + t.nnz] = t.data, t.indices
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


def _store(path, n_genes, seed):
    rng = np.random.default_rng(seed)
    x = sp.random(120, n_genes, density=0.4, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    write_store(ad.AnnData(X=x, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])), path, seed=0)
    return CellStore(path)


def test_blocks_of_several_stores_read_together_equal_plain_block_reads(tmp_path):
    """One store loses half its genes to the vocabulary (values compacted in the arena), one keeps all."""
    half, full = _store(tmp_path / "a.zarr", 30, 0), _store(tmp_path / "b.zarr", 15, 1)
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(15)])
    assert half._vocab_map(vocab)[1].size == 15 and full._vocab_map(vocab)[1].size == 15
    requests = [(full, 0, 40), (half, 40, 80), (full, 80, 120), (half, 0, 40), (full, 40, 41)]
    plain = [store.read_block(a, b, [], vocab) for store, a, b in requests]
    arena = CsrArena()
    arena.reset(10)  # too small: grows once for the whole group
    blocks = read_blocks(requests, [], vocab, arena)
    got = CellTable.from_arena(arena, [np.diff(b.indptr) for b in blocks], [b.gene_ids for b in blocks],
                               [b.labels for b in blocks], {})
    assert arena.used == sum(p.nnz for p in plain) < sum(s.read_counts(a, b).nnz for s, a, b in requests)
    assert _same(got, CellTable.concat(plain))
