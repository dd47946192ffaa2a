"""Output heads: expression decoder, MVC decoder, cell classifier, adversarial batch discriminator.

Names follow the original scGPT state dict (``decoder.fc``, ``mvc_decoder.gene2query`` ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _mlp3(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))


class ExpressionDecoder(nn.Module):
    """Token state -> expression value, and optionally the logit of the value being non-zero."""

    def __init__(self, d_in: int, d_model: int, explicit_zero_prob: bool) -> None:
        super().__init__()
        self.fc = _mlp3(d_in, d_model)
        self.zero_logit = _mlp3(d_in, d_model) if explicit_zero_prob else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # (..., d_in) -> (...,), (...,)
        pred = self.fc(x).squeeze(-1)
        return pred, None if self.zero_logit is None else self.zero_logit(x).squeeze(-1)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding: <W sigmoid(gene2query(gene)), cell>."""

    def __init__(self, d_model: int, d_cell: int, explicit_zero_prob: bool) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_cell, bias=False)
        self.W_zero_logit = nn.Linear(d_model, d_cell) if explicit_zero_prob else None

    def forward(self, gene_embs: Tensor, cell_per_token: Tensor) -> tuple[Tensor, Tensor | None]:
        """gene_embs (..., D); cell_per_token broadcastable to (..., d_cell) -> (...,), (...,)."""
        query = self.query_activation(self.gene2query(gene_embs))  # (..., D)
        pred = (self.W(query) * cell_per_token).sum(-1)
        if self.W_zero_logit is None:
            return pred, None
        return pred, (self.W_zero_logit(query) * cell_per_token).sum(-1)


class ClassifierHead(nn.Module):
    """(Linear, ReLU, LayerNorm) x (n_layers - 1) then ``out_layer`` to class logits."""

    def __init__(self, d_model: int, n_classes: int, n_layers: int) -> None:
        super().__init__()
        blocks = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)]
        self._decoder = nn.Sequential(*blocks)
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, cell_emb: Tensor) -> Tensor:  # (B, D) -> (B, C)
        return self.out_layer(self._decoder(cell_emb))


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float = 1.0) -> Tensor:
    """Identity forward; gradient multiplied by ``-strength`` backward."""
    return _GradientReversal.apply(x, strength)


class BatchDiscriminator(nn.Module):
    """Predicts the batch of a cell from its embedding behind gradient reversal (DAB)."""

    def __init__(self, d_model: int, n_batches: int, n_layers: int = 3, reversal_strength: float = 1.0) -> None:
        super().__init__()
        blocks = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.LayerNorm(d_model)]
        self._decoder = nn.Sequential(*blocks)
        self.out_layer = nn.Linear(d_model, n_batches)
        self.reversal_strength = reversal_strength

    def forward(self, cell_emb: Tensor) -> Tensor:  # (B, D) -> (B, n_batches)
        return self.out_layer(self._decoder(reverse_gradient(cell_emb, self.reversal_strength)))
