"""``model.attention_backend=flex``: PyTorch FlexAttention with a block mask, one call per layer.

Packed cells are one row of T tokens; the mask allows a (query, key) pair when both tokens belong to the
same cell (the document mask) and the key is known or is the query itself (scGPT's generative mask: known
queries then see known keys only, generated queries the known keys and themselves). The block mask
skips the tiles that lie wholly outside every cell, so the work is about sum of l^2, with no log-sum-exp
merge, no permutation gathers and no ``cat``. Padded ``(B, L)`` rows use the same rule per row with
padding keys hidden.

The block mask depends only on the cells' lengths and generated tokens, so it is built once per forward
(in :meth:`FlexAttention.plan_layout`) and shared by every layer; it reads each token's cell, so the
known-first packed layout needs no permutation either. On CUDA the attention call is compiled
(``torch.compile``: FlexAttention's Triton kernel, or its FLASH backend, CuTe DSL from the
flash-attn-4 wheel, with ``flex_flash``). torch's FlexAttention has no backward on CPU, so
:func:`scgpt.model.attention_backends.build_attention_backend` offers it on CUDA only; CPU tests run its eager
(math) path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from scgpt.model.attention import AttentionBackend, PackedPlan
from scgpt.model.layout import TokenLayout


def packed_mask_mod(seq_ids: Tensor, gen_mask: Tensor | None) -> Callable:
    """mask_mod(b, h, q, kv) for packed tokens: same cell, and a known key or the query itself.
    seq_ids: (T,) cell of each token; gen_mask: (T,) bool or None."""
    if gen_mask is None:
        return lambda b, h, q, kv: seq_ids[q] == seq_ids[kv]
    return lambda b, h, q, kv: (seq_ids[q] == seq_ids[kv]) & (~gen_mask[kv] | (q == kv))


def padded_mask_mod(padding_mask: Tensor | None, gen_mask: Tensor | None) -> Callable:
    """mask_mod(b, h, q, kv) for padded rows: a real key that is known or the query itself.
    padding_mask, gen_mask: (B, L) bool or None."""
    def mask_mod(b, h, q, kv):
        allowed = q == q  # all True, in the index tensors' shape
        if padding_mask is not None:
            allowed = allowed & ~padding_mask[b, kv]
        if gen_mask is not None:
            allowed = allowed & (~gen_mask[b, kv] | (q == kv))
        return allowed
    return mask_mod


class FlexAttention(AttentionBackend):
    """Document + generative mask in one FlexAttention call (module doc)."""

    def __init__(self, name: str = "flex", kernel_options: dict | None = None, compiled: bool | None = None) -> None:
        """``compiled``: torch.compile the attention call and the block mask (default: on CUDA only);
        ``kernel_options``: FlexAttention's (``{"BACKEND": "FLASH"}`` for ``flex_flash``)."""
        self.name = name
        self.kernel_options = kernel_options
        self.compiled = compiled
        self._compiled_flex: Callable | None = None

    def _use_compile(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.compiled is None else self.compiled

    def _flex(self, device: torch.device) -> Callable:
        from torch.nn.attention.flex_attention import flex_attention

        if not self._use_compile(device):
            return flex_attention
        if self._compiled_flex is None:
            self._compiled_flex = torch.compile(flex_attention, dynamic=True)  # T changes every batch
        return self._compiled_flex

    def _block_mask(self, mask_mod: Callable, batch: int | None, length: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        # compiled: evaluated tile by tile, never as a dense (T, T) mask
        return create_block_mask(mask_mod, batch, None, length, length, device=device,
                                 _compile=self._use_compile(device))

    def _call(self, q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
        """q, k, v: (B, H, L, Dh) -> (B, H, L, Dh)."""
        options = {"kernel_options": self.kernel_options} if self.kernel_options else {}
        return self._flex(q.device)(q, k, v, block_mask=block_mask, **options)

    def plan(self, cu_seqlens: Tensor, max_seqlen: int, gen_mask: Tensor | None) -> PackedPlan:
        return self.plan_layout(TokenLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen), gen_mask)

    def plan_layout(self, layout: TokenLayout, gen_mask: Tensor | None) -> PackedPlan:
        """The block mask from each token's cell (``layout.seq_ids``): any packed order, no permutation."""
        plan = PackedPlan(layout.cell_offsets, layout.max_seqlen, gen_mask)
        plan.cache["block_mask"] = self._block_mask(packed_mask_mod(layout.seq_ids, plan.gen_mask), None,
                                                    layout.n_tokens, layout.device)
        return plan

    def packed(self, q, k, v, cu_seqlens, max_seqlen, gen_mask, plan=None):
        """q, k, v: (T, H, Dh) -> (T, H, Dh): the whole batch as one row under the block mask."""
        plan = plan or self.plan(cu_seqlens, max_seqlen, gen_mask)
        rows = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, T, Dh)
        return self._call(*rows, plan.cache["block_mask"])[0].transpose(0, 1)

    def padded(self, q, k, v, padding_mask, gen_mask):
        """q, k, v: (B, H, L, Dh); padding_mask, gen_mask: (B, L) bool -> (B, H, L, Dh)."""
        mask_mod = padded_mask_mod(padding_mask, gen_mask)
        return self._call(q, k, v, self._block_mask(mask_mod, q.shape[0], q.shape[-2], q.device))

    def attend(self, q, k, v, allowed):
        raise NotImplementedError("FlexAttention takes padding and generative masks, not a dense mask")
