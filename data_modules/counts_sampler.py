"""Gamma-Poisson count sampling shared by the synthetic generators (RNA, ADT and ATAC counts)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

_CHUNK_CELLS = 4096  # cells per sampling chunk; fixed so that results depend only on the seed


def _sample_chunk(
    rng: np.random.Generator, mean: np.ndarray, shape: np.ndarray, rows: np.ndarray, lib: np.ndarray
) -> sp.csr_matrix:
    mu = mean[rows] * lib[:, None].astype(np.float32)  # (C, G)
    rate = rng.standard_gamma(shape, size=mu.shape, dtype=np.float32) / shape  # mean 1, var 1/shape
    return sp.csr_matrix(rng.poisson(mu * rate).astype(np.float32))


def sample_counts(
    rng: np.random.Generator, mean: np.ndarray, shape: np.ndarray, rows: np.ndarray, lib: np.ndarray
) -> sp.csr_matrix:
    """Gamma-Poisson counts with mean ``lib[c] * mean[rows[c]]`` per gene.

    Cells are cut into fixed chunks, each with its own spawned generator, and sampled on threads (numpy
    releases the GIL while sampling); the result depends only on the seed, not on the thread count.
    """
    starts = range(0, rows.size, _CHUNK_CELLS)
    chunk_rngs = rng.spawn(len(starts))
    jobs = [(g, mean, shape, rows[s : s + _CHUNK_CELLS], lib[s : s + _CHUNK_CELLS]) for g, s in zip(chunk_rngs, starts)]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 8)) as pool:
        blocks = list(pool.map(lambda job: _sample_chunk(*job), jobs))
    return sp.vstack(blocks, format="csr", dtype=np.float32)
