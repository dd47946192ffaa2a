"""Token inputs: gene embedding + value encoding (+ modality and perturbation embeddings).

Module names follow the original scGPT state dict (``encoder.embedding``, ``encoder.enc_norm``,
``value_encoder.linear1`` ...) so that import and export need no guessing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MAX_CONTINUOUS_VALUE = 512.0


class GeneEncoder(nn.Module):
    """Gene id -> embedding -> LayerNorm."""

    def __init__(self, vocab_size: int, d_model: int, pad_token_id: int, eps: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.enc_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, gene_ids: Tensor) -> Tensor:  # (...,) -> (..., D)
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> MLP -> LayerNorm, values clamped at 512."""

    def __init__(self, d_model: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: Tensor) -> Tensor:  # (...,) -> (..., D)
        x = values.clamp(max=MAX_CONTINUOUS_VALUE).unsqueeze(-1).to(self.linear1.weight.dtype)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Bin index -> embedding; the mask and pad values get two extra rows after the n_bins bins."""

    def __init__(self, n_bins: int, d_model: int, mask_value: float, pad_value: float, eps: float) -> None:
        super().__init__()
        self.n_bins, self.mask_value, self.pad_value = n_bins, mask_value, pad_value
        self.embedding = nn.Embedding(n_bins + 2, d_model)
        self.enc_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, values: Tensor) -> Tensor:  # (...,) -> (..., D)
        index = values.round().long().clamp(0, self.n_bins - 1)
        index = torch.where(values == self.mask_value, self.n_bins, index)
        index = torch.where(values == self.pad_value, self.n_bins + 1, index)
        return self.enc_norm(self.embedding(index))


class InputEmbedding(nn.Module):
    """Sums (or, for ``scaling``, multiplies) gene and value encodings into token inputs."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.value_encoding, self.mask_value = cfg.value_encoding, float(cfg.mask_value)
        self.encoder = GeneEncoder(cfg.vocab_size, d, cfg.pad_token_id, eps)
        if cfg.value_encoding == "continuous":
            self.value_encoder = ContinuousValueEncoder(d, cfg.dropout, eps)
        elif cfg.value_encoding == "category":
            self.value_encoder = CategoryValueEncoder(cfg.n_bins, d, cfg.mask_value, cfg.pad_value, eps)
        self.modality_encoder = nn.Embedding(cfg.n_modalities, d) if cfg.n_modalities else None
        self.pert_encoder = nn.Embedding(cfg.n_perturbation_flags, d) if cfg.n_perturbation_flags else None

    def forward(self, gene_ids: Tensor, values: Tensor, modality_ids: Tensor | None = None,
                perturbation_flags: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (token inputs, gene embeddings), both (..., D); the latter feeds the MVC head."""
        genes = self.encoder(gene_ids)
        if self.value_encoding == "scaling":  # as scGPT's src * values: a hidden value reads -1, the gene stays known
            scale = torch.where(values == self.mask_value, -1.0, values.clamp(min=0))  # (..., L)
            x = genes * scale.unsqueeze(-1).to(genes.dtype)
        else:
            x = genes + self.value_encoder(values)
        if self.modality_encoder is not None and modality_ids is not None:
            x = x + self.modality_encoder(modality_ids)
        if self.pert_encoder is not None and perturbation_flags is not None:
            x = x + self.pert_encoder(perturbation_flags)
        return x, genes
