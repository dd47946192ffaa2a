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
V, 4 l^2 d per layer (the dense l x l block of the cell: what a per-cell or padded kernel computes; the
generative mask is not subtracted). Per cell: classifier and batch-discriminator MLPs when present.
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
    """Forward FLOPs of one batch, split into the per-token matmuls, attention and per-cell heads."""

    token_matmuls: float
    attention: float
    cell_heads: float

    @property
    def forward(self) -> float:
        return self.token_matmuls + self.attention + self.cell_heads

    @property
    def training_step(self) -> float:
        return TRAIN_MULTIPLIER * self.forward


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


def count_flops(cfg: ModelConfig, lengths: Sequence[int] | torch.Tensor) -> FlopCount:
    """FLOPs of one batch whose cells have ``lengths`` real tokens each (``<cls>`` included)."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64).flatten().cpu()
    tokens, squares = float(lengths.sum()), float((lengths ** 2).sum())
    return FlopCount(token_matmuls=tokens * token_matmul_flops(cfg),
                     attention=cfg.n_layers * 4 * cfg.d_model * squares,
                     cell_heads=lengths.numel() * cell_head_flops(cfg))


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
