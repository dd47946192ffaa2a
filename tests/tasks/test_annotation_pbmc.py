"""Annotation smoke test on real cells: scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 10 ``bulk_labels``).

Its ``X`` is scaled and its ``.raw.X`` is ``log1p`` of counts normalised to 10,000 per cell over 765 genes,
with each cell's total in ``obs["n_counts"]``; so ``expm1(raw.X) * n_counts / 1e4`` gives back the raw counts
of those genes (within 0.1 of integers; rounded here). Those counts go through the normal path: a cell
store, ``scgpt-train task=annotation data=zarr``, and ``scgpt-annotate`` on an .h5ad of the same counts.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt.annotate import annotate_file
from scgpt.train import train

from conftest import compose_config


def pbmc68k_counts() -> ad.AnnData:
    """Raw counts of pbmc68k_reduced's 765 genes, with ``obs["cell_type"]`` = ``bulk_labels``."""
    sc = pytest.importorskip("scanpy")
    pbmc = sc.datasets.pbmc68k_reduced()
    logs = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else np.asarray(pbmc.raw.X)
    counts = np.expm1(logs.astype(np.float64)) * pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4
    assert np.abs(counts - np.round(counts)).max() < 0.1  # really counts: normalised to 1e4 per cell, then log1p
    obs = pd.DataFrame({"cell_type": pbmc.obs["bulk_labels"].astype(str).astype("category")}, index=pbmc.obs_names)
    return ad.AnnData(sp.csr_matrix(np.round(counts).astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=pbmc.raw.var_names.astype(str)))


def test_annotation_smoke_on_pbmc68k_reduced(tmp_path):
    from data_modules.convert import write_store

    adata = pbmc68k_counts()
    write_store(adata, tmp_path / "pbmc.zarr", obs_keys=["cell_type"], seed=0)
    summary = train(compose_config(
        tmp_path / "run", "task=annotation", "data=zarr", f"data.paths=[{tmp_path / 'pbmc.zarr'}]",
        "data.label_keys=[cell_type]", "data.num_workers=0", "data.block_size=128", "data.buffer_blocks=4",
        "data.val_fraction=0.25", "data.per_device_batch_size=32", "data.global_batch_size=32", "model.d_model=32",
        "model.d_hid=64", "model.max_seq_len=64", "logger=none", "trainer=cpu", "trainer.max_steps=30",
        "trainer.val_check_interval=30", "trainer.enable_progress_bar=false"))
    val = summary["val"]
    assert summary["global_step"] == 30 and np.isfinite(summary["train_loss_last"])
    classes = set(adata.obs["cell_type"].cat.categories)
    assert {k for k in val if k.startswith("f1/")} <= {f"f1/{c}" for c in classes} and 0 <= val["accuracy"] <= 1
    majority = adata.obs["cell_type"].value_counts(normalize=True).max()  # Dendritic, 34%
    assert val["pca_logreg_accuracy"] > majority  # the tokens carry the labels: the baseline beats the majority

    query = tmp_path / "pbmc_counts.h5ad"
    adata.write_h5ad(query)
    out, accuracy = annotate_file(query, summary["checkpoint"], tmp_path / "annotated.h5ad", progress=False)
    predicted = ad.read_h5ad(out).obs["predicted_cell_type"]
    assert set(predicted.cat.categories) == classes and predicted.notna().all()
    assert accuracy == pytest.approx((predicted.astype(str) == adata.obs["cell_type"].astype(str).to_numpy()).mean())
