"""Cell-embedding terms: elastic cell similarity (ECS), contrastive (CCE), adversarial batch (DAB)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scgpt.objectives.base import Objective


class ElasticCellSimilarity(Objective):
    """ECS: push cosine similarities between different cells away from ``threshold`` (scGPT's ecs_thres):
    pairs more similar than it are pulled together, less similar ones pushed apart."""

    name = "ecs"

    def __init__(self, weight: float, threshold: float = 0.6) -> None:
        super().__init__(weight)
        self.threshold = threshold

    def __call__(self, out, batch, ctx):
        emb = F.normalize(out.cell_emb, dim=-1)  # (B, D)
        cos = (emb @ emb.T).fill_diagonal_(0.0).relu()  # (B, B), self-similarity removed
        return {self.name: torch.mean(1 - (cos - self.threshold) ** 2)}


class ContrastiveCellEmbedding(Objective):
    """CCE: InfoNCE between two dropout views of each cell, negatives gathered across ranks."""

    name = "cce"
    needs_second_view = True

    def __init__(self, weight: float, temperature: float = 0.5) -> None:
        super().__init__(weight)
        self.temperature = temperature

    def __call__(self, out, batch, ctx):
        local = F.normalize(out.cell_emb, dim=-1)  # (B, D)
        others = F.normalize(ctx.gather(ctx.second_view.cell_emb), dim=-1)  # (world * B, D)
        logits = local @ others.T / self.temperature  # (B, world * B)
        labels = torch.arange(local.shape[0], device=local.device) + ctx.rank * local.shape[0]
        return {self.name: F.cross_entropy(logits.float(), labels)}


class AdversarialBatch(Objective):
    """DAB: the discriminator learns the batch; gradient reversal pushes the encoder to hide it."""

    name = "dab"

    def check(self, model_cfg):
        return None if model_cfg.batch_discriminator else "needs model.batch_discriminator=true"

    def __call__(self, out, batch, ctx):
        return {self.name: F.cross_entropy(out.batch_logits.float(), batch.labels["batch"])}
