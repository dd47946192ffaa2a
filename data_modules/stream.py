"""Streaming batches from cell stores: contiguous blocks -> shuffle buffer -> this rank's and worker's cells.

The data order is a pure function of (seed, epoch, world size, rank, workers, position):
- the training rows of every store are cut into contiguous blocks of ``block_size`` cells;
- each epoch the blocks are permuted from (seed, epoch) and dealt to ranks, then to dataloader workers:
  worker ``w`` of rank ``r`` takes blocks ``r + world * w``, stepping by ``world * workers``;
- a worker reads ``buffer_blocks`` blocks at a time (one contiguous read each), permutes their cells
  from (seed, epoch, rank, worker, group) and cuts them into batches; the remainder of a group that
  does not fill a batch is dropped (training) or yields a short batch (validation);
- with a domain sampler (``domain_key``, e.g. the batch label), the permuted cells of a group are split by
  domain, each domain's cells are cut into batches (remainders dropped or short, as above) and these
  single-domain batches are put in an order drawn from (seed, epoch, rank, worker, group); the blocks
  carry their per-domain cell counts, so the batch counts stay arithmetic;
- every worker yields the same number of batches, the minimum over all ranks and workers, so ranks
  never wait on each other; the DataLoader interleaves workers, so batch ``i`` of a rank comes from
  worker ``i % workers`` and was collated with the generator of (seed, epoch, rank, worker, i // workers)
  (after a resume at batch ``n`` the workers' roles rotate by ``n``, so this still holds).

Resuming after ``n`` batches of an epoch is arithmetic: block sizes say how many batches each group
holds, so whole groups are skipped without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_modules.cells import CellTable, CsrArena
from data_modules.collate import CellCollator
from data_modules.store import CellStore, read_blocks
from scgpt.errors import DataError
from scgpt.seeding import make_generator

BUFFER_STREAM = 1  # an extra seed coordinate keeping buffer permutations apart from collation generators
DOMAIN_STREAM = 2  # ... and the order of a group's single-domain batches apart from both


class CellSource(Protocol):
    def read_block(self, start: int, stop: int, label_keys: Sequence[str], vocab) -> CellTable: ...


@dataclass(frozen=True)
class Block:
    source: int  # index of the store
    start: int  # first row
    stop: int  # one past the last row
    domains: tuple[int, ...] = ()  # cells per domain code (domain sampler only)

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


def cut_blocks(row_ranges: Sequence[tuple[int, int]], block_size: int,
               domain_codes: Sequence[np.ndarray] | None = None) -> tuple[Block, ...]:
    """Contiguous blocks of at most ``block_size`` rows over each source's [start, stop) range; with
    ``domain_codes`` (per source, the domain code of each row in its range) each block counts its domains."""
    blocks = []
    n_domains = 1 + max((int(c.max()) for c in domain_codes if c.size), default=0) if domain_codes is not None else 0
    for source, (start, stop) in enumerate(row_ranges):
        for a in range(start, stop, block_size):
            b = min(a + block_size, stop)
            counts = () if domain_codes is None else \
                tuple(np.bincount(domain_codes[source][a - start:b - start], minlength=n_domains).tolist())
            blocks.append(Block(source, a, b, counts))
    return tuple(blocks)


@dataclass(frozen=True)
class StreamPlan:
    """Which cells each (epoch, rank, worker) reads and in what order: arithmetic on block sizes only."""

    blocks: tuple[Block, ...]
    batch_size: int
    buffer_blocks: int
    seed: int
    shuffle: bool
    world_size: int = 1
    num_workers: int = 1
    domain_key: str | None = None  # a label: every batch holds cells of one of its values (blocks count them)

    def epoch_blocks(self, epoch: int) -> list[Block]:
        if not self.shuffle:
            return list(self.blocks)
        order = torch.randperm(len(self.blocks), generator=make_generator(self.seed, epoch)).tolist()
        return [self.blocks[i] for i in order]

    def worker_groups(self, epoch: int, rank: int, worker: int) -> list[list[Block]]:
        mine = self.epoch_blocks(epoch)[rank + self.world_size * worker::self.world_size * self.num_workers]
        return [mine[i:i + self.buffer_blocks] for i in range(0, len(mine), self.buffer_blocks)]

    def group_batches(self, group: list[Block]) -> int:
        per_domain = [sum(c) for c in zip(*(b.domains for b in group))] if self.domain_key else []
        return sum(self._batches(cells) for cells in per_domain or [sum(b.n_cells for b in group)])

    def _batches(self, cells: int) -> int:
        return cells // self.batch_size if self.shuffle else -(-cells // self.batch_size)

    def group_rows(self, order: np.ndarray, domains: np.ndarray | None, generator: torch.Generator) -> list[np.ndarray]:
        """A group's batches as row indices: ``order`` (its permuted rows) cut into batches, or, with a
        domain sampler, each domain's rows (in ``order``) cut into batches, put in an order from ``generator``."""
        size = self.batch_size
        if not self.domain_key:
            return [order[j * size:(j + 1) * size] for j in range(self._batches(order.size))]
        batches = []
        for domain in np.unique(domains):
            rows = order[domains[order] == domain]
            batches += [rows[j * size:(j + 1) * size] for j in range(self._batches(rows.size))]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def batches_per_worker(self, epoch: int) -> int:
        return min(sum(self.group_batches(g) for g in self.worker_groups(epoch, r, w))
                   for r in range(self.world_size) for w in range(self.num_workers))

    def batches_per_rank(self, epoch: int) -> int:
        return self.batches_per_worker(epoch) * self.num_workers


def fitted_plan(row_ranges: Sequence[tuple[int, int]], block_size: int, batch_size: int, buffer_blocks: int, seed: int,
                shuffle: bool, world_size: int = 1, num_workers: int = 1, domain_codes: Sequence[np.ndarray] | None = None,
                domain_key: str | None = None) -> tuple[StreamPlan, int] | None:
    """The plan (and its block size) of the given block size and workers when every rank and worker gets a
    batch. Small stores (fewer blocks than ranks x workers): the largest block size, halving down to one
    batch, then fewer workers, that gives every one a batch. None when no plan with this batch size does."""
    for workers in range(num_workers, 0, -1):
        size = block_size
        while True:
            plan = StreamPlan(cut_blocks(row_ranges, size, domain_codes), batch_size, buffer_blocks, seed,
                              shuffle=shuffle, world_size=world_size, num_workers=workers, domain_key=domain_key)
            if plan.batches_per_rank(0) > 0:
                return plan, size
            if size <= batch_size:
                break
            size = max(batch_size, size // 2)
    return None


def worker_share(rank_batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first ``rank_batches`` batches came from ``worker`` (round-robin)."""
    return max(0, (rank_batches - worker + num_workers - 1) // num_workers)


class CellBatchStream(IterableDataset):
    """Collated batches of one rank, following a :class:`StreamPlan`; stores are opened inside workers."""

    def __init__(self, sources: Sequence[CellSource], label_keys: Sequence[str], label_maps: dict[str, list],
                 vocab, plan: StreamPlan, collator: CellCollator, rank: int = 0) -> None:
        super().__init__()
        self.sources, self.label_keys, self.label_maps, self.vocab = list(sources), list(label_keys), label_maps, vocab
        self.plan, self.collator, self.rank = plan, collator, rank
        self.epoch, self.skip = 0, 0  # skip: batches of this epoch already consumed (resume)

    def __len__(self) -> int:
        return self.plan.batches_per_rank(self.epoch)

    def _read(self, group: list[Block], arena: CsrArena) -> CellTable:
        """A group's blocks as one table (the shuffle buffer). Blocks of stores are read together straight
        into the reused ``arena`` (no concatenation copy); other sources' blocks are concatenated."""
        if all(isinstance(self.sources[b.source], CellStore) for b in group):
            stores = [self.sources[b.source] for b in group]
            # room for the group's expected values up front (growing copies what was read so far)
            arena.reset(int(1.1 * sum(b.n_cells * s.nnz / max(1, s.n_cells) for b, s in zip(group, stores))))
            tables = read_blocks([(s, b.start, b.stop) for b, s in zip(group, stores)], self.label_keys,
                                 self.vocab, arena)
        else:
            arena = None
            tables = [self.sources[b.source].read_block(b.start, b.stop, self.label_keys, self.vocab) for b in group]
        for block, table in zip(group, tables):
            for key in self.label_keys:  # store-wide codes -> dataset-wide codes (-1 stays missing)
                table.labels[key] = np.where(table.labels[key] >= 0, self.label_maps[key][block.source][table.labels[key]], -1)
        if arena is None:
            return CellTable.concat(tables)
        return CellTable.from_arena(arena, [np.diff(t.indptr) for t in tables], [t.gene_ids for t in tables],
                                    [t.labels for t in tables], tables[0].label_names)

    def __iter__(self):
        info = get_worker_info()
        plan, epoch = self.plan, self.epoch
        # The DataLoader always starts its round-robin at worker 0; after resuming at batch n, worker 0 must
        # play the role of the worker that made batch n, so roles rotate by n.
        worker = ((0 if info is None else info.id) + self.skip) % plan.num_workers
        total = plan.batches_per_worker(epoch)
        skip = worker_share(self.skip, worker, plan.num_workers)
        step, arena = 0, CsrArena()
        for index, group in enumerate(plan.worker_groups(epoch, self.rank, worker)):
            n_batches = min(plan.group_batches(group), total - step)
            if n_batches <= 0:
                return
            if step + n_batches <= skip:  # resume: skip the whole group without reading it
                step += n_batches
                continue
            table = self._read(group, arena)
            order = torch.randperm(table.n_cells,
                                   generator=make_generator(plan.seed, epoch, self.rank, worker, BUFFER_STREAM, index))
            domains = table.labels[plan.domain_key] if plan.domain_key else None
            batches = plan.group_rows(order.numpy(), domains,
                                      make_generator(plan.seed, epoch, self.rank, worker, DOMAIN_STREAM, index))
            if len(batches) != plan.group_batches(group):
                raise DataError(f"the cells of {plan.domain_key!r} changed since the blocks were counted (store "
                                "rewritten during the run?); restart the run")
            for rows in batches[:n_batches]:
                if step >= skip:
                    generator = make_generator(plan.seed, epoch, self.rank, worker, step)
                    yield self.collator.collate_table(table, rows, generator)
                step += 1
