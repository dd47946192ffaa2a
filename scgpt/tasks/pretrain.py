"""Pretraining as a LightningModule: builds the model, sums the weighted objectives, logs, optimizes."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, PearsonCorrCoef

from data_modules.collate import CellBatch
from scgpt.config import ModelConfig
from scgpt.model.scgpt import ScGPTModel, ScGPTOutput
from scgpt.objectives import ObjectiveContext, build_objectives
from scgpt.tasks.base import TrainingTask


class PretrainTask(TrainingTask):
    """Masked and generative expression pretraining with any weighted mix of objectives."""

    def __init__(self, model: dict[str, Any], objectives: dict[str, float],
                 objective_options: dict[str, dict[str, Any]] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0, compile: bool = False,
                 activation_checkpointing: bool = False, fused_adamw: bool = False,
                 peak_tflops: float | None = None) -> None:
        """``compile``: ``torch.compile`` the encoder layers' per-token blocks (parameter names unchanged);
        ``activation_checkpointing``: recompute each encoder layer in backward (less memory, ~1 more
        forward); ``fused_adamw``: the optimizer's fused kernel (``fused=True``: CUDA, and CPU on torch
        >= 2.4); ``peak_tflops``: the device's peak for MFU logging, overriding the table in
        :mod:`scgpt.flops`. All off / None by default (see conf/task/pretrain.yaml)."""
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.compile_model, self.activation_checkpointing = compile, activation_checkpointing
        self.fused_adamw, self.peak_tflops = fused_adamw, peak_tflops
        self.model_cfg = ModelConfig(**model)
        self.objectives = build_objectives(objectives, objective_options, self.model_cfg)
        self.init_training(optimizer, scheduler, seed, default_lr=1e-4)
        self.model: ScGPTModel | None = None
        self.val_mse = MeanSquaredError()
        self.val_pearson = PearsonCorrCoef()

    def configure_model(self) -> None:
        """Built here, not in __init__, so that DeepSpeed ZeRO-3 can shard parameters as they are made."""
        if self.model is None:
            self.model = ScGPTModel(self.model_cfg)
            self.model.transformer_encoder.activation_checkpointing = self.activation_checkpointing
            if self.compile_model:  # per-token blocks only; state-dict keys stay as export expects
                self.model.transformer_encoder.compile_token_ops()

    # ---- forward and losses -----------------------------------------------------------------
    def forward(self, batch: CellBatch) -> ScGPTOutput:
        gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
        return self.model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask,
                          batch_labels=batch.labels.get("batch"), modality_ids=batch.modality_ids)

    def _gather(self, t: Tensor) -> Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return t
        return self.all_gather(t, sync_grads=True).flatten(0, 1)

    def losses(self, batch: CellBatch) -> tuple[Tensor, dict[str, Tensor], ScGPTOutput]:
        """(weighted total, unweighted named terms, model output)."""
        out = self(batch)
        ctx = ObjectiveContext(gather=self._gather, rank=self.global_rank, forward=self)
        if any(o.needs_second_view for o in self.objectives):
            ctx.second_view = self(batch)  # same input, other dropout noise
        total, terms = 0.0, {}
        for objective in self.objectives:
            named = objective(out, batch, ctx)
            terms.update(named)
            total = total + objective.weight * sum(named.values())
        return total, terms, out

    # ---- steps ------------------------------------------------------------------------------
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

    # ---- checkpoint state -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scgpt"] = {"cells_seen": self.cells_seen, "attention_backend": self.model.attention_backend,
                               **self.export_metadata}
