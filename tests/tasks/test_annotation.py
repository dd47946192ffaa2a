"""Annotation on a held-out batch (data.test_split): test metrics in summary.json, the transfer baseline,
class names in the checkpoint, and the errors users can cause."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from scgpt.errors import ConfigError, DataError
from scgpt.train import optimized_metric, train

from conftest import SMALL_DATA, compose_config

HELD_OUT = ["data.synthetic.n_batches=2", "data.test_split={key:batch,values:[batch_1]}", "data.val_fraction=0.3"]
DEBUG = [*SMALL_DATA, "logger=none", "trainer=debug", "trainer.limit_val_batches=1.0", *HELD_OUT]


def test_test_split_metrics_go_to_summary_under_test(tmp_path):
    cfg = compose_config(tmp_path, *DEBUG, "task=annotation", "optimized_metric=test/accuracy")
    summary = train(cfg)
    test, val = summary["test"], summary["val"]
    for key in ("accuracy", "macro_f1", "knn_accuracy", "pca_logreg_accuracy", "pca_logreg_transfer_accuracy", "loss"):
        assert 0.0 <= test[key] and (key == "loss" or test[key] <= 1.0), key
    assert "pca_logreg_transfer_accuracy" not in val  # only a held-out split has a transfer to measure
    assert optimized_metric(cfg, summary) == test["accuracy"]
    assert (tmp_path / "plots" / "test" / "confusion.png").is_file()
    extra = torch.load(summary["checkpoint"], weights_only=True)["scgpt"]
    assert extra["cls_label_key"] == "cell_type" and extra["labels"]["cell_type"] == [f"type_{i}" for i in range(6)]


def test_pretraining_with_a_test_split_still_trains_and_reports_val(tmp_path):
    summary = train(compose_config(tmp_path, *DEBUG))  # the pretrain task has no test metrics: a warning
    assert summary["global_step"] == 4 and "masked_mse" in summary["val"] and "test" not in summary


def test_unknown_split_value_is_a_one_line_error_with_exit_code_2(tmp_path):
    overrides = [*SMALL_DATA, "logger=none", "trainer=debug", "data.synthetic.n_batches=2", "task=annotation",
                 "data.test_split={key:batch,values:[batch_7]}", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"data.test_split.values: 'batch_7' not found in obs column 'batch'"):
        train(compose_config(tmp_path, *overrides[:-1]))
    result = subprocess.run([sys.executable, "-m", "scgpt.train", *overrides], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.test_split.values: 'batch_7'")


def test_missing_label_column_for_annotation_names_the_field(tmp_path):
    with pytest.raises(DataError, match=r"obs has no column 'cell_label' \(data.label_keys\)"):
        train(compose_config(tmp_path, *DEBUG, "task=annotation", "task.label_key=cell_label",
                             "data.label_keys=[cell_label,batch]"))


def test_annotation_recipe_sets_pooling_and_head_on_top_of_a_pretrained_checkpoint(tmp_path):
    pretrained = train(compose_config(tmp_path / "pre", *SMALL_DATA, "logger=none", "trainer=debug"))["checkpoint"]
    assert torch.load(pretrained, weights_only=True)["hyper_parameters"]["model"]["cell_emb_style"] == "cls"
    summary = train(compose_config(tmp_path / "ft", *SMALL_DATA, "logger=none", "trainer=debug", "task=annotation",
                                   f"init_from={pretrained}"))
    model = torch.load(summary["checkpoint"], weights_only=True)["hyper_parameters"]["model"]
    assert (model["cell_emb_style"], model["n_layers_cls"], model["dropout"]) == ("avg-pool", 1, 0.0)
    with pytest.raises(ConfigError, match="task.model_heads.d_model: not a head setting; .*cell_emb_style"):
        train(compose_config(tmp_path / "bad", *SMALL_DATA, "logger=none", "trainer=debug", "task=annotation",
                             "+task.model_heads.d_model=16"))
