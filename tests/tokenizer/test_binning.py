"""Per-cell quantile binning, checked against hand-made rows and a numpy port of the original."""

from __future__ import annotations

import numpy as np
import torch

from scgpt.seeding import make_generator
from scgpt.tokenizer.binning import bin_expression, bin_rows


def _bin_rows(rows, n_bins, seed=0):
    counts = torch.tensor(rows, dtype=torch.float32)
    return bin_expression(counts, torch.ones_like(counts, dtype=torch.bool), n_bins, make_generator(seed))


def _original_digitize(row: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """The original scGPT algorithm (numpy), with its random draws given."""
    out = np.zeros_like(row)
    nonzero = row > 0
    bins = np.quantile(row[nonzero], np.linspace(0, 1, n_bins - 1))
    left = np.digitize(row[nonzero], bins)
    right = np.digitize(row[nonzero], bins, right=True)
    out[nonzero] = np.ceil(uniform[nonzero] * (left - right) + right)
    return out


def test_distinct_values_fill_bins_by_quantile():
    assert _bin_rows([[0, 1, 2, 3, 4]], n_bins=5).tolist() == [[0, 1, 2, 3, 4]]
    assert _bin_rows([[40, 0, 10, 30, 20]], n_bins=5).tolist() == [[4, 0, 1, 3, 2]]


def test_quantile_edges_between_values():
    # n_bins 4 -> edges at quantiles (0, 0.5, 1) = [1, 5, 9]; bin i holds edge[i-1] <= x < edge[i],
    # and the maximum sits on the last edge, so it takes the top bin alone
    bins = _bin_rows([[1, 2, 3, 4, 5, 6, 7, 8, 9]], n_bins=4)[0].tolist()
    assert bins == [1, 1, 1, 1, 2, 2, 2, 2, 3]


def test_zeros_stay_zero_and_invalid_slots_are_zero():
    counts = torch.tensor([[0.0, 3.0, 0.0, 7.0], [5.0, 5.0, 9.0, 2.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    bins = bin_expression(counts, valid, 11, make_generator(0))
    assert bins[0, 0] == 0 and bins[0, 2] == 0
    assert bins[1, 3] == 0  # invalid slot, even though its count is non-zero
    assert (bins[counts.gt(0) & valid] >= 1).all()


def test_all_zero_cell_bins_to_zero():
    assert _bin_rows([[0, 0, 0]], n_bins=51).tolist() == [[0, 0, 0]]


def test_ties_are_broken_at_random_within_their_span_and_seeded():
    row = [[5.0] * 200]
    bins = _bin_rows(row, n_bins=5, seed=1)
    assert set(bins[0].tolist()) == {1.0, 2.0, 3.0, 4.0}  # all four tied edges used
    assert torch.equal(bins, _bin_rows(row, n_bins=5, seed=1))
    assert not torch.equal(bins, _bin_rows(row, n_bins=5, seed=2))


def test_matches_the_original_algorithm_on_random_rows():
    rng = np.random.default_rng(0)
    rows = rng.poisson(rng.gamma(0.5, 4.0, size=(6, 300))).astype(np.float32)  # many ties, many zeros
    generator = make_generator(3)
    uniform = torch.rand(rows.shape, generator=make_generator(3)).numpy()  # the draws bin_expression makes
    ours = bin_expression(torch.from_numpy(rows), torch.ones(rows.shape, dtype=torch.bool), 51, generator).numpy()
    expected = np.stack([_original_digitize(r, 51, u) for r, u in zip(rows, uniform)])
    np.testing.assert_array_equal(ours, expected)


def _original_bins(rows: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    return np.stack([_original_digitize(r, n_bins, u) for r, u in zip(rows, uniform)])


def test_edges_are_numpys_float64_quantiles_on_a_small_tied_row():
    # the 36th of the 50 edges of these 8 counts is 2.999999999999999 in float64 (numpy) but 3.0 in
    # float32, which moved both 3s from bin 40 to bin 39
    row = np.array([[2, 1, 1, 3, 2, 3, 4, 1]], dtype=np.float32)
    uniform = np.full(row.shape, 0.5, dtype=np.float32)
    ours = bin_rows(row, np.ones(row.shape, dtype=bool), 51, uniform)
    np.testing.assert_array_equal(ours, _original_bins(row, 51, uniform))
    assert ours[0, 3] == ours[0, 5] == 40


def test_equals_numpys_quantile_and_digitize_on_tied_integer_and_log_counts():
    rng = np.random.default_rng(0)
    for log in (False, True):  # integer counts (counting path) and log1p values (sorting path)
        rows = rng.poisson(rng.gamma(0.3, 3.0, size=(128, 700))).astype(np.float32)  # many ties
        rows = np.log1p(rows).astype(np.float32) if log else rows
        uniform = rng.random(rows.shape, dtype=np.float32)
        ours = bin_rows(rows, np.ones(rows.shape, dtype=bool), 51, uniform)
        np.testing.assert_array_equal(ours, _original_bins(rows, 51, uniform), err_msg=f"log1p={log}")
