"""A baseline that follows the ORIGINAL scGPT architecture, written from ../shared/specs/scgpt-format.md.

Padded ``(B, L)`` tokens through torch's ``nn.TransformerEncoder`` (post-norm ``nn.TransformerEncoderLayer``,
ReLU, FFN width ``d_hid``, fused q/k/v input projection), as the original model runs without
flash-attn: gene embedding + LayerNorm, continuous value encoder (clamp 512, Linear(1, d), ReLU,
Linear(d, d), LayerNorm, dropout), summed; expression decoder ``fc`` (Linear, LeakyReLU, Linear,
LeakyReLU, Linear); cell embedding = the ``<cls>`` state; MVC "inner product" decoder
(``gene2query`` + sigmoid, ``W``, dot with the cell embedding). Key padding goes in as
``src_key_padding_mask``; scGPT's generative attention mask, where a batch has generative cells, as a
per-cell, per-head boolean ``mask`` of shape ``(B * n_heads, L, L)`` (True = may not attend), the way a
padded ``nn.TransformerEncoder`` must receive per-cell masks. Benchmark-only code: not part of the package.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scgpt.model.scgpt import ScGPTOutput


class OriginalScGPT(nn.Module):
    """``attention_dropout``: dropout on the attention probabilities. torch's layer (and so the original
    model) applies the model's ``dropout`` there too; ``ScGPTModel`` does not (its dropouts act on the
    residual branches and the FFN). Pass 0.0 to take that extra work out of a comparison."""

    def __init__(self, cfg, attention_dropout: float | None = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.gene_embedding = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.gene_norm = nn.LayerNorm(d)
        self.value_encoder = nn.Sequential(nn.Linear(1, d), nn.ReLU(), nn.Linear(d, d), nn.LayerNorm(d),
                                           nn.Dropout(cfg.dropout))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_hid, cfg.dropout, batch_first=True)  # post-norm, ReLU
        self.transformer_encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        if attention_dropout is not None:
            for encoder_layer in self.transformer_encoder.layers:
                encoder_layer.self_attn.dropout = attention_dropout
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))
        self.gene2query = nn.Linear(d, d)
        self.W = nn.Linear(d, d, bias=False)

    def generative_mask(self, gen_mask: Tensor) -> Tensor:
        """(B, L) generated tokens -> (B * H, L, L) bool, True where a query may NOT attend to a key."""
        length = gen_mask.shape[1]
        itself = torch.eye(length, dtype=torch.bool, device=gen_mask.device)
        blocked = gen_mask[:, None, :] & ~itself  # (B, L, L): generated keys hidden except from themselves
        return blocked.repeat_interleave(self.n_heads, dim=0)

    def forward(self, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, gen_mask: Tensor | None = None) -> ScGPTOutput:
        genes = self.gene_norm(self.gene_embedding(gene_ids))  # (B, L, D)
        x = genes + self.value_encoder(values.clamp(max=512.0).unsqueeze(-1))
        mask = None if gen_mask is None else self.generative_mask(gen_mask)
        states = self.transformer_encoder(x, mask=mask, src_key_padding_mask=padding_mask)  # (B, L, D)
        cell_emb = states[:, 0]  # <cls>
        query = torch.sigmoid(self.gene2query(genes))  # (B, L, D)
        mvc = torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)  # (B, L)
        return ScGPTOutput(token_states=states, cell_emb=cell_emb, expr_pred=self.decoder(states).squeeze(-1),
                           mvc_pred=mvc)
