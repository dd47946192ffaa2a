"""What a training run prints: a progress bar of optimizer steps with the loss and cells/s, a model
summary without Lightning's FLOPs column, and none of Lightning's messages that do not concern the user.

Lightning's defaults, on a plain ``scgpt-train`` (CPU, max_steps=300, max_epochs=-1):
- its rich bar counts batches of an epoch and reads "Epoch 0/-2" in a run bounded by steps;
- its model summary has a FLOPs column and "Total FLOPs: 0" (it counts FLOPs only for a model with an
  ``example_input_array``; the run summary has our own, :mod:`scgpt.flops`);
- an advertisement for litlogger, an "srun is available but not used" hint on any machine with SLURM
  tools, a torch deprecation warning raised inside Lightning's own code, and a warning that an
  IterableDataset defines ``__len__`` (ours splits its cells by rank and worker, so the length is right).
Each is fixed here, filtered by its exact text, nothing broader.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn

# (message start, when to drop it) of Lightning's INFO lines and warnings that do not concern a scgpt user
LIGHTNING_LINES = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "Trainer already configured with model summary callbacks",  # ours replaces the default one
)
LIGHTNING_WARNINGS = (
    "`isinstance(treespec, LeafSpec)` is deprecated",  # torch >= 2.10 about Lightning's _pytree.py
    "Your `IterableDataset` has `__len__` defined",  # the cell stream is split by rank and worker
)
SRUN_HINT = "The `srun` command is available on your system but is not used"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning_utilities.core.rank_zero")


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


_DROP = _DropLines(LIGHTNING_LINES)


def quiet_lightning(world_size: int) -> None:
    """Drop Lightning's messages that do not concern the user (idempotent). The srun hint only for a
    single process, which needs no srun; a multi-process run outside srun keeps it."""
    for name in RANK_ZERO_LOGGERS:
        if _DROP not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP)
    messages = LIGHTNING_WARNINGS + ((SRUN_HINT,) if world_size == 1 else ())
    for message in messages:
        warnings.filterwarnings("ignore", message=re.escape(message))


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps of ``max_steps`` ("step 120/300", right also after a
    resume) with the training loss and the run's cells per second; per epoch as Lightning's when the run
    is bounded by epochs (max_steps=-1)."""

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "step" if self._by_steps() else super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def configure_columns(self, trainer) -> list:
        # batches per second: cells/s, with the metrics, says it in the unit that matters; a shorter bar
        # keeps the line with the loss and cells/s within 80 columns (a log file's width)
        columns = [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]
        for column in columns:
            if hasattr(column, "bar_width"):
                column.bar_width = 20
        return columns

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown: dict[str, Any] = {}
        if "train/loss" in metrics:
            shown["loss"] = metrics.pop("train/loss")
        rate = next((c.cells_per_s for c in trainer.callbacks if hasattr(c, "cells_per_s")), 0.0)
        if rate:
            shown["cells/s"] = f"{rate:,.0f}"
        return {**shown, **metrics}


class ParameterSummary(RichModelSummary):
    """Lightning's rich model summary without the FLOPs column and total, which read 0 (Lightning counts
    FLOPs only given an ``example_input_array``; training FLOPs and MFU are in the run summary)."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (get_formatted_model_size,
                                                                              get_human_readable_count)
        from rich import get_console
        from rich.table import Table

        kept = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name, _ in kept[1:]:
            table.add_column(name, justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in kept)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(f"[bold]Parameters[/]: {get_human_readable_count(int(total_parameters)).strip()} "
                      f"({get_human_readable_count(int(frozen)).strip()} frozen), "
                      f"{get_formatted_model_size(model_size)} MB")


def console_callbacks(trainer_cfg) -> list:
    """The model summary callback (unless the trainer turns summaries off)."""
    return [ParameterSummary()] if trainer_cfg.get("enable_model_summary", True) is not False else []
