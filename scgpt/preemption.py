"""Preemption-safe training: save at a step boundary on a signal, requeue under SLURM, resume by itself.

SLURM sends ``SIGUSR1`` a while before a job's time ends (``#SBATCH --signal=SIGUSR1@120``) and ``SIGTERM``
when it preempts or cancels it. :class:`PreemptionHandler` only notes the signal in the handler; after the
next optimizer step every rank agrees (one all-reduce of a flag) to stop, saves a full checkpoint
(model, optimizer, scheduler, loop and data-module state; the ZeRO shard directory under DeepSpeed),
and rank 0 runs ``scontrol requeue $SLURM_JOB_ID``. The requeued job starts in the same run directory
(the sbatch scripts pin ``hydra.run.dir`` to the job id) and :func:`newest_complete_checkpoint` finds where
it stopped. Because the data order and the dropout noise are functions of (seed, epoch, step, rank), the
resumed job ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from scgpt.io import rank_zero_logger

log = rank_zero_logger()

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised out of ``trainer.fit`` once the checkpoint is saved (and the job requeued)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, requeued: bool) -> None:
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued
        what = "requeued SLURM job " + slurm_job_id() if requeued else "not requeued (not a SLURM batch job)"
        super().__init__(f"{signal.Signals(signum).name} received: saved step {step} to {checkpoint}; {what}")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs); None outside a batch job."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def in_slurm_batch_job() -> bool:
    """Started by a SLURM batch job (sbatch), not in an interactive allocation (as Lightning tells them)."""
    return bool(slurm_job_id()) and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeue_slurm_job() -> bool:
    if not in_slurm_batch_job():
        return False
    job = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("scontrol requeue %s failed: %s", job, exc)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, result.stderr.strip())
    return result.returncode == 0


class PreemptionHandler(L.Callback):
    """On SIGUSR1 / SIGTERM: finish the optimizer step, save ``checkpoint_path`` on all ranks, requeue, stop.

    Goes after the callbacks that update state at the end of a batch (the data-module position), so the
    checkpoint it writes is the one a periodic save at this step would have written.
    """

    def __init__(self, checkpoint_path: str | Path, requeue: bool = True,
                 signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.requeue = requeue
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1

    # ---- signal handling: note it, act later ---------------------------------------------------------
    def _note(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("%s received: checkpointing after this optimizer step", signal.Signals(signum).name)
        self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            current = signal.getsignal(signum)
            if current != self._note:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._note)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._install()  # early, so that dataloader workers forked later inherit it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # again: Lightning registers its own SIGTERM handler when fit starts

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    # ---- acting at a step boundary --------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient-accumulation cycle: no consistent state to save yet
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the run is finishing and its final checkpoint is written anyway
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        signum = self.received or signal.SIGUSR1  # another rank got it
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # collective; atomic
        trainer.strategy.barrier("scgpt.preemption.saved")
        requeued = False
        if self.requeue and trainer.is_global_zero:
            requeued = requeue_slurm_job()
        requeued = bool(trainer.strategy.broadcast(requeued))
        raise Preempted(signum, trainer.global_step, self.checkpoint_path, requeued)


# ------------------------------------------------------------------------------------------------
# Finding where a run stopped
# ------------------------------------------------------------------------------------------------
def _file_step(path: Path) -> int | None:
    """The global step of a complete single-file Lightning checkpoint; None if it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception:
        return None


def checkpoint_step(path: Path) -> int | None:
    """Global step of a complete checkpoint (file or ZeRO directory); None when incomplete or unreadable."""
    from scgpt.distributed import deepspeed_checkpoint_info

    if path.is_dir():
        info = deepspeed_checkpoint_info(path)
        return None if info is None else info["global_step"]
    return _file_step(path) if path.is_file() else None


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint in ``run_dir/checkpoints`` with the highest step (then the newest) that loads.

    Candidates are ``*.ckpt`` files and ZeRO directories, plus a ``.NAME.old`` directory a DeepSpeed save
    moved aside just before a crash; hidden temporaries (``.NAME.tmp*``), being half-written, are not.
    """
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.iterdir()
                  if (p.name.endswith(".ckpt") and not p.name.startswith(".")) or
                  (p.name.startswith(".") and p.name.endswith(".ckpt.old") and p.is_dir())]
    best: tuple[int, float, Path] | None = None
    for path in candidates:
        step = checkpoint_step(path)
        if step is None:
            log.warning("skipping %s: incomplete or unreadable checkpoint", path)
            continue
        key = (step, path.stat().st_mtime, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]
