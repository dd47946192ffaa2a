"""Training callbacks: throughput in cells and non-pad tokens per second."""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Times each training step (forward, backward, optimizer) and counts its cells and real tokens.

    Logs ``throughput/cells_per_s`` and ``throughput/tokens_per_s`` for the whole job (this rank's rate
    times the world size: ranks get equal batches) and keeps run totals for the summary.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cells = 0
        self.tokens = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        world = trainer.world_size
        self.seconds += elapsed
        self.cells += batch.n_cells * world
        self.tokens += batch.n_tokens * world
        pl_module.log_dict({"throughput/cells_per_s": batch.n_cells * world / elapsed,
                            "throughput/tokens_per_s": batch.n_tokens * world / elapsed}, on_step=True, on_epoch=False)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
