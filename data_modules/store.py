"""The cell store: an AnnData Zarr (v3) store of CSR raw counts, its bounded-memory writer and its reader.

On-disk layout (``anndata.read_zarr(path)`` opens it; metadata is consolidated into ``zarr.json``)::

    X/          csr_matrix, shape (n_cells, n_genes)
      data      float32 raw counts (integer-valued)   chunks 131072 values, shards of 16 chunks, blosc-zstd
      indices   int32 column (gene) index per value   same chunks and shards
      indptr    int64 (n_cells + 1,)                  chunks 65536, shards of 16 chunks
    obs/        the requested metadata columns (strings/bools -> categorical, numbers stay numeric),
                ``original_index`` (int64 row in its source file before shuffling), ``source`` (file name)
    var/        index: gene names; ``gene_ids`` (Ensembl id, '' when unknown); ``vocab_id`` (int64);
                ``feature_type`` (10x feature type, only for multi-modal input: see data_modules/modality.py)
    uns/scgpt_store   a copy of the attributes below
    uns/scgpt_vocab   the vocabulary used at conversion: ``tokens`` (str) and ``ids`` (int64)

The root group attribute ``scgpt_store`` is the source of truth: ``{format_version, n_cells, n_genes, nnz,
shuffle_seed, fingerprint, fingerprint_method, created_by, x_dtype, n_cells_dropped, sources}``.
Rows are shuffled once at write time by ``np.random.default_rng(shuffle_seed).permutation`` of the input
rows; cells without counts are then dropped. ``fingerprint`` is the sha256 of the header
``scgpt-store-v1 n_cells n_genes nnz``, the var names and the sha256 of each of indptr, indices and data
(all of them, little-endian): content-sensitive and computed while writing at no extra read.
Only ``X`` and ``var`` enter it; obs metadata does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.core.buffer
from zarr.core.sync import sync as zarr_sync
from zarr.codecs import BloscCodec, BloscShuffle

from data_modules.cells import CellTable, CsrArena
from data_modules.modality import FEATURE_TYPE_COLUMN, GENE_EXPRESSION, feature_types_of
from scgpt.errors import DataError
from scgpt.tokenizer.vocab import GeneVocab

FORMAT_VERSION = 1
DATA_CHUNK, DATA_SHARD = 131_072, 16 * 131_072  # nonzeros per chunk / per shard
INDPTR_CHUNK, INDPTR_SHARD = 65_536, 16 * 65_536
RESERVED_OBS = ("original_index", "source")
FINGERPRINT_METHOD = "sha256(header, var names, sha256(indptr), sha256(indices), sha256(data))"
_GENE_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id")


# ------------------------------------------------------------------------------------------------
# Input sources: each yields row blocks of raw counts (cells x its own genes) in order.
# ------------------------------------------------------------------------------------------------
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
        return pd.Series(ad.io.read_elem(self._file["obs"][key]))

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


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------
@dataclass
class StoreReport:
    """What a conversion wrote: printed by ``scgpt-data convert``."""

    path: Path
    n_cells: int  # cells written
    n_cells_dropped: int  # cells with no counts in vocabulary genes
    n_genes: int  # genes written (those in the vocabulary)
    n_genes_input: int  # distinct genes across the inputs
    nnz: int
    fingerprint: str
    seconds: float
    sources: list[str] = field(default_factory=list)


class _Fingerprint:
    def __init__(self) -> None:
        self.parts = {k: hashlib.sha256() for k in ("indptr", "indices", "data")}

    def digest(self, n_cells: int, n_genes: int, nnz: int, var_names: Sequence[str]) -> str:
        h = hashlib.sha256(f"scgpt-store-v{FORMAT_VERSION} {n_cells} {n_genes} {nnz}\n".encode())
        h.update("\n".join(map(str, var_names)).encode())
        for part in self.parts.values():
            h.update(part.digest())
        return h.hexdigest()


class _ShardWriter:
    """Appends to a 1-d zarr array in whole shards (no read-modify-write), hashing what it writes."""

    def __init__(self, array: zarr.Array, hasher) -> None:
        self.array, self.hasher, self.step = array, hasher, array.shards[0]
        self.pending: list[np.ndarray] = []
        self.n_pending = self.offset = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.array.dtype)
        self.hasher.update(values.tobytes())
        self.pending.append(values)
        self.n_pending += values.size
        if self.n_pending >= self.step:
            self._flush((self.n_pending // self.step) * self.step)

    def close(self) -> None:
        self._flush(self.n_pending)
        if self.offset != self.array.shape[0]:
            raise RuntimeError(f"wrote {self.offset} values into an array of {self.array.shape[0]}")

    def _flush(self, n: int) -> None:
        if n == 0:
            return
        buf = np.concatenate(self.pending)
        self.array[self.offset:self.offset + n] = buf[:n]
        self.offset += n
        self.pending, self.n_pending = [buf[n:]], buf.size - n


def _check_values(source: _Source, data: np.ndarray, row_of: np.ndarray, first_row: int) -> None:
    if np.issubdtype(data.dtype, np.integer):
        bad = data < 0
    else:
        nonfinite = ~np.isfinite(data)
        if nonfinite.any():
            row = first_row + int(row_of[np.argmax(nonfinite)])
            raise DataError(f"{source.path}: counts contain NaN or infinite values (row {row}); "
                            "remove or fix those cells before converting")
        bad = (data < 0) | (data != np.round(data))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{source.path}: found {data[i]:g} in row {first_row + int(row_of[i])}, but raw counts "
                        f"must be non-negative integers (is it log-normalised?); {source.fix_hint}")


def _check_genes(source: _Source) -> None:
    if source.n_cells == 0 or len(source.genes) == 0:
        raise DataError(f"{source.path}: empty input ({source.n_cells} cells, {len(source.genes)} genes); "
                        "pass a file with at least one cell and one gene")
    names = pd.Index(source.genes)
    if not names.is_unique:
        dups = names[names.duplicated()].unique()[:5].tolist()
        raise DataError(f"{source.path}: duplicate gene names ({len(names) - names.nunique()} duplicates, e.g. "
                        f"{', '.join(dups)}); make them unique or pass --gene-column with a column of unique ids")


def _check_overlap(source: _Source, vocab: GeneVocab, vocab_name: str, min_overlap: float) -> None:
    known = vocab.encode(list(source.genes)) >= 0
    if known.mean() < min_overlap:
        examples = ", ".join(source.genes[~known][:5])
        raise DataError(f"{source.path}: only {int(known.sum())} of {known.size} genes "
                        f"({100 * known.mean():.1f}%, need {100 * min_overlap:.0f}%) are in the vocabulary "
                        f"{vocab_name} (unmatched e.g. {examples}); pass --gene-column with matching gene "
                        "names or a vocabulary built from these genes")


def _merge_feature_types(sources: list[_Source], genes: pd.Index) -> np.ndarray | None:
    """Each kept gene's feature type (first source that has one wins; 'Gene Expression' otherwise), or None
    when no source has feature types."""
    if all(s.feature_types is None for s in sources):
        return None
    types = pd.Series(GENE_EXPRESSION, index=genes, dtype=object)
    for s in reversed(sources):
        if s.feature_types is not None:
            known = pd.Series(s.feature_types, index=s.genes)
            known = known[known.index.isin(genes)]
            types[known.index] = known.to_numpy()
    return types.to_numpy(dtype=str)


def _combine_column(parts: list[pd.Series]) -> pd.Series | pd.Categorical:
    """One obs column across sources: numbers stay numeric; anything else becomes one categorical."""
    if all(pd.api.types.is_numeric_dtype(p) and not pd.api.types.is_bool_dtype(p) for p in parts):
        return pd.concat(parts, ignore_index=True)
    cats = [pd.Categorical(p) for p in parts]
    try:
        return pd.api.types.union_categoricals(cats, sort_categories=False)
    except TypeError:
        return pd.api.types.union_categoricals([pd.Categorical(np.asarray(p, dtype=str)) for p in parts])


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


class _StoreWriter:
    """Two passes with memory bounded by ``chunk_cells``: scatter validated rows into on-disk buckets of
    output positions, then sort each bucket and append it to X."""

    def __init__(self, sources: list[_Source], vocab: GeneVocab, obs_keys: list[str], chunk_cells: int,
                 seed: int) -> None:
        self.sources, self.obs_keys, self.chunk = sources, obs_keys, chunk_cells
        genes = pd.Index(pd.unique(np.concatenate([s.genes for s in sources])))
        self.n_genes_input = len(genes)
        self.genes = genes[vocab.encode(list(genes)) >= 0]
        self.colmaps = [self.genes.get_indexer(s.genes).astype(np.int64) for s in sources]
        ids = pd.Series("", index=self.genes, dtype=object)
        for s in reversed(sources):  # the first source that knows a gene's id wins
            if s.gene_ids is not None:
                known = pd.Series(s.gene_ids, index=s.genes)
                known = known[known.index.isin(self.genes) & (known != "")]
                ids[known.index] = known.to_numpy()
        self.gene_ids = ids.to_numpy(dtype=str)
        self.feature_types = _merge_feature_types(sources, self.genes)
        self.n_in = sum(s.n_cells for s in sources)
        self.perm = np.random.default_rng(seed).permutation(self.n_in)
        self.pos_of = np.empty(self.n_in, np.int64)
        self.pos_of[self.perm] = np.arange(self.n_in)
        self.kept = np.zeros(self.n_in, bool)
        self.nnz = 0

    # pass 1: validate, map genes, scatter rows into buckets of output positions ----------------
    def scatter(self, scratch: Path, progress) -> None:
        task = progress.add_task("reading", total=self.n_in)
        offset = 0
        for source, colmap in zip(self.sources, self.colmaps):
            local = 0
            for block in source.blocks(self.chunk):
                block = sp.csr_matrix(block)
                block.sum_duplicates()
                row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
                _check_values(source, block.data, row_of, local)
                col = colmap[block.indices]
                keep = (col >= 0) & (block.data != 0)
                counts = sp.csr_matrix((block.data[keep].astype(np.float32), (row_of[keep], col[keep])),
                                       shape=(block.shape[0], len(self.genes)))
                counts.sort_indices()
                self._write_buckets(scratch, counts, offset + local)
                local += block.shape[0]
                progress.advance(task, block.shape[0])
            if local != source.n_cells:
                raise DataError(f"{source.path}: read {local} cells but the file declares {source.n_cells}; "
                                "the file is truncated or inconsistent")
            offset += local

    def _write_buckets(self, scratch: Path, counts: sp.csr_matrix, first: int) -> None:
        lengths = np.diff(counts.indptr)
        rows = np.flatnonzero(lengths)
        self.kept[first + rows] = True
        self.nnz += int(counts.nnz)
        pos = self.pos_of[first + rows]
        order = np.argsort(pos // self.chunk, kind="stable")
        rows, pos = rows[order], pos[order]
        sub = counts[rows]
        buckets = pos // self.chunk
        bounds = np.flatnonzero(np.diff(buckets)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, rows.size]):
            lo, hi = sub.indptr[a], sub.indptr[b]
            with open(scratch / f"{buckets[a]}.bin", "ab") as handle:
                handle.write(np.array([b - a, hi - lo], np.int64).tobytes())
                handle.write(pos[a:b].tobytes())
                handle.write(np.diff(sub.indptr[a:b + 1]).astype(np.int64).tobytes())
                handle.write(sub.indices[lo:hi].astype(np.int32).tobytes())
                handle.write(sub.data[lo:hi].astype(np.float32).tobytes())

    # pass 2: each bucket sorted by output position, appended to X in whole shards --------------
    def gather(self, scratch: Path, x: zarr.Group, fingerprint: _Fingerprint, progress) -> None:
        n_buckets = -(-self.n_in // self.chunk)
        writers = {k: _ShardWriter(x[k], fingerprint.parts[k]) for k in ("indptr", "indices", "data")}
        writers["indptr"].append(np.zeros(1, np.int64))
        done = 0
        task = progress.add_task("writing", total=int(self.kept.sum()))
        for bucket in range(n_buckets):
            file = scratch / f"{bucket}.bin"
            if not file.exists():
                continue
            pos, lengths, indices, data = _read_bucket(file)
            file.unlink()
            indptr = np.r_[0, np.cumsum(lengths)]
            rows = sp.csr_matrix((data, indices, indptr), shape=(pos.size, len(self.genes)))[np.argsort(pos)]
            writers["indptr"].append(done + rows.indptr[1:])
            writers["indices"].append(rows.indices)
            writers["data"].append(rows.data)
            done += rows.nnz
            progress.advance(task, pos.size)
        for writer in writers.values():
            writer.close()

    def obs(self) -> pd.DataFrame:
        """Requested obs columns of every input row, then the kept rows in output order."""
        order = self.perm[self.kept[self.perm]]
        names = [Path(s.path).name for s in self.sources]
        if len(set(names)) < len(names):
            names = [s.path for s in self.sources]
        frame = pd.DataFrame({k: _combine_column([s.read_obs(k) for s in self.sources]) for k in self.obs_keys})
        frame["original_index"] = np.concatenate([np.arange(s.n_cells, dtype=np.int64) for s in self.sources])
        frame["source"] = pd.Categorical(np.repeat(names, [s.n_cells for s in self.sources]), categories=names)
        cell_names = pd.Index(np.concatenate([s.obs_names() for s in self.sources]))
        if not cell_names[self.kept].is_unique and len(self.sources) > 1:
            cell_names = pd.Index(frame["source"].astype(str).to_numpy(dtype=object) + ":"
                                  + cell_names.to_numpy(dtype=object))
        frame = frame.iloc[order].copy()
        frame.index = ad.utils.make_index_unique(pd.Index(np.asarray(cell_names)[order], dtype=str))
        return frame


def _read_bucket(file: Path) -> tuple[np.ndarray, ...]:
    raw, off, parts = file.read_bytes(), 0, []
    while off < len(raw):
        n, nnz = (int(v) for v in np.frombuffer(raw, np.int64, 2, off))
        off += 16
        record = []
        for dtype, count in ((np.int64, n), (np.int64, n), (np.int32, nnz), (np.float32, nnz)):
            record.append(np.frombuffer(raw, dtype, count, off))
            off += count * np.dtype(dtype).itemsize
        parts.append(record)
    return tuple(np.concatenate(col) for col in zip(*parts))


def _create_x(group: zarr.Group, n_cells: int, n_genes: int, nnz: int) -> zarr.Group:
    x = group.create_group("X", attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                            "shape": [n_cells, n_genes]})
    layout = {"data": ("float32", nnz, DATA_CHUNK, DATA_SHARD), "indices": ("int32", nnz, DATA_CHUNK, DATA_SHARD),
              "indptr": ("int64", n_cells + 1, INDPTR_CHUNK, INDPTR_SHARD)}
    for name, (dtype, size, chunk, shard) in layout.items():
        shuffle = BloscShuffle.bitshuffle if name == "data" else BloscShuffle.shuffle
        x.create_array(name, shape=(size,), dtype=dtype, chunks=(chunk,), shards=(shard,), fill_value=0,
                       compressors=BloscCodec(cname="zstd", clevel=3, shuffle=shuffle),
                       attributes={"encoding-type": "array", "encoding-version": "0.2.0"})
    return x


def _write_store(sources: list[_Source], out: str | os.PathLike, **kwargs) -> StoreReport:
    try:
        return _validate_and_write(sources, out, **kwargs)
    finally:
        for source in sources:
            source.close()


def _validate_and_write(sources: list[_Source], out: str | os.PathLike, *, vocab: GeneVocab | None,
                        vocab_name: str, obs_keys: Sequence[str] | None, min_vocab_overlap: float,
                        chunk_cells: int, seed: int, overwrite: bool, created_by: str, progress: bool,
                        extra_uns: dict | None = None) -> StoreReport:
    import time

    start_time, out = time.perf_counter(), Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: output exists; pass --overwrite to replace it")
    if chunk_cells < 1:
        raise DataError(f"--chunk-cells={chunk_cells}: must be a positive number of cells")
    for source in sources:
        _check_genes(source)
    if vocab is None:
        vocab = GeneVocab.from_genes(pd.unique(np.concatenate([s.genes for s in sources])))
    else:
        for source in sources:
            _check_overlap(source, vocab, vocab_name, min_vocab_overlap)
    if obs_keys is None:
        common = [set(s.obs_columns) for s in sources]
        obs_keys = [c for c in sources[0].obs_columns if all(c in cs for cs in common) and c not in RESERVED_OBS]
    for key in obs_keys:
        if key in RESERVED_OBS:
            raise DataError(f"--obs-keys {key!r}: the store writes this column itself; drop it from --obs-keys")
        for source in sources:
            if key not in source.obs_columns:
                raise DataError(f"{source.path}: obs has no column {key!r}; available: "
                                f"{', '.join(source.obs_columns) or 'none'}; fix --obs-keys")
    writer = _StoreWriter(sources, vocab, list(obs_keys), chunk_cells, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        scratch = tmp / "_scratch"
        scratch.mkdir(parents=True)
        with _progress(progress) as bar:
            writer.scatter(scratch, bar)
            n_cells = int(writer.kept.sum())
            if n_cells == 0:
                raise DataError(f"{sources[0].path}: no cell has counts in genes of the vocabulary; "
                                "check the vocabulary and the input")
            group = zarr.open_group(str(tmp / "store"), mode="w", zarr_format=3)
            fingerprint = _Fingerprint()
            writer.gather(scratch, _create_x(group, n_cells, len(writer.genes), writer.nnz), fingerprint, bar)
        shutil.rmtree(scratch)
        meta = dict(format_version=FORMAT_VERSION, n_cells=n_cells, n_genes=len(writer.genes), nnz=writer.nnz,
                    shuffle_seed=int(seed), fingerprint=fingerprint.digest(n_cells, len(writer.genes), writer.nnz,
                                                                           writer.genes),
                    fingerprint_method=FINGERPRINT_METHOD, created_by=created_by, x_dtype="float32",
                    n_cells_dropped=writer.n_in - n_cells, sources=[s.path for s in sources])
        var = pd.DataFrame({"gene_ids": writer.gene_ids, "vocab_id": vocab.encode(list(writer.genes))},
                           index=pd.Index(writer.genes.astype(str)))
        if writer.feature_types is not None:  # multi-modal input: which modality each feature is
            var[FEATURE_TYPE_COLUMN] = pd.Categorical(writer.feature_types)
        tokens = sorted(vocab.token_to_id.items(), key=lambda kv: kv[1])
        uns = dict(extra_uns or {}, scgpt_store=meta, scgpt_vocab={
            "tokens": np.array([t for t, _ in tokens], dtype=object), "ids": np.array([i for _, i in tokens])})
        with anndata_writing(zarr_write_format=3, auto_shard_zarr_v3=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.io.write_elem(group, "obs", writer.obs())
            ad.io.write_elem(group, "var", var)
            ad.io.write_elem(group, "uns", uns)
            group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0", "scgpt_store": meta})
            zarr.consolidate_metadata(str(tmp / "store"))
        _replace(tmp / "store", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StoreReport(out, n_cells, meta["n_cells_dropped"], len(writer.genes), writer.n_genes_input,
                       writer.nnz, meta["fingerprint"], time.perf_counter() - start_time, meta["sources"])


def _replace(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is removed only after the new store is complete."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(new, out)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
        os.replace(new, out)


def convert_to_store(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     vocab: GeneVocab | str | os.PathLike | None = None, gene_column: str | None = None,
                     layer: str | None = None, obs_keys: Sequence[str] | None = None,
                     min_vocab_overlap: float = 0.5, chunk_cells: int = 10_000, seed: int = 0,
                     overwrite: bool = False, created_by: str = "convert_to_store", progress: bool = False,
                     ) -> StoreReport:
    """Validate ``inputs`` (.h5ad, 10x .h5, mtx directories, .csv/.tsv), read them in row chunks of
    ``chunk_cells`` and write one shuffled store at ``out``. Without ``vocab``, the vocabulary is built
    from the input genes (first-seen order). ``obs_keys=None`` keeps the obs columns all inputs share."""
    if not inputs:
        raise DataError("no input files given; pass at least one .h5ad, .h5, mtx directory or .csv/.tsv")
    if Path(out).exists() and not overwrite:  # before reading any input
        raise DataError(f"{out}: output exists; pass --overwrite to replace it")
    vocab_name = str(vocab) if vocab is not None else "built from the inputs"
    if vocab is not None and not isinstance(vocab, GeneVocab):
        vocab = GeneVocab.load(vocab)
    sources: list[_Source] = []
    try:
        for path in inputs:
            sources.append(_open_source(path, layer, gene_column))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return _write_store(sources, out, vocab=vocab, vocab_name=vocab_name, obs_keys=obs_keys,
                        min_vocab_overlap=min_vocab_overlap, chunk_cells=chunk_cells, seed=seed,
                        overwrite=overwrite, created_by=created_by, progress=progress)


def anndata_writing(**settings):
    """``anndata.settings.override`` for our writes, also letting anndata write pandas >= 3's nullable
    strings (pandas 3 infers them for every string column and index; anndata refuses them by default)."""
    if hasattr(ad.settings, "allow_write_nullable_strings"):
        settings.setdefault("allow_write_nullable_strings", True)
    return ad.settings.override(**settings)


def write_store(adata: ad.AnnData, out: str | os.PathLike, *, vocab: GeneVocab | None = None,
                obs_keys: Sequence[str] | None = None, seed: int = 0, overwrite: bool = False,
                chunk_cells: int = 10_000, created_by: str = "write_store", name: str = "adata",
                progress: bool = False, uns: dict | None = None) -> StoreReport:
    """Write an in-memory AnnData (``X`` raw counts) as a store; ``uns`` is copied into the store's uns."""
    return _write_store([_AnnDataSource(adata, name)], out, vocab=vocab, vocab_name="given", obs_keys=obs_keys,
                        min_vocab_overlap=0.0, chunk_cells=chunk_cells, seed=seed, overwrite=overwrite,
                        created_by=created_by, progress=progress, extra_uns=uns)


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------
PYTHON_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"
_ZARRS_PIDS: set[int] = set()  # processes in which a zarrs-decoded array was opened (its threads run there)


def block_codec_pipeline() -> str:
    """The codec pipeline that decodes the X blocks: the Rust ``zarrs`` pipeline when the optional ``zarrs``
    package is importable, zarr-python's otherwise; ``SCGPT_ZARRS=0`` forces zarr-python, ``SCGPT_ZARRS=1``
    requires zarrs.

    zarrs decodes on a process-wide thread pool, and a process forked after that pool started inherits it
    without its threads: any zarrs read there hangs. So metadata, obs and whole-``indptr`` reads always use
    zarr-python (setting a DataModule up never starts the pool in the parent, and forked DataLoader
    workers start their own), and a process forked from one whose pool runs (a DataLoader with workers
    after a 0-worker pass over zarrs, for example) decodes with zarr-python instead of hanging."""
    setting = os.environ.get("SCGPT_ZARRS", "auto").strip().lower()
    if setting in ("0", "false", "no", "off") or inherited_zarrs_pool():
        return PYTHON_PIPELINE
    try:
        import zarrs  # noqa: F401
    except ImportError:
        if setting in ("1", "true", "yes", "on"):
            raise DataError("SCGPT_ZARRS=1 but the zarrs package is not installed; pip install zarrs "
                            "or unset SCGPT_ZARRS") from None
        return PYTHON_PIPELINE
    return ZARRS_PIPELINE


def zarrs_started_here() -> bool:
    """Whether this process has opened a zarrs-decoded array (its thread pool runs here)."""
    return os.getpid() in _ZARRS_PIDS


def inherited_zarrs_pool() -> bool:
    """Whether this process was forked from one running zarrs' thread pool (zarrs would hang here)."""
    return bool(_ZARRS_PIDS) and not zarrs_started_here()


def _python_pipeline():
    """A context in which opened arrays decode with zarr-python's pipeline, whatever the global setting.
    A global zarrs setting marks this process as running zarrs (whatever it reads outside our stores may
    start the pool), so that its forks fall back to zarr-python."""
    if zarr.config.get("codec_pipeline.path") == ZARRS_PIPELINE:
        _ZARRS_PIDS.add(os.getpid())
    return zarr.config.set({"codec_pipeline.path": PYTHON_PIPELINE})


async def _read_into(pairs: list[tuple[zarr.Array, int, int, np.ndarray]]) -> None:
    """Values [a, b) of each array into its ``out`` array, all reads at once (the pipeline decodes the
    chunks of concurrent reads in parallel)."""
    nd = zarr.core.buffer.default_buffer_prototype().nd_buffer
    await asyncio.gather(*(array.async_array.get_orthogonal_selection((slice(a, b),), out=nd.from_numpy_array(out))
                           for array, a, b, out in pairs if b > a))


class CellStore:
    """A store opened lazily: ``__init__`` reads only the root ``zarr.json``, so an unused instance pickles
    cheaply into DataLoader workers, each of which opens its own zarr handles on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            attrs = json.loads((self.path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {})
        except FileNotFoundError:
            raise DataError(f"{self.path}: store not found; pass a directory written by scgpt-data convert") from None
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{self.path}: not a readable zarr store ({e}); pass a store written by "
                            "scgpt-data convert") from None
        meta = attrs.get("scgpt_store") if isinstance(attrs, dict) else None
        if not isinstance(meta, dict):
            raise DataError(f"{self.path}: not a scgpt store (no 'scgpt_store' attribute); "
                            "write it with scgpt-data convert")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise DataError(f"{self.path}: store format {meta.get('format_version')} is newer than this scgpt "
                            f"reads ({FORMAT_VERSION}); upgrade scgpt")
        self.meta: dict = meta
        self._group: zarr.Group | None = None
        self._cache: dict = {}
        self._pid = os.getpid()  # the process that opened the handles

    # pickling: never ship open zarr handles or caches to workers ---------------------------------
    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _group=None, _cache={}, _pid=os.getpid())

    def __repr__(self) -> str:
        return f"CellStore({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes})"

    def __len__(self) -> int:
        return self.n_cells

    @property
    def is_open(self) -> bool:
        return self._group is not None

    def _open(self) -> zarr.Group:
        if self._group is not None and self._pid != os.getpid():  # forked (DataLoader worker): own handles
            self._group, self._cache = None, {}
        if self._group is None:
            self._pid = os.getpid()
            with warnings.catch_warnings(), _python_pipeline():
                warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec
                self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def _array(self, key: str) -> zarr.Array:
        """Array ``key`` decoded by zarr-python (metadata, obs, whole-array reads: safe before forking)."""
        group = self._open()
        if key not in self._cache:
            with _python_pipeline():
                self._cache[key] = group[key]
        return self._cache[key]

    def _block_array(self, key: str) -> zarr.Array:
        """Array ``key`` decoded by :func:`block_codec_pipeline` (the X reads of blocks)."""
        group = self._open()
        if ("block", key) not in self._cache:
            pipeline = block_codec_pipeline()
            with zarr.config.set({"codec_pipeline.path": pipeline}):
                self._cache["block", key] = group[key]
            if pipeline == ZARRS_PIPELINE:
                _ZARRS_PIDS.add(os.getpid())
        return self._cache["block", key]

    # metadata --------------------------------------------------------------------------------------
    n_cells = property(lambda self: int(self.meta["n_cells"]))
    n_genes = property(lambda self: int(self.meta["n_genes"]))
    nnz = property(lambda self: int(self.meta["nnz"]))
    fingerprint = property(lambda self: str(self.meta["fingerprint"]))

    @property
    def var(self) -> pd.DataFrame:
        if "var" not in self._cache:
            with _python_pipeline():
                self._cache["var"] = ad.io.read_elem(self._open()["var"])
        return self._cache["var"]

    @property
    def var_names(self) -> list[str]:
        return [str(g) for g in self.var.index]

    @property
    def obs_columns(self) -> list[str]:
        return [str(c) for c in self._open()["obs"].attrs.get("column-order", [])]

    def is_categorical(self, key: str) -> bool:
        self._check_obs_key(key)
        return self._open()["obs"][key].attrs.get("encoding-type") == "categorical"

    def label_categories(self, key: str) -> list[str]:
        """Category names of obs column ``key``; codes from :meth:`read_block` index into this list."""
        if ("categories", key) not in self._cache:
            if not self.is_categorical(key):
                raise DataError(f"{self.path}: obs column {key!r} is not categorical; use a categorical "
                                "column (strings are stored as categories) as a label")
            with _python_pipeline():
                values = ad.io.read_elem(self._open()["obs"][key]["categories"])
            self._cache["categories", key] = [str(v) for v in values]
        return self._cache["categories", key]

    def read_obs(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of obs column ``key`` for rows [start, stop) (categorical columns as codes, -1 missing)."""
        stop = self.n_cells if stop is None else stop
        if self.is_categorical(key):
            return np.asarray(self._array(f"obs/{key}/codes")[start:stop], dtype=np.int64)
        return np.asarray(self._array(f"obs/{key}")[start:stop])

    def _check_obs_key(self, key: str) -> None:
        if key not in self.obs_columns:
            raise DataError(f"{self.path}: obs has no column {key!r}; available: {', '.join(self.obs_columns)}")

    def vocab(self) -> GeneVocab:
        """The vocabulary the store was converted with."""
        with _python_pipeline():
            node = self._open()["uns/scgpt_vocab"]
            tokens, ids = ad.io.read_elem(node["tokens"]), ad.io.read_elem(node["ids"])
        return GeneVocab({str(t): int(i) for t, i in zip(tokens, ids)})

    def nnz_per_cell(self) -> np.ndarray:
        return np.diff(self._array("X/indptr")[:])

    # blocks ----------------------------------------------------------------------------------------
    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as CSR over the store's genes: one contiguous read of each X array (data and
        indices concurrently)."""
        if not 0 <= start <= stop <= self.n_cells:
            raise IndexError(f"rows [{start}, {stop}) out of range for {self.n_cells} cells in {self.path}")
        indptr = np.asarray(self._block_array("X/indptr")[start:stop + 1], dtype=np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        data_array, indices_array = self._block_array("X/data"), self._block_array("X/indices")
        data, indices = np.empty(b - a, data_array.dtype), np.empty(b - a, indices_array.dtype)
        zarr_sync(_read_into([(data_array, a, b, data), (indices_array, a, b, indices)]))
        return sp.csr_matrix((data, indices, indptr - a), shape=(stop - start, self.n_genes))

    def _vocab_map(self, vocab: GeneVocab) -> tuple[np.ndarray, np.ndarray]:
        """Per store gene: its column in the block (-1: dropped), and the vocab id of each block column."""
        cached = self._cache.get(("vocab", id(vocab)))
        if cached is None or cached[0] is not vocab:
            ids = vocab.encode(self.var_names)
            known = ids >= 0
            col = np.where(known, np.cumsum(known) - 1, -1)
            cached = (vocab, col, ids[known])
            self._cache["vocab", id(vocab)] = cached
        return cached[1], cached[2]

    def read_block(self, start: int, stop: int, label_keys: Sequence[str], vocab: GeneVocab) -> CellTable:
        """Rows [start, stop) as a :class:`CellTable` with gene ids of ``vocab`` (genes it lacks are dropped)
        and labels coded by the store-wide categories of :meth:`label_categories` (-1: missing)."""
        return read_blocks([(self, start, stop)], label_keys, vocab, CsrArena())[0]

    def compute_fingerprint(self, block_values: int = DATA_SHARD) -> str:
        """Recompute the fingerprint from the arrays (reads everything, in shard-sized contiguous blocks)."""
        fingerprint = _Fingerprint()
        for key in ("indptr", "indices", "data"):
            array = self._array(f"X/{key}")
            for a in range(0, array.shape[0], block_values):
                fingerprint.parts[key].update(np.ascontiguousarray(array[a:a + block_values]).tobytes())
        return fingerprint.digest(self.n_cells, self.n_genes, self.nnz, self.var_names)


def read_blocks(requests: Sequence[tuple[CellStore, int, int]], label_keys: Sequence[str], vocab: GeneVocab,
                arena: CsrArena) -> list[CellTable]:
    """Blocks ``(store, start, stop)`` (of one or several stores) as :meth:`CellStore.read_block` gives them,
    read together into consecutive slots of ``arena``: all their ``indptr`` slices in one concurrent read,
    then all their values and indices in another (the decoder works on every chunk of the group at once,
    and the reading thread waits twice per group instead of twice per block)."""
    for store, start, stop in requests:
        if not 0 <= start <= stop <= store.n_cells:
            raise IndexError(f"rows [{start}, {stop}) out of range for {store.n_cells} cells in {store.path}")
    indptrs = [np.empty(stop - start + 1, np.int64) for _, start, stop in requests]
    zarr_sync(_read_into([(store._block_array("X/indptr"), start, stop + 1, out)
                          for (store, start, stop), out in zip(requests, indptrs)]))
    sizes = [int(p[-1] - p[0]) for p in indptrs]
    first = arena.take_slots(sum(sizes))
    reads, offset = [], first
    for (store, _, _), indptr, size in zip(requests, indptrs, sizes):
        a, b = int(indptr[0]), int(indptr[-1])
        reads += [(store._block_array("X/data"), a, b, arena.data[offset:offset + size]),
                  (store._block_array("X/indices"), a, b, arena.indices[offset:offset + size])]
        offset += size
    zarr_sync(_read_into(reads))
    tables, read_at, write_at = [], first, first
    data, indices = arena.data, arena.indices
    for (store, start, stop), indptr, size in zip(requests, indptrs, sizes):
        indptr = indptr - indptr[0]
        col, gene_ids = store._vocab_map(vocab)
        if gene_ids.size < store.n_genes:  # drop the genes outside the vocabulary, compacting in place
            mapped = col[indices[read_at:read_at + size]]
            keep = mapped >= 0
            kept = int(keep.sum())
            indptr = np.r_[0, np.cumsum(keep)][indptr]
            data[write_at:write_at + kept] = data[read_at:read_at + size][keep]
            indices[write_at:write_at + kept] = mapped[keep]
        else:
            kept = size
            if write_at != read_at:  # an earlier block shrank: move this one down (numpy handles the overlap)
                data[write_at:write_at + size] = data[read_at:read_at + size]
                indices[write_at:write_at + size] = indices[read_at:read_at + size]
        labels, names = {}, {}
        for key in label_keys:
            names[key] = store.label_categories(key)
            labels[key] = np.asarray(store._array(f"obs/{key}/codes")[start:stop], dtype=np.int64)
        tables.append(CellTable(gene_ids=gene_ids, labels=labels, label_names=names,
                                csr=(indptr, indices[write_at:write_at + kept], data[write_at:write_at + kept])))
        read_at, write_at = read_at + size, write_at + kept
    arena.release(read_at - write_at)
    return tables


def open_dataset(paths_or_manifest: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CellStore]:
    """Stores forming one dataset: a list of store paths, one store path, or a manifest file (JSON or YAML:
    a list of paths, or ``{"stores": [...]}``; relative paths are relative to the manifest's directory)."""
    if isinstance(paths_or_manifest, (str, os.PathLike)):
        path = Path(paths_or_manifest)
        if path.is_file():
            return [CellStore(p) for p in read_manifest(path)]
        return [CellStore(path)]
    stores = [CellStore(p) for p in paths_or_manifest]
    if not stores:
        raise DataError("empty list of stores; pass at least one store path or a manifest")
    return stores


def read_manifest(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the same user error
        raise DataError(f"{path}: cannot parse the manifest ({e}); write a JSON or YAML list of store paths") from None
    entries = data.get("stores") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise DataError(f"{path}: a manifest must list store paths (a list, or {{'stores': [...]}}); fix it")
    return [(path.parent / e) if not Path(e).is_absolute() else Path(e) for e in entries]


def write_manifest(path: str | os.PathLike, stores: Sequence[str | os.PathLike]) -> None:
    """Write a JSON manifest listing ``stores`` relative to the manifest's directory where possible."""
    from scgpt.io import write_json_atomic

    path = Path(path)
    base = path.parent.resolve()
    entries = []
    for store in stores:
        resolved = Path(store).resolve()
        entries.append(os.path.relpath(resolved, base) if resolved.is_relative_to(base) else str(resolved))
    write_json_atomic(path, {"stores": entries})
