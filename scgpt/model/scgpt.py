"""The scGPT model: input embedding -> transformer encoder -> cell embedding and heads.

Pure torch. Which heads exist is fixed by :class:`~scgpt.config.ModelConfig`, not by call flags;
``forward`` runs every head the model has and returns them in one :class:`ScGPTOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scgpt.config import ModelConfig
from scgpt.model.attention import AttentionBackend
from scgpt.model.attention_backends import build_attention_backend
from scgpt.model.dsbn import DomainSpecificBatchNorm
from scgpt.model.embeddings import InputEmbedding
from scgpt.model.encoder import TransformerEncoder
from scgpt.model.heads import BatchDiscriminator, ClassifierHead, ExpressionDecoder, MVCDecoder
from scgpt.model.layout import TokenLayout


@dataclass
class ScGPTOutput:
    """Per-token tensors are (B, L) padded or (T,) packed, like the input; per-cell are (B, ...)."""

    token_states: Tensor  # (B, L, D) | (T, D)
    cell_emb: Tensor  # (B, D)
    expr_pred: Tensor  # (B, L) | (T,)
    expr_zero_logit: Tensor | None = None
    mvc_pred: Tensor | None = None
    mvc_zero_logit: Tensor | None = None
    cls_logits: Tensor | None = None  # (B, C)
    batch_logits: Tensor | None = None  # (B, n_batches), behind gradient reversal


class ScGPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embedding = InputEmbedding(cfg)
        self.transformer_encoder = TransformerEncoder(cfg, backend or build_attention_backend(cfg.attention_backend))
        self.batch_encoder = None
        # a learned embedding of each cell's condition (e.g. CTRL / STIM), added to every token of the cell
        self.condition_encoder = nn.Embedding(cfg.n_conditions, d) if cfg.n_conditions else None
        if cfg.n_batch_labels:
            self.batch_encoder = nn.Sequential(nn.Embedding(cfg.n_batch_labels, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        d_dec = 2 * d if cfg.n_batch_labels else d
        self.decoder = ExpressionDecoder(d_dec, d, cfg.explicit_zero_prob)
        self.mvc_decoder = MVCDecoder(d, d_dec, cfg.explicit_zero_prob) if cfg.mvc_decoder else None
        self.cls_decoder = ClassifierHead(d, cfg.n_cls_classes, cfg.n_layers_cls) if cfg.n_cls_classes else None
        self.batch_discriminator = BatchDiscriminator(d, cfg.n_batch_labels) if cfg.batch_discriminator else None
        self.dsbn = (DomainSpecificBatchNorm(d, cfg.n_batch_labels, eps=cfg.layer_norm_eps)
                     if cfg.dsbn != "off" else None)

    @property
    def attention_backend(self) -> str:
        return self.transformer_encoder.backend.name

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.transformer_encoder.backend = backend

    def pool(self, token_states: Tensor, values: Tensor, layout: TokenLayout) -> Tensor:
        """Cell embedding (B, D) by ``cfg.cell_emb_style``: ``<cls>`` state, mean, or value-weighted mean."""
        style = self.cfg.cell_emb_style
        if style == "cls":
            return layout.first_tokens(token_states)
        real = layout.token_mask().to(token_states.dtype)  # (B, L) | (T,)
        if style == "avg-pool":
            return layout.weighted_mean(token_states, real)
        weights = values.clamp(min=0).to(token_states.dtype) * real  # w-pool: expression-weighted
        return nn.functional.normalize(layout.weighted_mean(token_states, weights), dim=-1)

    def encode(self, gene_ids: Tensor, values: Tensor, layout: TokenLayout, gen_mask: Tensor | None = None,
               modality_ids: Tensor | None = None, perturbation_flags: Tensor | None = None,
               batch_labels: Tensor | None = None, condition_labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """-> (token states, gene embeddings, cell embedding). ``batch_labels`` (B,) are needed with DSBN;
        ``condition_labels`` (B,) with a condition embedding (``cfg.n_conditions``)."""
        x, gene_embs = self.embedding(gene_ids, values, modality_ids, perturbation_flags)  # (B, L, D) | (T, D)
        if self.condition_encoder is not None:
            if condition_labels is None:
                raise ValueError("this model has a condition embedding (model.n_conditions); pass condition_labels")
            x = x + layout.broadcast(self.condition_encoder(condition_labels))  # (B, 1, D) | (T, D)
        if self.cfg.dsbn == "input":
            x = self.domain_norm(x, layout, batch_labels)
        states = self.transformer_encoder(x, layout, gen_mask)
        if self.cfg.dsbn == "output":
            states = self.domain_norm(states, layout, batch_labels)
        cell_emb = self.pool(states, values, layout)  # (B, D)
        if self.cfg.dsbn == "cell":  # statistics over the cells of each batch label
            labels = self._require_labels(batch_labels)  # (B,)
            cell_emb = self.dsbn(cell_emb, labels, torch.ones_like(labels, dtype=torch.bool))
        return states, gene_embs, cell_emb

    @staticmethod
    def _require_labels(batch_labels: Tensor | None) -> Tensor:
        if batch_labels is None:
            raise ValueError("this model has domain-specific batch norm (model.dsbn); pass batch_labels")
        return batch_labels

    def domain_norm(self, x: Tensor, layout: TokenLayout, batch_labels: Tensor | None) -> Tensor:
        """DSBN of per-token tensors (B, L, D) | (T, D) with the statistics of each cell's batch label."""
        batch_labels = self._require_labels(batch_labels)
        domains = batch_labels[layout.seq_ids] if layout.is_packed else batch_labels[:, None].expand(x.shape[:2])
        return self.dsbn(x, domains, layout.token_mask())  # domains, mask: (B, L) | (T,)

    def forward(self, gene_ids: Tensor, values: Tensor, layout: TokenLayout, gen_mask: Tensor | None = None,
                batch_labels: Tensor | None = None, modality_ids: Tensor | None = None,
                perturbation_flags: Tensor | None = None, condition_labels: Tensor | None = None) -> ScGPTOutput:
        states, gene_embs, cell_emb = self.encode(gene_ids, values, layout, gen_mask, modality_ids, perturbation_flags,
                                                  batch_labels, condition_labels)
        dec_in, cell_dec = states, cell_emb
        if self.batch_encoder is not None:
            batch_emb = self.batch_encoder(batch_labels)  # (B, D)
            dec_in = torch.cat([states, layout.broadcast(batch_emb).expand_as(states)], dim=-1)
            cell_dec = torch.cat([cell_emb, batch_emb], dim=-1)
        expr, expr_zero = self.decoder(dec_in)
        out = ScGPTOutput(token_states=states, cell_emb=cell_emb, expr_pred=expr, expr_zero_logit=expr_zero)
        if self.mvc_decoder is not None:
            out.mvc_pred, out.mvc_zero_logit = self.mvc_decoder(gene_embs, layout.broadcast(cell_dec))
        if self.cls_decoder is not None:
            out.cls_logits = self.cls_decoder(cell_emb)
        if self.batch_discriminator is not None:
            out.batch_logits = self.batch_discriminator(cell_emb)
        return out
