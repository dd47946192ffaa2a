"""The validating writer of cell stores: ``convert_to_store`` (files) and ``write_store`` (an AnnData), in two
passes with bounded memory, to a temporary name renamed when complete (layout: data_modules/store_format.py)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.core.buffer
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from data_modules.modality import FEATURE_TYPE_COLUMN, GENE_EXPRESSION
from data_modules.sources import _AnnDataSource, _open_source, _Source
from data_modules.store_format import (
    DATA_CHUNK,
    DATA_SHARD,
    FINGERPRINT_METHOD,
    FORMAT_VERSION,
    INDPTR_CHUNK,
    INDPTR_SHARD,
    RESERVED_OBS,
    Fingerprint,
    anndata_writing,
)
from scgpt.errors import DataError
from scgpt.io import progress_bar, replace_directory
from scgpt.tokenizer.vocab import GeneVocab


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
    n_values_rounded: int = 0  # float counts with rounding noise (0.999999999999999) made integers


class _ShardWriter:
    """Appends to a 1-d zarr array in whole shards (no read-modify-write), hashing what it writes."""

    def __init__(self, array: zarr.Array, hasher) -> None:
        # every chunk is written, even one of zeros (a one-gene store's indices): a chunk missing from its
        # shard is then damage (data_modules/integrity.py)
        array = array.with_config({"write_empty_chunks": True})
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


ROUNDING_TOLERANCE = 1e-6  # relative: a value this close to an integer is that integer with float noise


def _check_values(source: _Source, data: np.ndarray, row_of: np.ndarray, first_row: int) -> int:
    """Refuse counts that are not non-negative integers, naming the first offender at full precision; round
    in place values within ROUNDING_TOLERANCE of an integer (0.999999999999999 from a CSV written by R or
    pandas) and return how many were rounded."""
    rounded = 0
    if not np.issubdtype(data.dtype, np.integer):
        nonfinite = ~np.isfinite(data)
        if nonfinite.any():
            row = first_row + int(row_of[np.argmax(nonfinite)])
            raise DataError(f"{source.path}: counts contain NaN or infinite values (row {row}); "
                            "remove or fix those cells before converting")
        nearest = np.round(data)
        off = data != nearest
        noise = off & (np.abs(data - nearest) <= ROUNDING_TOLERANCE * np.maximum(1.0, np.abs(nearest)))
        if (off & ~noise).any():
            i = int(np.argmax(off & ~noise))
            raise DataError(f"{source.path}: found {np.format_float_positional(data[i], trim='-')} in row "
                            f"{first_row + int(row_of[i])}, but raw counts must be non-negative integers "
                            f"(is it log-normalised?); {source.fix_hint}")
        rounded = int(noise.sum())
        data[noise] = nearest[noise]
    negative = data < 0
    if negative.any():
        i = int(np.argmax(negative))
        raise DataError(f"{source.path}: found {data[i]} in row {first_row + int(row_of[i])}, but raw counts "
                        f"must be non-negative integers (is it log-normalised?); {source.fix_hint}")
    return rounded


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
        self.n_rounded = 0  # float counts within ROUNDING_TOLERANCE of an integer

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
                self.n_rounded += _check_values(source, block.data, row_of, local)
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
    def gather(self, scratch: Path, x: zarr.Group, fingerprint: Fingerprint, progress) -> None:
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


def _create_x(group: zarr.Group, n_cells: int, n_genes: int, nnz: int, checksums: bool = True) -> zarr.Group:
    """X's three arrays; ``checksums=False`` writes format 1's codecs (tests of stores written before 2)."""
    x = group.create_group("X", attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                            "shape": [n_cells, n_genes]})
    layout = {"data": ("float32", nnz, DATA_CHUNK, DATA_SHARD), "indices": ("int32", nnz, DATA_CHUNK, DATA_SHARD),
              "indptr": ("int64", n_cells + 1, INDPTR_CHUNK, INDPTR_SHARD)}
    for name, (dtype, size, chunk, shard) in layout.items():
        shuffle = BloscShuffle.bitshuffle if name == "data" else BloscShuffle.shuffle
        # crc32c last: each chunk's encoded bytes carry their checksum (_ShardWriter writes every chunk)
        x.create_array(name, shape=(size,), dtype=dtype, chunks=(chunk,), shards=(shard,), fill_value=0,
                       compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)] + [Crc32cCodec()] * checksums,
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
        with progress_bar(progress) as bar:
            writer.scatter(scratch, bar)
            n_cells = int(writer.kept.sum())
            if n_cells == 0:
                raise DataError(f"{sources[0].path}: no cell has counts in genes of the vocabulary; "
                                "check the vocabulary and the input")
            group = zarr.open_group(str(tmp / "store"), mode="w", zarr_format=3)
            fingerprint = Fingerprint()
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
        replace_directory(tmp / "store", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StoreReport(out, n_cells, meta["n_cells_dropped"], len(writer.genes), writer.n_genes_input,
                       writer.nnz, meta["fingerprint"], time.perf_counter() - start_time, meta["sources"],
                       writer.n_rounded)


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


def write_store(adata: ad.AnnData, out: str | os.PathLike, *, vocab: GeneVocab | None = None,
                obs_keys: Sequence[str] | None = None, seed: int = 0, overwrite: bool = False,
                chunk_cells: int = 10_000, created_by: str = "write_store", name: str = "adata",
                progress: bool = False, uns: dict | None = None) -> StoreReport:
    """Write an in-memory AnnData (``X`` raw counts) as a store; ``uns`` is copied into the store's uns."""
    return _write_store([_AnnDataSource(adata, name)], out, vocab=vocab, vocab_name="given", obs_keys=obs_keys,
                        min_vocab_overlap=0.0, chunk_cells=chunk_cells, seed=seed, overwrite=overwrite,
                        created_by=created_by, progress=progress, extra_uns=uns)
