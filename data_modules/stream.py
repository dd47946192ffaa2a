"""A rank- and worker-sharded iterable of collated batches whose order is a pure function of
(seed, epoch, world size, rank, workers, position).

Each epoch the cells are permuted from (seed, epoch); global batch ``g`` takes cells
``perm[g * world * B : (g + 1) * world * B]`` and rank ``r`` the r-th slice of it, so every rank yields
the same number of batches (DDP never waits on a missing one); without ``drop_last`` the last global
batch is filled by wrapping around to the first cells of the epoch (single process: it is just shorter). Local batch ``b`` is made by worker
``b % num_workers``; its masking generator is seeded from (seed, epoch, rank, worker, b).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_modules.cells import CellTable
from data_modules.collate import CellCollator
from scgpt.seeding import make_generator


class CellBatchStream(IterableDataset):
    def __init__(self, table: CellTable, rows: np.ndarray, collator: CellCollator, batch_size: int, seed: int,
                 shuffle: bool, drop_last: bool) -> None:
        super().__init__()
        self.table, self.rows, self.collator = table, np.asarray(rows), collator
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch, self.rank, self.world_size = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        per_global_batch = self.batch_size * self.world_size
        n = len(self.rows) / per_global_batch
        return int(n) if self.drop_last else math.ceil(n)

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        perm = torch.randperm(len(self.rows), generator=make_generator(self.seed, self.epoch)).numpy()
        return self.rows[perm]

    def _rank_batch(self, order: np.ndarray, local_batch: int) -> np.ndarray:
        start = (local_batch * self.world_size + self.rank) * self.batch_size
        return order[start:start + self.batch_size]

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = self._epoch_order()
        if not self.drop_last and self.world_size > 1:  # wrap around so every rank fills its last batch
            order = np.resize(order, len(self) * self.world_size * self.batch_size)
        for b in range(worker, len(self), n_workers):
            generator = make_generator(self.seed, self.epoch, self.rank, worker, b)
            yield self.collator(self.table.cells(self._rank_batch(order, b)), generator)
