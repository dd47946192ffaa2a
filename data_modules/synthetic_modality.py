"""A second modality for the synthetic data: protein (ADT) and/or chromatin-accessibility (ATAC) features
tied to cell type, appended as extra columns of the same count matrix.

As 10x Cell Ranger does for multiome and CITE-seq output, every feature is one column of ``X`` and the var
column ``feature_type`` says which modality it is: ``Gene Expression``, ``Antibody Capture`` (names
``ADT_<name>``) or ``Peaks`` (names ``ATAC_<name>``). Counts come from the generator's Gamma-Poisson
sampler, with their own generator ``np.random.default_rng([seed, 11])`` so that the RNA part of a seed's
dataset is the same with or without a second modality.

- Proteins: a log-normal ambient background; each cell type raises its own marker proteins 2-8x (and
  some markers are shared with a second type at a lower fold), a few proteins are uninformative; batches
  scale each protein by a log-normal factor; per-cell ADT library ~ 1000 counts; dispersion 0.3-0.6.
- Peaks: most peaks are rarely open; each cell type opens its own set of peaks 4-10x more often; sparse
  Gamma-Poisson counts (dispersion 1), about a tenth of the peaks non-zero per cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.counts_sampler import sample_counts
from data_modules.modality import ANTIBODY_CAPTURE, FEATURE_TYPE_COLUMN, GENE_EXPRESSION, PEAKS
from scgpt.errors import ConfigError

MODALITY_STREAM = 11  # the generator's second seed coordinate: np.random.default_rng([seed, 11])
_SHARED_MARKER_SHARE = 0.3  # of marker proteins, also raised (less) in a second cell type
_UNINFORMATIVE_SHARE = 0.2  # of proteins, not raised in any cell type


def _check(n_proteins: int, n_peaks: int) -> None:
    for key, value in dict(n_proteins=n_proteins, n_peaks=n_peaks).items():
        if int(value) != value or value < 0:
            raise ConfigError(f"synthetic data: {key}={value!r} must be a non-negative integer (0: off)")


def _group_props(base: np.ndarray, type_mult: np.ndarray, batch_mult: np.ndarray) -> np.ndarray:
    """(T, F) x (B, F) -> per (type, batch) feature proportions (T * B, F), float32."""
    prop = base[None, None, :] * type_mult[:, None, :] * batch_mult[None, :, :]  # (T, B, F)
    prop = prop / prop.sum(-1, keepdims=True)
    return prop.reshape(-1, base.size).astype(np.float32)


def _proteins(rng: np.random.Generator, groups: np.ndarray, n_types: int, n_batches: int,
              n_proteins: int) -> tuple[sp.csr_matrix, dict[str, list[int]]]:
    """ADT counts (C, P) and each type's marker proteins (indices)."""
    base = rng.lognormal(0.0, 0.5, size=n_proteins)  # (P,)
    n_markers = max(min(n_types, n_proteins), int(round(n_proteins * (1 - _UNINFORMATIVE_SHARE))))
    owner = rng.permutation(np.arange(n_markers) % n_types)  # (M,) each marker's cell type
    type_mult = np.ones((n_types, n_proteins))
    type_mult[owner, np.arange(n_markers)] = np.exp(rng.uniform(np.log(2.0), np.log(8.0), size=n_markers))
    if n_types > 1:
        shared = np.flatnonzero(rng.random(n_markers) < _SHARED_MARKER_SHARE)
        second = (owner[shared] + rng.integers(1, n_types, size=shared.size)) % n_types
        type_mult[second, shared] = np.exp(rng.uniform(np.log(1.5), np.log(3.0), size=shared.size))
    batch_mult = rng.lognormal(0.0, 0.2, size=(n_batches, n_proteins)) if n_batches > 1 else np.ones((1, n_proteins))
    shape = (1.0 / rng.uniform(0.3, 0.6, size=n_proteins)).astype(np.float32)
    lib = np.exp(np.log(1000.0) + rng.normal(0.0, 0.4, size=groups.size))
    counts = sample_counts(rng, _group_props(base, type_mult, batch_mult), shape, groups, lib)
    markers = {f"type_{t}": np.flatnonzero(type_mult[t] > 1.0).tolist() for t in range(n_types)}
    return counts, markers


def _peaks(rng: np.random.Generator, groups: np.ndarray, n_types: int, n_batches: int,
           n_peaks: int) -> tuple[sp.csr_matrix, dict[str, list[int]]]:
    """ATAC counts (C, K) and each type's open peaks (indices)."""
    base = rng.lognormal(0.0, 1.0, size=n_peaks)  # (K,)
    size = max(1, n_peaks // (2 * n_types))
    order = rng.permutation(n_peaks)
    type_mult = np.ones((n_types, n_peaks))
    sets = {}
    for t in range(n_types):  # loop over types, not cells
        peaks = order[(t * size + np.arange(size)) % n_peaks]
        type_mult[t, peaks] = np.exp(rng.uniform(np.log(4.0), np.log(10.0), size=size))
        sets[f"type_{t}"] = np.sort(peaks).tolist()
    batch_mult = np.ones((n_batches, n_peaks))
    shape = np.ones(n_peaks, dtype=np.float32)  # dispersion 1
    lib = np.exp(np.log(0.12 * n_peaks) + rng.normal(0.0, 0.4, size=groups.size))
    return sample_counts(rng, _group_props(base, type_mult, batch_mult), shape, groups, lib), sets


def add_modalities(x: sp.csr_matrix, var_names: np.ndarray, cell_type: np.ndarray, batch: np.ndarray,
                   n_cell_types: int, n_batches: int, n_proteins: int, n_peaks: int,
                   seed: int) -> tuple[sp.csr_matrix, pd.DataFrame, dict]:
    """RNA counts ``x`` (C, G) -> (RNA | ADT | ATAC counts, var with ``feature_type``, ground truth for uns)."""
    _check(n_proteins, n_peaks)
    rng = np.random.default_rng([seed, MODALITY_STREAM])
    groups = cell_type * n_batches + batch  # (C,) row of each cell in the (type, batch) proportions
    blocks, names = [x], [np.asarray(var_names)]
    types = [np.full(len(var_names), GENE_EXPRESSION, dtype=object)]
    uns: dict = {}
    if n_proteins:
        counts, markers = _proteins(rng, groups, n_cell_types, n_batches, int(n_proteins))
        protein_names = np.array([f"ADT_PROT{p:03d}" for p in range(n_proteins)])
        blocks.append(counts), names.append(protein_names)
        types.append(np.full(n_proteins, ANTIBODY_CAPTURE, dtype=object))
        uns["protein_markers"] = {t: protein_names[idx].tolist() for t, idx in markers.items()}
    if n_peaks:
        counts, sets = _peaks(rng, groups, n_cell_types, n_batches, int(n_peaks))
        peak_names = np.array([f"ATAC_PEAK{k:05d}" for k in range(n_peaks)])
        blocks.append(counts), names.append(peak_names)
        types.append(np.full(n_peaks, PEAKS, dtype=object))
        uns["open_peaks"] = {t: peak_names[idx].tolist() for t, idx in sets.items()}
    var = pd.DataFrame({FEATURE_TYPE_COLUMN: np.concatenate(types)}, index=pd.Index(np.concatenate(names)))
    return sp.hstack(blocks, format="csr", dtype=np.float32), var, uns
