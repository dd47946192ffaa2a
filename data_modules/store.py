"""The streaming reader of cell stores: ``CellStore`` (lazy, fork-safe handles), ``read_blocks`` (several blocks
in two concurrent reads) and dataset manifests. The on-disk layout is described in data_modules/store_format.py;
the writer is data_modules/convert.py, the input readers data_modules/sources.py."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.core.buffer
from zarr.core.sync import sync as zarr_sync

from data_modules import codecs
from data_modules.cells import CellTable, CsrArena
from data_modules.integrity import ChunkChecker, DamagedChunk, cell_range, has_chunk_checksums, indptr_cell_range
from data_modules.store_format import DATA_SHARD, FORMAT_VERSION, X_ARRAYS, Fingerprint
from scgpt.errors import DataError
from scgpt.tokenizer.vocab import GeneVocab


class StoreDamagedError(DataError):
    """A chunk of a store that fails its checksum or cannot be decoded (names the store, array, chunk, cells).

    A DataLoader worker's exception reaches the main process rebuilt from its formatted traceback
    (``ExceptionWrapper.reraise`` calls ``type(msg)``): the constructor keeps only the original line."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


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
            with warnings.catch_warnings(), codecs._python_pipeline():
                warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec
                self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    def _array(self, key: str) -> zarr.Array:
        """Array ``key`` decoded by zarr-python (metadata, obs, whole-array reads: safe before forking)."""
        group = self._open()
        if key not in self._cache:
            with codecs._python_pipeline():
                self._cache[key] = group[key]
        return self._cache[key]

    def _block_array(self, key: str) -> zarr.Array:
        """Array ``key`` decoded by :func:`block_codec_pipeline` (the X reads of blocks)."""
        group = self._open()
        if ("block", key) not in self._cache:
            pipeline = codecs.block_codec_pipeline()
            with zarr.config.set({"codec_pipeline.path": pipeline}):
                self._cache["block", key] = group[key]
            if pipeline == codecs.ZARRS_PIPELINE:
                codecs.note_zarrs_started()
            # zarrs leaves the checksums of chunks read in part unchecked: they are checked after each read;
            # zarr-python checks them, but reads a missing shard file as zeros: its presence is checked
            self._cache["check after read", key] = (None if not self.has_checksums else
                                                    "chunks" if pipeline == codecs.ZARRS_PIPELINE else "shards")
        return self._cache["block", key]

    # integrity -------------------------------------------------------------------------------------
    @property
    def has_checksums(self) -> bool:
        """Whether every X array carries per-chunk crc32c checksums (format 2; read from the array metadata)."""
        if "checksums" not in self._cache:
            self._cache["checksums"] = all(has_chunk_checksums(self._array(f"X/{k}")) for k in X_ARRAYS)
        return self._cache["checksums"]

    def _checker(self, key: str) -> ChunkChecker:
        if ("checker", key) not in self._cache:
            self._cache["checker", key] = ChunkChecker(self.path / key, self._array(key))
        return self._cache["checker", key]

    def check_chunks(self, key: str, start: int, stop: int, shards_only: bool = False) -> None:
        """Raise :class:`StoreDamagedError` for the first chunk of ``key`` ('X/data', ...) holding values
        [start, stop) that fails its checksum, or only whose shard file is gone (``shards_only``); nothing
        to check in a store without checksums."""
        if self.has_checksums:
            checker = self._checker(key)
            damage = (checker.first_missing_shard if shards_only else checker.first_damaged)(start, stop)
            if damage is not None:
                raise StoreDamagedError(self._damage_message(key, damage))

    def _damage_message(self, key: str, damage: DamagedChunk) -> str:
        return (f"{self.path}: {key} chunk {damage.chunk} (values {damage.start}-{damage.stop - 1}, "
                f"{self._cells_of(key, damage.start, damage.stop)}) {damage.reason}: the store is damaged; "
                f"restore it from a copy or convert it again (scgpt-data verify {self.path} lists every "
                "damaged chunk)")

    def _cells_of(self, key: str, start: int, stop: int) -> str:
        if key == "X/indptr":
            return indptr_cell_range(self.n_cells, start, stop)
        try:
            return cell_range(self._array("X/indptr")[:], start, stop)
        except Exception:  # noqa: BLE001 - indptr damaged too
            return "cells unknown: X/indptr is unreadable too"

    # metadata --------------------------------------------------------------------------------------
    n_cells = property(lambda self: int(self.meta["n_cells"]))
    n_genes = property(lambda self: int(self.meta["n_genes"]))
    nnz = property(lambda self: int(self.meta["nnz"]))
    fingerprint = property(lambda self: str(self.meta["fingerprint"]))

    @property
    def var(self) -> pd.DataFrame:
        if "var" not in self._cache:
            with codecs._python_pipeline():
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
            with codecs._python_pipeline():
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
        with codecs._python_pipeline():
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
        indptr = np.empty(stop - start + 1, np.int64)
        _read_checked([(self, "X/indptr", start, stop + 1, indptr)])
        a, b = int(indptr[0]), int(indptr[-1])
        data_array, indices_array = self._block_array("X/data"), self._block_array("X/indices")
        data, indices = np.empty(b - a, data_array.dtype), np.empty(b - a, indices_array.dtype)
        _read_checked([(self, "X/data", a, b, data), (self, "X/indices", a, b, indices)])
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
        fingerprint = Fingerprint()
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
        if not (store.path / "zarr.json").is_file():  # zarr would read the missing chunks as fill values
            raise DataError(f"{store.path}: the cell store is gone (deleted, moved or unmounted during the run); "
                            "put it back")
    indptrs = [np.empty(stop - start + 1, np.int64) for _, start, stop in requests]
    _read_checked([(store, "X/indptr", start, stop + 1, out) for (store, start, stop), out in zip(requests, indptrs)])
    sizes = [int(p[-1] - p[0]) for p in indptrs]
    first = arena.take_slots(sum(sizes))
    reads, offset = [], first
    for (store, _, _), indptr, size in zip(requests, indptrs, sizes):
        a, b = int(indptr[0]), int(indptr[-1])
        reads += [(store, "X/data", a, b, arena.data[offset:offset + size]),
                  (store, "X/indices", a, b, arena.indices[offset:offset + size])]
        offset += size
    _read_checked(reads)
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


def _read_checked(reads: Sequence[tuple[CellStore, str, int, int, np.ndarray]]) -> None:
    """Values [a, b) of array ``key`` of each store into ``out``, all in one concurrent read, never returning
    numbers from a damaged chunk: zarr-python checks each chunk's checksum as it decodes it, and the chunks
    zarrs decoded are checked here (it skips the check for chunks read in part). A failed read is a
    :class:`StoreDamagedError` naming the chunk (or, without checksums, the range that failed)."""
    try:
        zarr_sync(codecs._read_into([(store._block_array(key), a, b, out) for store, key, a, b, out in reads]))
    except (ValueError, RuntimeError, OSError) as exc:
        for store, key, a, b, _ in reads:
            store.check_chunks(key, a, b)
        for store, key, a, b, _ in reads:  # no checksums: the read that fails alone
            try:
                store._array(key)[a:b]
            except (ValueError, RuntimeError, OSError) as inner:
                raise StoreDamagedError(
                    f"{store.path}: {key} values {a}-{b - 1} ({store._cells_of(key, a, b)}) cannot be decoded "
                    f"({' '.join(str(inner).split())[:120]}): the store is damaged; restore it from a copy or "
                    f"convert it again (scgpt-data verify {store.path} lists every damaged chunk)") from exc
        raise
    for store, key, a, b, _ in reads:
        check = store._cache.get(("check after read", key))
        if check:
            store.check_chunks(key, a, b, shards_only=check == "shards")


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
