"""Training callbacks: throughput in cells and non-pad tokens per second; the final checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

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


class FinalCheckpoint(L.Callback):
    """Saves ``last.ckpt`` at the end of the last training step, inside the loop like any periodic
    checkpoint, so that resuming from it continues mid-epoch exactly (a save after ``fit`` returns
    would be restored as the end of an epoch)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps):  # ended by epochs
            trainer.save_checkpoint(self.path, weights_only=False)
