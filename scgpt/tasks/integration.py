"""Batch integration: batch embedding into the decoders, adversarial batch discriminator (DAB), domain-specific
batch norm (DSBN, ``model_heads.dsbn`` with single-domain training batches from ``task.domain_key``), ECS and
MVC; metrics of batch mixing and cell-type separation against the unintegrated PCA baseline, and a 2-D map
(UMAP, or PCA without umap-learn) of the model and PCA embeddings coloured by batch and by cell type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scgpt.errors import ConfigError
from scgpt.plots import MAP_METHODS, plot_cell_maps
from scgpt.tasks.finetune import FinetuneTask, embedding_report


class IntegrationTask(FinetuneTask):
    """Validation metrics (model, and ``pca/`` for the baseline): celltype_asw, batch_asw, batch_mixing,
    nmi, ari, knn_accuracy; plus ``celltype_asw_kept`` (model / PCA) and ``batch_mixing_gain`` (model - PCA).

    ``embedding_map``: ``auto`` (UMAP when umap-learn is installed, else PCA), ``umap`` or ``pca``;
    ``map_max_cells``: cells drawn in ``plots/embedding.png`` (a seeded sample; keeps the plot fast)."""

    def __init__(self, *args: Any, embedding_map: str = "auto", map_max_cells: int = 5000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if embedding_map not in MAP_METHODS:
            raise ConfigError(f"task.module.embedding_map: unknown value {embedding_map!r}; "
                              f"choose one of {', '.join(MAP_METHODS)}")
        if map_max_cells < 2:
            raise ConfigError(f"task.module.map_max_cells: {map_max_cells} must be at least 2")
        self.embedding_map, self.map_max_cells = embedding_map, map_max_cells

    def forward(self, batch):
        """The model's batch embedding, DSBN and DAB read ``labels["batch"]``: the ``task.batch_key`` column
        (e.g. ``stim``) is passed under that name (without it a batch_key other than ``batch`` reached no head)."""
        if self.batch_key and self.batch_key != "batch" and self.batch_key in batch.labels:
            batch.labels["batch"] = batch.labels[self.batch_key]  # (B,) codes of the batch column
        return super().forward(batch)

    def evaluate(self, arrays):
        out = embedding_report(arrays["emb"], arrays.get("expression"), self.labels_of(arrays, self.label_key),
                               self.labels_of(arrays, self.batch_key), self.seed)
        if "pca/celltype_asw" in out:
            out["celltype_asw_kept"] = out["celltype_asw"] / max(out["pca/celltype_asw"], 1e-9)
            out["batch_mixing_gain"] = out["batch_mixing"] - out["pca/batch_mixing"]
            out["ilisi_gain"] = out["ilisi"] - out["pca/ilisi"]
            out["batch_asw_gain"] = out["batch_asw"] - out["pca/batch_asw"]
        return out

    def plot(self, arrays, directory: Path):
        colourings = {}
        for key in (self.batch_key, self.label_key):
            codes = self.labels_of(arrays, key)
            if codes is not None:
                colourings[key] = (codes, self.label_names.get(key) or [str(i) for i in range(codes.max() + 1)])
        embeddings = {"scGPT": arrays["emb"]}
        if arrays.get("expression") is not None:  # the unintegrated baseline beside the model
            from scgpt.metrics import pca_embedding

            embeddings["PCA of expression"] = pca_embedding(arrays["expression"], 50, self.seed)
        return plot_cell_maps(embeddings, colourings, directory / "embedding.png", self.seed, self.embedding_map,
                              self.map_max_cells)
