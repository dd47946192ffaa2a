"""Pretraining as a LightningModule: builds the model, sums the weighted objectives, logs, optimizes."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, PearsonCorrCoef

from data_modules.collate import CellBatch
from scgpt.config import ModelConfig
from scgpt.model.scgpt import ScGPTModel, ScGPTOutput
from scgpt.objectives import ObjectiveContext, build_objectives
from scgpt.seeding import derive_seed


class PretrainTask(L.LightningModule):
    """Masked and generative expression pretraining with any weighted mix of objectives."""

    def __init__(self, model: dict[str, Any], objectives: dict[str, float],
                 objective_options: dict[str, dict[str, Any]] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_cfg = ModelConfig(**model)
        self.objectives = build_objectives(objectives, objective_options, self.model_cfg)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.scheduler_factory = scheduler
        self.model: ScGPTModel | None = None
        self.seed = seed
        self.val_mse = MeanSquaredError()
        self.val_pearson = PearsonCorrCoef()
        self.cells_seen = 0
        self.first_loss: Tensor | None = None
        self.last_loss: Tensor | None = None
        self.export_metadata: dict[str, Any] = {}  # vocabulary and tokenizer settings, set by train()

    def configure_model(self) -> None:
        """Built here, not in __init__, so that DeepSpeed ZeRO-3 can shard parameters as they are made."""
        if self.model is None:
            self.model = ScGPTModel(self.model_cfg)

    # ---- forward and losses -----------------------------------------------------------------
    def forward(self, batch: CellBatch) -> ScGPTOutput:
        gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
        return self.model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask,
                          batch_labels=batch.labels.get("batch"))

    def _gather(self, t: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return t
        return self.all_gather(t, sync_grads=True).flatten(0, 1)

    def losses(self, batch: CellBatch) -> tuple[Tensor, dict[str, Tensor], ScGPTOutput]:
        """(weighted total, unweighted named terms, model output)."""
        out = self(batch)
        ctx = ObjectiveContext(gather=self._gather, rank=self.global_rank)
        if any(o.needs_second_view for o in self.objectives):
            ctx.second_view = self(batch)  # same input, other dropout noise
        total, terms = 0.0, {}
        for objective in self.objectives:
            named = objective(out, batch, ctx)
            terms.update(named)
            total = total + objective.weight * sum(named.values())
        return total, terms, out

    # ---- steps ------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: CellBatch, batch_idx: int) -> None:
        """Dropout noise is a function of (seed, epoch, batch, rank), so a resumed run draws what an
        uninterrupted one would have drawn."""
        torch.manual_seed(derive_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch: CellBatch, batch_idx: int) -> Tensor:
        loss, terms, _ = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.n_cells)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch.n_cells)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch.n_cells)
        self.cells_seen += batch.n_cells * self.trainer.world_size
        self.first_loss = loss.detach() if self.first_loss is None else self.first_loss
        self.last_loss = loss.detach()
        return loss

    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        loss, terms, out = self.losses(batch)
        hidden = batch.hidden_mask
        pred, target = out.expr_pred[hidden].float(), batch.target_values[hidden].float()
        self.val_mse.update(pred, target)
        self.val_pearson.update(pred, target)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch.n_cells)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch.n_cells)

    def on_validation_epoch_end(self) -> None:
        self.log("val/masked_mse", self.val_mse.compute())
        self.log("val/pearson", self.val_pearson.compute())
        self.val_mse.reset()
        self.val_pearson.reset()

    # ---- optimisation and state ---------------------------------------------------------------
    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]  # biases and norms
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scgpt"] = {"cells_seen": self.cells_seen, "attention_backend": self.model.attention_backend,
                               **self.export_metadata}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.cells_seen = int(checkpoint.get("scgpt", {}).get("cells_seen", 0))
