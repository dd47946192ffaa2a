"""Per-cell quantile binning of expression values, vectorised over a batch.

Following the original scGPT: a cell's non-zero values are split at the edges
``quantile(nonzero, linspace(0, 1, n_bins - 1))`` and get bins 1 .. n_bins - 1; zeros stay 0. When
several edges are equal (ties), a value on them is placed uniformly at random among the bins they
span, using the given generator.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bin_expression(counts: Tensor, valid: Tensor, n_bins: int, generator: torch.Generator | None = None) -> Tensor:
    """counts, valid: (B, N) -> bins (B, N) float in {0, 1, ..., n_bins - 1}; 0 for zeros and invalid slots."""
    nonzero = valid & (counts > 0)  # (B, N)
    x = counts.float()
    quantiles = torch.linspace(0, 1, n_bins - 1, device=x.device)
    edges = torch.nanquantile(x.masked_fill(~nonzero, float("nan")), quantiles, dim=1).T  # (B, n_bins - 1)
    edges = torch.nan_to_num(edges.contiguous(), nan=0.0)  # cells without any non-zero value
    upper = torch.searchsorted(edges, x, right=True)  # number of edges <= x   (np.digitize)
    lower = torch.searchsorted(edges, x, right=False)  # number of edges < x   (np.digitize, right=True)
    uniform = torch.rand(x.shape, generator=generator, device=x.device)
    bins = torch.ceil(uniform * (upper - lower) + lower).clamp(1, n_bins - 1)
    return torch.where(nonzero, bins, torch.zeros_like(bins))
