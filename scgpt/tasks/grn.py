"""Gene regulatory network from the model's gene embeddings, scored against a planted network.

The planted network is read from the store's ``uns/gene_programs`` (the synthetic generator records it):
the first gene of each program is taken as its regulator and the other genes as its targets. The model's
network scores a gene pair by the cosine similarity of the two genes' input embeddings; the baseline scores
it by the Pearson correlation of their binned expression in the validation cells. Both are ranked over all
ordered pairs of measured genes (self pairs excluded): AUPRC and early precision (precision in the top |E|
pairs) against random (the edge density). Gene embeddings are symmetric, so direction is not scored beyond
the planted orientation. Not done yet: attention-based networks per cell state or perturbation.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from scgpt.metrics import edge_recovery
from scgpt.tasks.finetune import FinetuneTask

log = logging.getLogger(__name__)


def planted_network(store_path, vocab) -> tuple[np.ndarray, np.ndarray] | None:
    """(gene vocabulary ids (G,), boolean regulator->target matrix (G, G)) from ``uns/gene_programs``."""
    import anndata as ad
    import zarr

    group = zarr.open_group(str(store_path), mode="r")
    if "uns" not in group or "gene_programs" not in group["uns"]:
        return None
    programs = ad.io.read_elem(group["uns"]["gene_programs"])
    edges = set()
    for genes in programs.values():
        ids = [vocab[str(g)] for g in genes if str(g) in vocab]
        edges.update((ids[0], t) for t in ids[1:] if t != ids[0]) if ids else None
    genes = np.array(sorted({g for e in edges for g in e}), dtype=np.int64)
    return genes, edges


class GrnTask(FinetuneTask):
    """Trains like pretraining (gep + mvc); validation adds the network recovery metrics."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.planted = None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.sources:
            self.planted = planted_network(datamodule.sources[0].path, datamodule.vocab)
            if self.planted is None:
                log.warning("grn: %s has no uns/gene_programs; network metrics skipped", datamodule.sources[0].path)

    def evaluate(self, arrays):
        if not getattr(self, "planted", None) or "expression" not in arrays:
            return {}
        expression = arrays["expression"].tocsc()
        measured = np.flatnonzero(np.diff(expression.indptr) > 1)  # vocabulary ids seen in >= 2 cells
        _, edges = self.planted
        truth = np.array([[(int(a), int(b)) in edges for b in measured] for a in measured])
        off_diagonal = ~np.eye(len(measured), dtype=bool)
        with torch.no_grad():
            emb = self.model.embedding.encoder(torch.as_tensor(measured, device=self.device)).float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            model_scores = (emb @ emb.T).cpu().numpy()
        dense = expression[:, measured].toarray()
        corr = np.nan_to_num(np.corrcoef(dense, rowvar=False))
        out = {}
        for prefix, scores in (("", model_scores), ("coexpr/", corr)):
            metrics = edge_recovery(scores[off_diagonal], truth[off_diagonal])
            out.update({f"{prefix}grn_{k}": v for k, v in metrics.items() if not (prefix and k.endswith("random"))})
        out["grn_auprc_over_random"] = out["grn_auprc"] / max(out["grn_auprc_random"], 1e-12)
        return out
