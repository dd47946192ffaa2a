"""Attention probabilities of one encoder layer, for attention-based gene networks (not for training).

The training backends never form attention probabilities (flash kernels keep them on chip); this module
recomputes one layer's softmax(QK^T / sqrt(d)) on padded cells from that layer's input, exactly as the
layer attends without a generative mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from scgpt.model.layout import TokenLayout


@torch.no_grad()
def attention_maps(model, gene_ids: Tensor, values: Tensor, padding_mask: Tensor, layer: int = -1,
                   batch_labels: Tensor | None = None, modality_ids: Tensor | None = None,
                   perturbation_flags: Tensor | None = None) -> Tensor:
    """Head-averaged attention probabilities (B, L, L) of encoder layer ``layer``: row i is how much token i
    (the query) attends to each token j; rows and columns of padding are 0.

    gene_ids, values, padding_mask: (B, L) padded cells; ``model`` an :class:`~scgpt.model.ScGPTModel`.
    """
    layout = TokenLayout(padding_mask=padding_mask)
    x, _ = model.embedding(gene_ids, values, modality_ids, perturbation_flags)  # (B, L, D)
    if model.cfg.dsbn == "input":
        x = model.domain_norm(x, layout, batch_labels)
    encoder = model.transformer_encoder
    layers = list(encoder.layers)
    index = layer % len(layers)
    for block in layers[:index]:
        x = block(x, layout, None, encoder.backend)
    block = layers[index]
    attn_in = block.norm1(x) if block.pre_norm else x
    qkv = F.linear(attn_in, block.self_attn.in_proj_weight, block.self_attn.in_proj_bias)  # (B, L, 3D)
    q, k, _ = qkv.unflatten(-1, (3, block.self_attn.n_heads, -1)).unbind(dim=2)  # (B, L, H, Dh)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).mean(dim=1)  # (B, L, L)
    return probs.masked_fill(padding_mask[:, :, None], 0.0)
