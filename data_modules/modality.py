"""Modalities of features: 10x ``feature_type`` strings -> per-token modality ids, and the collator's
per-modality binning and gene sampling.

Ids: 0 = RNA (``Gene Expression``), 1 = ADT (``Antibody Capture``), 2 = ATAC (``Peaks``), and 3 for the
tokens that are not features (``<cls>`` and padding), so a model with a modality embedding
(``model.n_modalities: 4``) learns a separate vector for ``<cls>`` rather than giving it RNA's, as the
original scGPT multiomic code gives special tokens their own modality tokens.

Per modality, within each cell:
- binning: each modality's non-zero values are binned on their own quantiles (as the original scGPT
  multiomic code bins RNA, ATAC and protein values separately), so a few thousand protein counts do not
  push every RNA value into the lowest bins, and dropping a modality leaves the others' bins unchanged;
- sampling to ``max_seq_len``: the token budget is shared by water-filling: every modality present gets
  an equal share, a modality with fewer features than its share keeps all of them and passes the rest
  on; each modality's tokens are a uniform random sample of its features. A small modality (tens of
  proteins) is therefore always kept whole and a large one (tens of thousands of peaks) cannot crowd
  out RNA.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from scgpt.errors import DataError
from scgpt.tokenizer.binning import bin_rows

FEATURE_TYPE_COLUMN = "feature_type"
INPUT_COLUMNS = (FEATURE_TYPE_COLUMN, "feature_types")  # scanpy's read_10x_h5 names it feature_types
GENE_EXPRESSION, ANTIBODY_CAPTURE, PEAKS = "Gene Expression", "Antibody Capture", "Peaks"
RNA, ADT, ATAC, SPECIAL = 0, 1, 2, 3
MODALITY_NAMES = ("rna", "adt", "atac")
N_MODALITY_IDS = 4  # model.n_modalities for data with modality ids
_CODES = {GENE_EXPRESSION: RNA, ANTIBODY_CAPTURE: ADT, PEAKS: ATAC}


def feature_types_of(var: pd.DataFrame) -> np.ndarray | None:
    """The ``feature_type`` (or ``feature_types``) var column as strings, None without one."""
    column = next((c for c in INPUT_COLUMNS if c in var.columns), None)
    return None if column is None else np.asarray(var[column].astype(str), dtype=object)


def modality_codes(feature_types: Sequence[str], where: str) -> np.ndarray:
    """Feature types -> modality ids (int64); ``where`` names the file in the error."""
    types = pd.Series(np.asarray(feature_types, dtype=str))
    codes = types.map(_CODES)
    if codes.isna().any():
        bad = types[codes.isna()].iloc[0]
        raise DataError(f"{where}: var column {FEATURE_TYPE_COLUMN!r} has {bad!r}; modalities are "
                        f"{', '.join(repr(t) for t in _CODES)}; relabel those features or drop them")
    return codes.to_numpy(dtype=np.int64)


def store_modalities(store) -> np.ndarray | None:
    """Modality id of each of a store's genes, None when its var has no ``feature_type`` column."""
    types = feature_types_of(store.var)
    return None if types is None else modality_codes(types, str(store.path))


def vocab_modalities(sources: Sequence, vocab) -> np.ndarray | None:
    """Modality of every vocabulary id (SPECIAL for ids no store measures), None when no store has a
    ``feature_type`` column (RNA-only data: the collator then works exactly as without modalities)."""
    per_store = [store_modalities(s) for s in sources]
    if all(m is None for m in per_store):
        return None
    size = max(vocab.token_to_id.values()) + 1
    table = np.full(size, SPECIAL, dtype=np.int64)
    for store, modality in zip(sources, per_store):
        ids = vocab.encode(list(store.var_names))
        known = ids >= 0
        table[ids[known]] = RNA if modality is None else modality[known]
    return table


def present_modalities(table: np.ndarray | None) -> list[int]:
    """Modality ids that some vocabulary token has (SPECIAL excluded)."""
    return [] if table is None else sorted(int(m) for m in np.unique(table) if m != SPECIAL)


def bin_per_modality(values: np.ndarray, valid: np.ndarray, modality: np.ndarray, n_bins: int,
                     uniform: np.ndarray) -> np.ndarray:
    """Bins (b, N) of each cell's values, each modality on its own quantiles (``bin_rows`` per modality)."""
    bins = np.zeros(values.shape, dtype=np.float32)
    for m in np.unique(modality[valid]):
        own = valid & (modality == m)  # (b, N)
        np.copyto(bins, bin_rows(values, own, n_bins, uniform), where=own)
    return bins


def token_quota(counts: np.ndarray, keep: int) -> np.ndarray:
    """Tokens per modality (b, M) from features per modality (b, M) and a budget of ``keep``: equal shares
    by water-filling (smallest modality first; what it does not use goes to the others)."""
    rows = np.arange(counts.shape[0])
    order = np.argsort(counts, axis=1, kind="stable")  # (b, M) smallest first
    quota = np.zeros_like(counts)
    remaining = np.full(counts.shape[0], keep, dtype=counts.dtype)
    left = np.count_nonzero(counts, axis=1)  # modalities still to serve
    for j in range(counts.shape[1]):
        c = counts[rows, order[:, j]]
        q = np.minimum(c, remaining // np.maximum(left, 1))
        quota[rows, order[:, j]] = q
        remaining -= q
        left -= c > 0
    return quota


def choose_per_modality(valid: np.ndarray, modality: np.ndarray, keep: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """At most ``keep`` features per cell, each modality's :func:`token_quota` of them a uniform random
    sample -> chosen (b, N) bool and tokens per cell (b,)."""
    n_valid = np.count_nonzero(valid, axis=1)
    if not (n_valid > keep).any():
        return valid, n_valid
    mods = np.unique(modality[valid])
    counts = np.stack([np.count_nonzero(valid & (modality == m), axis=1) for m in mods], axis=1)  # (b, M)
    quota = token_quota(counts, keep)
    keys = rng.random(valid.shape, dtype=np.float32)
    chosen = np.zeros_like(valid)
    for j, m in enumerate(mods):
        own = valid & (modality == m)
        rank = np.argsort(np.argsort(np.where(own, keys, 2.0), axis=1, kind="stable"), axis=1)  # (b, N)
        chosen |= own & (rank < quota[:, j:j + 1])
    return chosen, np.count_nonzero(chosen, axis=1)
