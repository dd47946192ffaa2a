"""Attention backends behind one interface, each honouring key padding and the generative mask.

scGPT's generative mask: a token whose value is to be generated (``gen_mask`` True) attends to the
known tokens and to itself only; known tokens attend among known tokens. Without ``gen_mask`` every
token attends to every real token of its cell.

Backends:
- ``reference``: plain softmax(QK^T / sqrt(d)) V, the ground truth used by tests.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (the default).
- ``flash_attn``: flash-attn 2 varlen kernels on unpadded tokens (CUDA only). The generative mask is
  not a shape flash-attn supports directly, so it is computed exactly from two varlen calls and the
  log-sum-exp of each (see :func:`generative_varlen_attention`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scgpt.errors import ConfigError

# kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k) -> (out (Tq, H, Dh), lse (Tq, H))
VarlenKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor]]


def allowed_keys(padding_mask: Tensor | None, gen_mask: Tensor | None, length: int, device) -> Tensor | None:
    """Boolean mask (B, 1, L, L) of the keys each query may attend to; None when all may."""
    allowed = None
    if padding_mask is not None:
        allowed = ~padding_mask[:, None, None, :]  # (B, 1, 1, L)
    if gen_mask is not None:
        itself = torch.eye(length, dtype=torch.bool, device=device)  # (L, L)
        generative = (~gen_mask[:, None, None, :]) | itself  # (B, 1, L, L)
        allowed = generative if allowed is None else allowed & generative
    return allowed


def _segments(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


class AttentionBackend:
    """One way of computing multi-head attention, for padded and for packed tokens."""

    name = "base"

    def padded(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None,
               gen_mask: Tensor | None) -> Tensor:
        """q, k, v: (B, H, L, Dh); padding_mask, gen_mask: (B, L) bool -> (B, H, L, Dh)."""
        raise NotImplementedError

    def packed(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
               gen_mask: Tensor | None) -> Tensor:
        """q, k, v: (T, H, Dh); cu_seqlens (B + 1,); gen_mask (T,) bool -> (T, H, Dh).

        The default runs :meth:`padded` on each cell on its own: no padding, no cross-cell work.
        """
        out = torch.empty_like(q)
        for start, end in _segments(cu_seqlens):
            seg = slice(start, end)
            seg_gen = None if gen_mask is None else gen_mask[None, seg]  # (1, l)
            qs, ks, vs = (t[seg].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, l, Dh)
            out[seg] = self.padded(qs, ks, vs, None, seg_gen)[0].transpose(0, 1)
        return out


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def padded(self, q, k, v, padding_mask, gen_mask):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        allowed = allowed_keys(padding_mask, gen_mask, q.shape[-2], q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class SdpaAttention(AttentionBackend):
    name = "sdpa"

    def padded(self, q, k, v, padding_mask, gen_mask):
        allowed = allowed_keys(padding_mask, gen_mask, q.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """A plain-torch stand-in for flash-attn's varlen kernel that also returns the log-sum-exp."""
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:2], float("-inf"), dtype=torch.float32)  # (Tq, H)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for (qs, qe), (ks, ke) in zip(_segments(cu_q), _segments(cu_k)):
        if qe == qs or ke == ks:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k[ks:ke].float()) * scale  # (H, lq, lk)
        lse[qs:qe] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        probs = torch.softmax(scores, dim=-1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", probs, v[ks:ke].float()).to(q.dtype)
    return out, lse


def flash_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn 2 ``flash_attn_varlen_func`` returning (out (Tq, H, Dh), lse (Tq, H))."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                         return_attn_probs=True)
    if lse.dim() != 2:  # flash-attn < 2.4 returned (B, H, max_q) here
        raise RuntimeError("flash-attn >= 2.4 is required (varlen softmax_lse of shape (H, T))")
    return out, lse.transpose(0, 1).float()


def _cumulative(counts: Tensor) -> Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = counts.cumsum(0)
    return cu


def generative_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, gen_mask: Tensor,
                                kernel: VarlenKernel) -> Tensor:
    """Exact generative-mask attention from two varlen calls on packed tokens.

    Known queries attend to the known keys of their cell. A generated query attends to the known keys
    (one varlen cross-attention returning its log-sum-exp ``lse``) and to its own key (score ``s``);
    softmax over the union is the lse-weighted mix ``(e^lse * out_known + e^s * v_self) / (e^lse + e^s)``.
    Packed tokens are contiguous per cell, so selecting known or generated tokens keeps cells grouped.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)  # (T,)
    known = ~gen_mask
    n_known = torch.zeros_like(lengths).index_add_(0, seq_ids, known.long())  # (B,)
    cu_known, cu_gen = _cumulative(n_known), _cumulative(lengths - n_known)
    max_known, max_gen = int(n_known.max()), int((lengths - n_known).max())
    qk, kk, vk = q[known], k[known], v[known]  # (Tk, H, Dh)
    out = torch.empty_like(q)
    out[known] = kernel(qk, kk, vk, cu_known, cu_known, max_known, max_known)[0]
    if max_gen == 0:
        return out
    qg, kg, vg = q[gen_mask], k[gen_mask], v[gen_mask]  # (Tg, H, Dh)
    cross, lse = kernel(qg, kk, vk, cu_gen, cu_known, max_gen, max_known)  # (Tg, H, Dh), (Tg, H)
    self_score = (qg.float() * kg.float()).sum(-1) / math.sqrt(q.shape[-1])  # (Tg, H)
    top = torch.maximum(lse, self_score)
    w_cross, w_self = torch.exp(lse - top)[..., None], torch.exp(self_score - top)[..., None]
    out[gen_mask] = ((w_cross * cross.float() + w_self * vg.float()) / (w_cross + w_self)).to(q.dtype)
    return out


class VarlenAttention(AttentionBackend):
    """Unpadded attention from a varlen kernel; padded input is unpadded, attended and re-padded."""

    def __init__(self, kernel: VarlenKernel, name: str) -> None:
        self.kernel = kernel
        self.name = name

    def packed(self, q, k, v, cu_seqlens, max_seqlen, gen_mask):
        if gen_mask is None or not bool(gen_mask.any()):
            return self.kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)[0]
        return generative_varlen_attention(q, k, v, cu_seqlens, gen_mask, self.kernel)

    def padded(self, q, k, v, padding_mask, gen_mask):
        batch, heads, length, _ = q.shape
        real = torch.ones(batch, length, dtype=torch.bool, device=q.device) if padding_mask is None else ~padding_mask
        lengths = real.sum(dim=1)
        flat = [t.transpose(1, 2)[real] for t in (q, k, v)]  # (T, H, Dh)
        flat_gen = None if gen_mask is None else gen_mask[real]
        packed = self.packed(*flat, _cumulative(lengths), int(lengths.max()), flat_gen)
        out = q.new_zeros(batch, length, heads, q.shape[-1])
        out[real] = packed
        return out.transpose(1, 2)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_attention_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; refuses flash_attn where it cannot run."""
    if name == "reference":
        return ReferenceAttention()
    if name == "sdpa":
        return SdpaAttention()
    if name == "flash_attn":
        if not flash_attn_available():
            raise ConfigError("model.attention_backend: flash_attn needs CUDA and the flash-attn package "
                              "(pip install 'scgpt[gpu]'); use model.attention_backend=sdpa on this machine")
        return VarlenAttention(flash_varlen_kernel, "flash_attn")
    raise ConfigError(f"model.attention_backend: unknown backend {name!r}; choose sdpa, reference or flash_attn")
