"""The synthetic second modality: off by default (RNA data bit-identical), ADT / ATAC features tied to
cell type with a ``feature_type`` var column when on."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data_modules.synthetic import GENERATOR_VERSION, default_dataset_path, make_synthetic_adata
from data_modules.synthetic_modality import FEATURE_TYPE_COLUMN
from scgpt.errors import ConfigError

PARAMS = dict(n_cells=300, n_genes=120, n_cell_types=3, n_batches=2, seed=4)
# sha256 of make_synthetic_adata(**PARAMS) of generator version 2 without a second modality (numpy 2.4): the
# default generator must stay bit-identical, since cached stores and other tests depend on it (a change of
# the counts must bump GENERATOR_VERSION, which names the cache, and then this digest).
DEFAULT_DIGEST = "40f52472a9652b37c20ac7f35f47722ff9cfa3530bf2af3e2c11aa60f639c18a"


def _digest(adata) -> str:
    h = hashlib.sha256()
    for arr in (adata.X.indptr.astype(np.int64), adata.X.indices.astype(np.int32), adata.X.data.astype(np.float32),
                adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64),
                adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("|".join(adata.var_names).encode())
    h.update(",".join(map(str, adata.var.columns)).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def multiome():
    return make_synthetic_adata(**PARAMS, n_proteins=12, n_peaks=90)


def test_default_generator_is_bit_identical_without_the_modality():
    adata = make_synthetic_adata(**PARAMS)
    assert FEATURE_TYPE_COLUMN not in adata.var.columns and "n_proteins" not in adata.uns["synthetic"]
    if not np.__version__.startswith("2.4"):
        pytest.skip("reference digest recorded with numpy 2.4 (numpy may change its random streams)")
    assert GENERATOR_VERSION == 2 and _digest(adata) == DEFAULT_DIGEST


def test_second_modality_leaves_the_rna_counts_and_labels_unchanged(multiome):
    rna = make_synthetic_adata(**PARAMS)
    assert (multiome.X[:, :120] != rna.X).nnz == 0
    assert multiome.obs.equals(rna.obs)
    assert list(multiome.var_names[:120]) == list(rna.var_names)


def test_features_have_10x_feature_types_and_distinct_names(multiome):
    types = multiome.var[FEATURE_TYPE_COLUMN]
    assert types.value_counts().to_dict() == {"Gene Expression": 120, "Peaks": 90, "Antibody Capture": 12}
    assert multiome.var_names.is_unique
    assert all(n.startswith("ADT_") for n in multiome.var_names[types == "Antibody Capture"])
    assert all(n.startswith("ATAC_") for n in multiome.var_names[types == "Peaks"])
    data = multiome.X.data
    np.testing.assert_array_equal(data, np.round(data))
    assert multiome.uns["synthetic"]["n_proteins"] == 12 and multiome.uns["synthetic"]["n_peaks"] == 90


def test_cell_types_raise_their_marker_proteins_and_open_their_peaks(multiome):
    types = multiome.obs["cell_type"].to_numpy()
    for key in ("protein_markers", "open_peaks"):
        for cell_type, features in multiome.uns[key].items():
            cols = multiome.var_names.get_indexer(features)
            x = multiome.X[:, cols].toarray()
            inside, outside = x[types == cell_type].mean(), x[types != cell_type].mean()
            assert inside > 1.5 * outside, (key, cell_type, inside, outside)


def test_seeded_and_cached_under_its_own_name():
    a = make_synthetic_adata(**PARAMS, n_proteins=5)
    b = make_synthetic_adata(**PARAMS, n_proteins=5)
    assert (a.X != b.X).nnz == 0
    assert default_dataset_path("/c", **PARAMS, n_proteins=5).name.endswith("_adt5.zarr")
    assert default_dataset_path("/c", **PARAMS) != default_dataset_path("/c", **PARAMS, n_peaks=5)
    with pytest.raises(ConfigError, match="n_proteins=-1"):
        make_synthetic_adata(**PARAMS, n_proteins=-1)
