"""FLOP accounting for the scGPT model from the real (non-pad) tokens of a batch, and MFU.

Model FLOPs, the usual convention for MFU: every matrix multiply counts ``2 * m * n * k``; a training
step is forward + backward = 3 x the forward (backward computes gradients for inputs and weights).
What a kernel recomputes (flash attention's backward, activation checkpointing) is not counted, and
neither is work on padding: a padded batch and the same cells packed have the same model FLOPs, so the
figure compares layouts fairly. Elementwise work (norms, activations, dropout, softmax) is not counted.

Per real token, forward:
- value encoder (continuous): ``Linear(1, d)`` 2d, ``Linear(d, d)`` 2d^2;
- each encoder layer: q/k/v 6d^2, output projection 2d^2, FFN 4 d d_hid;
- expression decoder ``Linear(d_in, d), Linear(d, d), Linear(d, 1)``: 2 d_in d + 2d^2 + 2d (twice with
  explicit zero probability); d_in is d, or 2d with a batch embedding;
- MVC: ``gene2query`` 2d^2, ``W`` 2 d d_cell, the inner product with the cell embedding 2 d_cell (twice
  the last two with explicit zero probability).
Per cell of l real tokens (``<cls>`` included), forward: attention scores QK^T and the weighted sum of
V, 4 d per (query, key) pair per layer. Two figures count the pairs differently:
- model FLOPs (``attention``, ``forward``, ``training_step``): the dense l x l block of the cell, l^2 pairs,
  the generative mask not subtracted. The usual MFU convention; the run summary's ``tflops_per_device``
  and ``mfu`` report this figure.
- work done (``attention_work_done``, ``forward_work_done``, ``training_step_work_done``): only the pairs
  the generative mask lets attend. A cell with k known and g generated tokens (k + g = l): known x known
  k^2, each generated query x (the known keys + itself) g (k + 1), so k^2 + g (k + 1) pairs; a cell
  without generated tokens l^2. What a kernel computes beyond these (a dense masked block, padding) is
  waste, not work. The summary's ``tflops_per_device_work_done`` and ``mfu_work_done`` report it.
Per cell: classifier and batch-discriminator MLPs when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from scgpt.config import ModelConfig

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)

# Dense bf16 tensor-core peaks, TFLOP/s per GPU, from the vendors' data sheets (without sparsity).
# Matched by substring of ``torch.cuda.get_device_name()``, first match wins; override with a number.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one batch, split into the per-token matmuls, attention and per-cell heads.
    ``attention`` counts every cell's dense l x l block (model FLOPs); ``attention_work_done`` only the
    pairs the generative mask computes (equal without generated tokens)."""

    token_matmuls: float
    attention: float
    cell_heads: float
    attention_work_done: float | None = None  # None: same as ``attention``

    @property
    def forward(self) -> float:
        return self.token_matmuls + self.attention + self.cell_heads

    @property
    def training_step(self) -> float:
        return TRAIN_MULTIPLIER * self.forward

    @property
    def forward_work_done(self) -> float:
        attention = self.attention if self.attention_work_done is None else self.attention_work_done
        return self.token_matmuls + attention + self.cell_heads

    @property
    def training_step_work_done(self) -> float:
        return TRAIN_MULTIPLIER * self.forward_work_done


def token_matmul_flops(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs of one real token (embeddings, every encoder layer, decoders)."""
    d, d_hid = cfg.d_model, cfg.d_hid
    d_in = 2 * d if cfg.n_batch_labels else d  # decoder input: token state (+ batch embedding)
    value = 2 * d + 2 * d * d if cfg.value_encoding == "continuous" else 0
    layers = cfg.n_layers * (8 * d * d + 4 * d * d_hid)
    expression = (2 * d_in * d + 2 * d * d + 2 * d) * (2 if cfg.explicit_zero_prob else 1)
    mvc = 0
    if cfg.mvc_decoder:
        mvc = 2 * d * d + (2 * d * d_in + 2 * d_in) * (2 if cfg.explicit_zero_prob else 1)
    return float(value + layers + expression + mvc)


def cell_head_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per cell of the per-cell heads (classifier, batch discriminator)."""
    d, total = cfg.d_model, 0
    if cfg.n_cls_classes:
        total += (cfg.n_layers_cls - 1) * 2 * d * d + 2 * d * cfg.n_cls_classes
    if cfg.batch_discriminator:
        total += 2 * 2 * d * d + 2 * d * cfg.n_batch_labels  # BatchDiscriminator: 3 layers by default
    return float(total)


def attended_pairs(lengths: torch.Tensor, generated: torch.Tensor | None) -> float:
    """(query, key) pairs the generative mask computes: k^2 + g (k + 1) per cell of k known and g
    generated tokens (l^2 without ``generated``). lengths, generated: (B,) tokens per cell."""
    if generated is None:
        return float((lengths ** 2).sum())
    known = lengths - generated  # (B,)
    return float((known ** 2 + generated * (known + 1)).sum())


def generated_per_cell(gen_mask: torch.Tensor | None, layout=None) -> torch.Tensor | None:
    """Generated tokens of each cell (B,) from a padded (B, L) ``gen_mask``, or a packed (T,) one with its
    :class:`~scgpt.model.layout.TokenLayout` (any packed order); None without a mask."""
    if gen_mask is None:
        return None
    if layout is None or not layout.is_packed:
        return gen_mask.sum(dim=1).cpu()
    return torch.bincount(layout.seq_ids[gen_mask], minlength=layout.n_cells).cpu()  # (B,)


def count_flops(cfg: ModelConfig, lengths: Sequence[int] | torch.Tensor,
                generated: Sequence[int] | torch.Tensor | None = None) -> FlopCount:
    """FLOPs of one batch whose cells have ``lengths`` real tokens each (``<cls>`` included), of which
    ``generated`` (per cell, optional) are generated under the generative mask."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten().cpu()
    tokens, per_pair = float(lengths.sum()), cfg.n_layers * 4 * cfg.d_model
    work_done = None
    if generated is not None:
        generated = torch.as_tensor(generated, dtype=torch.float64).flatten().cpu()
        work_done = per_pair * attended_pairs(lengths, generated)
    return FlopCount(token_matmuls=tokens * token_matmul_flops(cfg),
                     attention=per_pair * attended_pairs(lengths, None),
                     cell_heads=lengths.numel() * cell_head_flops(cfg),
                     attention_work_done=work_done)


def peak_tflops(device_name: str | None, precision: str = "bf16",
                table: Iterable[tuple[str, float]] = PEAK_BF16_TFLOPS) -> float | None:
    """Dense peak TFLOP/s of a device for ``precision`` (bf16 only in the table); None when unknown."""
    if not device_name or precision not in ("bf16", "bf16-mixed", "bf16-true", "bfloat16"):
        return None
    for key, value in table:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(flops: float, seconds: float, peak: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``n_devices`` x ``peak`` TFLOP/s."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * n_devices)
