"""Training callbacks: throughput in cells and non-pad tokens per second; the final checkpoint; atomic
checkpoint files (written to a hidden temporary name, then renamed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scgpt.checkpoints import save_torch_file
from scgpt.io import atomic_path


class CellThroughputMonitor(L.Callback):
    """Times each training step (forward, backward, optimizer) and counts its cells and real tokens.
    (Not Lightning's ``ThroughputMonitor``, which counts samples and needs a FLOPs function.)

    Logs ``throughput/cells_per_s`` and ``throughput/tokens_per_s`` for the whole job (this rank's rate
    times the world size: ranks get equal batches) and keeps run totals for the summary. Also logs
    ``throughput/tflops_per_device`` (model FLOPs of the step from its real tokens, :mod:`scgpt.flops`)
    and, when the device's peak is known, ``throughput/mfu``: the peak comes from ``peak_tflops`` here,
    else the task's ``peak_tflops`` (config ``task.module.peak_tflops``), else the bf16 table in
    :mod:`scgpt.flops` for a CUDA device under bf16 precision. ``throughput/tflops_per_device_work_done``
    and ``throughput/mfu_work_done`` count attention only on the pairs the generative mask computes
    (:mod:`scgpt.flops`: work done; equal to the model FLOPs without generated tokens).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.seconds = 0.0
        self.cells = 0
        self.tokens = 0
        self.flops = 0.0  # model FLOPs of this rank's steps
        self.flops_work_done = 0.0  # the same, attention counted on the pairs the generative mask computes
        self.peak_tflops = peak_tflops
        self._peak: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        world = trainer.world_size
        self.seconds += elapsed
        self.cells += batch.n_cells * world
        self.tokens += batch.n_tokens * world
        flops, work_done = self._step_flops(pl_module, batch)
        self.flops += flops
        self.flops_work_done += work_done
        logged = {"throughput/cells_per_s": batch.n_cells * world / elapsed,
                  "throughput/tokens_per_s": batch.n_tokens * world / elapsed,
                  "throughput/tflops_per_device": flops / elapsed / 1e12,
                  "throughput/tflops_per_device_work_done": work_done / elapsed / 1e12}
        peak = self._device_peak(trainer, pl_module)
        if peak:
            logged["throughput/mfu"] = flops / elapsed / (peak * 1e12)
            logged["throughput/mfu_work_done"] = work_done / elapsed / (peak * 1e12)
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    @staticmethod
    def _step_flops(pl_module, batch) -> tuple[float, float]:
        """(model FLOPs, work-done FLOPs) of one training step on this rank."""
        model_cfg = getattr(getattr(pl_module, "model", None), "cfg", None)
        if model_cfg is None:
            return 0.0, 0.0
        from scgpt.flops import count_flops, generated_per_cell

        generated = generated_per_cell(getattr(batch, "gen_mask", None), batch.layout)
        count = count_flops(model_cfg, batch.layout.lengths, generated)
        return count.training_step, count.training_step_work_done

    def _device_peak(self, trainer, pl_module) -> float | None:
        if self._peak is None:
            from scgpt.flops import peak_tflops

            peak = self.peak_tflops or getattr(pl_module, "peak_tflops", None)
            if not peak and pl_module.device.type == "cuda":
                peak = peak_tflops(torch.cuda.get_device_name(pl_module.device), str(trainer.precision))
            self._peak = float(peak or 0.0)
        return self._peak or None

    @property
    def tflops_per_s(self) -> float:
        """Achieved model TFLOP/s per device over the run."""
        return self.flops / self.seconds / 1e12 if self.seconds else 0.0

    @property
    def mfu(self) -> float | None:
        return self.tflops_per_s / self._peak if self._peak else None

    @property
    def tflops_per_s_work_done(self) -> float:
        """Achieved TFLOP/s per device over the run, attention counted on the pairs actually computed."""
        return self.flops_work_done / self.seconds / 1e12 if self.seconds else 0.0

    @property
    def mfu_work_done(self) -> float | None:
        return self.tflops_per_s_work_done / self._peak if self._peak else None

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class LastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at the last step, inside the
    loop like any periodic checkpoint, so that resuming from it continues mid-epoch exactly (a save after
    ``fit`` returns would be restored as the end of an epoch). The only writer of ``last.ckpt``."""

    def __init__(self, path: str | Path, every_n_train_steps: int) -> None:
        self.path, self.every = Path(path), max(1, int(every_n_train_steps))
        self._saved_step = -1

    def _finished(self, trainer) -> bool:
        return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._saved_step and (step % self.every == 0 or self._finished(trainer)):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step:  # ended by max_epochs
            trainer.save_checkpoint(self.path, weights_only=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint file to ``.NAME.tmp-PID`` beside it, flushes it to disk, then renames it over
    ``NAME``: a kill -9 mid-write leaves the previous complete file in place (and a hidden temporary that
    resume ignores), never a truncated newest checkpoint. Remote paths (``s3://``) use Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path, durable=True) as tmp:  # fsynced, and the rename survives a crash
            save_torch_file(checkpoint, tmp)  # a full disk is an OSError naming the file, not 'unexpected pos'
