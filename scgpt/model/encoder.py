"""Transformer encoder layers that run on padded (B, L, D) or packed (T, D) tokens.

Parameter names follow torch's ``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight`` with
rows [q; k; v], ``linear1``, ``linear2``, ``norm1``, ``norm2``), which is the original scGPT layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.checkpoint import checkpoint

from scgpt.model.attention import AttentionBackend, PackedPlan
from scgpt.model.layout import TokenLayout


class SelfAttention(nn.Module):
    """Fused q/k/v projection, a pluggable attention backend, output projection."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project(self, x: Tensor) -> Tensor:
        """(..., D) -> q/k/v (..., 3, H, Dh)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.n_heads, -1))

    def attend(self, qkv: Tensor, layout: TokenLayout, gen_mask: Tensor | None, backend: AttentionBackend,
               plan: PackedPlan | None = None) -> Tensor:
        """q/k/v (..., 3, H, Dh) -> attention output (..., D), before the output projection."""
        if layout.is_packed:
            q, k, v = qkv.unbind(dim=-3)  # (T, H, Dh)
            out = backend.packed_layout(q, k, v, plan or backend.plan_layout(layout, gen_mask))
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (B, H, L, Dh)
            out = backend.padded(q, k, v, layout.padding_mask, gen_mask).transpose(1, 2)  # (B, L, H, Dh)
        return out.flatten(-2)  # (..., D)

    def forward(self, x: Tensor, layout: TokenLayout, gen_mask: Tensor | None, backend: AttentionBackend,
                plan: PackedPlan | None = None) -> Tensor:
        return self.out_proj(self.attend(self.project(x), layout, gen_mask, backend, plan))  # (..., D)


class EncoderLayer(nn.Module):
    """Self-attention + ReLU FFN of width ``d_hid``, post-norm (scGPT) or pre-norm.

    A layer runs as three steps: ``_before_attention`` (pre-norm LayerNorm and the q/k/v projection), the
    attention kernels, and ``_after_attention`` (output projection, residuals, norms, FFN). The first and
    last hold only per-token work; they are what ``TransformerEncoder.compile_token_ops`` compiles.
    """

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float, norm_scheme: str, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = norm_scheme == "pre"

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def _before_attention(self, x: Tensor) -> Tensor:
        """(..., D) -> q/k/v (..., 3, H, Dh)."""
        return self.self_attn.project(self.norm1(x) if self.pre_norm else x)

    def _after_attention(self, x: Tensor, heads: Tensor) -> Tensor:
        """Output projection of the attention ``heads`` (..., D), residuals, norms and FFN."""
        attn = self.self_attn.out_proj(heads)  # (..., D)
        if self.pre_norm:
            x = x + self.dropout1(attn)
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self.dropout1(attn))
        return self.norm2(x + self._ffn(x))

    def forward(self, x: Tensor, layout: TokenLayout, gen_mask: Tensor | None, backend: AttentionBackend,
                plan: PackedPlan | None = None) -> Tensor:
        heads = self.self_attn.attend(self._before_attention(x), layout, gen_mask, backend, plan)  # (..., D)
        return self._after_attention(x, heads)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; pre-norm stacks end with a final LayerNorm.

    Packed input: the attention plan (cell lengths, masks, index tensors) is built once per forward
    and shared by every layer. ``activation_checkpointing`` recomputes each layer in backward instead
    of keeping its activations (less memory, about one more forward of compute); it is set by the
    training task, not stored in the model config, and applies in training mode only. Dropout noise in
    the recomputation is replayed (torch saves and restores the RNG state), so gradients are the same.
    """

    def __init__(self, cfg, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
        self.activation_checkpointing = False
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_hid, cfg.dropout, cfg.norm_scheme, cfg.layer_norm_eps)
            for _ in range(cfg.n_layers)
        )
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_scheme == "pre" else None

    def compile_token_ops(self) -> None:
        """``torch.compile`` each layer's per-token blocks (projections, residuals, norms, dropout, FFN) with
        a dynamic token count, and the varlen backends' elementwise mixing of generated tokens. Attention kernels stay
        eager: sdpa's per-cell loop over varying lengths would make the compiler break the graph and
        recompile for each new length. Parameter names do not change."""
        for layer in self.layers:
            layer._before_attention = torch.compile(layer._before_attention, dynamic=True)
            layer._after_attention = torch.compile(layer._after_attention, dynamic=True)
        if hasattr(self.backend, "compile_elementwise"):  # varlen backends: the generated tokens' mixing
            self.backend.compile_elementwise()

    def forward(self, x: Tensor, layout: TokenLayout, gen_mask: Tensor | None = None) -> Tensor:
        plan = self.backend.plan_layout(layout, gen_mask) if layout.is_packed else None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, layout, gen_mask, self.backend, plan, use_reentrant=False)
            else:
                x = layer(x, layout, gen_mask, self.backend, plan)
        return x if self.final_norm is None else self.final_norm(x)
