"""Choosing which tokens' values are hidden for expression prediction."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def draw_mask_ratios(n_cells: int, choices: list[float] | tuple[float, ...], generator: torch.Generator) -> Tensor:
    """One ratio per cell, drawn uniformly from ``choices`` -> (B,)."""
    options = torch.tensor(choices, dtype=torch.float32)
    return options[torch.randint(len(options), (n_cells,), generator=generator)]


def mask_rows(maskable: np.ndarray, ratios: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """numpy core of :func:`random_mask`: hide the ``round(ratio * n)`` maskable positions of each row
    with the smallest ``keys`` (uniform in [0, 1))."""
    keys = np.where(maskable, keys, 2.0)  # (B, L), unmaskable positions never chosen
    n_hide = np.round(ratios * maskable.sum(axis=1)).astype(np.int64)  # (B,)
    ordered = np.sort(keys, axis=1)
    threshold = np.take_along_axis(ordered, np.maximum(n_hide - 1, 0)[:, None], 1)  # (B, 1)
    return (keys <= threshold) & maskable & (n_hide > 0)[:, None]


def random_mask(maskable: Tensor, ratios: Tensor, generator: torch.Generator) -> Tensor:
    """Hide ``round(ratio * n_maskable)`` of each row's maskable positions, chosen uniformly.

    maskable (B, L) bool, ratios (B,) -> hidden (B, L) bool, never True where ``maskable`` is False.
    """
    keys = torch.rand(maskable.shape, generator=generator).numpy()
    return torch.from_numpy(mask_rows(maskable.numpy(), ratios.numpy(), keys))
