"""Batch integration: batch embedding into the decoders, adversarial batch discriminator (DAB), ECS and
MVC; metrics of batch mixing and cell-type separation against the unintegrated PCA baseline."""

from __future__ import annotations

from pathlib import Path

from scgpt.metrics import plot_embedding
from scgpt.tasks.finetune import FinetuneTask, embedding_report


class IntegrationTask(FinetuneTask):
    """Validation metrics (model, and ``pca/`` for the baseline): celltype_asw, batch_asw, batch_mixing,
    nmi, ari, knn_accuracy; plus ``celltype_asw_kept`` (model / PCA) and ``batch_mixing_gain`` (model - PCA)."""

    def evaluate(self, arrays):
        out = embedding_report(arrays["emb"], arrays.get("expression"), self.labels_of(arrays, self.label_key),
                               self.labels_of(arrays, self.batch_key), self.seed)
        if "pca/celltype_asw" in out:
            out["celltype_asw_kept"] = out["celltype_asw"] / max(out["pca/celltype_asw"], 1e-9)
            out["batch_mixing_gain"] = out["batch_mixing"] - out["pca/batch_mixing"]
        return out

    def plot(self, arrays, directory: Path):
        colourings = {}
        for key in (self.batch_key, self.label_key):
            codes = self.labels_of(arrays, key)
            if codes is not None:
                colourings[key] = (codes, self.label_names.get(key) or [str(i) for i in range(codes.max() + 1)])
        return [plot_embedding(arrays["emb"], colourings, directory / "embedding.png", self.seed)] if colourings else []
