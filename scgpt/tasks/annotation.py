"""Cell-type annotation: a classifier on the cell embedding, trained with the ``cls`` objective."""

from __future__ import annotations

from pathlib import Path


from scgpt.metrics import (classification_metrics, confusion, knn_accuracy, logistic_regression_accuracy,
                           pca_embedding, plot_confusion)
from scgpt.tasks.finetune import FinetuneTask


class AnnotationTask(FinetuneTask):
    """Validation metrics: accuracy, macro_f1, f1/<class>; kNN accuracy of the embedding; and the
    logistic-regression-on-PCA baseline (cross-validated on the same validation cells)."""

    def evaluate(self, arrays):
        truth = self.labels_of(arrays, self.label_key)
        names = self.label_names.get(self.label_key) or [str(i) for i in range(self.model_cfg.n_cls_classes)]
        out = classification_metrics(truth, arrays["pred"], names) if "pred" in arrays else {}
        out["knn_accuracy"] = knn_accuracy(arrays["emb"], truth, seed=self.seed)
        if "expression" in arrays:
            out["pca_logreg_accuracy"] = logistic_regression_accuracy(
                pca_embedding(arrays["expression"], 50, self.seed), truth, seed=self.seed)
        return out

    def plot(self, arrays, directory: Path):
        if "pred" not in arrays:
            return []
        names = self.label_names.get(self.label_key) or [str(i) for i in range(self.model_cfg.n_cls_classes)]
        matrix = confusion(self.labels_of(arrays, self.label_key), arrays["pred"], len(names))
        return [plot_confusion(matrix, names, directory / "confusion.png")]
