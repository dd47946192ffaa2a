"""Per-cell quantile binning of expression values, vectorised over a batch.

Following the original scGPT: a cell's non-zero values are split at the edges
``quantile(nonzero, linspace(0, 1, n_bins - 1))`` (linear interpolation, as numpy) and get bins
1 .. n_bins - 1; zeros stay 0. When several edges are equal (ties), a value on them is placed
uniformly at random among the bins they span, using the given generator.

The edges are numpy's own arithmetic, step for step: float64 positions and weights, the difference of
the two neighbouring (float32) values, and numpy's two-sided interpolation (``b - (b - a) * (1 - t)``
from t = 0.5 on), so given the same random draws the bins equal the original's ``np.quantile`` +
``np.digitize`` exactly (float32 edges moved 127 of 186,202 bins by one on real cells).

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
    return _quantiles(lambda positions: np.take_along_axis(ordered, positions, 1), last, n_edges)


def _quantiles(value_at, last: np.ndarray, n_edges: int) -> np.ndarray:
    """Linear quantiles at linspace(0, 1, n_edges), given ``value_at(positions (B, E))``: the (float32)
    values at those 0-based positions of each row's sorted non-zeros, of which the largest is at ``last``
    (B, 1). float64 (B, E), computed as ``np.quantile`` computes them (its ``_lerp``)."""
    position = np.linspace(0, 1, n_edges) * last  # (B, E) float64, numpy's (n - 1) * q
    low = np.floor(position)
    high = np.minimum(low + 1, last)
    weight = position - low  # float64
    a, b = value_at(low.astype(np.int64)), value_at(high.astype(np.int64))
    step = b - a  # in the values' dtype, as numpy
    return np.where(weight >= 0.5, b - step * (1 - weight), a + step * weight)


def _integer_edge_counts(values: np.ndarray, nonzero: np.ndarray, top: int, n_edges: int) -> np.ndarray:
    """The packed counts of :func:`_edge_counts` for each value in place, when the values are integers
    in [1, top]: a per-row histogram of the values replaces the sort (a counting sort), and the edge
    counts are tabulated per integer value, then looked up. No argsort, no scatter back.

    For an integer v: edge <= v iff ceil(edge) <= v, and edge < v iff floor(edge) + 1 <= v.
    """
    rows, width = values.shape
    span = top + 2  # table columns: values 0 .. top + 1
    slot = np.where(nonzero, values, 0).astype(np.int64) + (np.arange(rows) * span)[:, None]  # (B, N)
    hist = np.bincount(slot.ravel(), minlength=rows * span).reshape(rows, span)
    hist[:, 0] = 0  # zeros and invalid slots are not values
    below = hist.cumsum(axis=1)  # (B, span) non-zeros <= v; at most width
    last = np.maximum(below[:, -1:] - 1, 0)  # (B, 1) position of the largest non-zero
    flat = (below + (np.arange(rows) * (width + 1))[:, None]).ravel()  # rows apart, ascending overall

    def value_at(positions):  # the value at a sorted position: the first v with more than it at or below v
        found = np.searchsorted(flat, positions + (np.arange(rows) * (width + 1))[:, None], side="right")
        return (found - (np.arange(rows) * span)[:, None]).astype(np.float32)

    edges = _quantiles(value_at, last, n_edges)  # (B, E) float64; ceil and floor of them are exact
    base = (np.arange(rows) * span)[:, None]
    at_most = np.clip(np.ceil(edges), 0, span - 1).astype(np.int64) + base  # first v with edge <= v
    above = np.clip(np.floor(edges) + 1, 0, span - 1).astype(np.int64) + base  # first v with edge < v
    table = np.bincount(at_most.ravel(), minlength=rows * span) << 16
    table += np.bincount(above.ravel(), minlength=rows * span)
    table = table.reshape(rows, span).cumsum(axis=1, dtype=np.int32).ravel()
    return table[slot]  # (B, N)


def _edge_counts(ordered: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """For rows sorted ascending (finite) and each row's sorted ``edges`` (B, E): how many edges are
    <= and < each value -> (B, N) int32 ``(le << 16) | lt``, in the rows' sorted order.

    The edges are located among the values with one searchsorted per side (rows kept apart by an offset
    in one flat array); an edge found at position p counts for every value from p on, so a histogram of
    the positions, summed along the row, gives the counts. Both sides share one pass: the "<" count
    sits in the low 16 bits, the "<=" count above it (E < 2**15).

    The float64 edges are compared with the float32 values exactly: a value v is >= an edge e iff
    v >= the smallest float32 >= e, and > e iff v > the largest float32 <= e; both sides are float32,
    so the row offsets move them alike.
    """
    rows, width = ordered.shape
    up, down = _float32_around(edges)  # (B, E) each
    span = 2.0 * max(float(np.abs(ordered).max(initial=0)), float(np.abs(up).max(initial=0))) + 1.0
    offset = np.arange(rows, dtype=np.float64)[:, None] * span  # keeps rows apart in one array
    flat = (ordered + offset).ravel()
    base = (np.arange(rows) * (width + 1))[:, None]
    at_or_above = np.searchsorted(flat, (up + offset).ravel(), side="left").reshape(edges.shape)  # first v >= e
    above = np.searchsorted(flat, (down + offset).ravel(), side="right").reshape(edges.shape)  # first v > e
    shift = np.arange(rows)[:, None] * width - base  # flat position -> position in the (width + 1) rows
    size = rows * (width + 1)
    hist = np.bincount((at_or_above - shift).ravel(), minlength=size) << 16
    hist += np.bincount((above - shift).ravel(), minlength=size)
    return hist.reshape(rows, width + 1)[:, :width].cumsum(axis=1, dtype=np.int32)


def _float32_around(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(smallest float32 >= edge, largest float32 <= edge) of float64 edges."""
    nearest = edges.astype(np.float32)
    up = np.where(nearest < edges, np.nextafter(nearest, np.float32(np.inf)), nearest)
    down = np.where(nearest > edges, np.nextafter(nearest, np.float32(-np.inf)), nearest)
    return up, down


def bin_rows(x: np.ndarray, valid: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """numpy core of :func:`bin_expression`; ``uniform`` (B, N) in [0, 1) breaks ties between equal edges.

    One argsort per row gives both the quantile edges and, by locating the (few) edges among the sorted
    values, how many edges lie at or below each value: no per-value search over the edges.
    """
    if x.shape[1] == 0:  # no cell of the batch expresses any gene
        return np.zeros(x.shape, dtype=np.float32)
    nonzero = valid & (x > 0)  # (B, N)
    top = float(x.max(initial=0))
    if top < 4 * x.shape[1] + 64 and np.array_equal(x, np.trunc(x)):  # integer counts: no sort needed
        packed = _integer_edge_counts(x, nonzero, int(top), n_bins - 1)
        return _bins_from_counts(packed, nonzero, uniform, n_bins)
    sentinel = np.float32(top + 1)  # sorts after every non-zero value
    keyed = np.where(nonzero, x, sentinel)
    order = np.argsort(keyed, axis=1)  # (B, N)
    ordered = np.sort(keyed, axis=1)  # = keyed in that order, faster than gathering it
    last = np.maximum(np.count_nonzero(nonzero, axis=1, keepdims=True) - 1, 0)  # (B, 1)
    edges = _interpolate_edges(ordered, last, n_bins - 1)  # (B, n_bins - 1)
    packed = np.empty(x.shape, dtype=np.int32)  # back in the cells' own order: one scatter for both counts
    np.put_along_axis(packed, order, _edge_counts(ordered, edges), 1)
    return _bins_from_counts(packed, nonzero, uniform, n_bins)


def _bins_from_counts(packed: np.ndarray, nonzero: np.ndarray, uniform: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins from each value's packed ``(edges <= value) << 16 | (edges < value)`` counts (B, N)."""
    lower = packed & 0xFFFF  # edges < value
    spread = (packed >> 16) - lower  # edges == value
    # float64 as the original (float32 uniform x int64 counts): exact, so ceil agrees with it bit for bit
    bins = np.ceil(uniform * spread.astype(np.float64)) + lower
    return np.where(nonzero, np.clip(bins, 1, n_bins - 1), 0).astype(np.float32)


def bin_expression(counts: Tensor, valid: Tensor, n_bins: int, generator: torch.Generator | None = None) -> Tensor:
    """counts, valid: (B, N) -> bins (B, N) float in {0, 1, ..., n_bins - 1}; 0 for zeros and invalid slots."""
    uniform = torch.rand(counts.shape, generator=generator).numpy()
    return torch.from_numpy(bin_rows(counts.float().numpy(), valid.numpy(), n_bins, uniform))
