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


def _interpolate_edges(ordered: np.ndarray, last: np.ndarray, n_edges: int) -> np.ndarray:
    """numpy's linear quantiles at linspace(0, 1, n_edges) of rows sorted ascending, whose largest
    non-zero sits at index ``last`` (B, 1) -> (B, n_edges)."""
    position = np.linspace(0, 1, n_edges) * last  # (B, E)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, last)
    frac = (position - low).astype(ordered.dtype)
    a, b = np.take_along_axis(ordered, low, 1), np.take_along_axis(ordered, high, 1)
    return np.where(frac > 0, a + (b - a) * frac, a)


def _edge_counts(ordered: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted ascending (finite) and each row's sorted ``edges`` (B, E): how many edges are
    <= and < each value -> two (B, N) int32 arrays, in the rows' sorted order.

    The edges are located among the values with one searchsorted per side (rows kept apart by an offset
    in one flat array); an edge found at position p counts for every value from p on, so a histogram of
    the positions, summed along the row, gives the counts. Both sides share one pass: the "<" count
    sits in the low 16 bits, the "<=" count above it (E < 2**15).
    """
    rows, width = ordered.shape
    span = 2.0 * max(float(np.abs(ordered).max(initial=0)), float(np.abs(edges).max(initial=0))) + 1.0
    offset = np.arange(rows, dtype=np.float64)[:, None] * span  # keeps rows apart in one array
    flat = (ordered + offset).ravel()
    queries = (edges + offset).ravel()
    base = (np.arange(rows) * (width + 1))[:, None]
    at_or_above = np.searchsorted(flat, queries, side="left").reshape(edges.shape)  # first value >= edge
    above = np.searchsorted(flat, queries, side="right").reshape(edges.shape)  # first value > edge
    shift = np.arange(rows)[:, None] * width - base  # flat position -> position in the (width + 1) rows
    size = rows * (width + 1)
    hist = np.bincount((at_or_above - shift).ravel(), minlength=size) << 16
    hist += np.bincount((above - shift).ravel(), minlength=size)
    packed = hist.reshape(rows, width + 1)[:, :width].cumsum(axis=1, dtype=np.int32)
    return packed >> 16, packed & 0xFFFF


def bin_rows(x: np.ndarray, valid: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """numpy core of :func:`bin_expression`; ``uniform`` (B, N) in [0, 1) breaks ties between equal edges.

    One argsort per row gives both the quantile edges and, by locating the (few) edges among the sorted
    values, how many edges lie at or below each value: no per-value search over the edges.
    """
    nonzero = valid & (x > 0)  # (B, N)
    sentinel = np.float32(x.max(initial=0) + 1)  # sorts after every non-zero value
    keyed = np.where(nonzero, x, sentinel)
    order = np.argsort(keyed, axis=1)  # (B, N)
    ordered = np.take_along_axis(keyed, order, 1)
    last = np.maximum(np.count_nonzero(nonzero, axis=1, keepdims=True) - 1, 0)  # (B, 1)
    edges = _interpolate_edges(ordered, last, n_bins - 1)  # (B, n_bins - 1)
    upper_sorted, lower_sorted = _edge_counts(ordered, edges)  # edges <= value, edges < value
    spread = np.empty_like(upper_sorted)  # (B, N) back in the cells' own order
    np.put_along_axis(spread, order, upper_sorted - lower_sorted, 1)
    lower = np.empty_like(lower_sorted)
    np.put_along_axis(lower, order, lower_sorted, 1)
    # float64 as the original (float32 uniform x int64 counts): exact, so ceil agrees with it bit for bit
    bins = np.ceil(uniform * spread.astype(np.float64)) + lower
    return np.where(nonzero, np.clip(bins, 1, n_bins - 1), 0).astype(np.float32)


def bin_expression(counts: Tensor, valid: Tensor, n_bins: int, generator: torch.Generator | None = None) -> Tensor:
    """counts, valid: (B, N) -> bins (B, N) float in {0, 1, ..., n_bins - 1}; 0 for zeros and invalid slots."""
    uniform = torch.rand(counts.shape, generator=generator).numpy()
    return torch.from_numpy(bin_rows(counts.float().numpy(), valid.numpy(), n_bins, uniform))
