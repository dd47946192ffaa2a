"""The domain sampler (``domain_key``): batches of one domain, blocks -> ranks -> workers, equal batches per
rank, seeded, every cell at most once (exactly once when counts divide), exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from torch.utils.data import DataLoader

from data_modules.cells import CellTable
from data_modules.collate import CellCollator, CollatorConfig
from data_modules.stream import CellBatchStream, StreamPlan, cut_blocks
from scgpt.errors import ConfigError
from scgpt.tokenizer.vocab import GeneVocab

VOCAB = GeneVocab.from_genes([f"G{i}" for i in range(40)])


def uneven_domain(ids: np.ndarray) -> np.ndarray:
    """Three domains in irregular runs, with unequal shares."""
    return np.where((ids * 7919) % 11 < 5, 0, np.where((ids * 7919) % 11 < 9, 1, 2))


def aligned_domain(ids: np.ndarray) -> np.ndarray:
    """Runs of 8 cells: with 32-cell blocks and batches of 8 nothing is left over."""
    return (ids // 8 * 5) % 3


class DomainSource:
    """Cell i (global id) expresses gene i % 40 and belongs to domain ``domain_of(i)``; records reads."""

    def __init__(self, offset: int, n_cells: int, domain_of) -> None:
        self.offset, self.n_cells, self.domain_of, self.reads = offset, n_cells, domain_of, []

    def codes(self, start: int, stop: int) -> np.ndarray:
        return self.domain_of(np.arange(self.offset + start, self.offset + stop))

    def read_block(self, start, stop, label_keys, vocab):
        self.reads.append((start, stop))
        ids = np.arange(self.offset + start, self.offset + stop)
        counts = sp.csr_matrix((ids + 1.0, ids % 40, np.arange(len(ids) + 1)), shape=(len(ids), 40))
        return CellTable(counts, np.arange(40), {"cell": ids, "domain": self.codes(start, stop)}, {})


def _stream(sizes=(300, 170, 95), world=1, rank=0, workers=1, batch=8, block=32, buffer=3, seed=0,
            domain_of=uneven_domain, domain_key="domain"):
    sources, offset = [], 0
    for n in sizes:
        sources.append(DomainSource(offset, n, domain_of))
        offset += n
    ranges = [(0, n) for n in sizes]
    codes = [s.codes(a, b) for s, (a, b) in zip(sources, ranges)] if domain_key else None
    plan = StreamPlan(cut_blocks(ranges, block, codes), batch, buffer, seed, True, world, workers, domain_key)
    collator = CellCollator(CollatorConfig(pad_token_id=VOCAB.pad_id, cls_token_id=VOCAB.cls_id, max_seq_len=8))
    maps = {"cell": [np.arange(10_000)] * len(sizes), "domain": [np.arange(3)] * len(sizes)}
    return CellBatchStream(sources, ["cell", "domain"], maps, VOCAB, plan, collator, rank)


def _batches(batches) -> list[tuple[list[int], list[int]]]:
    return [(b.labels["cell"].tolist(), b.labels["domain"].tolist()) for b in batches]


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


def _rank_batches(world, rank, workers=1, epoch=0, **kw):
    """What one rank's DataLoader yields: its workers' batches interleaved round-robin."""
    per_worker = []
    for w in range(workers):
        stream = _stream(world=world, rank=rank, workers=workers, **kw)
        stream.epoch = epoch
        per_worker.append(_batches(_as_worker(stream, w, workers)))
    return [per_worker[i % workers][i // workers] for i in range(sum(map(len, per_worker)))]


def test_blocks_count_their_domains():
    blocks = cut_blocks([(0, 70), (0, 10)], 32, [uneven_domain(np.arange(70)), uneven_domain(np.arange(70, 80))])
    assert [b.n_cells for b in blocks] == [32, 32, 6, 10]
    assert all(len(b.domains) == 3 and sum(b.domains) == b.n_cells for b in blocks)
    assert blocks[2].domains == tuple(np.bincount(uneven_domain(np.arange(64, 70)), minlength=3))


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (3, 2)])
def test_batches_hold_one_domain_and_ranks_get_equal_disjoint_shards(world, workers):
    ranks = [_rank_batches(world, r, workers) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) > 0
    for cells, domains in (b for r in ranks for b in r):
        assert len(cells) == 8 and len(set(domains)) == 1
        assert set(domains) == set(uneven_domain(np.array(cells)).tolist())
    seen = [c for r in ranks for cells, _ in r for c in cells]
    assert len(seen) == len(set(seen))  # no cell twice in an epoch
    assert len(seen) >= 0.6 * 565  # only per-domain remainders and the equal-share cut are dropped
    assert len({d[0] for r in ranks for _, d in r}) == 3  # every domain is served


@pytest.mark.parametrize("world, workers", [(1, 1), (3, 2)])
def test_every_cell_exactly_once_per_epoch_when_domain_counts_divide(world, workers):
    # 24 blocks of 32 cells, runs of 8 cells per domain: nothing is left over and every worker gets 4 blocks
    kw = dict(sizes=(768,), block=32, buffer=2, domain_of=aligned_domain)
    ranks = [_rank_batches(world, r, workers, **kw) for r in range(world)]
    seen = sorted(c for r in ranks for cells, _ in r for c in cells)
    assert seen == list(range(768))
    assert all(len(set(d)) == 1 for r in ranks for _, d in r)


def test_domain_order_is_seeded_and_differs_between_epochs():
    a = _rank_batches(1, 0, epoch=0)
    assert a == _rank_batches(1, 0, epoch=0)
    assert a != _rank_batches(1, 0, epoch=1) and a != _rank_batches(1, 0, seed=1)
    domains = [d[0] for _, d in a]
    assert len(set(domains[:6])) > 1  # domains are interleaved within a group, not served one after another
    plain = _rank_batches(1, 0, domain_key=None)
    assert any(len(set(uneven_domain(np.array(cells)).tolist())) > 1 for cells, _ in plain)  # the sampler's doing


@pytest.mark.parametrize("skip", [1, 4, 11, 25])
def test_resuming_with_the_domain_sampler_yields_exactly_the_rest(skip):
    full = _batches(_stream())
    resumed = _stream()
    resumed.skip = skip
    assert _batches(resumed) == full[skip:] and len(full) > 25
    reads = sum(len(s.reads) for s in resumed.sources)
    assert skip < 20 or reads < len(resumed.plan.blocks)  # whole groups before the position are not read


def test_resuming_with_the_domain_sampler_and_two_workers_matches_uninterrupted():
    def loader(skip):
        stream = _stream(workers=2)
        stream.skip = skip
        return _batches(DataLoader(stream, batch_size=None, num_workers=2))

    full = loader(0)
    assert full == _rank_batches(1, 0, workers=2)
    assert loader(7) == full[7:]


# ---- through the data module --------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched_store(tmp_path_factory):
    from data_modules.convert import write_store
    from data_modules.synthetic import make_synthetic_adata

    path = tmp_path_factory.mktemp("domain") / "cells.zarr"
    adata = make_synthetic_adata(n_cells=600, n_genes=40, n_cell_types=3, n_batches=3, seed=0)
    write_store(adata, path, obs_keys=["cell_type", "batch"], seed=1)
    return str(path)


def _dm(path, **options):
    from data_modules.datamodule import CellDataModule

    options = {"label_keys": ["cell_type", "batch"], "val_fraction": 0.2, "block_size": 40, "buffer_blocks": 3,
               "per_device_batch_size": 10, "max_seq_len": 32, "seed": 3, "domain_key": "batch", **options}
    dm = CellDataModule(paths=[path], **options)
    dm.setup()
    return dm


def _labels(loader, key="batch"):
    return [b.labels[key].tolist() for b in loader]


def test_data_module_trains_on_single_domain_batches_and_resumes_exactly(batched_store):
    dm = _dm(batched_store)
    train = _labels(dm.train_dataloader())
    assert len(train) >= 30 and all(len(set(b)) == 1 for b in train)
    assert len({b[0] for b in train}) == 3
    assert any(len(set(b)) > 1 for b in _labels(dm.val_dataloader()))  # validation batches stay mixed
    state = {**dm.state_dict(), "batches_done": 7}
    assert state["domain_key"] == "batch"
    resumed = _dm(batched_store)
    resumed.load_state_dict(state)
    tokens = lambda d: [b.gene_ids.tolist() for b in d.train_dataloader()]  # noqa: E731
    assert tokens(resumed) == tokens(dm)[7:]
    with pytest.raises(ConfigError, match="data.domain_key: the checkpoint was trained with domain_key=batch, now None"):
        _dm(batched_store, domain_key=None).load_state_dict(state)


def test_domain_key_must_be_a_label_key(batched_store):
    with pytest.raises(ConfigError, match=r"data.domain_key: 'donor' is not in data.label_keys"):
        _dm(batched_store, domain_key="donor")
