"""Finetuning tasks end to end through train(cfg) on synthetic ground truth: annotation, integration,
zero-shot embedding, init_from (strict loading, skipped heads, freezing) and the errors users can cause."""

from __future__ import annotations

import json

import pytest
import torch

from scgpt.errors import CheckpointError, ConfigError, DataError
from scgpt.objectives.classification import CellClassification
from scgpt.train import train

from conftest import SMALL_DATA, compose_config

BASE = [*SMALL_DATA, "model.max_seq_len=128", "logger=none", "data.val_fraction=0.25"]
DEBUG = [*BASE, "trainer=debug", "trainer.limit_val_batches=1.0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly pretrained tiny model (last.ckpt) on the synthetic data."""
    run = tmp_path_factory.mktemp("pretrain")
    return train(compose_config(run, *BASE, "trainer=debug"))["checkpoint"]


@pytest.mark.slow  # ~30-60 s on 2 shared cores: 300 training steps
def test_annotation_learns_synthetic_cell_types_well_above_chance(tmp_path):
    summary = train(compose_config(tmp_path, *BASE, "task=annotation", "trainer=cpu", "trainer.max_steps=300",
                                   "trainer.val_check_interval=300", "data.synthetic.n_cells=1200",
                                   "data.val_fraction=0.1", "model.dropout=0.0", "trainer.enable_progress_bar=false"))
    val = summary["val"]
    assert summary["task"] == "annotation" and summary["global_step"] == 300
    assert val["accuracy"] > 0.5 and val["macro_f1"] > 0.4  # chance is 1/6 for 6 balanced types
    assert len([k for k in val if k.startswith("f1/")]) == 6
    assert 0.0 <= val["pca_logreg_accuracy"] <= 1.0  # the baseline is reported alongside
    assert (tmp_path / "plots" / "confusion.png").is_file()


def test_init_from_loads_strictly_skips_the_new_head_and_freezes(tmp_path, pretrained):
    summary = train(compose_config(tmp_path, *DEBUG, "task=annotation", f"init_from={pretrained}",
                                   "task.freeze.embeddings=true", "task.freeze.encoder_layers=1"))
    report = json.loads((tmp_path / "init_report.json").read_text())
    assert report["skipped_prefixes"] == ["cls_decoder."] and report["missing"] == [] == report["unexpected"]
    assert all(k.startswith("cls_decoder.") for k in report["initialised"]) and report["initialised"]
    assert report["frozen"] == ["embedding", "transformer_encoder.layers.0"]
    assert "genes (100.0%) are in the model vocabulary" in report["vocab_overlap"]
    before = torch.load(pretrained, weights_only=True)["state_dict"]
    after = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]
    frozen = "model.transformer_encoder.layers.0.linear1.weight"
    trained = "model.transformer_encoder.layers.1.linear1.weight"
    assert torch.equal(before["model.embedding.encoder.embedding.weight"], after["model.embedding.encoder.embedding.weight"])
    assert torch.equal(before[frozen], after[frozen]) and not torch.equal(before[trained], after[trained])


def test_zero_shot_embedding_reports_knn_accuracy_against_pca(tmp_path, pretrained):
    summary = train(compose_config(tmp_path, *DEBUG, "task=embed", f"init_from={pretrained}"))
    assert summary["global_step"] == 0  # nothing trained
    val = summary["val"]
    for key in ("knn_accuracy", "celltype_asw", "batch_asw", "batch_mixing", "nmi", "ari"):
        assert 0.0 <= val[key] <= 1.0 and 0.0 <= val[f"pca/{key}"] <= 1.0
    assert val["pca/knn_accuracy"] > 0.5  # the synthetic cell types are separable in expression space
    assert (tmp_path / "plots" / "embedding.png").is_file()


def test_integration_trains_dab_and_reports_mixing_and_conservation(tmp_path, pretrained):
    summary = train(compose_config(tmp_path, *DEBUG, "task=integration", f"init_from={pretrained}",
                                   "trainer.max_steps=8", "trainer.val_check_interval=8"))
    val = summary["val"]
    assert {"gep", "mvc", "ecs", "dab"} <= set(val)
    for key in ("celltype_asw", "batch_asw", "batch_mixing", "nmi", "ari", "knn_accuracy"):
        assert 0.0 <= val[key] <= 1.0 and f"pca/{key}" in val
    assert "celltype_asw_kept" in val and "batch_mixing_gain" in val
    report = json.loads((tmp_path / "init_report.json").read_text())
    assert {"batch_encoder.", "decoder.", "mvc_decoder.", "batch_discriminator."} <= set(report["skipped_prefixes"])


def test_task_label_key_not_in_data_label_keys_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="task.label_key: 'tissue' is not in data.label_keys"):
        train(compose_config(tmp_path, *DEBUG, "task=annotation", "task.label_key=tissue"))


def test_missing_obs_column_names_the_column(tmp_path):
    with pytest.raises(DataError, match="obs has no column 'tissue'"):
        train(compose_config(tmp_path, *DEBUG, "task=annotation", "task.label_key=tissue",
                             "data.label_keys=[tissue,batch]"))


def test_init_from_missing_path_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="init_from=.*nope.ckpt"):
        train(compose_config(tmp_path, *DEBUG, "task=annotation", f"init_from={tmp_path / 'nope.ckpt'}"))


def test_init_from_checkpoint_of_other_genes_reports_the_overlap(tmp_path, pretrained):
    from data_modules.convert import write_store
    from data_modules.synthetic import make_synthetic_adata

    adata = make_synthetic_adata(n_cells=200, n_genes=200, seed=3)
    adata.var_names = [f"OTHER{i}" if i % 10 else name for i, name in enumerate(adata.var_names)]  # 10% shared
    store = tmp_path / "other.zarr"
    write_store(adata, store, obs_keys=["cell_type", "batch"])
    with pytest.raises(CheckpointError, match=r"init_from=.*20 of 200 genes \(10.0%\) are in the model vocabulary"):
        train(compose_config(tmp_path / "run", *DEBUG, "task=annotation", f"init_from={pretrained}",
                             "data.synthetic=null", f"+data.paths={store}"))


def test_classification_objective_balances_classes_and_ignores_missing_labels():
    objective = CellClassification(1.0, class_weights="balanced")
    objective.set_class_counts([30, 10, 0])
    assert torch.allclose(objective._weight_tensor, torch.tensor([40 / 60, 40 / 20, 0.0]))

    class Out:
        cls_logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, -9.0, 0.0]])

    class Batch:
        labels = {"cell_type": torch.tensor([0, 1, -1])}

    loss = objective(Out, Batch, None)["cls"]
    assert loss < 0.05  # the wrongly-scored third cell has no label and does not count
    Batch.labels = {"cell_type": torch.tensor([-1, -1, -1])}
    assert objective(Out, Batch, None)["cls"] == 0.0
    with pytest.raises(ConfigError, match="class_weights"):
        CellClassification(1.0, class_weights="inverse")


def test_grn_scores_gene_embedding_network_against_the_planted_one(tmp_path):
    summary = train(compose_config(tmp_path, *DEBUG, "task=grn"))
    val = summary["val"]
    assert 0.0 < val["grn_auprc_random"] < 0.05 and 0.0 <= val["grn_auprc"] <= 1.0
    assert "grn_early_precision" in val and "grn_auprc_over_random" in val
    # the planted network is real: co-expression of the validation cells recovers it well above random
    assert val["coexpr/grn_auprc"] > 3 * val["grn_auprc_random"]


@pytest.mark.parametrize("layout", ["packed", "packed_known_first"])
def test_binned_expression_is_the_same_in_every_layout(layout):
    """The expression matrix the finetune baselines use (one row per cell) does not depend on token order."""
    import numpy as np

    from data_modules.collate import CellCollator, CollatorConfig
    from scgpt.tasks.finetune import binned_expression

    rng = np.random.default_rng(0)
    cells = [{"gene_ids": rng.choice(np.arange(3, 100), size=n, replace=False),
              "counts": rng.geometric(0.3, size=n).astype(np.float32)} for n in (5, 30, 12)]
    matrices = []
    for name in ("padded", layout):
        collator = CellCollator(CollatorConfig(pad_token_id=0, cls_token_id=1, max_seq_len=32, generative_fraction=1.0,
                                               layout=name))
        matrices.append(binned_expression(collator(cells, torch.Generator().manual_seed(0)), 100).toarray())
    assert np.array_equal(matrices[0], matrices[1]) and matrices[0].sum() > 0
