"""Integration end to end with DSBN on single-domain batches, and the embedding map PNG (UMAP or PCA)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from scgpt.errors import ConfigError
from scgpt.plots import embedding_2d, plot_cell_maps
from scgpt.tasks.integration import IntegrationTask
from scgpt.train import train

from conftest import SMALL_DATA, compose_config

RUN = [*SMALL_DATA, "logger=none", "data.val_fraction=0.25", "trainer=debug", "trainer.limit_val_batches=1.0",
       "task=integration", "trainer.max_steps=6", "trainer.val_check_interval=6", "task.module.embedding_map=pca"]


def test_integration_with_dsbn_trains_on_single_domain_batches_and_reports_against_pca(tmp_path):
    summary = train(compose_config(tmp_path, *RUN))
    val = summary["val"]
    assert summary["global_step"] == 6 and {"gep", "mvc", "ecs", "dab"} <= set(val)
    for key in ("celltype_asw", "batch_asw", "batch_mixing", "nmi", "knn_accuracy"):
        assert 0.0 <= val[key] <= 1.0 and 0.0 <= val[f"pca/{key}"] <= 1.0
    assert {"celltype_asw_kept", "batch_mixing_gain", "batch_asw_gain"} <= set(val)
    ckpt = torch.load(summary["checkpoint"], weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["dsbn"] == "input"
    tracked = ckpt["state_dict"]["model.dsbn.num_batches_tracked"]
    # each single-domain batch updates exactly one domain's statistics: one update per step, both domains served
    assert int(tracked.sum()) == 6 and (tracked > 0).all()
    mean = ckpt["state_dict"]["model.dsbn.running_mean"]
    assert not torch.allclose(mean[0], mean[1])  # per-domain statistics
    assert any(isinstance(v, dict) and v.get("domain_key") == "batch" for v in ckpt.values())  # in the data state
    assert (tmp_path / "plots" / "embedding.png").stat().st_size > 0


def test_a_batch_key_other_than_batch_reaches_dsbn_and_dab(tmp_path):
    # Kang's condition column is `stim`: here cell_type plays the batch (6 domains) and batch the label
    summary = train(compose_config(tmp_path, *RUN, "task.batch_key=cell_type", "task.label_key=batch",
                                   "trainer.max_steps=3", "trainer.val_check_interval=3"))
    assert "dab" in summary["val"]
    tracked = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]["model.dsbn.num_batches_tracked"]
    assert len(tracked) == 6 and int(tracked.sum()) == 3  # a domain per cell type; one single-type batch per step


def test_integration_without_the_sampler_sees_mixed_batches(tmp_path):
    summary = train(compose_config(tmp_path, *RUN, "task.domain_key=null", "trainer.max_steps=3",
                                   "trainer.val_check_interval=3", "trainer.limit_val_batches=0"))
    tracked = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]["model.dsbn.num_batches_tracked"]
    assert tracked.tolist() == [3, 3]  # every mixed batch updates both domains


def _clusters(n=300, seed=0):
    g = np.random.default_rng(seed)
    types, batches = g.integers(0, 3, n), g.integers(0, 2, n)
    emb = g.normal(size=(n, 16)) + 4 * np.eye(16)[types] + 2 * np.eye(16)[8 + batches]
    return emb, {"batch": (batches, ["b0", "b1"]), "cell_type": (np.where(np.arange(n) % 50 == 0, -1, types),
                                                                  ["A", "B", "C"])}


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_cell_maps_png_per_embedding_and_colouring(tmp_path, method):
    if method == "umap":
        pytest.importorskip("umap")
    emb, colourings = _clusters()
    written = plot_cell_maps({"model": emb, "PCA": emb[:, ::-1]}, colourings, tmp_path / "map.png", seed=0,
                             method=method, max_cells=200)
    assert written == [tmp_path / "map.png"] and written[0].stat().st_size > 10_000
    xy, used = embedding_2d(emb[:100], 0, method)
    assert xy.shape == (100, 2) and used == method.upper()
    from sklearn.metrics import silhouette_score

    types = colourings["cell_type"][0][:100]
    assert silhouette_score(xy[types >= 0], types[types >= 0]) > 0.2  # the map keeps the cell types apart


def test_map_falls_back_to_pca_with_a_note_without_umap(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    emb, _ = _clusters(60)
    with caplog.at_level(logging.INFO, logger="scgpt"):
        xy, used = embedding_2d(emb, 0, "auto")
    assert used == "PCA" and xy.shape == (60, 2) and "umap-learn is not installed" in caplog.text
    with pytest.raises(ConfigError, match="embedding_map=umap: umap-learn is not installed"):
        embedding_2d(emb, 0, "umap")


def test_bad_map_options_name_the_key():
    model = {"vocab_size": 20, "pad_token_id": 0, "d_model": 8, "n_heads": 2, "n_layers": 1, "d_hid": 8}
    with pytest.raises(ConfigError, match="task.module.embedding_map: unknown value 'tsne'"):
        IntegrationTask(model, {"gep": 1.0}, embedding_map="tsne")
    with pytest.raises(ConfigError, match="task.module.map_max_cells: 1 must be at least 2"):
        IntegrationTask(model, {"gep": 1.0}, map_max_cells=1)
