"""Varlen attention kernels: ``kernel(q, k, v, cu_q, cu_k, max_q, max_k) -> (out (Tq, H, Dh), lse (Tq, H))``.

- :func:`torch_varlen_kernel`: plain torch, one cell at a time; exact gradients for ``out`` and ``lse``.
- :func:`flash_varlen_kernel`: the flash-attn package; its backward drops ``lse``'s gradient
  (``lse_has_gradient = False``: the caller rebuilds it with one more call, see attention.py).
- :func:`torch_flash_varlen_kernel`: PyTorch's FlashAttention varlen kernel through
  :class:`FlashVarlenWithLse`, whose backward carries ``lse``'s gradient at no extra kernel call. With
  ``activate_flash_attention_impl("FA4")`` the same aten ops run FlashAttention-4 (``flash_attn4``).
- :func:`torch_cudnn_varlen_kernel`: cuDNN attention on ragged tokens through the same autograd function.

How ``FlashVarlenWithLse`` does it: a FlashAttention backward computes dS = P * (dO V^T - D) with
D_i = rowsum(dO_i * O_i) taken from the ``out`` it is given. The gradient of lse_i with respect to the
scores is p_ij, so an upstream gradient g_i on lse_i adds g_i * p_ij to dS: the same as lowering D_i by
g_i. Handing the kernel out'_i = O_i - (g_i / |dO_i|^2) dO_i does exactly that (rowsum(dO_i * out'_i) =
D_i - g_i), per query and head. Where dO_i is zero, g_i is zero as well in the generative mix that uses
the lse (both are proportional to the mix's upstream gradient), so nothing is lost there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# forward(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out (Tq, H, Dh), lse (H, Tq) float32, saved tensors)
# backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, extras) -> (dq, dk, dv)
FlashForward = Callable[..., tuple[Tensor, Tensor, tuple]]
FlashBackward = Callable[..., tuple[Tensor, Tensor, Tensor]]


def torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """A plain-torch stand-in for flash-attn's varlen kernel that also returns the log-sum-exp."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    outs, lses = [], []
    for qs, ks, vs in zip(q.split(lens_q), k.split(lens_k), v.split(lens_k)):
        if qs.shape[0] == 0 or ks.shape[0] == 0:
            outs.append(qs.new_zeros(qs.shape))
            lses.append(qs.new_full(qs.shape[:2], float("-inf"), dtype=torch.float32))
            continue
        scores = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale  # (H, lq, lk)
        lses.append(torch.logsumexp(scores, dim=-1).transpose(0, 1))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vs.float()).to(q.dtype))
    return torch.cat(outs), torch.cat(lses)


torch_varlen_kernel.lse_has_gradient = True


def flash_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn 2 ``flash_attn_varlen_func`` returning (out (Tq, H, Dh), lse (Tq, H))."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                         return_attn_probs=True)
    if lse.dim() != 2:  # flash-attn < 2.4 returned (B, H, max_q) here
        raise RuntimeError("flash-attn >= 2.4 is required (varlen softmax_lse of shape (H, T))")
    return out, lse.transpose(0, 1).float()


flash_varlen_kernel.lse_has_gradient = False


def fold_lse_gradient(out: Tensor, grad_out: Tensor, grad_lse: Tensor | None) -> Tensor:
    """The ``out`` to hand a FlashAttention backward so that it also applies ``grad_lse`` (module doc).

    out, grad_out: (Tq, H, Dh); grad_lse: the kernel's (H, Tq) layout.
    """
    if grad_lse is None:
        return out
    grad_lse = grad_lse.transpose(0, 1).float()  # (Tq, H)
    norm = grad_out.float().square().sum(-1)  # (Tq, H)
    shift = torch.where(norm > 0, grad_lse / norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (out.float() - shift[..., None] * grad_out.float()).to(out.dtype)


class FlashVarlenWithLse(torch.autograd.Function):
    """A FlashAttention varlen call whose backward also carries the log-sum-exp's gradient."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, ops):
        forward_op, backward_op = ops
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse, extras = forward_op(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, *extras)
        ctx.meta = (max_q, max_k, scale, backward_op)
        return out, lse  # (Tq, H, Dh), (H, Tq)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, cu_q, cu_k, out, lse, *extras = ctx.saved_tensors
        max_q, max_k, scale, backward_op = ctx.meta
        grad_out = grad_out.contiguous()
        folded = fold_lse_gradient(out, grad_out, grad_lse).contiguous()
        dq, dk, dv = backward_op(grad_out, q, k, v, folded, lse, cu_q, cu_k, max_q, max_k, scale, tuple(extras))
        return dq, dk, dv, None, None, None, None, None


def flash_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, ops: tuple[FlashForward, FlashBackward]) -> tuple[Tensor, Tensor]:
    """(out (Tq, H, Dh), lse (Tq, H) float32), both differentiable, from one FlashAttention-style op pair."""
    out, lse = FlashVarlenWithLse.apply(q, k, v, cu_q, cu_k, max_q, max_k, ops)
    return out, lse.transpose(0, 1)  # (Tq, H, Dh), (Tq, H)


def _aten_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)
    return out, lse, (rng_state, unused)


def _aten_flash_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, extras):
    rng_state, unused = extras
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, False, rng_state, unused, scale=scale)
    return dq, dk, dv


ATEN_FLASH_OPS = (_aten_flash_forward, _aten_flash_backward)


def torch_flash_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """PyTorch's FlashAttention varlen kernel (fp16/bf16 on CUDA): (out (Tq, H, Dh), lse (Tq, H)), the lse
    with its gradient (:class:`FlashVarlenWithLse`)."""
    return flash_with_lse(q, k, v, cu_q.int(), cu_k.int(), int(max_q), int(max_k), ATEN_FLASH_OPS)


torch_flash_varlen_kernel.lse_has_gradient = True


def _lse_heads_first(lse: Tensor, n_queries: int, heads: int) -> Tensor:
    """A kernel's log-sum-exp as (H, Tq) float32, from (H, Tq), (Tq, H) or (Tq, H, 1)."""
    lse = lse.squeeze(-1) if lse.dim() == 3 else lse
    heads_first = tuple(lse.shape) == (heads, n_queries)
    return (lse if heads_first else lse.transpose(0, 1)).float().contiguous()


def _aten_cudnn_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """cuDNN attention on ragged tokens (``cum_seq_q`` / ``cum_seq_k`` offsets). The raw log-sum-exp goes
    back to its backward as it came; the (H, Tq) copy feeds the generative mix."""
    out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, False, False, scale=scale)
    return out, _lse_heads_first(lse, q.shape[0], q.shape[1]), (lse, seed, offset)


def _aten_cudnn_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, extras):
    raw_lse, seed, offset = extras
    dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
        grad_out, q, k, v, out, raw_lse, seed, offset, torch.empty(0, device=q.device), cu_q, cu_k, max_q, max_k,
        0.0, False, scale=scale)
    return dq, dk, dv


CUDNN_OPS = (_aten_cudnn_forward, _aten_cudnn_backward)


def torch_cudnn_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """cuDNN's attention on ragged tokens (fp16/bf16 on CUDA), lse gradient folded into its backward as
    for :func:`torch_flash_varlen_kernel` (cuDNN's backward also takes ``out`` for D = rowsum(dO * O))."""
    return flash_with_lse(q, k, v, cu_q.int(), cu_k.int(), int(max_q), int(max_k), CUDNN_OPS)


torch_cudnn_varlen_kernel.lse_has_gradient = True


def _reference_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention's forward semantics in plain torch (tests): lse in the kernel's (H, Tq) layout."""
    out, lse = torch_varlen_kernel(q.detach(), k.detach(), v.detach(), cu_q, cu_k, max_q, max_k)
    return out, lse.transpose(0, 1).contiguous(), ()


def _reference_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, extras):
    """FlashAttention's backward semantics in plain torch (tests): D from the ``out`` it is handed."""
    dq, dk, dv = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(k, dtype=torch.float32), \
        torch.zeros_like(v, dtype=torch.float32)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 == q0 or k1 == k0:
            continue
        qs, ks, vs = q[q0:q1].float(), k[k0:k1].float(), v[k0:k1].float()  # (l, H, Dh)
        g, o = grad_out[q0:q1].float(), out[q0:q1].float()
        probs = torch.exp(torch.einsum("qhd,khd->hqk", qs, ks) * scale - lse[:, q0:q1, None])  # (H, lq, lk)
        dv[k0:k1] = torch.einsum("hqk,qhd->khd", probs, g)
        d_probs = torch.einsum("qhd,khd->hqk", g, vs)
        d_scores = probs * (d_probs - (g * o).sum(-1).transpose(0, 1)[..., None])  # (H, lq, lk)
        dq[q0:q1] = scale * torch.einsum("hqk,khd->qhd", d_scores, ks)
        dk[k0:k1] = scale * torch.einsum("hqk,qhd->khd", d_scores, qs)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


REFERENCE_FLASH_OPS = (_reference_forward, _reference_backward)


def reference_flash_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    """:func:`torch_flash_varlen_kernel` with FlashAttention's semantics in plain torch: tests the lse folding
    on a CPU."""
    return flash_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, REFERENCE_FLASH_OPS)


reference_flash_kernel.lse_has_gradient = True
