"""The VAE baseline as a task (``scgpt-train model=vae``, which selects ``task=vae``): trained through the same
data module and trainer as scGPT, validated with the same embedding metrics as integration and annotation
(kNN cell-type accuracy, cell-type and batch ASW, batch mixing, NMI/ARI, and the PCA baseline), so its
numbers are the reference row of those tables.

Input: each cell's true binned values (``target_values``) scattered into a dense vector over the vocabulary
(the dataset's genes; special tokens stay 0), divided by ``n_bins - 1``. Set ``model.max_seq_len`` at least
as high as the most genes a cell expresses, or sampled-out genes read as 0.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import scipy.sparse as sp
import torch
from torch import Tensor

from data_modules.collate import CellBatch
from scgpt.errors import ConfigError
from scgpt.metrics import logistic_regression_accuracy, plot_embedding
from scgpt.model.vae import VAE, VAEOutput, dense_expression, kl_divergence, reconstruction_loss
from scgpt.tasks.annotation import transfer_accuracy
from scgpt.tasks.base import TrainingTask
from scgpt.tasks.finetune import embedding_report, log_collected_metrics
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)

OBJECTIVES = ("recon", "kl")


class VAETask(TrainingTask):
    """Loss ``recon * reconstruction + kl * KL`` (``task.objectives``; ``kl`` is beta). Validation metrics as
    :class:`~scgpt.tasks.integration.IntegrationTask` (model and ``pca/``), plus ``logreg_accuracy`` of the
    embedding (the annotation linear probe) and ``val/recon``, ``val/kl``. On a test split (``data.test_split``)
    the same under ``test/``, plus ``logreg_transfer_accuracy`` and ``pca_logreg_transfer_accuracy`` (classifiers
    fitted on the latest validation cells, scored on the held-out ones: the annotation table's protocol)."""

    def __init__(self, model: dict[str, Any], objectives: dict[str, float],
                 objective_options: dict[str, dict[str, Any]] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, seed: int = 0,
                 label_key: str | None = "cell_type", batch_key: str | None = "batch", plots: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown:
            raise ConfigError(f"task.objectives.{unknown[0]}: not a VAE loss term; use {', '.join(OBJECTIVES)}")
        self.objectives = {k: float(objectives.get(k, 1.0)) for k in OBJECTIVES}
        self.model_settings = dict(model)
        self.model = VAE.from_settings(model)
        self.scale = float(max(int(model.get("n_bins", 51)) - 1, 1))
        self.init_training(optimizer, scheduler, seed, default_lr=1e-3)
        self.label_key, self.batch_key, self.plots = label_key, batch_key, plots
        self.label_names: dict[str, list[str]] = {}
        self._collected: dict[str, list] = defaultdict(list)
        self.last_eval: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.label_names = {k: list(v) for k, v in getattr(datamodule, "label_names", {}).items()}

    # ---- forward and losses -----------------------------------------------------------------
    def expression(self, batch: CellBatch) -> Tensor:
        return dense_expression(batch.gene_ids, batch.target_values, self.model.n_genes, batch.layout, self.scale)

    def losses(self, batch: CellBatch) -> tuple[Tensor, dict[str, Tensor], VAEOutput, Tensor]:
        x = self.expression(batch)
        out = self.model(x)
        terms = {"recon": reconstruction_loss(out.x_hat, x, self.model.x_logvar.clamp(-10.0, 10.0)), "kl": kl_divergence(out.z_mu, out.z_logvar)}
        total = sum(self.objectives[k] * v for k, v in terms.items())
        return total, terms, out, x

    # ---- steps ------------------------------------------------------------------------------
    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def _eval_step(self, batch: CellBatch, prefix: str) -> None:
        loss, terms, out, x = self.losses(batch)
        self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=batch.n_cells)
        self.log_dict({f"{prefix}/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch.n_cells)
        c = self._collected
        c["emb"].append(out.z_mu.detach().float().cpu().numpy())  # z_mu as is (not L2-normalised)
        for key, codes in batch.labels.items():
            c[f"label/{key}"].append(codes.cpu().numpy())
        # the binned values (x * scale): the same matrix the scGPT tasks' PCA baselines see
        c["expression"].append(sp.csr_matrix(x.detach().cpu().numpy() * self.scale))

    def on_validation_epoch_end(self) -> None:
        log_collected_metrics(self)

    # ---- test (data.test_split: held-out cells, evaluated once after training) -------------------
    def test_step(self, batch: CellBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._reference = self.last_eval or None  # the latest validation cells: the transfer classifiers' training set

    def on_test_epoch_end(self) -> None:
        log_collected_metrics(self, prefix="test")
        self._reference = None

    def on_test_end(self) -> None:
        self._write_plots("plots/test")

    def evaluate(self, arrays: dict[str, Any]) -> dict[str, float]:
        cell_types = arrays.get(f"label/{self.label_key}") if self.label_key else None
        batches = arrays.get(f"label/{self.batch_key}") if self.batch_key else None
        out = embedding_report(arrays["emb"], arrays.get("expression"), cell_types, batches, self.seed)
        if "pca/celltype_asw" in out:
            out["celltype_asw_kept"] = out["celltype_asw"] / max(out["pca/celltype_asw"], 1e-9)
            out["batch_mixing_gain"] = out["batch_mixing"] - out["pca/batch_mixing"]
        if cell_types is not None:
            out["logreg_accuracy"] = logistic_regression_accuracy(arrays["emb"], cell_types, seed=self.seed)
            out.update(self._transfer(arrays, cell_types))
        return out

    def _transfer(self, arrays: dict[str, Any], cell_types) -> dict[str, float]:
        """On the test split: logistic regression fitted on the latest validation cells, scored on these: on z_mu
        (``logreg_transfer_accuracy``, the counterpart of annotation's held-out accuracy) and on the PCA of the
        binned values (``pca_logreg_transfer_accuracy``, annotation's baseline)."""
        reference = getattr(self, "_reference", None)
        truth = reference.get(f"label/{self.label_key}") if reference else None
        if truth is None:
            return {}
        out = {"logreg_transfer_accuracy": transfer_accuracy(reference["emb"], truth, arrays["emb"], cell_types,
                                                             n_components=None, seed=self.seed)}
        if "expression" in reference and "expression" in arrays:
            out["pca_logreg_transfer_accuracy"] = transfer_accuracy(reference["expression"], truth,
                                                                    arrays["expression"], cell_types, seed=self.seed)
        return out

    # ---- plots ------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        self._write_plots()

    def on_validation_end(self) -> None:
        if not self.trainer.training and self.trainer.state.fn == "validate":
            self._write_plots()

    def _write_plots(self, subdir: str = "plots") -> None:
        if not self.plots or not self.last_eval or not self.trainer.is_global_zero:
            return
        colourings = {}
        for key in (self.batch_key, self.label_key):
            codes = self.last_eval.get(f"label/{key}") if key else None
            if codes is not None:
                colourings[key] = (codes, self.label_names.get(key) or [str(i) for i in range(codes.max() + 1)])
        if not colourings:
            return
        try:
            path = plot_embedding(self.last_eval["emb"], colourings,
                                  Path(self.trainer.default_root_dir) / subdir / "embedding.png", self.seed)
        except Exception as exc:  # a plot must never fail a run
            log.warning("plots skipped: %s", exc)
            return
        if path is not None:
            log.info("wrote %s", path)

    # ---- checkpoint state -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scgpt"] = {"cells_seen": self.cells_seen, "attention_backend": self.model.attention_backend,
                               "model_kind": "vae", **self.export_metadata, "labels": self.label_names}
