"""Perturbation response prediction, scGPT / GEARS style.

Input: a control cell (``<cls>`` + a fixed gene panel, log1p-normalised values) with perturbation-flag
tokens (``model.n_perturbation_flags``) on the perturbed genes, or (``condition_input=label``, e.g. a
stimulation) the target condition's learned embedding added to every token (``model.n_conditions``);
target: a cell of that condition and of the same group (cell type) on the same genes; loss: the ``gep``
MSE over every gene token (data: :mod:`data_modules.perturbation`).

Metrics, per split (``seen``: held-out cells of trained perturbations; ``unseen``: perturbations never
trained on; with ``condition_input=label``: held-out cells of trained (condition, cell type) units, and
the non-control cells of the held-out cell types), averaged over the split's perturbations (units): the
Pearson correlation of the predicted and the true
mean expression change versus control (each cell minus its group's control mean) over all panel genes
(``pearson_delta``) and over the top-20 differentially expressed genes (``pearson_delta_de20``: the genes
with the largest absolute true mean change). The mean-shift baseline under ``<split>/mean_shift/``: control
mean + that perturbation's (unit's) mean training change (seen), or + the average change over the training
perturbations (unseen; with units: over the training units of the same condition, i.e. the mean shift of
the other cell types). Everything lands in ``summary.json`` under ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_modules.perturbation import SPLITS, PerturbationBatch, PerturbationData
from scgpt.errors import ConfigError
from scgpt.metrics import pearson
from scgpt.tasks.finetune import FinetuneTask


def condition_means(values: np.ndarray, condition: np.ndarray) -> dict[int, np.ndarray]:
    """Mean row of ``values`` (n, G) per condition code."""
    return {int(c): values[condition == c].mean(0) for c in np.unique(condition)}


def delta_correlations(predicted: dict[int, np.ndarray], truth: dict[int, np.ndarray],
                       top_k: int = 20) -> dict[str, float]:
    """Mean over conditions of Pearson(predicted change, true change), over all genes and over the
    ``top_k`` genes with the largest absolute true change; nan when no condition gives a finite value."""
    every, top = [], []
    for c, true in truth.items():
        de = np.argsort(-np.abs(true), kind="stable")[:top_k]
        every.append(pearson(predicted[c], true))
        top.append(pearson(predicted[c][de], true[de]))
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    return {"pearson_delta": mean(np.array(every)), f"pearson_delta_de{top_k}": mean(np.array(top))}


def mean_shift_baseline(training_shift: dict[int, np.ndarray], units, seen: bool,
                        condition_of=None) -> dict[int, np.ndarray]:
    """Predicted change per unit: its own mean training change (seen), else the average of the training
    units' changes; with ``condition_of`` (unit -> condition) the average of the training units of the
    same condition (all of them when there is none)."""
    average = np.mean(list(training_shift.values()), axis=0)

    def unseen(u: int) -> np.ndarray:
        if condition_of is None:
            return average
        same = [v for t, v in training_shift.items() if condition_of(t) == condition_of(u)]
        return np.mean(same, axis=0) if same else average

    return {int(u): training_shift.get(int(u), average) if seen else unseen(int(u)) for u in units}


def perturbation_metrics(data: PerturbationData, rows: np.ndarray, predicted: np.ndarray,
                         top_k: int = 20) -> dict[str, float]:
    """The metrics of the module docstring for predictions ``predicted`` (n, G) of target rows ``rows``."""
    shift = data.training_shift()
    out: dict[str, float] = {}
    for split in ("seen", "unseen"):
        chosen = data.split[rows] == SPLITS.index(split)
        if not chosen.any():
            continue
        r = rows[chosen]
        units = data.unit(r)
        truth = condition_means(data.delta(r), units)
        model = condition_means(data.delta(r, predicted[chosen]), units)
        out.update({f"{split}/{k}": v for k, v in delta_correlations(model, truth, top_k).items()})
        if shift:  # no trained perturbation: no mean shift to report
            baseline = mean_shift_baseline(shift, truth, seen=split == "seen",
                                           condition_of=data.unit_condition if data.by_group else None)
            out.update({f"{split}/mean_shift/{k}": v for k, v in delta_correlations(baseline, truth, top_k).items()})
        out[f"{split}/mse"] = float(np.mean((predicted[chosen] - data.expr[r]) ** 2))
        out[f"{split}/n_perturbations"] = float(len(truth))
    return out


class PerturbationTask(FinetuneTask):
    """Trains ``gep`` on paired batches; validation reports :func:`perturbation_metrics`."""

    def __init__(self, *args, top_de_genes: int = 20, predict_change: bool = False, **kwargs) -> None:
        """``predict_change``: the model's output on a gene token is the change from the control cell's
        value (prediction = input value + output), so the identity response costs nothing to learn."""
        kwargs.setdefault("label_key", None)
        kwargs.setdefault("batch_key", None)
        super().__init__(*args, **kwargs)
        if self.model_cfg.n_perturbation_flags < 2 and self.model_cfg.n_conditions < 2:
            raise ConfigError("task.model_heads.n_perturbation_flags: the perturbation task needs 2 flags "
                              "(unperturbed, perturbed); set it to 2 (or, for conditions that are not genes, "
                              "task.data_module.condition_input=label with task.model_heads.n_conditions=auto)")
        self.top_de_genes = int(top_de_genes)
        self.predict_change = bool(predict_change)
        self.perturbation_data: PerturbationData | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.perturbation_data = getattr(datamodule, "data", None)
        if not isinstance(self.perturbation_data, PerturbationData):
            raise ConfigError("task=perturbation: needs the paired data module (task.data_module: "
                              "data_modules.perturbation.PerturbationDataModule); keep it in the task config")
        self._check_condition_input(self.perturbation_data)

    def _check_condition_input(self, data: PerturbationData) -> None:
        if data.by_group and self.model_cfg.n_conditions < len(data.conditions):
            raise ConfigError(f"task.model_heads.n_conditions: {self.model_cfg.n_conditions} rows for "
                              f"{len(data.conditions)} conditions ({', '.join(data.conditions)}); set it to auto")
        if not data.by_group and self.model_cfg.n_perturbation_flags < 2:
            raise ConfigError("task.model_heads.n_perturbation_flags: gene perturbations (condition_input=genes) "
                              "need 2 flags; set it to 2")

    def forward(self, batch: PerturbationBatch):
        batch_labels = batch.labels.get("batch")
        if self.model_cfg.n_batch_labels and batch_labels is None:
            raise ConfigError("task.batch_key: the model has a batch embedding; name the obs column of batches")
        conditions = batch.labels.get("condition") if self.model_cfg.n_conditions else None  # (B,) the targets'
        flags = batch.perturbation_flags if self.model_cfg.n_perturbation_flags else None  # (B, L)
        out = self.model(batch.gene_ids, batch.values, batch.layout, batch_labels=batch_labels,
                         perturbation_flags=flags, condition_labels=conditions)
        if self.predict_change:  # gene tokens: control value + predicted change; <cls> (not hidden) as is
            out.expr_pred = out.expr_pred + torch.where(batch.hidden_mask, batch.values, 0.0).to(out.expr_pred.dtype)
        return out

    def collect(self, batch: PerturbationBatch, out) -> None:
        self._collected["perturbed_pred"].append(out.expr_pred[:, 1:].float().detach().cpu().numpy())  # (B, G)
        self._collected["target_row"].append(batch.target_rows.cpu().numpy())

    def evaluate(self, arrays):
        if self.perturbation_data is None or "perturbed_pred" not in arrays:
            return {}
        return perturbation_metrics(self.perturbation_data, arrays["target_row"], arrays["perturbed_pred"],
                                    self.top_de_genes)

    def plot(self, arrays, directory: Path):
        return [plot_delta_scatter(self.perturbation_data, arrays["target_row"], arrays["perturbed_pred"],
                                   self.top_de_genes, directory / "perturbation_delta.png")]


def plot_delta_scatter(data: PerturbationData, rows: np.ndarray, predicted: np.ndarray, top_k: int,
                       path: Path) -> Path | None:
    """Predicted vs true mean change on each perturbation's top DE genes, one panel per split."""
    from scgpt.metrics import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), squeeze=False)
    for ax, split in zip(axes[0], ("seen", "unseen")):
        chosen = data.split[rows] == SPLITS.index(split)
        if chosen.any():
            r = rows[chosen]
            truth = condition_means(data.delta(r), data.unit(r))
            model = condition_means(data.delta(r, predicted[chosen]), data.unit(r))
            for c, true in truth.items():
                de = np.argsort(-np.abs(true))[:top_k]
                ax.scatter(true[de], model[c][de], s=8, label=data.unit_name(c))
            ax.axline((0, 0), slope=1, color="grey", lw=0.5)
            ax.legend(fontsize=6)
        ax.set_title(f"{split} perturbations: top-{top_k} DE genes")
        ax.set_xlabel("true change vs control (log1p)")
        ax.set_ylabel("predicted change")
    fig.tight_layout()
    return _save(fig, plt, path)
