"""Attention backends behind one interface, each honouring key padding and the generative mask.

scGPT's generative mask: a token whose value is to be generated (``gen_mask`` True) attends to the
known tokens and to itself only; known tokens attend among known tokens. Without ``gen_mask`` every
token attends to every real token of its cell.

Backends:
- ``reference``: plain softmax(QK^T / sqrt(d)) V, the ground truth used by tests.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (the default).
- ``flash_attn``: FlashAttention varlen kernels on unpadded tokens (CUDA only): the flash-attn package's
  ``flash_attn_varlen_func`` when it is installed, else PyTorch's own FlashAttention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10), so a GPU without a flash-attn build still
  runs unpadded. The backend's ``name`` says which kernel ran. The generative mask is not a shape these
  kernels support directly, so it is computed exactly from varlen calls and the log-sum-exp of the
  cross-attention (see :func:`generative_varlen_attention`).
- ``flash_attn4``: the same varlen path on FlashAttention-4 (the flash-attn-4 wheel, CuTe DSL compiled at
  run time, no nvcc), switched on process-wide with ``activate_flash_attention_impl("FA4")``; Hopper and
  Blackwell GPUs.
- ``cudnn``: the same varlen path on cuDNN's attention with ragged offsets (varlen_kernels.py).
- ``flex`` / ``flex_flash``: FlexAttention with a block mask (document + generative mask) in one call per
  layer, compiled; ``flex_flash`` asks for its FLASH (FlashAttention-4) backend (flex_attention.py).
  These four run on CUDA only; elsewhere choosing one is a one-line error naming the key and the fix.

Which backend a name means, and whether it can run here, is attention_backends.py
(:func:`~scgpt.model.attention_backends.build_attention_backend`).

Packed (unpadded) tokens: everything that depends only on the cells' lengths and the generative mask
(per-cell masks, length groups, index tensors, host-side lengths) is computed once per forward in a
:class:`PackedPlan` and shared by every layer. ``reference`` and ``sdpa`` attend each cell on its own
(optionally groups of cells of similar length, padded to the longest: ``group_tolerance``), so no work
crosses cells. Sequence packing in the flash-attn sense (all cells of a batch in one row, block-diagonal
attention) is exactly the packed layout with ``cu_seqlens``; a dense block-diagonal mask over one row
would cost (sum of l)^2 attention work instead of sum of l^2, so no backend builds one.

Known-first packed tokens (``data.layout=packed_known_first``, layout.py): the varlen path reads the known
and generated parts as slices (no permutation); ``reference`` and ``sdpa`` bring each cell's tokens
together with one gather per layer (index computed once per forward in the plan) and attend as above;
``flex`` builds its block mask from the tokens' cell ids, which works in any order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scgpt.model.layout import TokenLayout, cumulative
from scgpt.model.varlen_kernels import flash_varlen_kernel, torch_flash_varlen_kernel, torch_varlen_kernel

__all__ = ["AttentionBackend", "PackedPlan", "ReferenceAttention", "SdpaAttention", "VarlenAttention",
           "torch_varlen_kernel", "flash_varlen_kernel", "torch_flash_varlen_kernel"]

# kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k) -> (out (Tq, H, Dh), lse (Tq, H))
VarlenKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor]]

# ``reference`` / ``sdpa`` on packed cells: a group of cells may cost at most this much more attention
# work than its cells attended one by one; < 0: every cell alone. Alone was fastest on CPU (BENCHMARKS.md:
# tolerance 0.05 / 0.15 / 0.3 / 1.0 were 5-30% slower per step on the tiny shape); where per-call overhead
# dominates (a GPU without flash-attn, many short cells) a tolerance near 0.15 may pay: measure it there.
DEFAULT_GROUP_TOLERANCE = -1.0


def allowed_keys(padding_mask: Tensor | None, gen_mask: Tensor | None, length: int, device) -> Tensor | None:
    """Boolean mask (B, 1, L, L) of the keys each query may attend to ((B, 1, 1, L) without
    ``gen_mask``); None when all may."""
    allowed = None
    if padding_mask is not None:
        allowed = ~padding_mask[:, None, None, :]  # (B, 1, 1, L)
    if gen_mask is not None:
        itself = torch.eye(length, dtype=torch.bool, device=device)  # (L, L)
        generative = (~gen_mask[:, None, None, :]) | itself  # (B, 1, L, L)
        allowed = generative if allowed is None else allowed & generative
    return allowed


def length_groups(lengths: list[int], tolerance: float) -> list[list[int]]:
    """Cells (indices) grouped by similar length, longest first. A group padded to its longest cell
    costs at most ``(1 + tolerance)`` x the attention work (sum of l^2) of its cells one by one;
    ``tolerance < 0`` keeps every cell alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and tolerance >= 0:
            group = groups[-1]
            longest = lengths[group[0]]
            exact = sum(lengths[j] ** 2 for j in group) + lengths[i] ** 2
            if (len(group) + 1) * longest ** 2 <= (1.0 + tolerance) * exact:
                group.append(i)
                continue
        groups.append([i])
    return groups


class PackedPlan:
    """Per-forward facts about packed cells that every layer reuses (built by ``backend.plan`` or
    ``backend.plan_layout``), about the cells with their tokens together (``cu_seqlens``).

    ``lengths`` are host-side ints (one device sync per forward, not per layer). ``order`` (T,), when set,
    brings the layout's tokens into that cells-together order (``restore`` takes them back): known-first
    layouts on backends that attend cell by cell. Backends add their own cached tensors lazily in ``cache``.
    """

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, gen_mask: Tensor | None) -> None:
        self.cu_seqlens = cu_seqlens  # (B + 1,) int32
        self.max_seqlen = max_seqlen
        self.gen_mask = gen_mask if gen_mask is not None and bool(gen_mask.any()) else None  # (T,) bool
        self.order: Tensor | None = None  # (T,) layout position of each cells-together token
        self.restore: Tensor | None = None  # (T,) its inverse
        self.cache: dict[str, object] = {}

    @functools.cached_property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @functools.cached_property
    def starts(self) -> list[int]:
        return self.cu_seqlens[:-1].tolist()


def inverse_permutation(order: Tensor) -> Tensor:
    """(T,) permutation -> (T,) its inverse."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class CellGroups:
    """How ``reference`` and ``sdpa`` attend packed cells: cells alone (a view of their tokens), or a few
    cells of similar length gathered into one padded batch with one index over all such groups."""

    def __init__(self, plan: PackedPlan, tolerance: float) -> None:
        device, gen = plan.cu_seqlens.device, plan.gen_mask
        self.singles: list[tuple[int, Tensor | None]] = []  # (cell, allowed (1, 1, l, l) or None)
        self.groups: list[tuple[list[int], list[int], Tensor | None]] = []  # (cells, lengths, allowed)
        indices = []
        for cells in length_groups(plan.lengths, tolerance):
            lengths = [plan.lengths[i] for i in cells]
            if len(cells) == 1:
                start, length = plan.starts[cells[0]], lengths[0]
                cell_gen = None if gen is None else gen[start:start + length]
                use_gen = cell_gen is not None and bool(cell_gen.any())
                self.singles.append((cells[0], allowed_keys(None, cell_gen[None], length, device) if use_gen else None))
                continue
            longest = lengths[0]
            starts = torch.tensor([plan.starts[i] for i in cells], device=device)  # (g,)
            offset = torch.arange(longest, device=device)  # (m,)
            padding = offset[None, :] >= torch.tensor(lengths, device=device)[:, None]  # (g, m)
            index = (starts[:, None] + offset[None, :].masked_fill(padding, 0)).flatten()  # (g * m,) any real token at padding
            group_gen = None if gen is None else gen[index].view(len(cells), longest) & ~padding
            if group_gen is not None and not bool(group_gen.any()):
                group_gen = None
            self.groups.append((cells, lengths, allowed_keys(padding, group_gen, longest, device)))
            indices.append(index)
        self.index = torch.cat(indices) if indices else None  # (sum g * m,) tokens of every group, padded
        self.sizes = [len(cells) * lengths[0] for cells, lengths, _ in self.groups]


class AttentionBackend:
    """One way of computing multi-head attention, for padded and for packed tokens."""

    name = "base"
    group_tolerance = DEFAULT_GROUP_TOLERANCE

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """q, k, v: (B, H, L, Dh); allowed: bool, broadcastable to (B, H, L, L), or None -> (B, H, L, Dh)."""
        raise NotImplementedError

    def padded(self, q: Tensor, k: Tensor, v: Tensor, padding_mask: Tensor | None,
               gen_mask: Tensor | None) -> Tensor:
        """q, k, v: (B, H, L, Dh); padding_mask, gen_mask: (B, L) bool -> (B, H, L, Dh)."""
        return self.attend(q, k, v, allowed_keys(padding_mask, gen_mask, q.shape[-2], q.device))

    def plan(self, cu_seqlens: Tensor, max_seqlen: int, gen_mask: Tensor | None) -> PackedPlan:
        """What :meth:`packed` needs about the cells, computed once per forward for every layer."""
        return PackedPlan(cu_seqlens, max_seqlen, gen_mask)

    def plan_layout(self, layout: TokenLayout, gen_mask: Tensor | None) -> PackedPlan:
        """The plan for any packed layout (gen_mask (T,) in the layout's order). Known-first tokens are
        attended with each cell's tokens together: the plan carries that permutation."""
        order = layout.cell_order  # (T,) or None
        if order is not None and gen_mask is not None:
            gen_mask = gen_mask[order]
        plan = self.plan(layout.cell_offsets, layout.max_seqlen, gen_mask)
        if order is not None:
            plan.order, plan.restore = order, inverse_permutation(order)
        return plan

    def packed_layout(self, q: Tensor, k: Tensor, v: Tensor, plan: PackedPlan) -> Tensor:
        """q, k, v: (T, H, Dh) in the layout the plan was made for -> (T, H, Dh)."""
        if plan.order is None:
            return self.packed(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.gen_mask, plan)
        q, k, v = (permute_tokens(t, plan.order, plan.restore) for t in (q, k, v))  # cells together
        out = self.packed(q, k, v, plan.cu_seqlens, plan.max_seqlen, plan.gen_mask, plan)
        return permute_tokens(out, plan.restore, plan.order)

    def packed(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
               gen_mask: Tensor | None, plan: PackedPlan | None = None) -> Tensor:
        """q, k, v: (T, H, Dh); cu_seqlens (B + 1,); gen_mask (T,) bool -> (T, H, Dh).

        No work crosses cells. A cell attends alone on a view of its tokens, or with cells of similar
        length padded to the longest of their group (``group_tolerance``); tensors are split once and
        the result concatenated once, so backward does O(T) work per layer, not O(cells x T).
        """
        plan = plan or self.plan(cu_seqlens, max_seqlen, gen_mask)
        cells = plan.cache.get("cell_groups")
        if cells is None:
            cells = plan.cache["cell_groups"] = CellGroups(plan, self.group_tolerance)
        pieces: list[Tensor | None] = [None] * len(plan.lengths)
        if cells.singles:
            q_cells, k_cells, v_cells = (t.split(plan.lengths) for t in (q, k, v))  # views (l, H, Dh)
            for cell, allowed in cells.singles:
                qs, ks, vs = (t[cell].transpose(0, 1)[None] for t in (q_cells, k_cells, v_cells))  # (1, H, l, Dh)
                pieces[cell] = self.attend(qs, ks, vs, allowed)[0].transpose(0, 1)
        if cells.groups:
            gathered = (t.index_select(0, cells.index).split(cells.sizes) for t in (q, k, v))
            for (group, lengths, allowed), qg, kg, vg in zip(cells.groups, *gathered):
                qg, kg, vg = (t.view(len(group), lengths[0], *t.shape[1:]).transpose(1, 2) for t in (qg, kg, vg))
                out = self.attend(qg, kg, vg, allowed).transpose(1, 2).unbind(0)  # g x (m, H, Dh)
                for cell, length, cell_out in zip(group, lengths, out):
                    pieces[cell] = cell_out[:length]
        return torch.cat(pieces)  # (T, H, Dh)


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def attend(self, q, k, v, allowed):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class SdpaAttention(AttentionBackend):
    name = "sdpa"

    def attend(self, q, k, v, allowed):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def lse_gradient_keys(q: Tensor, k: Tensor, kernel: VarlenKernel, cu_q: Tensor, cu_k: Tensor, max_q: int,
                      max_k: int) -> Tensor | None:
    """The attention-weighted mean key of each query (Tq, H, Dh), which carries the log-sum-exp's gradient
    (see :func:`mix_generated`); None when no gradient is needed."""
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad):
        return None
    return kernel(q.detach(), k.detach(), k, cu_q, cu_k, max_q, max_k)[0]


def differentiable_lse(lse: Tensor, q: Tensor, mean_key: Tensor | None) -> Tensor:
    """``lse``'s value with its exact gradient, which FlashAttention kernels' backward passes drop.

    With p_ij the attention probabilities, d lse_i / d q_i = scale * sum_j p_ij k_j (the attention output
    with the keys as values, ``mean_key`` from :func:`lse_gradient_keys`) and d lse_i / d k_j =
    scale * p_ij q_i (what reaches the values of that call when q and the scoring keys are held fixed).
    Two zero-valued terms carry these gradients.
    """
    if mean_key is None:  # no gradient needed, or the kernel's lse carries its own
        return lse
    scale = 1.0 / math.sqrt(q.shape[-1])
    mean_key = mean_key.float()  # (Tq, H, Dh)
    via_q = scale * (q.float() * mean_key.detach()).sum(-1)  # (Tq, H)
    via_k = scale * (q.detach().float() * mean_key).sum(-1)  # (Tq, H)
    return lse.detach() + (via_q - via_q.detach()) + (via_k - via_k.detach())


def mix_generated(cross: Tensor, lse: Tensor, mean_key: Tensor | None, qg: Tensor, kg: Tensor, vg: Tensor) -> Tensor:
    """Generated queries' output (Tg, H, Dh): the cross-attention to the known keys (``cross``, its
    log-sum-exp ``lse`` (Tg, H)) mixed with each query's own value by softmax weights. Elementwise only,
    so ``torch.compile`` fuses it into a few kernels (:meth:`VarlenAttention.compile_elementwise`)."""
    lse = differentiable_lse(lse, qg, mean_key)  # (Tg, H)
    self_score = (qg.float() * kg.float()).sum(-1) / math.sqrt(qg.shape[-1])  # (Tg, H)
    top = torch.maximum(lse, self_score)
    w_cross, w_self = torch.exp(lse - top)[..., None], torch.exp(self_score - top)[..., None]
    return ((w_cross * cross.float() + w_self * vg.float()) / (w_cross + w_self)).to(qg.dtype)


class _Permute(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``, with the backward as the inverse gather ``grad[inverse]``
    (``index_select``'s backward is an atomic ``index_add_``, slow on GPUs in bf16)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_tokens(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """(T, ...) tokens reordered by the permutation ``order`` (``inverse`` undoes it)."""
    return _Permute.apply(x, order, inverse)


@dataclass
class GenerativeSplit:
    """Known and generated tokens of packed cells: their offsets per cell (no host syncs later) and, unless
    the tokens are already known-first, the permutation that makes them so.

    ``order`` puts every known token first (cells stay grouped and in order), then every generated one;
    ``restore`` is its inverse. Both are None on a known-first layout (:meth:`from_layout`).
    """

    cu_known: Tensor  # (B + 1,) int32 offsets of each cell's known tokens among the known ones
    cu_gen: Tensor  # (B + 1,) int32 offsets of each cell's generated tokens among the generated ones
    max_known: int
    max_gen: int
    n_known: int
    order: Tensor | None = None  # (T,)
    restore: Tensor | None = None  # (T,)

    @classmethod
    def from_mask(cls, cu_seqlens: Tensor, gen_mask: Tensor) -> GenerativeSplit:
        """Cells with their tokens together (``cu_seqlens``), generated where ``gen_mask`` (T,)."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=gen_mask.device), lengths)  # (T,)
        known = ~gen_mask
        n_known = torch.zeros_like(lengths).index_add_(0, seq_ids, known.long())  # (B,)
        known_idx = known.nonzero().squeeze(1)  # (Tk,) in cell order: cells stay grouped
        order = torch.cat([known_idx, gen_mask.nonzero().squeeze(1)])  # (T,)
        return cls(cumulative(n_known), cumulative(lengths - n_known), int(n_known.max()),
                   int((lengths - n_known).max()), int(known_idx.numel()), order, inverse_permutation(order))

    @classmethod
    def from_layout(cls, layout: TokenLayout, gen_mask: Tensor | None) -> GenerativeSplit | None:
        """A known-first layout whose generated part is exactly ``gen_mask`` (T,): no permutation needed.
        None otherwise (another layout, no generated tokens, or a mask that differs from the layout's)."""
        if not layout.is_known_first or gen_mask is None or layout.n_known == layout.n_tokens:
            return None
        generated_part = torch.arange(gen_mask.numel(), device=gen_mask.device) >= layout.n_known  # (T,)
        if not torch.equal(gen_mask, generated_part):
            return None
        return cls(layout.cu_known, layout.cu_gen, layout.max_known, layout.max_gen, layout.n_known)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(T, ...) -> known (Tk, ...) and generated (Tg, ...): views when the tokens are known-first."""
        if self.order is not None:
            x = permute_tokens(x, self.order, self.restore)
        known, generated = x.split([self.n_known, x.shape[0] - self.n_known])  # backward: one cat, no zero fills
        return known, generated

    def back(self, x: Tensor) -> Tensor:
        """(T, ...) known-first -> the tokens' own order."""
        return x if self.order is None else permute_tokens(x, self.restore, self.order)


def generative_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, gen_mask: Tensor,
                                kernel: VarlenKernel, split: GenerativeSplit | None = None,
                                mix: Callable[..., Tensor] = mix_generated) -> Tensor:
    """Exact generative-mask attention from two varlen calls on packed tokens.

    Known queries attend to the known keys of their cell. A generated query attends to the known keys
    (one varlen cross-attention returning its log-sum-exp ``lse``) and to its own key (score ``s``);
    softmax over the union is the lse-weighted mix ``(e^lse * out_known + e^s * v_self) / (e^lse + e^s)``.
    The lse's gradient comes from the kernel (``kernel.lse_has_gradient``, see varlen_kernels.py) or else
    from :func:`differentiable_lse` (one more varlen call while training);
    ``mix`` is :func:`mix_generated`, or its compiled form.
    Packed tokens are contiguous per cell, so selecting known or generated tokens keeps cells grouped;
    known-first tokens (``split.order`` None) are sliced, not permuted.
    """
    split = split or GenerativeSplit.from_mask(cu_seqlens, gen_mask)
    if split.max_gen == 0:
        return kernel(q, k, v, cu_seqlens, cu_seqlens, split.max_known, split.max_known)[0]
    (qk, qg), (kk, kg), (vk, vg) = (split.parts(t) for t in (q, k, v))  # (Tk, H, Dh), (Tg, H, Dh)
    out_known = kernel(qk, kk, vk, split.cu_known, split.cu_known, split.max_known, split.max_known)[0]
    cross, lse = kernel(qg, kk, vk, split.cu_gen, split.cu_known, split.max_gen, split.max_known)  # (Tg, H, Dh), (Tg, H)
    mean_key = None if getattr(kernel, "lse_has_gradient", False) else \
        lse_gradient_keys(qg, kk, kernel, split.cu_gen, split.cu_known, split.max_gen, split.max_known)
    out_gen = mix(cross, lse, mean_key, qg, kg, vg)  # (Tg, H, Dh)
    return split.back(torch.cat([out_known, out_gen]))  # (T, H, Dh); the kernels' outputs are new tensors: one cat


class VarlenAttention(AttentionBackend):
    """Unpadded attention from a varlen kernel; padded input is unpadded, attended and re-padded."""

    def __init__(self, kernel: VarlenKernel, name: str) -> None:
        self.kernel = kernel
        self.name = name
        self.mix = mix_generated

    def compile_elementwise(self) -> None:
        """``torch.compile`` the generated tokens' softmax mixing (elementwise float32 work, dynamic sizes)."""
        self.mix = torch.compile(mix_generated, dynamic=True)

    def plan(self, cu_seqlens, max_seqlen, gen_mask):
        plan = PackedPlan(cu_seqlens, max_seqlen, gen_mask)
        if plan.gen_mask is not None:
            plan.cache["split"] = GenerativeSplit.from_mask(cu_seqlens, plan.gen_mask)
        return plan

    def plan_layout(self, layout, gen_mask):
        """Known-first tokens whose generated part is ``gen_mask``: sliced in every layer, never permuted."""
        split = GenerativeSplit.from_layout(layout, gen_mask)
        if split is None:
            return super().plan_layout(layout, gen_mask)
        plan = PackedPlan(layout.cell_offsets, layout.max_seqlen, gen_mask)
        plan.cache["split"] = split
        return plan

    def packed(self, q, k, v, cu_seqlens, max_seqlen, gen_mask, plan=None):
        plan = plan or self.plan(cu_seqlens, max_seqlen, gen_mask)
        if plan.gen_mask is None:
            return self.kernel(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)[0]
        return generative_varlen_attention(q, k, v, cu_seqlens, plan.gen_mask, self.kernel, plan.cache["split"],
                                           self.mix)

    def attend(self, q, k, v, allowed):
        raise NotImplementedError("VarlenAttention takes padding and generative masks, not a dense mask")

    def padded(self, q, k, v, padding_mask, gen_mask):
        batch, heads, length, _ = q.shape
        real = torch.ones(batch, length, dtype=torch.bool, device=q.device) if padding_mask is None else ~padding_mask
        lengths = real.sum(dim=1)
        flat = [t.transpose(1, 2)[real] for t in (q, k, v)]  # (T, H, Dh)
        flat_gen = None if gen_mask is None else gen_mask[real]
        packed = self.packed(*flat, cumulative(lengths), int(lengths.max()), flat_gen)
        out = q.new_zeros(batch, length, heads, q.shape[-1])
        out[real] = packed
        return out.transpose(1, 2)
