"""Cells -> model-ready token batches: choose genes, bin values, mask, then pad or pack.

Input cells are sparse: ``gene_ids`` (vocabulary ids of the measured non-zero genes) and their raw
``counts``. Everything after building the (B, N) batch is vectorised, a chunk of cells at a time;
randomness comes only from the generator passed in, seeded by the caller from (seed, epoch, rank,
worker, step), which seeds one numpy generator per batch (never numpy's global state).
"""

from __future__ import annotations

import ctypes
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from data_modules.modality import SPECIAL, bin_per_modality, choose_per_modality
from scgpt.errors import ConfigError
from scgpt.model.layout import TokenLayout, cumulative
from scgpt.tokenizer.binning import bin_rows
from scgpt.tokenizer.masking import mask_rows

LAYOUTS = ("padded", "packed", "packed_known_first")


@dataclass
class CellBatch:
    """A tokenized batch. Per-token tensors are (B, L) when padded, (T,) when packed (each cell's tokens
    together, ``cu_seqlens``) or packed known-first (every cell's known tokens, then every cell's generated
    ones: ``cu_known``, ``cu_gen``; see scgpt/model/layout.py)."""

    gene_ids: Tensor  # long
    values: Tensor  # float: binned input values; mask_value where hidden, pad_value at <cls> and padding
    target_values: Tensor  # float: true binned values
    hidden_mask: Tensor  # bool: values the model must predict
    gen_mask: Tensor  # bool: hidden tokens of generative cells (attend to known genes and themselves)
    generative: Tensor  # (B,) bool: cells trained with the generative attention mask
    padding_mask: Tensor | None = None  # (B, L) bool, padded layout
    cu_seqlens: Tensor | None = None  # (B + 1,) int32, packed layout
    max_seqlen: int = 0  # longest cell (packed layouts)
    cu_known: Tensor | None = None  # (B + 1,) int32, packed known-first: offsets of each cell's known tokens
    cu_gen: Tensor | None = None  # (B + 1,) int32, packed known-first: offsets of each cell's generated tokens
    max_known: int = 0
    max_gen: int = 0
    labels: dict[str, Tensor] = field(default_factory=dict)  # per-cell (B,) long, e.g. cell_type, batch
    modality_ids: Tensor | None = None  # long per token, data with feature types only: 0 RNA, 1 ADT, 2 ATAC,
    # 3 <cls> and padding (data_modules/modality.py)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(padding_mask=self.padding_mask, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen,
                           cu_known=self.cu_known, cu_gen=self.cu_gen, max_known=self.max_known, max_gen=self.max_gen)

    @property
    def n_cells(self) -> int:
        return int(self.generative.numel())

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens, <cls> included."""
        return int(self.gene_ids.numel()) if self.padding_mask is None else int((~self.padding_mask).sum())


@dataclass
class CollatorConfig:
    pad_token_id: int
    cls_token_id: int
    max_seq_len: int = 1200
    n_bins: int = 51
    mask_ratios: Sequence[float] = (0.25, 0.5, 0.75)
    mask_value: float = -1.0
    pad_value: float = -2.0
    include_zero_genes: bool = False
    generative_fraction: float = 0.0
    layout: str = "padded"

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len: is {self.max_seq_len}; needs room for <cls> and one gene (>= 2)")
        if not self.mask_ratios or not all(0.0 <= r <= 1.0 for r in self.mask_ratios):
            raise ConfigError(f"data.mask_ratios: {list(self.mask_ratios)} must be a non-empty list of ratios in [0, 1]")
        if not 0.0 <= self.generative_fraction <= 1.0:
            raise ConfigError(f"data.generative_fraction: {self.generative_fraction} must be in [0, 1]")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout: unknown layout {self.layout!r}; choose {', '.join(LAYOUTS)}")


class CellCollator:
    """Turns sparse cells into a :class:`CellBatch`, vectorised over the whole CSR block (numpy inside:
    collation runs on CPU in data-loader workers, where numpy's row sorts are much faster than torch's).

    ``gene_universe`` (vocabulary ids of every gene the dataset measures) is needed only with
    ``include_zero_genes``: then every measured gene is a candidate token, with value 0 if unexpressed.

    ``gene_modality`` (modality id of every vocabulary id, :func:`data_modules.modality.vocab_modalities`)
    makes batches carry ``modality_ids``, bins each modality on its own and shares ``max_seq_len`` between
    the modalities (see :mod:`data_modules.modality`); without it nothing changes.
    """

    def __init__(self, cfg: CollatorConfig, gene_universe: np.ndarray | Tensor | None = None,
                 gene_modality: np.ndarray | None = None) -> None:
        self.cfg = cfg
        if cfg.include_zero_genes and gene_universe is None:
            raise ConfigError("data.include_zero_genes: needs the dataset's gene list (gene_universe)")
        self.gene_universe = None if gene_universe is None else np.asarray(gene_universe, dtype=np.int64)
        self.gene_modality = None if gene_modality is None else np.asarray(gene_modality, dtype=np.int64)
        self._position: np.ndarray | None = None  # gene id -> column in the gene universe

    def __call__(self, cells: Sequence[dict], generator: torch.Generator) -> CellBatch:
        """Cells as dicts: ``gene_ids`` and ``counts`` arrays, plus integer labels."""
        lengths = [len(c["gene_ids"]) for c in cells]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gene_ids = np.concatenate([np.asarray(c["gene_ids"], dtype=np.int64) for c in cells])
        counts = np.concatenate([np.asarray(c["counts"], dtype=np.float32) for c in cells])
        labels = {k: np.array([c[k] for c in cells]) for k in cells[0] if k not in ("gene_ids", "counts")}
        return self.collate_csr(indptr, gene_ids, counts, labels, generator)

    def collate_table(self, table, rows: np.ndarray, generator: torch.Generator) -> CellBatch:
        """Rows of a :class:`~data_modules.cells.CellTable` (one fancy-indexed CSR slice, no per-cell work)."""
        block = table.counts[rows]
        labels = {k: codes[rows] for k, codes in table.labels.items()}
        return self.collate_csr(block.indptr, table.gene_ids[block.indices], block.data, labels, generator)

    def collate_csr(self, indptr: np.ndarray, gene_ids: np.ndarray, counts: np.ndarray,
                    labels: dict[str, np.ndarray], generator: torch.Generator) -> CellBatch:
        """indptr (B + 1,), gene_ids and counts (nnz,) of B cells -> CellBatch.

        Cells are tokenized ``CHUNK_CELLS`` at a time straight into the (B, L) outputs, so every (cells,
        genes) temporary stays small enough for the CPU caches whatever the batch size; outside DataLoader
        workers the chunks run on a few threads (numpy releases the GIL in its array loops). Random draws
        come from numpy generators seeded from ``generator`` (never numpy's global state), one per chunk,
        so a batch is the same whatever the number of threads.
        """
        _keep_freed_memory()
        cfg = self.cfg
        rng = np.random.Generator(np.random.PCG64(int(torch.randint(0, 2**62, (1,), generator=generator))))
        indptr = np.asarray(indptr, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.float32)
        lengths = np.diff(indptr)
        n_cells = len(lengths)
        n_candidates = self.gene_universe.size if cfg.include_zero_genes else int(lengths.max(initial=0))
        out = _Tokens.empty(n_cells, 1 + min(cfg.max_seq_len - 1, n_candidates), cfg, self.gene_modality is not None)
        options = np.asarray(cfg.mask_ratios, dtype=np.float32)
        ratios = options[rng.integers(len(options), size=n_cells)]  # (B,)
        generative = rng.random(n_cells) < cfg.generative_fraction  # (B,)
        starts = range(0, n_cells, CHUNK_CELLS)
        seeds = rng.integers(0, 2**62, len(starts))  # one generator per chunk: the same result on any threads

        def tokenize_chunk(i: int) -> None:
            a, b = starts[i], min(starts[i] + CHUNK_CELLS, n_cells)
            self._tokenize_rows(indptr[a:b + 1] - indptr[a], gene_ids[indptr[a]:indptr[b]],
                                counts[indptr[a]:indptr[b]], ratios[a:b], generative[a:b],
                                np.random.default_rng(int(seeds[i])), out, a)

        pool = _thread_pool() if len(starts) > 1 else None
        if pool is None:
            for i in range(len(starts)):
                tokenize_chunk(i)
        else:
            list(pool.map(tokenize_chunk, range(len(starts))))  # list(): re-raises a chunk's exception
        as_tensor = torch.from_numpy
        batch = CellBatch(
            gene_ids=as_tensor(out.gene_ids), values=as_tensor(out.values), target_values=as_tensor(out.target),
            hidden_mask=as_tensor(out.hidden), gen_mask=as_tensor(out.gen_mask), generative=as_tensor(generative),
            padding_mask=as_tensor(np.arange(out.gene_ids.shape[1]) > out.n_tokens[:, None]),
            max_seqlen=int(out.n_tokens.max(initial=0)) + 1,
            labels={k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in labels.items()},
            modality_ids=None if out.modality is None else as_tensor(out.modality),
        )
        return PACKERS[cfg.layout](batch)

    def _tokenize_rows(self, indptr, gene_ids, counts, ratios, generative, rng: np.random.Generator,
                       out: "_Tokens", first: int) -> None:
        """Cells ``first ..`` of the batch (their own CSR slice) -> rows of ``out``."""
        cfg = self.cfg
        values, valid = self._candidates(indptr, gene_ids, counts)  # (b, N)
        if self.gene_modality is None:
            bins = bin_rows(values, valid, cfg.n_bins, rng.random(values.shape, dtype=np.float32))  # (b, N)
            chosen, n_tokens = self._choose_genes(valid, rng)  # (b, N), (b,)
        else:
            modality = self._slot_modality(gene_ids, valid)  # (b, N)
            bins = bin_per_modality(values, valid, modality, cfg.n_bins, rng.random(values.shape, dtype=np.float32))
            chosen, n_tokens = choose_per_modality(valid, modality, cfg.max_seq_len - 1, rng)
        rows = slice(first, first + len(n_tokens))
        width = int(n_tokens.max(initial=0))
        tokens = np.arange(width) < n_tokens[:, None]  # (b, w) real gene tokens, after <cls>
        if cfg.include_zero_genes:
            out.gene_ids[rows, 1:width + 1][tokens] = self.gene_universe[np.nonzero(chosen)[1]]
        else:
            out.gene_ids[rows, 1:width + 1][tokens] = gene_ids[chosen[valid]]  # valid slots are CSR order
        out.target[rows, 1:width + 1][tokens] = bins[chosen]
        out.n_tokens[rows] = n_tokens
        if out.modality is not None:
            out.modality[rows, 1:width + 1][tokens] = modality[chosen]
        real_gene = np.zeros((len(n_tokens), width + 1), dtype=bool)  # (b, 1 + w)
        real_gene[:, 1:] = tokens
        hidden = mask_rows(real_gene, ratios, rng.random(real_gene.shape, dtype=np.float32))
        out.hidden[rows, :width + 1] = hidden
        out.gen_mask[rows, :width + 1] = hidden & generative[:, None]
        np.copyto(out.values[rows], out.target[rows])
        np.copyto(out.values[rows, :width + 1], np.float32(cfg.mask_value), where=hidden)

    def _candidates(self, indptr, gene_ids, counts) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's candidate genes, padded: raw counts (b, N) and valid (b, N). The ids of the valid
        slots are ``gene_ids`` in row-major order, or the gene universe with ``include_zero_genes``."""
        lengths = np.diff(indptr)
        if self.cfg.include_zero_genes:
            rows = np.repeat(np.arange(len(lengths)), lengths)  # (nnz,) cell of each value
            position = self._universe_position(gene_ids)
            dense = np.zeros((len(lengths), self.gene_universe.size), dtype=np.float32)  # (b, G)
            known = position >= 0
            dense[rows[known], position[known]] = counts[known]
            return dense, np.ones(dense.shape, dtype=bool)
        valid = np.arange(int(lengths.max(initial=0))) < lengths[:, None]  # (b, N)
        values = np.zeros(valid.shape, dtype=np.float32)
        values[valid] = counts  # row-major order of the valid slots is CSR order
        return values, valid

    def _slot_modality(self, gene_ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Modality id (b, N) of each candidate slot (SPECIAL where not valid)."""
        if self.cfg.include_zero_genes:
            return np.broadcast_to(self.gene_modality[self.gene_universe], valid.shape)
        modality = np.full(valid.shape, SPECIAL, dtype=np.int64)
        modality[valid] = self.gene_modality[gene_ids]  # valid slots are CSR order
        return modality

    def _universe_position(self, gene_ids: np.ndarray) -> np.ndarray:
        """Column of each gene id in the gene universe, -1 for ids outside it."""
        universe = self.gene_universe
        size = int(max(universe.max(initial=0), gene_ids.max(initial=0))) + 1
        if self._position is None or self._position.size < size:
            self._position = np.full(size, -1, dtype=np.int64)
            self._position[universe] = np.arange(universe.size)
        return self._position[gene_ids]

    def _choose_genes(self, valid: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Keep at most max_seq_len - 1 genes per cell, a uniform random sample when there are more
        -> chosen (b, N) bool (in the cells' own gene order) and the number kept per cell (b,)."""
        keep = self.cfg.max_seq_len - 1
        n_valid = np.count_nonzero(valid, axis=1)
        long = n_valid > keep
        if not long.any():  # every cell fits: no sampling
            return valid, n_valid
        keys = rng.random((int(long.sum()), valid.shape[1]), dtype=np.float32)  # the `keep` smallest are kept
        keys[~valid[long]] = 2.0
        sample = keys <= np.partition(keys, keep - 1, axis=1)[:, keep - 1:keep]
        tied = np.flatnonzero(np.count_nonzero(sample, axis=1) > keep)  # equal keys at the cut: rare
        if tied.size:
            picked = np.argpartition(keys[tied], keep - 1, axis=1)[:, :keep]
            rows = np.zeros((tied.size, keys.shape[1]), dtype=bool)
            np.put_along_axis(rows, picked, True, 1)
            sample[tied] = rows
        chosen = valid.copy()
        chosen[long] = sample
        return chosen, np.minimum(n_valid, keep)


CHUNK_CELLS = 128  # cells tokenized at once (measured: 4096-cell chunks run 3x slower per cell, out of cache)
MAX_THREADS = 4
_allocator_tuned = False
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)


def _thread_pool() -> ThreadPoolExecutor | None:
    """Threads for the chunks of a batch: one per available CPU (at most ``MAX_THREADS``, or the
    ``SCGPT_COLLATE_THREADS`` environment variable), none inside DataLoader worker processes, which
    already run one per CPU."""
    global _pool
    if get_worker_info() is not None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = int(os.environ.get("SCGPT_COLLATE_THREADS", min(MAX_THREADS, cpus)))
    if threads <= 1:
        return None
    if _pool is None or _pool[:2] != (os.getpid(), threads):  # a forked child starts its own
        _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="collate"))
    return _pool[2]


def _keep_freed_memory() -> None:
    """Once per process: let glibc keep freed heap memory for reuse instead of handing every large freed
    array back to the kernel. Otherwise each of the collator's many short-lived multi-MB arrays is a
    fresh mmap whose pages fault in and are zeroed on first touch: measured 2.8x slower binning."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # allocations below 32 MiB come from the reusable heap
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)  # keep up to 256 MiB of freed heap before trimming
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass
class _Tokens:
    """The (B, L) outputs of one batch, filled a chunk of cells at a time."""

    gene_ids: np.ndarray  # int64: <cls>, chosen genes, pad
    target: np.ndarray  # float32: pad_value, bins, pad_value
    values: np.ndarray  # float32: target with mask_value where hidden
    hidden: np.ndarray  # bool
    gen_mask: np.ndarray  # bool
    n_tokens: np.ndarray  # (B,) genes per cell, <cls> not counted
    modality: np.ndarray | None = None  # int64: SPECIAL at <cls> and pad, else the feature's modality

    @classmethod
    def empty(cls, n_cells: int, length: int, cfg: CollatorConfig, modality: bool = False) -> "_Tokens":
        gene_ids = np.full((n_cells, length), cfg.pad_token_id, dtype=np.int64)
        gene_ids[:, 0] = cfg.cls_token_id
        return cls(gene_ids=gene_ids, target=np.full((n_cells, length), cfg.pad_value, dtype=np.float32),
                   values=np.empty((n_cells, length), dtype=np.float32),
                   hidden=np.zeros((n_cells, length), dtype=bool), gen_mask=np.zeros((n_cells, length), dtype=bool),
                   n_tokens=np.zeros(n_cells, dtype=np.int64),
                   modality=np.full((n_cells, length), SPECIAL, dtype=np.int64) if modality else None)


def pack_batch(batch: CellBatch) -> CellBatch:
    """Padded (B, L) -> packed (T,) tokens with cu_seqlens; cells stay in order."""
    real = ~batch.padding_mask
    lengths = real.sum(dim=1)
    cu_seqlens = cumulative(lengths)
    return CellBatch(
        gene_ids=batch.gene_ids[real], values=batch.values[real], target_values=batch.target_values[real],
        hidden_mask=batch.hidden_mask[real], gen_mask=batch.gen_mask[real], generative=batch.generative,
        cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()), labels=batch.labels,
        modality_ids=None if batch.modality_ids is None else batch.modality_ids[real],
    )


def pack_known_first(batch: CellBatch) -> CellBatch:
    """Padded (B, L) -> packed (T,) tokens, every cell's known tokens first (cells in order, <cls> first in
    its cell), then every cell's generated tokens (cells in order). Without generated tokens this is
    :func:`pack_batch` (each cell's tokens together, cu_seqlens)."""
    generated = batch.gen_mask  # (B, L), False at padding
    if not bool(generated.any()):
        return pack_batch(batch)
    known = ~batch.padding_mask & ~generated  # (B, L)

    def take(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.cat([t[known], t[generated]])  # (T,)

    n_known, n_gen = known.sum(dim=1), generated.sum(dim=1)  # (B,)
    return CellBatch(
        gene_ids=take(batch.gene_ids), values=take(batch.values), target_values=take(batch.target_values),
        hidden_mask=take(batch.hidden_mask), gen_mask=take(batch.gen_mask), generative=batch.generative,
        max_seqlen=int((n_known + n_gen).max()), cu_known=cumulative(n_known), cu_gen=cumulative(n_gen),
        max_known=int(n_known.max()), max_gen=int(n_gen.max()), labels=batch.labels,
        modality_ids=take(batch.modality_ids),
    )


PACKERS = {"padded": lambda batch: batch, "packed": pack_batch, "packed_known_first": pack_known_first}
