"""scgpt/scib.py: graph iLISI / cLISI as scib-metrics defines them, checked by hand and against scib-metrics."""

from __future__ import annotations

import numpy as np
import pytest

from scgpt.metrics import integration_metrics
from scgpt.scib import knn_graph, lisi, lisi_scores


def _blobs(n_per: int = 60, seed: int = 0, mixed: bool = True):
    """Two cell types far apart; batches mixed within each type (or each type one batch when not ``mixed``)."""
    rng = np.random.default_rng(seed)
    types = np.repeat([0, 1], n_per)
    emb = rng.normal(size=(2 * n_per, 5)) + types[:, None] * 20.0
    batches = rng.integers(0, 2, size=2 * n_per) if mixed else types.copy()
    return emb.astype(np.float32), types, batches


def test_one_label_everywhere_gives_lisi_one():
    emb, _, _ = _blobs()
    distances, indices = knn_graph(emb, 30)
    np.testing.assert_allclose(lisi(distances, indices, np.zeros(len(emb), dtype=int)), 1.0)


def test_alternating_labels_at_equal_distances_give_lisi_two():
    # every cell's other neighbours are at the same distance and half carry each label: Simpson 1/2
    n = 40
    indices = np.array([[i, *[(i + j) % n for j in range(1, 9)]] for i in range(n)])
    distances = np.concatenate([np.zeros((n, 1)), np.ones((n, 8))], axis=1)
    labels = np.arange(n) % 2
    np.testing.assert_allclose(lisi(distances, indices, labels, perplexity=3.0), 2.0)


def test_separated_types_mixed_batches_score_high_and_unmixed_score_zero():
    emb, types, batches = _blobs()
    mixed = lisi_scores(emb, types, batches, n_neighbors=30)
    assert mixed["clisi"] == pytest.approx(1.0, abs=1e-6)  # every neighbourhood one type
    assert mixed["ilisi"] > 0.6  # random batches among ~10 effective neighbours
    emb, types, batches = _blobs(mixed=False)
    assert lisi_scores(emb, types, batches, n_neighbors=30)["ilisi"] == pytest.approx(0.0, abs=1e-6)


def test_integration_metrics_report_ilisi_and_clisi():
    emb, types, batches = _blobs()
    out = integration_metrics(emb, types, batches)
    assert {"ilisi", "clisi", "batch_asw", "celltype_asw", "nmi", "ari"} <= set(out)
    assert out["clisi"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_scib_metrics_on_the_same_graph(seed):
    scib_metrics = pytest.importorskip("scib_metrics")
    from scib_metrics.nearest_neighbors import NeighborsResults

    rng = np.random.default_rng(seed)
    n = 300
    types = rng.integers(0, 4, size=n)
    batches = rng.integers(0, 3, size=n)
    emb = (rng.normal(size=(n, 8)) + types[:, None] * 1.5 + batches[:, None] * 0.7).astype(np.float32)
    distances, indices = knn_graph(emb, 90)
    graph = NeighborsResults(indices=indices, distances=distances)
    ours = lisi_scores(emb, types, batches, n_neighbors=90)
    assert ours["ilisi"] == pytest.approx(float(scib_metrics.ilisi_knn(graph, batches)), abs=1e-4)
    assert ours["clisi"] == pytest.approx(float(scib_metrics.clisi_knn(graph, types)), abs=1e-4)
    per_cell = np.asarray(scib_metrics.lisi_knn(graph, batches))
    np.testing.assert_allclose(lisi(distances, indices, batches), per_cell, rtol=1e-3)
    asw = integration_metrics(emb, types, batches)
    assert asw["celltype_asw"] == pytest.approx(float(scib_metrics.silhouette_label(emb, types)), abs=1e-4)
    assert asw["batch_asw"] == pytest.approx(float(scib_metrics.silhouette_batch(emb, types, batches)), abs=1e-4)
