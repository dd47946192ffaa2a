"""Synthetic single-cell data: deterministic, realistic counts with known ground truth."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data_modules.synthetic import default_dataset_path, ensure_synthetic_store, make_synthetic_adata

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_signal import binned_tokens, signal_shares  # noqa: E402

SMALL = dict(n_cells=600, n_genes=300, n_cell_types=3)


@pytest.fixture(scope="module")
def adata():
    return make_synthetic_adata(**SMALL, seed=0)


def test_deterministic_for_a_seed(adata):
    again = make_synthetic_adata(**SMALL, seed=0)
    assert (adata.X != again.X).nnz == 0
    assert adata.obs.equals(again.obs)
    assert adata.uns["gene_programs"] == again.uns["gene_programs"]


def test_different_seeds_differ(adata):
    other = make_synthetic_adata(**SMALL, seed=1)
    assert (adata.X != other.X).nnz > 0


def test_counts_are_non_negative_integers_in_float32_csr(adata):
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    data = adata.X.data
    assert (data >= 0).all()
    np.testing.assert_array_equal(data, np.round(data))


def test_sparsity_is_realistic():
    x = make_synthetic_adata(seed=0).X  # defaults: 2000 cells x 500 genes
    zeros = 1.0 - x.nnz / (x.shape[0] * x.shape[1])
    assert 0.50 <= zeros <= 0.97
    median_library = np.median(np.asarray(x.sum(axis=1)).ravel())
    assert 1500 <= median_library <= 6000
    genes = np.sort(np.asarray(x.sum(axis=0)).ravel())[::-1]
    assert 0.2 <= genes[: x.shape[1] // 20].sum() / genes.sum() <= 0.7  # top 5% of genes: a share, not all


def test_cell_type_drives_a_real_share_of_the_binned_values(adata):
    """Per-cell binned values (what pretraining predicts): gene identity is not all, cell type matters."""
    shares = signal_shares(binned_tokens(adata))
    gene, with_type = shares["gene only"]["r2"], shares["gene + type"]["r2"]
    assert 0.3 <= gene <= 0.7
    assert with_type - gene >= 0.10  # the old generator (90% housekeeping counts): 0.04


def test_no_empty_cells(adata):
    assert (np.diff(adata.X.indptr) > 0).all()
    tiny = make_synthetic_adata(n_cells=200, n_genes=20, n_cell_types=2, seed=3)
    assert (np.asarray(tiny.X.sum(axis=1)).ravel() > 0).all()


def test_labels_and_names(adata):
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    assert list(adata.obs["batch"].cat.categories) == ["batch_0"]
    assert adata.obs_names[0] == "cell_0" and adata.var_names[0] == "SYN00000"
    assert adata.uns["synthetic"]["n_programs"] == 6
    programs = adata.uns["gene_programs"]
    assert all(set(genes) <= set(adata.var_names) for genes in programs.values())
    assert all(set(p) <= set(programs) for p in adata.uns["cell_type_programs"].values())


def test_program_genes_higher_in_their_cell_type(adata):
    x = adata.X.toarray()
    x = x / x.sum(axis=1, keepdims=True)  # normalise away library size
    types = adata.obs["cell_type"].to_numpy()
    owners = {}
    for t, progs in adata.uns["cell_type_programs"].items():
        for p in progs:
            owners.setdefault(p, set()).add(t)
    for t, progs in adata.uns["cell_type_programs"].items():
        own = [p for p in progs if owners[p] == {t}]  # programs no other type activates
        assert own, f"{t} has no program of its own"
        genes = adata.var_names.get_indexer([g for p in own for g in adata.uns["gene_programs"][p]])
        score = {u: x[types == u][:, genes].sum(axis=1).mean() for u in adata.uns["cell_type_programs"]}
        assert all(score[t] > 2.0 * score[u] for u in score if u != t), (t, score)


def _batch_log_ratios(adata):
    x = adata.X.toarray()
    x = x / x.sum(axis=1, keepdims=True)
    b = adata.obs["batch"].cat.codes.to_numpy()
    t = adata.obs["cell_type"].to_numpy() == "type_0"  # same type, so only batch differs
    m0, m1 = x[t & (b == 0)].mean(0), x[t & (b == 1)].mean(0)
    expressed = (m0 > 1e-3) & (m1 > 1e-3)
    return np.log(m0[expressed] / m1[expressed])


def test_batch_effects_present_with_two_batches():
    two = make_synthetic_adata(n_cells=2000, n_genes=300, n_cell_types=2, n_batches=2, seed=0)
    assert list(two.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    one = make_synthetic_adata(n_cells=2000, n_genes=300, n_cell_types=2, n_batches=1, seed=0)
    fake = one.obs["batch"].cat.add_categories(["batch_1"])
    fake[np.arange(one.n_obs) % 2 == 1] = "batch_1"  # an arbitrary split of one batch
    one.obs["batch"] = fake
    assert np.std(_batch_log_ratios(two)) > 2.0 * np.std(_batch_log_ratios(one))


def test_synthetic_store_is_written_once_and_holds_the_dataset(tmp_path):
    from data_modules.store import CellStore

    params = dict(n_cells=100, n_genes=50, n_cell_types=2, seed=4)
    path = ensure_synthetic_store(tmp_path, **params)
    assert path == default_dataset_path(tmp_path, **params) == tmp_path / "synthetic_100x50_t2_b1_s4_v2.zarr"
    mtime = path.stat().st_mtime_ns
    assert ensure_synthetic_store(tmp_path, **params) == path and path.stat().st_mtime_ns == mtime  # not rewritten
    store, made = CellStore(path), make_synthetic_adata(**params)
    assert store.n_cells == 100 and list(store.var_names) == list(made.var_names)
    assert store.label_categories("cell_type") == ["type_0", "type_1"]
    order = store.read_obs("original_index")
    assert (store.read_counts(0, 100) != made.X[order]).nnz == 0  # the same cells, shuffled once
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCGPT_CACHE", str(tmp_path / "cache"))
    assert default_dataset_path().parent == tmp_path / "cache"
    assert default_dataset_path().name == "synthetic_2000x500_t5_b1_s0_v2.zarr"


def test_type_effect_one_is_the_default_data_and_its_cache(adata):
    same = make_synthetic_adata(**SMALL, seed=0, type_effect=1.0)
    assert (adata.X != same.X).nnz == 0 and "type_effect" not in same.uns["synthetic"]
    assert default_dataset_path("/c", **SMALL, type_effect=1.0) == default_dataset_path("/c", **SMALL)
    assert default_dataset_path("/c", **SMALL, type_effect=0.25).name.endswith("_te0.25.zarr")


def test_smaller_type_effect_brings_cell_types_closer(adata):
    """Distance between cell-type mean profiles (log-normalised) shrinks with ``type_effect``; the cell-type
    share of the binned values with it."""
    def type_spread(a):
        x = a.X.toarray()
        x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
        codes = a.obs["cell_type"].cat.codes.to_numpy()
        means = np.stack([x[codes == t].mean(0) for t in np.unique(codes)])  # (T, G)
        return np.linalg.norm(means - means.mean(0), axis=1).mean()

    close = make_synthetic_adata(**SMALL, seed=0, type_effect=0.25)
    assert close.uns["synthetic"]["type_effect"] == 0.25
    assert type_spread(close) < 0.5 * type_spread(adata)
    shares = signal_shares(binned_tokens(close))
    assert shares["gene + type"]["r2"] - shares["gene only"]["r2"] < 0.05


@pytest.mark.parametrize("value", [-0.5, "strong", 50.0])
def test_bad_type_effect_is_a_config_error_naming_the_key(value):
    from scgpt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"synthetic data: type_effect=.* must be a number in \[0, 10\]"):
        make_synthetic_adata(**SMALL, type_effect=value)
