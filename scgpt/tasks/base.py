"""What every training task shares: per-batch reseeding, training-step logging and counters, AdamW with
weight-decay groups and a step schedule, and ``cells_seen`` carried through checkpoints.

Subclasses set ``self.model`` and implement ``losses(batch) -> (total, named terms, ...)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor

from data_modules.collate import CellBatch
from scgpt.seeding import derive_seed


class TrainingTask(L.LightningModule):
    fused_adamw = False  # PretrainTask exposes it as an option

    def init_training(self, optimizer: Callable[..., torch.optim.Optimizer] | None, scheduler: Callable[..., Any] | None,
                      seed: int, default_lr: float) -> None:
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=default_lr)
        self.scheduler_factory = scheduler
        self.seed = seed
        self.cells_seen = 0
        self.first_loss: Tensor | None = None
        self.last_loss: Tensor | None = None
        self.export_metadata: dict[str, Any] = {}  # vocabulary and tokenizer settings, set by train()

    def on_train_batch_start(self, batch: CellBatch, batch_idx: int) -> None:
        """Dropout noise is a function of (seed, optimizer step, micro-batch within the step, rank), so a
        resumed run draws what an uninterrupted one would have drawn. (Not of Lightning's ``batch_idx``:
        it restarts from 0 when a map-style loader resumes mid-epoch.)"""
        micro = batch_idx % max(1, int(self.trainer.accumulate_grad_batches))  # resumes fall on step boundaries
        torch.manual_seed(derive_seed(self.seed, self.global_step, micro, self.global_rank))

    def training_step(self, batch: CellBatch, batch_idx: int) -> Tensor:
        loss, terms = self.losses(batch)[:2]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.n_cells)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch.n_cells)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch.n_cells)
        self.cells_seen += batch.n_cells * self.trainer.world_size
        self.first_loss = loss.detach() if self.first_loss is None else self.first_loss
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731 - ZeRO-3 shards are flat; ds_shape is the real one
        decay = [p for p in self.model.parameters() if ndim(p) >= 2]
        no_decay = [p for p in self.model.parameters() if ndim(p) < 2]  # biases and norms
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups, fused=True) if self.fused_adamw else self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning refuses to clip for optimizers that unscale gradients themselves (fused AdamW) under any
        mixed precision, but only an fp16 ``GradScaler`` makes that unsafe: without one (bf16-mixed), clip
        here exactly as Lightning would."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False) and scaler is None):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.cells_seen = int(checkpoint.get("scgpt", {}).get("cells_seen", 0))
