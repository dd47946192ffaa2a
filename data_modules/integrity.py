"""Integrity of cell stores: the per-chunk checksums of X, checked outside the codec pipeline, and the
whole-store verification behind ``scgpt-data verify``.

Stores of format 2 end every encoded chunk of ``X/indptr``, ``X/indices`` and ``X/data`` with the CRC32C of
its bytes (Zarr v3's ``crc32c`` codec, last in each shard's chunk codec chain; the shard index carries its
own CRC32C as in every sharded Zarr array). zarr-python checks a chunk's checksum whenever it decodes it.
The zarrs pipeline checks it only when it decodes a whole shard: for a read of part of a shard (every block
the stream reads) its ``crc32c`` partial decoder strips the checksum unchecked (zarrs 0.23), so damaged
bytes would decode to other numbers. :class:`ChunkChecker` therefore reads the encoded chunks behind a
value range straight from the shard files and compares their checksums: after every zarrs read, to find the
chunk behind a failed read, and in :func:`verify_store`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from data_modules.store_format import X_ARRAYS, Fingerprint

_EMPTY = np.uint64(2**64 - 1)  # shard index entry of a chunk that was never written


def crc32c_function() -> Callable[[object], int]:
    """The fastest CRC32C at hand: the ``crc32c`` package (hardware, ~10 GB/s here; extra ``fast``) or
    ``google_crc32c`` (zarr's own dependency, ~3 GB/s here)."""
    try:
        from crc32c import crc32c

        return crc32c
    except ImportError:
        import google_crc32c

        return google_crc32c.value


def has_chunk_checksums(array: zarr.Array) -> bool:
    """Whether ``array`` is sharded with a ``crc32c`` codec last in its chunk chain and in its index chain."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return False
    sharding = codecs[0]
    return (isinstance(sharding.codecs[-1], Crc32cCodec) and len(sharding.index_codecs) == 2
            and isinstance(sharding.index_codecs[-1], Crc32cCodec))


@dataclass(frozen=True)
class DamagedChunk:
    """A chunk of one X array that cannot be trusted."""

    chunk: int  # index of the chunk in the array; it holds values [start, stop)
    start: int
    stop: int
    reason: str  # e.g. "fails its checksum"


class ChunkChecker:
    """Checks the CRC32C of the encoded chunks of one sharded X array, reading the shard files directly."""

    def __init__(self, array_dir: Path, array: zarr.Array) -> None:
        if not has_chunk_checksums(array):
            raise ValueError(f"{array_dir}: no per-chunk checksums")
        sharding: ShardingCodec = array.metadata.codecs[0]
        self.array_dir, self.array = array_dir, array
        self.size = int(array.shape[0])
        self.chunk = int(sharding.chunk_shape[0])
        self.per_shard = int(array.shards[0]) // self.chunk
        self.index_bytes = 16 * self.per_shard + 4
        self.index_at_end = sharding.index_location == ShardingCodecIndexLocation.end
        self.crc32c = crc32c_function()

    def chunk_values(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk, min((chunk + 1) * self.chunk, self.size)

    def damaged(self, start: int, stop: int) -> Iterator[DamagedChunk]:
        """Every damaged chunk holding values of [start, stop), in order."""
        if stop <= start:
            return
        first, last = start // self.chunk, (stop - 1) // self.chunk
        for shard in range(first // self.per_shard, last // self.per_shard + 1):
            lo, hi = max(first, shard * self.per_shard), min(last, (shard + 1) * self.per_shard - 1)
            yield from self._check_shard(shard, lo, hi)

    def first_damaged(self, start: int, stop: int) -> DamagedChunk | None:
        return next(self.damaged(start, stop), None)

    def first_missing_shard(self, start: int, stop: int) -> DamagedChunk | None:
        """The first chunk of [start, stop) whose shard file is gone (zarr-python reads it as zeros)."""
        if stop <= start:
            return None
        for shard in range(start // (self.chunk * self.per_shard), (stop - 1) // (self.chunk * self.per_shard) + 1):
            path = self.array_dir / self.array.metadata.encode_chunk_key((shard,))
            if not path.exists():
                chunk = max(shard * self.per_shard, start // self.chunk)
                return DamagedChunk(chunk, *self.chunk_values(chunk), f"is missing (its shard file {path.name} is gone)")
        return None

    def _damage(self, chunks: range, reason: str) -> Iterator[DamagedChunk]:
        for chunk in chunks:
            yield DamagedChunk(chunk, *self.chunk_values(chunk), reason)

    def _check_shard(self, shard: int, lo: int, hi: int) -> Iterator[DamagedChunk]:
        """Chunks lo..hi (array indices, all in ``shard``)."""
        chunks = range(lo, hi + 1)
        path = self.array_dir / self.array.metadata.encode_chunk_key((shard,))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield from self._damage(chunks, f"is missing (its shard file {path.name} is gone)")
            return
        try:
            size = os.fstat(fd).st_size
            if size < self.index_bytes:
                yield from self._damage(chunks, f"is missing (its shard file {path.name} is cut short)")
                return
            raw = os.pread(fd, self.index_bytes, size - self.index_bytes if self.index_at_end else 0)
            if self.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                yield from self._damage(chunks, "is unreadable (its shard's index fails its checksum)")
                return
            index = np.frombuffer(raw, "<u8", 2 * self.per_shard).reshape(self.per_shard, 2)
            local = index[lo - shard * self.per_shard:hi - shard * self.per_shard + 1]
            yield from self._check_chunks(fd, size, chunks, local)
        finally:
            os.close(fd)

    def _check_chunks(self, fd: int, size: int, chunks: range, local: np.ndarray) -> Iterator[DamagedChunk]:
        written = local[:, 0] != _EMPTY
        ends = np.where(written, local[:, 0] + local[:, 1], 0)
        if (ends > size).any() or ((local[:, 1] < 4) & written).any():
            yield from self._damage(chunks, "is unreadable (its shard's index points outside the shard)")
            return
        span_start = int(local[written, 0].min()) if written.any() else 0
        span = os.pread(fd, int(ends.max()) - span_start, span_start) if written.any() else b""
        view = memoryview(span)
        for chunk, (offset, nbytes), ok in zip(chunks, local.tolist(), written.tolist()):
            if not ok:
                yield DamagedChunk(chunk, *self.chunk_values(chunk), "is missing from its shard")
                continue
            encoded = view[offset - span_start:offset - span_start + nbytes]
            if self.crc32c(encoded[:-4]) != int.from_bytes(encoded[-4:], "little"):
                yield DamagedChunk(chunk, *self.chunk_values(chunk), "fails its checksum")


# ------------------------------------------------------------------------------------------------
# scgpt-data verify
# ------------------------------------------------------------------------------------------------
@dataclass
class Verification:
    """What :func:`verify_store` found in one store."""

    path: Path
    checksums: bool
    problems: list[str] = field(default_factory=list)
    fingerprint_matches: bool | None = None  # None: not recomputed (a chunk could not be read)

    @property
    def clean(self) -> bool:
        return not self.problems


def cell_range(indptr: np.ndarray | None, start: int, stop: int) -> str:
    """'cells a-b' holding values [start, stop) of X/data or X/indices ('' without a readable indptr)."""
    if indptr is None or stop <= start:
        return ""
    first = int(np.searchsorted(indptr, start, side="right")) - 1
    last = int(np.searchsorted(indptr, stop, side="left")) - 1
    return f"cells {max(first, 0)}-{max(last, first, 0)}"


def indptr_cell_range(n_cells: int, start: int, stop: int) -> str:
    """'cells a-b' whose bounds are entries [start, stop) of X/indptr."""
    return f"cells {max(start - 1, 0)}-{min(stop, n_cells) - 1}"


class _StoreVerifier:
    """Reads every value of X once (zarr-python, shard-sized ranges), checking chunks, values, structure
    and the fingerprint; ``report`` receives each problem line as it is found."""

    def __init__(self, store, report: Callable[[str], None], max_problems: int) -> None:
        self.store, self.report, self.max_problems = store, report, max_problems
        self.arrays = {key: store._array(f"X/{key}") for key in X_ARRAYS}
        self.result = Verification(store.path, all(has_chunk_checksums(a) for a in self.arrays.values()))
        self.fingerprint, self.complete, self.indptr = Fingerprint(), True, None
        self.hidden = 0

    def problem(self, line: str) -> None:
        self.result.problems.append(line)
        if len(self.result.problems) <= self.max_problems:
            self.report(f"{self.store.path}: {line}")
        else:
            self.hidden += 1

    def where(self, key: str, start: int, stop: int) -> str:
        cells = (indptr_cell_range(self.store.n_cells, start, stop) if key == "indptr"
                 else cell_range(self.indptr, start, stop))
        return f"values {start}-{stop - 1}" + (f", {cells}" if cells else "")

    def run(self, advance: Callable[[int], None]) -> Verification:
        expected = {"indptr": self.store.n_cells + 1, "indices": self.store.nnz, "data": self.store.nnz}
        for key in X_ARRAYS:
            if self.arrays[key].shape[0] != expected[key]:
                self.problem(f"X/{key} holds {self.arrays[key].shape[0]} values but the store's attributes say "
                             f"{expected[key]}")
                self.complete = False
        indptr_parts = []
        for key in X_ARRAYS:
            array, step = self.arrays[key], int(self.arrays[key].shards[0])
            for start in range(0, array.shape[0], step):
                stop = min(start + step, array.shape[0])
                values = self.read(key, start, stop)
                if values is not None:
                    self.fingerprint.parts[key].update(np.ascontiguousarray(values).tobytes())
                    self.check_values(key, values, start)
                    if key == "indptr":
                        indptr_parts.append(np.asarray(values, np.int64))
                advance(stop - start)
            if key == "indptr" and self.complete:
                self.indptr = np.concatenate(indptr_parts) if indptr_parts else np.zeros(1, np.int64)
                self.check_indptr()
        if self.complete:
            digest = self.fingerprint.digest(self.store.n_cells, self.store.n_genes, self.store.nnz,
                                             self.store.var_names)
            self.result.fingerprint_matches = digest == self.store.fingerprint
            if not self.result.fingerprint_matches:
                self.problem(f"fingerprint {digest[:16]}... differs from the stored {self.store.fingerprint[:16]}...: "
                             "X or the gene names changed after conversion")
        if self.hidden:
            self.report(f"{self.store.path}: ... and {self.hidden} more problems")
        return self.result

    def read(self, key: str, start: int, stop: int) -> np.ndarray | None:
        """Values [start, stop) of X/key, or None after reporting every chunk of it that is damaged."""
        array = self.arrays[key]
        damaged = {}
        if self.result.checksums:
            checker = ChunkChecker(self.store.path / "X" / key, array)
            damaged = {d.chunk: d for d in checker.damaged(start, stop)}
        if not damaged:
            try:
                return array[start:stop]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a damaged chunk, found below
                first_error = exc
        else:
            first_error = None
        self.complete = False
        chunk = int(array.chunks[0])
        for index in range(start // chunk, -(-stop // chunk)):
            a, b = index * chunk, min((index + 1) * chunk, array.shape[0])
            if index in damaged:
                self.problem(f"X/{key} chunk {index} ({self.where(key, a, b)}) {damaged[index].reason}")
                continue
            try:
                array[a:b]
            except Exception as exc:  # noqa: BLE001
                self.problem(f"X/{key} chunk {index} ({self.where(key, a, b)}) cannot be decoded: "
                             f"{' '.join(str(exc).split())[:120]}")
                first_error = None
        if first_error is not None:  # the range failed as a whole but no chunk alone: name the range
            self.problem(f"X/{key} {self.where(key, start, stop)} cannot be read: {first_error}")
        return None

    def check_values(self, key: str, values: np.ndarray, start: int) -> None:
        if key == "data":
            bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
            what = "are not finite, non-negative integers"
        elif key == "indices":
            bad = (values < 0) | (values >= self.store.n_genes)
            what = f"are not gene columns 0-{self.store.n_genes - 1}"
        else:
            return
        if not bad.any():
            return
        chunk = int(self.arrays[key].chunks[0])
        positions = start + np.flatnonzero(bad)
        for index in np.unique(positions // chunk):
            in_chunk = positions[positions // chunk == index]
            first = int(in_chunk[0])
            a, b = int(index) * chunk, min((int(index) + 1) * chunk, self.arrays[key].shape[0])
            example = f"{values[first - start]:g} at value {first}"
            if self.indptr is not None:
                example += f" (cell {int(np.searchsorted(self.indptr, first, side='right')) - 1})"
            self.problem(f"X/{key} chunk {int(index)} ({self.where(key, a, b)}): {in_chunk.size} values {what}, "
                         f"e.g. {example}")

    def check_indptr(self) -> None:
        indptr = self.indptr
        if indptr[0] != 0 or indptr[-1] != self.store.nnz:
            self.problem(f"X/indptr runs from {indptr[0]} to {indptr[-1]}, not from 0 to nnz {self.store.nnz}")
        steps = np.flatnonzero(np.diff(indptr) <= 0)
        if steps.size:
            self.problem(f"X/indptr: {steps.size} cells hold no values or a negative number of them, e.g. "
                         f"cell {int(steps[0])}")
            self.indptr = None  # cell ranges from it would be wrong


def verify_store(store, report: Callable[[str], None], progress: bool = False,
                 max_problems: int = 50) -> Verification:
    """Check every chunk (checksums, where the store has them), every value (data: finite, non-negative,
    integer; indices: gene columns; indptr: increasing from 0 to nnz) and the content fingerprint of
    ``store`` (a :class:`~data_modules.store.CellStore`); each problem goes to ``report`` as one line."""
    from scgpt.io import progress_bar

    verifier = _StoreVerifier(store, report, max_problems)
    total = sum(int(a.shape[0]) for a in verifier.arrays.values())
    with progress_bar(progress) as bar:
        task = bar.add_task(f"verifying {store.path.name}", total=total)
        return verifier.run(lambda n: bar.advance(task, n))
