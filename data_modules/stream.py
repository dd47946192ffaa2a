"""Streaming batches from cell stores: contiguous blocks -> shuffle buffer -> this rank's and worker's cells.

The data order is a pure function of (seed, epoch, world size, rank, workers, position):
- the training rows of every store are cut into contiguous blocks of ``block_size`` cells;
- each epoch the blocks are permuted from (seed, epoch) and dealt to ranks, then to dataloader workers:
  worker ``w`` of rank ``r`` takes blocks ``r + world * w``, stepping by ``world * workers``;
- a worker reads ``buffer_blocks`` blocks at a time (one contiguous read each), permutes their cells
  from (seed, epoch, rank, worker, group) and cuts them into batches; the remainder of a group that
  does not fill a batch is dropped (training) or yields a short batch (validation);
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

from data_modules.cells import CellTable
from data_modules.collate import CellCollator
from scgpt.seeding import make_generator

BUFFER_STREAM = 1  # an extra seed coordinate keeping buffer permutations apart from collation generators


class CellSource(Protocol):
    def read_block(self, start: int, stop: int, label_keys: Sequence[str], vocab) -> CellTable: ...


@dataclass(frozen=True)
class Block:
    source: int  # index of the store
    start: int  # first row
    stop: int  # one past the last row

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


def cut_blocks(row_ranges: Sequence[tuple[int, int]], block_size: int) -> tuple[Block, ...]:
    """Contiguous blocks of at most ``block_size`` rows over each source's [start, stop) range."""
    return tuple(Block(source, a, min(a + block_size, stop))
                 for source, (start, stop) in enumerate(row_ranges) for a in range(start, stop, block_size))


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

    def epoch_blocks(self, epoch: int) -> list[Block]:
        if not self.shuffle:
            return list(self.blocks)
        order = torch.randperm(len(self.blocks), generator=make_generator(self.seed, epoch)).tolist()
        return [self.blocks[i] for i in order]

    def worker_groups(self, epoch: int, rank: int, worker: int) -> list[list[Block]]:
        mine = self.epoch_blocks(epoch)[rank + self.world_size * worker::self.world_size * self.num_workers]
        return [mine[i:i + self.buffer_blocks] for i in range(0, len(mine), self.buffer_blocks)]

    def group_batches(self, group: list[Block]) -> int:
        cells = sum(b.n_cells for b in group)
        return cells // self.batch_size if self.shuffle else -(-cells // self.batch_size)

    def batches_per_worker(self, epoch: int) -> int:
        return min(sum(self.group_batches(g) for g in self.worker_groups(epoch, r, w))
                   for r in range(self.world_size) for w in range(self.num_workers))

    def batches_per_rank(self, epoch: int) -> int:
        return self.batches_per_worker(epoch) * self.num_workers


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

    def _read(self, group: list[Block]) -> CellTable:
        tables = []
        for block in group:
            table = self.sources[block.source].read_block(block.start, block.stop, self.label_keys, self.vocab)
            for key in self.label_keys:  # store-wide codes -> dataset-wide codes (-1 stays missing)
                table.labels[key] = np.where(table.labels[key] >= 0, self.label_maps[key][block.source][table.labels[key]], -1)
            tables.append(table)
        return CellTable.concat(tables)

    def __iter__(self):
        info = get_worker_info()
        plan, epoch = self.plan, self.epoch
        # The DataLoader always starts its round-robin at worker 0; after resuming at batch n, worker 0 must
        # play the role of the worker that made batch n, so roles rotate by n.
        worker = ((0 if info is None else info.id) + self.skip) % plan.num_workers
        total = plan.batches_per_worker(epoch)
        skip = worker_share(self.skip, worker, plan.num_workers)
        step = 0
        for index, group in enumerate(plan.worker_groups(epoch, self.rank, worker)):
            n_batches = min(plan.group_batches(group), total - step)
            if n_batches <= 0:
                return
            if step + n_batches <= skip:  # resume: skip the whole group without reading it
                step += n_batches
                continue
            table = self._read(group)
            order = torch.randperm(table.n_cells,
                                   generator=make_generator(plan.seed, epoch, self.rank, worker, BUFFER_STREAM, index))
            for j in range(n_batches):
                if step >= skip:
                    rows = order[j * plan.batch_size:(j + 1) * plan.batch_size].numpy()
                    generator = make_generator(plan.seed, epoch, self.rank, worker, step)
                    yield self.collator.collate_table(table, rows, generator)
                step += 1
