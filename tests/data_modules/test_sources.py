"""Input readers: an .h5ad written by anndata < 0.8 (categorical obs as int codes + ``obs/__categories``)."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest

from data_modules.convert import convert_to_store
from data_modules.sources import _open_source

CONDITIONS = np.array(["CTRL", "STIM"], dtype=object)
TYPES = np.array(["B", "CD14 Mono", "NK"], dtype=object)


def _write_legacy_h5ad(path, n_cells: int = 12, n_genes: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layout of anndata 0.7 (e.g. the Kang et al. tutorial file): dense X, obs as a dataframe group whose
    categorical columns are int8 codes with an attribute referencing their categories in obs/__categories."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # every cell expresses a gene
    stim_codes = np.arange(n_cells, dtype=np.int8) % 2
    type_codes = (np.arange(n_cells, dtype=np.int8) // 2) % 3
    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=counts)
        obs = f.create_group("obs")
        obs.attrs.update({"_index": "index", "encoding-type": "dataframe", "encoding-version": "0.1.0"})
        obs.attrs["column-order"] = np.array(["stim", "cell_type", "n_counts"], dtype=object)
        obs.create_dataset("index", data=np.array([f"cell{i}" for i in range(n_cells)], dtype=object), dtype=text)
        categories = obs.create_group("__categories")
        for name, cats, codes in (("stim", CONDITIONS, stim_codes), ("cell_type", TYPES, type_codes)):
            cats_ds = categories.create_dataset(name, data=cats, dtype=text)
            cats_ds.attrs["ordered"] = False
            obs.create_dataset(name, data=codes)
            obs[name].attrs["categories"] = cats_ds.ref
        obs.create_dataset("n_counts", data=counts.sum(1).astype(np.int64))
        var = f.create_group("var")
        var.attrs.update({"_index": "index", "encoding-type": "dataframe", "encoding-version": "0.1.0"})
        var.attrs["column-order"] = np.array([], dtype=float)
        var.create_dataset("index", data=np.array([f"G{i}" for i in range(n_genes)], dtype=object), dtype=text)
    return counts, CONDITIONS[stim_codes], TYPES[type_codes]


@pytest.fixture()
def legacy_h5ad(tmp_path):
    path = tmp_path / "legacy.h5ad"
    return path, *_write_legacy_h5ad(path)


def test_legacy_categorical_obs_keep_their_categories(legacy_h5ad):
    path, _, stim, cell_type = legacy_h5ad
    source = _open_source(path, None, None)
    try:
        assert source.obs_columns == ["stim", "cell_type", "n_counts"]
        assert list(source.read_obs("stim")) == list(stim)
        assert list(source.read_obs("cell_type")) == list(cell_type)
        assert source.read_obs("n_counts").dtype.kind == "i"
    finally:
        source.close()


def test_legacy_h5ad_converts_with_labels_and_dense_rows_in_chunks(legacy_h5ad, tmp_path):
    path, counts, stim, cell_type = legacy_h5ad
    convert_to_store([path], tmp_path / "legacy.zarr", chunk_cells=5, progress=False)
    back = ad.read_zarr(tmp_path / "legacy.zarr")
    order = np.asarray([int(name.removeprefix("cell")) for name in back.obs_names])
    assert list(back.obs["stim"].astype(str)) == list(stim[order])
    assert list(back.obs["cell_type"].astype(str)) == list(cell_type[order])
    assert set(back.obs["stim"].cat.categories) == {"CTRL", "STIM"}
    genes = [str(g) for g in back.var_names]
    columns = [int(g.removeprefix("G")) for g in genes]
    np.testing.assert_array_equal(back.X.toarray(), counts[order][:, columns])


def test_current_h5ad_categoricals_still_read(tmp_path):
    adata = ad.AnnData(np.ones((4, 3), dtype=np.float32))
    adata.obs["stim"] = np.array(["CTRL", "STIM", "CTRL", "STIM"])
    adata.obs["stim"] = adata.obs["stim"].astype("category")
    adata.write_h5ad(tmp_path / "new.h5ad")
    source = _open_source(tmp_path / "new.h5ad", None, None)
    try:
        assert list(source.read_obs("stim")) == ["CTRL", "STIM", "CTRL", "STIM"]
    finally:
        source.close()
