"""Choosing which tokens' values are hidden for expression prediction."""

from __future__ import annotations

import torch
from torch import Tensor


def draw_mask_ratios(n_cells: int, choices: list[float] | tuple[float, ...], generator: torch.Generator) -> Tensor:
    """One ratio per cell, drawn uniformly from ``choices`` -> (B,)."""
    options = torch.tensor(choices, dtype=torch.float32)
    return options[torch.randint(len(options), (n_cells,), generator=generator)]


def random_mask(maskable: Tensor, ratios: Tensor, generator: torch.Generator) -> Tensor:
    """Hide ``round(ratio * n_maskable)`` of each row's maskable positions, chosen uniformly.

    maskable (B, L) bool, ratios (B,) -> hidden (B, L) bool, never True where ``maskable`` is False.
    """
    keys = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, 2.0)  # (B, L)
    rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each position among its row's keys
    n_hide = torch.round(ratios * maskable.sum(dim=1)).long()  # (B,)
    return (rank < n_hide[:, None]) & maskable
