"""scgpt-annotate: labels of a query predicted into obs by a finetuned annotation checkpoint or its export,
with the class names carried along; and the one-line errors for a model without a classifier head and
for query labels the model never saw."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scgpt.annotate import annotate_file, main, predict_labels
from scgpt.errors import CheckpointError, DataError
from scgpt.export import export
from scgpt.train import train

from conftest import SMALL_DATA, compose_config

CLASSES = [f"type_{i}" for i in range(6)]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    run = tmp_path_factory.mktemp("annotation")
    return train(compose_config(run, *SMALL_DATA, "logger=none", "trainer=debug", "task=annotation"))["checkpoint"]


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    from data_modules.synthetic import make_synthetic_adata

    adata = make_synthetic_adata(n_cells=70, n_genes=200, n_cell_types=6, seed=0)  # the training genes
    path = tmp_path_factory.mktemp("query") / "query.h5ad"
    adata.write_h5ad(path)
    return path


def test_predictions_are_written_into_obs_of_a_copy(finetuned, query, tmp_path):
    out, accuracy = annotate_file(query, finetuned, tmp_path / "out.h5ad", batch_size=16, progress=False)
    result, original = ad.read_h5ad(out), ad.read_h5ad(query)
    predicted = result.obs["predicted_cell_type"]
    assert list(predicted.cat.categories) == CLASSES and predicted.notna().all()
    confidence = result.obs["predicted_cell_type_confidence"].to_numpy()
    assert ((confidence >= 1 / 6 - 1e-6) & (confidence <= 1)).all()  # the top softmax probability
    assert (result.X != original.X).nnz == 0 and result.obs["cell_type"].equals(original.obs["cell_type"])
    expected = (predicted.astype(str) == original.obs["cell_type"].astype(str)).mean()
    assert accuracy == pytest.approx(expected)


def test_export_carries_the_class_names_and_predicts_the_same(finetuned, query, tmp_path):
    exported = export(finetuned, tmp_path / "model")
    adata = ad.read_h5ad(query)
    from_export = predict_labels(adata, exported, batch_size=16)
    from_ckpt = predict_labels(adata, finetuned, batch_size=16)
    assert list(from_export["predicted_cell_type"].cat.categories) == CLASSES
    assert from_export["predicted_cell_type"].equals(from_ckpt["predicted_cell_type"])
    assert np.allclose(from_export["predicted_cell_type_confidence"], from_ckpt["predicted_cell_type_confidence"],
                       atol=1e-5)


def test_checkpoint_without_a_classifier_head_is_refused(tmp_path, query, capsys):
    pretrained = train(compose_config(tmp_path / "pre", *SMALL_DATA, "logger=none", "trainer=debug"))["checkpoint"]
    with pytest.raises(CheckpointError, match=r"has no classifier head .*task=annotation"):
        annotate_file(query, pretrained, tmp_path / "out.h5ad", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main([str(query), "--model", pretrained, "-o", str(tmp_path / "out.h5ad"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no classifier head" in err[0]
    assert not (tmp_path / "out.h5ad").exists()


def test_query_labels_the_model_never_saw_are_named(finetuned, query, tmp_path, capsys):
    adata = ad.read_h5ad(query)
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(adata.n_obs) < 3, "platelet", adata.obs["cell_type"]))
    odd = tmp_path / "odd.h5ad"
    adata.write_h5ad(odd)
    with pytest.raises(DataError, match=r"obs\['cell_type'\] has labels the model never saw: platelet"):
        predict_labels(adata, finetuned)
    with pytest.raises(SystemExit) as exit_info:
        main([str(odd), "--model", finetuned, "-o", str(tmp_path / "out.h5ad"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels the model never saw: platelet" in err[0]
    assert not (tmp_path / "out.h5ad").exists()
