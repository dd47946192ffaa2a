"""In-silico knockout networks: how much the model's predicted expression of each gene changes when a
regulator's token is taken out of the cell.

scGPT tokenizes only a cell's expressed genes, so a knocked-out gene is a token that is not there. For each
validation cell where regulator r is expressed and its value visible, the model predicts the cell's hidden
values (the batch's own masking) twice: as the cell is, and with r's token removed (padding); the edge
score of (r, t) is |mean over cells of the change in t's prediction|, over the cells where t was hidden.
A directed network for the known regulators only (one extra forward pass per regulator and batch).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from data_modules.collate import CellBatch
from scgpt.model.layout import TokenLayout


class KnockoutNetwork:
    """Sums and counts of prediction changes (regulator, gene) over cells, on vocabulary ids."""

    def __init__(self, regulators: np.ndarray, n_genes: int) -> None:
        self.regulators = torch.as_tensor(np.asarray(regulators, dtype=np.int64))  # (R,) vocabulary ids
        self.total = torch.zeros(len(regulators), n_genes, dtype=torch.float64)  # (R, G)
        self.count = torch.zeros(len(regulators), n_genes, dtype=torch.float64)  # (R, G)

    @torch.no_grad()
    def add(self, model, batch: CellBatch, batch_labels: Tensor | None = None) -> None:
        """Accumulate the changes for one padded batch (values hidden as the collator hid them)."""
        gene_ids, values, padding = batch.gene_ids, batch.values, batch.padding_mask  # (B, L)
        hidden = batch.hidden_mask & ~padding  # (B, L) the values the model predicts
        modality = batch.modality_ids

        def predict(cells: Tensor, pad: Tensor) -> Tensor:  # (b, L) predicted values of those cells
            return model(gene_ids[cells], values[cells], TokenLayout(padding_mask=pad),
                         batch_labels=None if batch_labels is None else batch_labels[cells],
                         modality_ids=None if modality is None else modality[cells]).expr_pred.float()

        every = torch.ones(gene_ids.shape[0], dtype=torch.bool, device=gene_ids.device)
        base = predict(every, padding)  # (B, L)
        for i, regulator in enumerate(self.regulators.tolist()):
            present = (gene_ids == regulator) & ~hidden & ~padding  # (B, L) visible regulator tokens
            cells = present.any(dim=1)  # (B,)
            if not bool(cells.any()):
                continue
            change = base[cells] - predict(cells, padding[cells] | present[cells])  # (b, L) with r minus without
            where = hidden[cells]
            ids = gene_ids[cells][where].cpu()
            self.total[i].index_add_(0, ids, change[where].double().cpu())
            self.count[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))

    def scores(self, genes: np.ndarray) -> np.ndarray:
        """(G', G') edge scores over ``genes`` (vocabulary ids): row i is |mean change| of each gene when
        genes[i] is knocked out, for the regulators among ``genes``; other rows and unseen pairs are 0."""
        out = np.zeros((len(genes), len(genes)))
        row_of = {int(g): i for i, g in enumerate(genes)}
        total, count = self.total.numpy()[:, genes], self.count.numpy()[:, genes]  # (R, G')
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        for i, regulator in enumerate(self.regulators.tolist()):
            if regulator in row_of:
                out[row_of[regulator]] = np.abs(mean[i])
        return out
