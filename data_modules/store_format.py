"""The cell store: an AnnData Zarr (v3) store of CSR raw counts, its bounded-memory writer and its reader.

On-disk layout (``anndata.read_zarr(path)`` opens it; metadata is consolidated into ``zarr.json``)::

    X/          csr_matrix, shape (n_cells, n_genes)
      data      float32 raw counts (integer-valued)   chunks 131072 values, shards of 16 chunks, blosc-zstd
      indices   int32 column (gene) index per value   same chunks and shards
      indptr    int64 (n_cells + 1,)                  chunks 65536, shards of 16 chunks
              each chunk's codec chain ends with ``crc32c`` (format 2): the CRC32C of its encoded bytes,
              checked by every reader (zarr-python, anndata; zarrs and data_modules/integrity.py: see there);
              every chunk is written, even one of zeros, so a chunk missing from its shard is damage
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
Only ``X`` and ``var`` enter it; obs metadata does not. Its header stays ``scgpt-store-v1`` in every format
version, so a store's fingerprint depends on its contents only.

Format versions: 1, no per-chunk checksums (still read; ``scgpt-data inspect`` says so); 2, per-chunk
``crc32c`` in X (the array metadata says which arrays carry it: :func:`data_modules.integrity.has_chunk_checksums`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import anndata as ad

FORMAT_VERSION = 2  # 2: per-chunk crc32c checksums in X
FIRST_CHECKSUMMED_VERSION = 2
FINGERPRINT_VERSION = 1  # the fingerprint's header: unchanged by format versions
X_ARRAYS = ("indptr", "indices", "data")  # the fingerprint's order
DATA_CHUNK, DATA_SHARD = 131_072, 16 * 131_072  # nonzeros per chunk / per shard
INDPTR_CHUNK, INDPTR_SHARD = 65_536, 16 * 65_536
RESERVED_OBS = ("original_index", "source")
FINGERPRINT_METHOD = "sha256(header, var names, sha256(indptr), sha256(indices), sha256(data))"


class Fingerprint:
    """The store's content fingerprint, fed while writing (or re-reading) indptr, indices and data."""

    def __init__(self) -> None:
        self.parts = {k: hashlib.sha256() for k in X_ARRAYS}

    def digest(self, n_cells: int, n_genes: int, nnz: int, var_names: Sequence[str]) -> str:
        h = hashlib.sha256(f"scgpt-store-v{FINGERPRINT_VERSION} {n_cells} {n_genes} {nnz}\n".encode())
        h.update("\n".join(map(str, var_names)).encode())
        for part in self.parts.values():
            h.update(part.digest())
        return h.hexdigest()


def anndata_writing(**settings):
    """``anndata.settings.override`` for our writes, also letting anndata write pandas >= 3's nullable
    strings (pandas 3 infers them for every string column and index; anndata refuses them by default)."""
    if hasattr(ad.settings, "allow_write_nullable_strings"):
        settings.setdefault("allow_write_nullable_strings", True)
    return ad.settings.override(**settings)
