"""Held-out splits by an obs value: ``data.test_split: {key: batch, values: [batch_1]}`` (and ``data.val_split``).

Without such options a store's first ``val_fraction`` rows are the validation cells and the rest train
(stores are shuffled when written). With them, every row of every store is assigned once, from its obs
value, to ``test``, ``val`` or ``train`` (``val`` falls back to the first ``val_fraction`` of the rows that
are not test). Each split of a store becomes a :class:`RowSubset`: a view that numbers the split's rows
0..n-1, so that the stream cuts, deals and resumes blocks by arithmetic exactly as over whole stores, while
a block read fetches the physical rows it spans in contiguous windows and keeps only the split's cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from data_modules.cells import CellTable
from scgpt.errors import ConfigError

OBS_CHUNK = 1 << 20  # obs values read this many rows at a time when assigning splits
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ObsSplit:
    """The cells whose obs column ``key`` holds one of ``values``."""

    option: str  # data.val_split or data.test_split, for messages
    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, option: str, spec: Mapping[str, Any] | None) -> "ObsSplit | None":
        if spec is None:
            return None
        if not isinstance(spec, Mapping) or set(spec) != {"key", "values"}:
            raise ConfigError(f"{option}: expected {{key: <obs column>, values: [<value>, ...]}}, got {spec!r}; "
                              f"e.g. {option}={{key: batch, values: [batch_1]}}")
        values = spec["values"]
        if isinstance(values, (str, int, float)):
            values = [values]
        if not values:
            raise ConfigError(f"{option}.values: empty; list the {spec['key']} values to hold out")
        return cls(option, str(spec["key"]), tuple(str(v) for v in values))

    def check(self, stores: Sequence) -> None:
        """Refuse an obs column missing from a store, or values that no store has."""
        seen: set[str] = set()
        for store in stores:
            if self.key not in store.obs_columns:
                raise ConfigError(f"{self.option}.key: obs column {self.key!r} is not in {store.path} (available: "
                                  f"{', '.join(store.obs_columns)}); name a column every store has")
            seen |= set(_values(store, self.key))
        unknown = [v for v in self.values if v not in seen]
        if unknown:
            shown = ", ".join(sorted(seen)[:20]) + (" ..." if len(seen) > 20 else "")
            raise ConfigError(f"{self.option}.values: {', '.join(map(repr, unknown))} not found in obs column "
                              f"{self.key!r} (values: {shown}); pick values that occur in the data")

    def mask(self, store, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: rows of ``store`` in [start, stop) that belong to this split."""
        raw = store.read_obs(self.key, start, stop)
        if store.is_categorical(self.key):
            wanted = np.isin(np.asarray(store.label_categories(self.key), dtype=str), self.values)
            return np.where(raw >= 0, wanted[np.maximum(raw, 0)], False)
        return np.isin(np.asarray(raw).astype(str), self.values)


def _values(store, key: str) -> list[str]:
    if store.is_categorical(key):
        return store.label_categories(key)
    return [str(v) for v in np.unique(np.asarray(store.read_obs(key)).astype(str))]


def assign_rows(store, val_fraction: float, val: ObsSplit | None, test: ObsSplit | None) -> dict[str, np.ndarray]:
    """Ascending row numbers of ``store`` for train / val / test; every row in exactly one split."""
    n = store.n_cells
    code = np.zeros(n, dtype=np.int8)  # 0 train, 1 val, 2 test
    for start in range(0, n, OBS_CHUNK):
        stop = min(start + OBS_CHUNK, n)
        part = code[start:stop]
        if val is not None:
            part[val.mask(store, start, stop)] = 1
        if test is not None:
            is_test = test.mask(store, start, stop)
            if val is not None and (is_test & (part == 1)).any():
                raise ConfigError(f"data.val_split and data.test_split select the same cells ({val.key} in "
                                  f"{list(val.values)}, {test.key} in {list(test.values)}); make them disjoint")
            part[is_test] = 2
    if val is None:  # the first val_fraction of the rows that are not test, as without splits
        rest = np.flatnonzero(code != 2)
        if rest.size:
            code[rest[:max(1, round(rest.size * val_fraction))]] = 1
    return {split: np.flatnonzero(code == i) for i, split in enumerate(SPLITS)}


class RowSubset:
    """Rows ``rows`` (ascending) of a store, numbered 0..len-1: what the stream reads for one split."""

    window_factor = 8  # a block read fetches physical windows of at most this many x its cells (or min_window)
    min_window = 8192

    def __init__(self, store, rows: np.ndarray) -> None:
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)

    @property
    def path(self):
        return self.store.path

    @property
    def n_cells(self) -> int:
        return int(self.rows.size)

    def read_obs(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.rows[start:stop]
        if rows.size == 0:
            return self.store.read_obs(key, 0, 0)
        return self.store.read_obs(key, int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]

    def read_block(self, start: int, stop: int, label_keys: Sequence[str], vocab) -> CellTable:
        """Rows [start, stop) of the subset: contiguous physical windows, filtered to the subset's cells."""
        rows = self.rows[start:stop]
        window = max(self.window_factor * rows.size, self.min_window)
        tables, i = [], 0
        while i < rows.size:
            first = int(rows[i])
            j = int(np.searchsorted(rows, first + window, side="left"))  # rows of this window: [i, j)
            last = int(rows[j - 1])
            table = self.store.read_block(first, last + 1, label_keys, vocab)
            tables.append(take(table, rows[i:j] - first))
            i = j
        if not tables:
            return take(self.store.read_block(0, 0, label_keys, vocab), np.zeros(0, np.int64))
        return CellTable.concat(tables)


def take(table: CellTable, rows: np.ndarray) -> CellTable:
    """The given rows of a table, in order."""
    counts = table.counts[rows] if rows.size else sp.csr_matrix((0, table.counts.shape[1]), dtype=table.counts.dtype)
    return CellTable(counts=sp.csr_matrix(counts), gene_ids=table.gene_ids,
                     labels={k: v[rows] for k, v in table.labels.items()}, label_names=table.label_names)
