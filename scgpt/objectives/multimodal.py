"""Cross-modal contrastive term (CMC) for multi-omic data: the embedding of a cell's RNA tokens and the
embedding of its other tokens (ADT / ATAC) should find each other among the batch's cells (symmetric
InfoNCE, in-batch negatives on this rank). What the two views share is the cell's state, so the term
teaches the encoder to embed either modality alone by it; cells missing one view do not count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_modules.modality import RNA, SPECIAL
from data_modules.modality_batch import select_tokens
from scgpt.objectives.base import Objective


class CrossModalContrastive(Objective):
    name = "cmc"

    def __init__(self, weight: float, temperature: float = 0.2) -> None:
        super().__init__(weight)
        self.temperature = temperature
        self.pad_token_id, self.pad_value = 0, -2.0

    def check(self, model_cfg):
        self.pad_token_id, self.pad_value = model_cfg.pad_token_id, model_cfg.pad_value
        return None if model_cfg.n_modalities else "needs modality embeddings (model_heads.n_modalities, task=multiomic)"

    def __call__(self, out, batch, ctx):
        mods = batch.modality_ids
        if mods is None or ctx.forward is None:
            return {self.name: out.cell_emb.sum() * 0.0}
        rna, other = (mods == RNA), (mods != RNA) & (mods != SPECIAL)  # per token
        both = _has(batch, rna) & _has(batch, other)  # (B,) cells with both views
        if int(both.sum()) < 2:
            return {self.name: out.cell_emb.sum() * 0.0}
        a = ctx.forward(select_tokens(batch, rna, self.pad_token_id, self.pad_value)).cell_emb[both]  # (C, D)
        b = ctx.forward(select_tokens(batch, other, self.pad_token_id, self.pad_value)).cell_emb[both]  # (C, D)
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / self.temperature  # (C, C)
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2
        return {self.name: loss}


def _has(batch, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) whether each cell has any of the given tokens."""
    if batch.padding_mask is not None:
        return tokens.any(dim=1)
    cell = batch.layout.seq_ids  # (T,) in any packed order
    return torch.bincount(cell[tokens], minlength=batch.n_cells) > 0
