"""``scgpt-data convert`` with float counts: rounding noise is rounded and reported, true fractions are
refused at full precision; a cell store given as input is named as one."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.store import CellStore
from scgpt.data_cli import main

GENES = [f"G{i}" for i in range(6)]
COUNTS = np.array([[1, 0, 3, 0, 2, 5], [0, 4, 0, 1, 0, 2], [7, 0, 0, 0, 1, 0]])


def _csv(path, rows) -> str:
    lines = [",".join(["cell", *GENES])] + [",".join([f"c{i}", *row]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_counts_with_rounding_noise_are_rounded_and_reported(tmp_path, capsys):
    noisy = [[repr(float(v)) for v in row] for row in COUNTS]
    noisy[0][0], noisy[1][1], noisy[2][0] = "0.999999999999999", "4.000000000000001", "6.9999999"  # R / pandas
    out = tmp_path / "noisy.zarr"
    assert main(["convert", _csv(tmp_path / "noisy.csv", noisy), "-o", str(out)]) == 0
    report = capsys.readouterr().out
    assert "rounded       : 3 float counts within 1e-06 (relative) of an integer" in report
    store = CellStore(out)
    in_input_order = np.argsort(store.read_obs("original_index"))  # rows are shuffled when written
    stored = np.asarray(store.read_counts(0, store.n_cells).todense())[in_input_order]
    np.testing.assert_array_equal(stored, COUNTS[:, [store.var_names.index(g) for g in GENES]])


def test_exact_integer_floats_report_nothing_rounded(tmp_path, capsys):
    exact = [[repr(float(v)) for v in row] for row in COUNTS]
    assert main(["convert", _csv(tmp_path / "exact.csv", exact), "-o", str(tmp_path / "exact.zarr")]) == 0
    assert "rounded" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1.000012345", "0.99990001", "2.5"])
def test_truly_fractional_counts_are_refused_at_full_precision(tmp_path, capsys, value):
    rows = [[str(v) for v in row] for row in COUNTS]
    rows[1][3] = value
    err = _error(capsys, ["convert", _csv(tmp_path / "frac.csv", rows), "-o", str(tmp_path / "o.zarr")])
    assert f"found {value} in row 1" in err and "non-negative integers" in err
    assert not (tmp_path / "o.zarr").exists()


def test_negative_counts_are_refused(tmp_path, capsys):
    rows = [[str(v) for v in row] for row in COUNTS]
    rows[2][1] = "-3"
    err = _error(capsys, ["convert", _csv(tmp_path / "neg.csv", rows), "-o", str(tmp_path / "o.zarr")])
    assert "found -3.0 in row 2" in err


def test_an_existing_store_as_input_is_named_a_cell_store_with_the_way_to_use_it(tmp_path, capsys):
    store = tmp_path / "cells.zarr"
    rows = [[str(v) for v in row] for row in COUNTS]
    assert main(["convert", _csv(tmp_path / "cells.csv", rows), "-o", str(store)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["convert", str(store), "-o", str(tmp_path / "again.zarr")])
    assert "is a cell store" in err and f"'data.paths=[{store}]'" in err and "mtx" not in err.split(";")[0]
