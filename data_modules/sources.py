"""Input readers for ``scgpt-data convert``: each source yields row blocks of raw counts (cells x its own
genes) in order, with its gene names, gene ids, feature types and obs columns."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.modality import feature_types_of
from scgpt.errors import DataError

_GENE_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id")


class _Source:
    path: str
    n_cells: int
    genes: np.ndarray  # (G,) str gene names
    gene_ids: np.ndarray | None = None  # (G,) str Ensembl ids
    feature_types: np.ndarray | None = None  # (G,) str 10x feature types ('Gene Expression', 'Peaks', ...)
    obs_columns: list[str] = []
    fix_hint = "pass a matrix of raw (integer) counts"

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        raise NotImplementedError

    def obs_names(self) -> np.ndarray:  # valid after ``blocks`` has been consumed
        raise NotImplementedError

    def read_obs(self, key: str) -> pd.Series:
        raise DataError(f"{self.path}: has no obs column {key!r}; drop it from --obs-keys")

    def close(self) -> None:
        pass


def _gene_names(path: str, var: pd.DataFrame, gene_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    if gene_column is None:
        names = var.index
    elif gene_column in var.columns:
        names = var[gene_column]
    else:
        raise DataError(f"{path}: var has no column {gene_column!r} for --gene-column; "
                        f"available: {', '.join(map(str, var.columns)) or 'none'}")
    ids = next((var[c] for c in _GENE_ID_COLUMNS if c in var.columns and c != gene_column), None)
    if ids is None and gene_column is not None and pd.Index(var.index.astype(str)).str.startswith("ENS").all():
        ids = var.index
    return np.asarray(names, dtype=str), None if ids is None else np.asarray(ids, dtype=str)


class _H5adSource(_Source):
    def __init__(self, path: Path, layer: str | None, gene_column: str | None) -> None:
        import h5py

        self.path = str(path)
        try:
            self._file = f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot open as HDF5 ({e}); pass a valid .h5ad file") from None
        layers = list(f["layers"].keys()) if "layers" in f else []
        available = ", ".join(layers + (["raw"] if "raw" in f else [])) or "none"
        if layer is None:
            node, var_node = f.get("X"), f["var"]
        elif layer == "raw" and "raw" in f:
            node, var_node = f["raw/X"], f["raw/var"]
        elif layer in layers:
            node, var_node = f["layers"][layer], f["var"]
        else:
            raise DataError(f"{path}: no layer {layer!r}; pass --layer with one of: {available}")
        if node is None:
            raise DataError(f"{path}: has no X; pass --layer with one of: {available}")
        self._node = node
        self.n_cells = int((node.shape if isinstance(node, h5py.Dataset) else node.attrs["shape"])[0])
        var = ad.io.read_elem(var_node)
        self.genes, self.gene_ids = _gene_names(self.path, var, gene_column)
        self.feature_types = feature_types_of(var)
        self.obs_columns = list(f["obs"].attrs.get("column-order", []))
        if "counts" in layers and layer != "counts":
            self.fix_hint = "pass --layer counts"
        elif layer is None and available != "none":
            self.fix_hint = f"pass --layer with the raw counts (one of: {available})"
        else:
            self.fix_hint = "pass an .h5ad whose X (or a --layer) holds raw counts"

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        import h5py

        dense = isinstance(self._node, h5py.Dataset)
        matrix = self._node if dense else ad.io.sparse_dataset(self._node)
        for start in range(0, self.n_cells, chunk):
            block = matrix[start:start + chunk]
            yield sp.csr_matrix(block)

    def obs_names(self) -> np.ndarray:
        obs = self._file["obs"]
        return np.asarray(ad.io.read_elem(obs[obs.attrs["_index"]]), dtype=str)

    def read_obs(self, key: str) -> pd.Series:
        if key not in self.obs_columns:
            raise DataError(f"{self.path}: obs has no column {key!r}; available: {', '.join(self.obs_columns)}")
        node = self._file["obs"][key]
        if "categories" in node.attrs:  # anndata < 0.8: int codes + a reference into obs/__categories
            return self._legacy_obs()[key].reset_index(drop=True)
        return pd.Series(ad.io.read_elem(node))

    def _legacy_obs(self) -> pd.DataFrame:
        """The whole obs frame through anndata's own reader, which decodes both categorical encodings."""
        if getattr(self, "_obs_frame", None) is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # anndata's OldFormatWarning: the legacy layout is what we read
                self._obs_frame = ad.io.read_elem(self._file["obs"])
        return self._obs_frame

    def close(self) -> None:
        self._file.close()


class _TenxH5Source(_Source):
    """CellRanger v3 HDF5: ``matrix/`` is CSC genes x barcodes, so each barcode column is one cell (a CSR row)."""

    def __init__(self, path: Path, gene_column: str | None) -> None:
        import h5py

        self.path = str(path)
        try:
            self._file = f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot open as HDF5 ({e}); pass a CellRanger v3 .h5 file") from None
        if "matrix" not in f or "features" not in f["matrix"]:
            raise DataError(f"{path}: not a CellRanger v3 HDF5 (no matrix/features group); "
                            "pass a v3 .h5 or convert it to .h5ad first")
        m = self._m = f["matrix"]
        self._n_genes, self.n_cells = (int(v) for v in m["shape"][:])
        names = np.asarray(m["features/name"].asstr()[:], dtype=str)
        ids = np.asarray(m["features/id"].asstr()[:], dtype=str)
        if gene_column in ("gene_ids", "id"):
            names = ids
        elif gene_column not in (None, "name"):
            raise DataError(f"{path}: unknown --gene-column {gene_column!r} for 10x input; use 'name' or 'gene_ids'")
        self.genes, self.gene_ids = names, ids
        if "feature_type" in m["features"]:
            self.feature_types = np.asarray(m["features/feature_type"].asstr()[:], dtype=object)
        self.fix_hint = "pass the raw (not filtered-and-normalised) CellRanger matrix"

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        indptr = self._m["indptr"]
        for start in range(0, self.n_cells, chunk):
            ip = indptr[start:min(start + chunk, self.n_cells) + 1].astype(np.int64)
            a, b = int(ip[0]), int(ip[-1])
            data, indices = self._m["data"][a:b], self._m["indices"][a:b]
            yield sp.csr_matrix((data, indices, ip - a), shape=(len(ip) - 1, self._n_genes))

    def obs_names(self) -> np.ndarray:
        return np.asarray(self._m["barcodes"].asstr()[:], dtype=str)

    def close(self) -> None:
        self._file.close()


def _first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).exists()), None)


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, dtype=str, comment=None)


class _MtxSource(_Source):
    """A 10x ``matrix.mtx[.gz]`` directory (genes x cells) with features/genes.tsv and barcodes.tsv."""

    def __init__(self, path: Path, gene_column: str | None) -> None:
        import scipy.io

        self.path = str(path)
        mtx = _first_existing(path, ["matrix.mtx", "matrix.mtx.gz"])
        features = _first_existing(path, ["features.tsv", "features.tsv.gz", "genes.tsv", "genes.tsv.gz"])
        barcodes = _first_existing(path, ["barcodes.tsv", "barcodes.tsv.gz"])
        if mtx is None or features is None or barcodes is None:
            raise DataError(f"{path}: an mtx directory needs matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv) "
                            "and barcodes.tsv[.gz]; add the missing file")
        try:
            self._x = sp.csr_matrix(scipy.io.mmread(mtx).T)
        except ValueError as e:
            raise DataError(f"{mtx}: not a valid Matrix Market file ({e}); pass a 10x matrix.mtx") from None
        feats = _read_tsv(features)
        ids = feats[0].to_numpy(dtype=str)
        names = feats[1].to_numpy(dtype=str) if feats.shape[1] > 1 else ids
        if gene_column in ("gene_ids", "id"):
            names = ids
        elif gene_column not in (None, "name"):
            raise DataError(f"{path}: unknown --gene-column {gene_column!r} for mtx input; use 'name' or 'gene_ids'")
        self._barcodes = _read_tsv(barcodes)[0].to_numpy(dtype=str)
        if self._x.shape != (len(self._barcodes), len(names)):
            raise DataError(f"{path}: matrix is {self._x.shape[1]} genes x {self._x.shape[0]} cells but there are "
                            f"{len(names)} features and {len(self._barcodes)} barcodes; use matching files")
        self.n_cells, self.genes, self.gene_ids = self._x.shape[0], names, ids if feats.shape[1] > 1 else None
        if feats.shape[1] > 2:  # 10x v3 features.tsv: id, name, feature type
            self.feature_types = feats[2].to_numpy(dtype=object)

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        for start in range(0, self.n_cells, chunk):
            yield self._x[start:start + chunk]

    def obs_names(self) -> np.ndarray:
        return self._barcodes


class _CsvSource(_Source):
    """A cell-by-gene table: first column cell ids, header row gene names; read in row chunks."""

    def __init__(self, path: Path) -> None:
        import csv
        import gzip

        self.path, self._p = str(path), path
        self._sep = "\t" if ".tsv" in path.suffixes else ","
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", newline="") as handle:
            header = next(csv.reader(handle, delimiter=self._sep), [])
            self.n_cells = sum(1 for line in handle if line.strip())
        self.genes, self._names = np.asarray(header[1:], dtype=str), []

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        reader = pd.read_csv(self._p, sep=self._sep, header=None, skiprows=1, index_col=0, chunksize=chunk,
                             dtype={0: str})
        try:
            for frame in reader:
                if frame.shape[1] != len(self.genes):
                    raise DataError(f"{self.path}: rows have {frame.shape[1]} values but the header names "
                                    f"{len(self.genes)} genes; fix the table")
                try:
                    values = frame.to_numpy(dtype=np.float64)
                except (TypeError, ValueError):
                    raise DataError(f"{self.path}: non-numeric values in the table; expected cell ids in the first "
                                    "column and counts in the others") from None
                self._names.extend(frame.index.astype(str))
                yield sp.csr_matrix(values)
        except pd.errors.ParserError as e:
            raise DataError(f"{self.path}: cannot parse the table ({e}); fix the file") from None

    def obs_names(self) -> np.ndarray:
        return np.asarray(self._names, dtype=str)


class _AnnDataSource(_Source):
    def __init__(self, adata: ad.AnnData, name: str) -> None:
        self.path, self._adata, self.n_cells = name, adata, adata.n_obs
        self.genes, self.gene_ids = _gene_names(name, adata.var, None)
        self.feature_types = feature_types_of(adata.var)
        self.obs_columns = list(adata.obs.columns)

    def blocks(self, chunk: int) -> Iterator[sp.csr_matrix]:
        for start in range(0, self.n_cells, chunk):
            yield sp.csr_matrix(self._adata.X[start:start + chunk])

    def obs_names(self) -> np.ndarray:
        return np.asarray(self._adata.obs_names, dtype=str)

    def read_obs(self, key: str) -> pd.Series:
        if key not in self.obs_columns:
            raise DataError(f"{self.path}: obs has no column {key!r}; available: {', '.join(self.obs_columns)}")
        return self._adata.obs[key].reset_index(drop=True)


def _open_source(path: str | os.PathLike, layer: str | None, gene_column: str | None) -> _Source:
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        raise DataError(f"{p}: input not found; pass an existing .h5ad, 10x .h5, mtx directory or .csv/.tsv")
    if p.is_dir() and (p / "zarr.json").is_file():
        raise DataError(f"{p}: is a cell store (zarr), already converted; train on it as it is with data=zarr "
                        f"'data.paths=[{p}]' (scgpt-embed reads it too), or convert the original .h5ad/.h5/mtx/.csv")
    if p.is_dir():
        return _MtxSource(p, gene_column)
    if layer is not None and not name.endswith(".h5ad"):
        raise DataError(f"{p}: --layer applies to .h5ad inputs only; drop --layer for this file")
    if name.endswith(".h5ad"):
        return _H5adSource(p, layer, gene_column)
    if name.endswith((".h5", ".hdf5")):
        return _TenxH5Source(p, gene_column)
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt.gz")):
        if gene_column is not None:
            raise DataError(f"{p}: --gene-column does not apply to table inputs (the header holds gene names)")
        return _CsvSource(p)
    raise DataError(f"{p}: unknown input type; pass .h5ad, 10x .h5, an mtx directory, or .csv/.tsv")
