"""The planted regulator -> target network and perturbation conditions of the synthetic generator."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pytest

from data_modules.synthetic import GENERATOR_VERSION, default_dataset_path, ensure_synthetic_store, make_synthetic_adata
from scgpt.errors import ConfigError

PERT = dict(n_cells=1500, n_genes=200, n_cell_types=3, n_regulators=6, n_perturbations=4, seed=0)


def _digest(adata) -> str:
    h = hashlib.sha256()
    for arr in (adata.X.indptr, adata.X.indices, adata.X.data, adata.obs["cell_type"].cat.codes.to_numpy(),
                adata.obs["batch"].cat.codes.to_numpy()):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("params, digest", [
    (dict(n_cells=600, n_genes=300, n_cell_types=3, seed=0), "aec1b19723d17284"),
    (dict(n_cells=400, n_genes=200, n_cell_types=6, n_batches=2, seed=0), "b0a3394623bdbcdf"),
])
def test_default_generator_is_bit_identical_without_the_network(params, digest):
    """Digests of generator version 2 without the network (cached stores rely on them: a change of the
    counts must bump GENERATOR_VERSION, which names the cache, and then these digests)."""
    adata = make_synthetic_adata(**params)
    assert GENERATOR_VERSION == 2 and _digest(adata) == digest
    assert "perturbation" not in adata.obs and "regulatory_network" not in adata.uns
    assert default_dataset_path("/c", **params) == default_dataset_path(
        "/c", **params, n_regulators=0, n_perturbations=0)


@pytest.fixture(scope="module")
def adata():
    return make_synthetic_adata(**PERT)


def test_network_and_perturbations_are_recorded(adata):
    net = adata.uns["regulatory_network"]
    regulators = list(dict.fromkeys(net["regulator"]))
    assert len(regulators) == 6 and set(net["regulator"]) | set(net["target"]) <= set(adata.var_names)
    sizes = [int((net["regulator"] == r).sum()) for r in regulators]
    assert all(10 <= s <= 20 for s in sizes)
    assert not set(net["target"]) & set(regulators)  # no cascades
    assert (np.abs(net["weight"]) >= 0.5).all() and (np.abs(net["weight"]) <= 1.0).all()
    genes = list(adata.uns["perturbations"]["genes"])
    assert genes == regulators[:4]
    assert list(adata.obs["perturbation"].cat.categories) == ["control", *genes]
    counts = adata.obs["perturbation"].value_counts()
    assert counts["control"] == 750 and all(counts[g] in (187, 188) for g in genes)
    assert adata.uns["synthetic"]["n_perturbations"] == 4


def test_knocked_down_regulator_and_its_targets_drop_in_counts(adata):
    x = adata.X.toarray()
    x = x / x.sum(1, keepdims=True)  # proportions: library size varies per cell
    net = adata.uns["regulatory_network"]
    col = {g: i for i, g in enumerate(adata.var_names)}
    control = x[(adata.obs["perturbation"] == "control").to_numpy()].mean(0)
    for gene in adata.uns["perturbations"]["genes"]:
        perturbed = x[(adata.obs["perturbation"] == gene).to_numpy()].mean(0)
        assert perturbed[col[gene]] < 0.3 * control[col[gene]]  # knocked down to 0.1
        mine = net["regulator"] == gene
        up = [col[t] for t in net["target"][mine & (net["weight"] > 0)]]
        down = [col[t] for t in net["target"][mine & (net["weight"] < 0)]]
        assert np.median(perturbed[up] / control[up]) < 0.6  # positive edges follow the regulator down
        if down:
            assert np.median(perturbed[down] / control[down]) > 1.3  # negative edges go up
        others = np.setdiff1d(np.arange(adata.n_vars), [col[gene], *up, *down])
        assert 0.8 < np.median(perturbed[others] / np.maximum(control[others], 1e-9)) < 1.3


def test_network_only_without_perturbations_marks_every_cell_control():
    adata = make_synthetic_adata(n_cells=300, n_genes=150, n_cell_types=3, n_regulators=3, seed=1)
    assert set(adata.obs["perturbation"]) == {"control"} and len(adata.uns["regulatory_network"]["target"]) >= 30


def test_store_carries_the_perturbation_column_and_network(tmp_path):
    params = dict(n_cells=300, n_genes=150, n_cell_types=3, n_regulators=3, n_perturbations=2, seed=2)
    path = ensure_synthetic_store(tmp_path, **params)
    assert "reg3_pert2" in path.name and path != default_dataset_path(tmp_path, **{**params, "n_perturbations": 1})
    stored = ad.read_zarr(path)
    original = make_synthetic_adata(**params)
    assert set(stored.obs["perturbation"].cat.categories) == set(original.obs["perturbation"].cat.categories)
    assert sorted(stored.obs["perturbation"].astype(str)) == sorted(original.obs["perturbation"].astype(str))
    np.testing.assert_array_equal(stored.uns["regulatory_network"]["target"], original.uns["regulatory_network"]["target"])
    np.testing.assert_allclose(stored.uns["regulatory_network"]["weight"], original.uns["regulatory_network"]["weight"])


@pytest.mark.parametrize("params, message", [
    (dict(n_regulators=2, n_perturbations=3), "n_perturbations=3 must be an integer between 0 and n_regulators=2"),
    (dict(n_regulators=2, n_perturbations=1, perturbed_fraction=1.0), "perturbed_fraction=1.0 must be in"),
    (dict(n_regulators=2, perturbation_factor=1.0), "perturbation_factor=1.0 must be positive and not 1"),
    (dict(n_regulators=80), "n_regulators=80 is too many"),
    (dict(n_regulators=2, regulator_activity=-0.5), "regulator_activity=-0.5 must be >= 0"),
])
def test_bad_perturbation_parameters_name_the_key(params, message):
    with pytest.raises(ConfigError, match=message):
        make_synthetic_adata(n_cells=100, n_genes=100, n_cell_types=2, **params)


def _within_type_target_correlation(adata, cell_type: str) -> float:
    """Median correlation, over the positive edges, of regulator and target log proportions across the
    control cells of one type."""
    cells = ((adata.obs["cell_type"] == cell_type) & (adata.obs["perturbation"] == "control")).to_numpy()
    x = adata.X[cells].toarray()
    x = np.log1p(1e4 * x / x.sum(1, keepdims=True))
    col = {g: i for i, g in enumerate(adata.var_names)}
    net = adata.uns["regulatory_network"]
    pairs = [(col[r], col[t]) for r, t, w in zip(net["regulator"], net["target"], net["weight"]) if w > 0]
    return float(np.median([np.corrcoef(x[:, r], x[:, t])[0, 1] for r, t in pairs]))


def test_regulator_activity_makes_targets_follow_regulators_within_a_type():
    params = dict(n_cells=1500, n_genes=200, n_cell_types=3, n_regulators=4, seed=0)
    still, active = make_synthetic_adata(**params), make_synthetic_adata(**params, regulator_activity=0.8)
    assert still.uns["regulatory_network"]["target"].tolist() == active.uns["regulatory_network"]["target"].tolist()
    assert abs(_within_type_target_correlation(still, "type_0")) < 0.1  # within a type: only sampling noise
    assert _within_type_target_correlation(active, "type_0") > 0.2
    assert active.uns["synthetic"]["regulator_activity"] == 0.8 and "regulator_activity" not in still.uns["synthetic"]
    assert default_dataset_path("/c", **params) != default_dataset_path("/c", **params, regulator_activity=0.8)
