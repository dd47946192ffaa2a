"""Per-cell quantile binning of expression values, vectorised over a batch.

Following the original scGPT: a cell's non-zero values are split at the edges
``quantile(nonzero, linspace(0, 1, n_bins - 1))`` (linear interpolation, as numpy) and get bins
1 .. n_bins - 1; zeros stay 0. When several edges are equal (ties), a value on them is placed
uniformly at random among the bins they span, using the given generator.

Collation runs on CPU in data-loader workers, where numpy's row sort and searchsorted are an order
of magnitude faster than torch's (measured: 3 ms vs 45 ms for 256 x 1,500 values).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def quantile_edges(x: np.ndarray, nonzero: np.ndarray, n_edges: int) -> np.ndarray:
    """Each row's quantiles of its non-zero values at linspace(0, 1, n_edges) -> (B, n_edges).

    One sort per row (non-zero values first), then numpy's linear interpolation between order
    statistics. Rows without non-zero values get edges of 0.
    """
    ordered = np.sort(np.where(nonzero, x, np.inf), axis=1)  # (B, N), inf last
    last = np.maximum(nonzero.sum(axis=1, keepdims=True) - 1, 0)  # (B, 1) index of the largest non-zero
    position = np.linspace(0, 1, n_edges) * last  # (B, E)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, last)
    frac = (position - low).astype(x.dtype)
    a, b = np.take_along_axis(ordered, low, 1), np.take_along_axis(ordered, high, 1)
    edges = np.where(frac > 0, a + (b - a) * frac, a)
    return np.where(nonzero.any(axis=1, keepdims=True), edges, 0).astype(x.dtype)


def _rowwise_searchsorted(edges: np.ndarray, x: np.ndarray, side: str) -> np.ndarray:
    """searchsorted of each row of ``x`` in the same row of ``edges``, as one flat search."""
    span = max(float(np.abs(edges).max(initial=0)), float(np.abs(x).max(initial=0))) * 2 + 1
    offset = np.arange(len(x), dtype=np.float64)[:, None] * span  # keeps rows apart in one sorted array
    flat = np.searchsorted((edges + offset).ravel(), (x + offset).ravel(), side=side).reshape(x.shape)
    return flat - np.arange(len(x))[:, None] * edges.shape[1]


def bin_rows(x: np.ndarray, valid: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """numpy core of :func:`bin_expression`; ``uniform`` (B, N) in [0, 1) breaks ties between equal edges."""
    nonzero = valid & (x > 0)  # (B, N)
    edges = quantile_edges(x, nonzero, n_bins - 1)  # (B, n_bins - 1)
    upper = _rowwise_searchsorted(edges, x, "right")  # number of edges <= x   (np.digitize)
    lower = _rowwise_searchsorted(edges, x, "left")  # number of edges < x   (np.digitize, right=True)
    bins = np.clip(np.ceil(uniform * (upper - lower) + lower), 1, n_bins - 1)
    return np.where(nonzero, bins, 0).astype(np.float32)


def bin_expression(counts: Tensor, valid: Tensor, n_bins: int, generator: torch.Generator | None = None) -> Tensor:
    """counts, valid: (B, N) -> bins (B, N) float in {0, 1, ..., n_bins - 1}; 0 for zeros and invalid slots."""
    uniform = torch.rand(counts.shape, generator=generator).numpy()
    return torch.from_numpy(bin_rows(counts.float().numpy(), valid.numpy(), n_bins, uniform))
