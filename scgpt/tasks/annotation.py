"""Cell-type annotation: a classifier on the cell embedding, trained with the ``cls`` objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scgpt.metrics import (classification_metrics, confusion, knn_accuracy, logistic_regression_accuracy,
                           pca_embedding, plot_confusion)
from scgpt.tasks.finetune import FinetuneTask


class AnnotationTask(FinetuneTask):
    """Validation (and test) metrics: accuracy, macro_f1, f1/<class>; kNN accuracy of the embedding; the
    logistic-regression-on-PCA baseline cross-validated on the same cells (``pca_logreg_accuracy``), and on
    a test split also that baseline fitted on the validation cells and applied to the held-out ones
    (``pca_logreg_transfer_accuracy``: the same transfer the model makes)."""

    def class_names(self) -> list[str]:
        return self.label_names.get(self.label_key) or [str(i) for i in range(self.model_cfg.n_cls_classes)]

    def evaluate(self, arrays):
        truth = self.labels_of(arrays, self.label_key)
        out = classification_metrics(truth, arrays["pred"], self.class_names()) if "pred" in arrays else {}
        out["knn_accuracy"] = knn_accuracy(arrays["emb"], truth, seed=self.seed)
        if "expression" in arrays:
            out["pca_logreg_accuracy"] = logistic_regression_accuracy(
                pca_embedding(arrays["expression"], 50, self.seed), without_singletons(truth), seed=self.seed)
            reference = getattr(self, "_reference", None)
            if reference is not None and "expression" in reference:
                out["pca_logreg_transfer_accuracy"] = transfer_accuracy(
                    reference["expression"], self.labels_of(reference, self.label_key), arrays["expression"], truth,
                    seed=self.seed)
        return out

    def on_test_epoch_start(self) -> None:
        self._reference = self.last_eval or None  # the latest validation cells: the baseline's training set

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._reference = None

    def plot(self, arrays, directory: Path):
        if "pred" not in arrays:
            return []
        names = self.class_names()
        matrix = confusion(self.labels_of(arrays, self.label_key), arrays["pred"], len(names))
        return [plot_confusion(matrix, names, directory / "confusion.png")]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["scgpt"]["cls_label_key"] = self.label_key  # which of the labels the classifier predicts


def without_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels with classes of a single cell marked missing (-1): cross-validation needs two cells per class."""
    counts = np.bincount(labels[labels >= 0], minlength=1)
    return np.where((labels >= 0) & (counts[np.maximum(labels, 0)] >= 2), labels, -1)


def transfer_accuracy(train_x, train_y: np.ndarray, test_x, test_y: np.ndarray, n_components: int | None = 50,
                      seed: int = 0) -> float:
    """Logistic regression on the PCA of ``train_x`` (fitted there), scored on ``test_x``: labelled cells only.
    ``n_components=None``: on ``train_x`` itself (an embedding), no PCA."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    keep, held = train_y >= 0, test_y >= 0
    if keep.sum() < 2 or len(np.unique(train_y[keep])) < 2 or not held.any():
        return float("nan")
    dense = lambda x: (x.toarray() if hasattr(x, "toarray") else np.asarray(x)).astype(np.float32)  # noqa: E731
    x_train, x_test = dense(train_x)[keep], dense(test_x)[held]
    if n_components is not None:
        pca = PCA(n_components=max(1, min(n_components, min(x_train.shape) - 1)), random_state=seed).fit(x_train)
        x_train, x_test = pca.transform(x_train), pca.transform(x_test)
    model = LogisticRegression(max_iter=2000).fit(x_train, train_y[keep])
    return float((model.predict(x_test) == test_y[held]).mean())
