"""The streaming order: disjoint shards, equal batches per rank, bounded reads, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from torch.utils.data import DataLoader

from data_modules.cells import CellTable
from data_modules.collate import CellCollator, CollatorConfig
from data_modules.stream import CellBatchStream, StreamPlan, cut_blocks
from scgpt.tokenizer.vocab import GeneVocab

VOCAB = GeneVocab.from_genes([f"G{i}" for i in range(40)])


class RecordingSource:
    """A store stand-in whose cell i expresses gene (i % 40) with count = its global id; records reads."""

    def __init__(self, offset: int, n_cells: int) -> None:
        self.offset, self.n_cells, self.reads = offset, n_cells, []

    def read_block(self, start, stop, label_keys, vocab):
        self.reads.append((start, stop))
        ids = np.arange(self.offset + start, self.offset + stop)
        counts = sp.csr_matrix((ids + 1.0, ids % 40, np.arange(len(ids) + 1)), shape=(len(ids), 40))
        return CellTable(counts, np.arange(40), {"cell": ids}, {})


def _stream(sizes=(300, 170, 95), world=1, rank=0, workers=1, batch=8, block=32, buffer=3, seed=0, shuffle=True):
    sources, offset = [], 0
    for n in sizes:
        sources.append(RecordingSource(offset, n))
        offset += n
    plan = StreamPlan(cut_blocks([(0, n) for n in sizes], block), batch, buffer, seed, shuffle, world, workers)
    collator = CellCollator(CollatorConfig(pad_token_id=VOCAB.pad_id, cls_token_id=VOCAB.cls_id, max_seq_len=8))
    maps = {"cell": [np.arange(10_000)] * len(sizes)}
    return CellBatchStream(sources, ["cell"], maps, VOCAB, plan, collator, rank)


def _cells(batches) -> list[list[int]]:
    return [b.labels["cell"].tolist() for b in batches]


def _rank_batches(world, rank, workers=1, epoch=0, **kw):
    """What one rank's DataLoader yields: its workers' batches interleaved round-robin."""
    per_worker = []
    for w in range(workers):
        stream = _stream(world=world, rank=rank, workers=workers, **kw)
        stream.epoch = epoch
        per_worker.append(list(_as_worker(stream, w, workers)))
    return [per_worker[i % workers][i // workers] for i in range(sum(map(len, per_worker)))]


def _as_worker(stream, worker, workers):
    import data_modules.stream as module

    class Info:
        id, num_workers = worker, workers

    original = module.get_worker_info
    module.get_worker_info = lambda: Info
    try:
        yield from iter(stream)
    finally:
        module.get_worker_info = original


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (3, 2)])
def test_shards_are_disjoint_and_every_rank_yields_the_same_number_of_batches(world, workers):
    ranks = [_cells(_rank_batches(world, r, workers)) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) > 0
    seen = [c for r in ranks for batch in r for c in batch]
    assert len(seen) == len(set(seen))  # no cell twice in an epoch, across ranks and workers
    assert len(seen) >= 0.75 * 565  # only remainders that do not fill a batch are dropped
    assert all(len(batch) == 8 for r in ranks for batch in r)


def test_epochs_have_different_orders_and_the_order_is_seeded():
    a, b = _cells(_rank_batches(1, 0, epoch=0)), _cells(_rank_batches(1, 0, epoch=1))
    assert a != b and a == _cells(_rank_batches(1, 0, epoch=0))
    assert a != _cells(_rank_batches(1, 0, epoch=0, seed=1))


def test_reads_are_contiguous_blocks_and_memory_is_bounded_by_the_buffer():
    stream = _stream(block=32, buffer=3)
    list(stream)
    for source in stream.sources:
        assert all(stop - start <= 32 for start, stop in source.reads)
    sizes = [stop - start for s in stream.sources for start, stop in s.reads]
    assert sum(sizes) <= 565 and max(sizes) <= 32


@pytest.mark.parametrize("skip", [0, 1, 7, 20])
def test_resuming_after_n_batches_yields_exactly_the_rest(skip):
    full = _cells(_stream())
    resumed_stream = _stream()
    resumed_stream.skip = skip
    assert _cells(resumed_stream) == full[skip:]


def test_resume_skips_whole_groups_without_reading_them():
    stream = _stream(block=32, buffer=3)
    stream.skip = 20  # a group of 3 x 32 cells holds 12 batches of 8
    list(stream)
    assert sum(len(s.reads) for s in stream.sources) < len(stream.plan.blocks)


def test_resume_with_dataloader_workers_matches_uninterrupted():
    def loader_cells(skip):
        stream = _stream(workers=2)
        stream.skip = skip
        return _cells(DataLoader(stream, batch_size=None, num_workers=2))

    full = loader_cells(0)
    assert full == _cells(_rank_batches(1, 0, workers=2))  # DataLoader interleaves workers round-robin
    assert loader_cells(5) == full[5:]
