"""The shared base of finetuning tasks: pretraining's model and objectives, plus validation outputs
collected per cell and turned into task metrics (and PNG plots) at the end of each validation epoch.

Metrics are computed on each rank's own validation cells (rank zero's are the ones reported).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from data_modules.collate import CellBatch
from scgpt.model.scgpt import ScGPTOutput
from scgpt.tasks.pretrain import PretrainTask
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)


class FinetuneTask(PretrainTask):
    """Subclasses implement :meth:`evaluate` (collected validation arrays -> named metrics)."""

    baseline_max_genes = 100_000  # the dense expression baseline is built only below this vocabulary size

    def __init__(self, model: dict[str, Any], objectives: dict[str, float],
                 objective_options: dict[str, dict[str, Any]] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0,
                 label_key: str | None = "cell_type", batch_key: str | None = "batch", plots: bool = True) -> None:
        super().__init__(model, objectives, objective_options, optimizer, scheduler, seed)
        self.label_key, self.batch_key, self.plots = label_key, batch_key, plots
        self.label_names: dict[str, list[str]] = {}
        self._collected: dict[str, list] = defaultdict(list)
        self.last_eval: dict[str, Any] = {}  # arrays of the latest validation, for plots
        self.init_report: dict[str, Any] | None = None

    # ---- data-dependent set-up --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        self.label_names = {k: list(v) for k, v in getattr(datamodule, "label_names", {}).items()}
        for objective in self.objectives:
            if getattr(objective, "wants_class_counts", False):
                objective.set_class_counts(datamodule.label_counts(objective.label_key))

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        loss, terms, out = self.losses(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch.n_cells)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch.n_cells)
        self.collect(batch, out)

    def collect(self, batch: CellBatch, out: ScGPTOutput) -> None:
        """Keep per-cell outputs of a validation batch (on CPU) for :meth:`evaluate`."""
        c = self._collected
        c["emb"].append(torch.nn.functional.normalize(out.cell_emb.float(), dim=-1).detach().cpu().numpy())
        for key, codes in batch.labels.items():
            c[f"label/{key}"].append(codes.cpu().numpy())
        if out.cls_logits is not None:
            c["pred"].append(out.cls_logits.argmax(-1).cpu().numpy())
        if self.model_cfg.vocab_size <= self.baseline_max_genes:
            c["expression"].append(binned_expression(batch, self.model_cfg.vocab_size))

    def on_validation_epoch_end(self) -> None:
        log_collected_metrics(self)

    # ---- test (data.test_split: held-out cells, evaluated once after training) -------------------
    def test_step(self, batch: CellBatch, batch_idx: int) -> None:
        loss, terms, out = self.losses(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch.n_cells)
        self.log_dict({f"test/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch.n_cells)
        self.collect(batch, out)

    def on_test_epoch_end(self) -> None:
        log_collected_metrics(self, prefix="test")

    def on_test_end(self) -> None:
        self._write_plots("plots/test")

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        raise NotImplementedError

    def labels_of(self, arrays: dict[str, np.ndarray], key: str | None) -> np.ndarray | None:
        return arrays.get(f"label/{key}") if key else None

    # ---- plots ------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        self._write_plots()

    def on_validation_end(self) -> None:
        if not self.trainer.training and self.trainer.state.fn == "validate":  # zero-shot: no fit end
            self._write_plots()

    def _write_plots(self, subdir: str = "plots") -> None:
        if not self.plots or not self.last_eval or not self.trainer.is_global_zero:
            return
        directory = Path(self.trainer.default_root_dir) / subdir
        try:
            written = self.plot(self.last_eval, directory)
        except Exception as exc:  # a plot must never fail a run
            log.warning("plots skipped: %s", exc)
            return
        for path in written:
            if path is not None:
                log.info("wrote %s", path)

    def plot(self, arrays: dict[str, np.ndarray], directory: Path) -> list[Path | None]:
        return []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["scgpt"]["labels"] = self.label_names  # class names, for predicting labels later


def log_collected_metrics(task, prefix: str = "val") -> None:
    """End of a validation (or test) epoch for tasks that collect per-cell arrays in ``task._collected``: stack
    them, keep them as ``task.last_eval`` (for plots), and log the finite values of ``task.evaluate(arrays)``
    as ``<prefix>/<name>``."""
    arrays = {k: (sp.vstack(v).tocsr() if k == "expression" else np.concatenate(v))
              for k, v in task._collected.items() if v}
    task._collected = defaultdict(list)
    if not arrays:
        return
    metrics = task.evaluate(arrays)
    task.last_eval = arrays
    for name, value in metrics.items():
        if value is not None and np.isfinite(value):
            task.log(f"{prefix}/{name}", float(value))


def binned_expression(batch: CellBatch, n_genes: int) -> sp.csr_matrix:
    """(B, vocab) sparse matrix of the batch's true binned values (the tokens the model saw, unmasked)."""
    gene_ids, values = batch.gene_ids.cpu(), batch.target_values.cpu()  # the batch may live on a GPU
    if batch.padding_mask is not None:
        real = ~batch.padding_mask.cpu()  # (B, L)
        rows = torch.arange(real.shape[0])[:, None].expand_as(real)[real]
        ids, values = gene_ids[real], values[real]
    else:  # packed, in any order
        rows, ids = batch.layout.seq_ids.cpu(), gene_ids  # (T,)
    keep = values > 0  # drops <cls> (pad_value) and zeros
    return sp.csr_matrix((values[keep].float().numpy(), (rows[keep].numpy(), ids[keep].numpy())),
                         shape=(batch.n_cells, n_genes))


def embedding_report(emb: np.ndarray, expression, cell_types: np.ndarray | None, batches: np.ndarray | None,
                     seed: int = 0) -> dict[str, float]:
    """Integration metrics of the model embedding, and of the PCA of the expression as the baseline."""
    from scgpt.metrics import integration_metrics, pca_embedding

    if cell_types is None:
        return {}
    if batches is None:
        batches = np.zeros_like(cell_types)
    out = {k: v for k, v in integration_metrics(emb, cell_types, batches, seed).items()}
    if expression is not None:
        baseline = integration_metrics(pca_embedding(expression, 50, seed), cell_types, batches, seed)
        out.update({f"pca/{k}": v for k, v in baseline.items()})
    return out
