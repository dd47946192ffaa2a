"""task=perturbation with condition_input=label (the held-out cell type benchmark of scGen / CPA, recipe
experiment=kang_response): a condition embedding instead of gene flags, the (cell type, condition) split,
per-unit metrics and the other types' mean shift on a hand example, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from data_modules.datamodule import CellDataModule
from data_modules.perturbation import SPLITS, PerturbationData, PerturbationDataModule
from data_modules.synthetic import ensure_synthetic_store
from scgpt.errors import ConfigError, DataError
from scgpt.model import ScGPTModel
from scgpt.model.layout import TokenLayout
from scgpt.tasks.perturbation import perturbation_metrics
from scgpt.train import train

from conftest import compose_config, random_tokens, tiny_config

# the synthetic batch effect (a per-gene factor shared by every cell type) plays the stimulation
SYNTH = dict(n_cells=400, n_genes=100, n_cell_types=3, n_batches=2, seed=0)
LABEL = dict(perturbation_key="batch", control_value="batch_0", pair_keys=["cell_type"], condition_input="label",
             heldout_cell_fraction=0.2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ensure_synthetic_store(tmp_path_factory.mktemp("stim"), **SYNTH)


@pytest.fixture(scope="module")
def cells(store):
    return CellDataModule(paths=[str(store)], label_keys=["cell_type"], per_device_batch_size=16, max_seq_len=64)


def test_held_out_types_stimulated_cells_are_never_trained_on_and_its_controls_are(cells):
    module = PerturbationDataModule(cells, heldout_groups=["type_1"], **LABEL)
    data = module.data
    assert data.conditions == ["batch_0", "batch_1"] and data.by_group and module.n_conditions == 2
    held = data.group_names.index("type_1")
    trained = np.concatenate([b.target_rows.numpy() for b in module.train_dataloader()])
    validated = np.concatenate([b.target_rows.numpy() for b in module.val_dataloader()])
    stimulated_held = np.flatnonzero((data.group == held) & (data.condition == 1))
    assert stimulated_held.size > 0 and not set(trained) & set(stimulated_held)
    assert set(data.rows("unseen")) == set(stimulated_held) and set(stimulated_held) <= set(validated)
    assert set(np.flatnonzero((data.group == held) & (data.condition == 0))) <= set(data.rows("train"))  # its CTRL
    for g in set(range(data.n_groups)) - {held}:  # 20% of each other type's stimulated cells: seen
        rows = np.flatnonzero((data.group == g) & (data.condition == 1))
        assert (data.split[rows] == SPLITS.index("seen")).sum() == round(rows.size * 0.2)
    batch = next(iter(module.val_dataloader()))
    np.testing.assert_array_equal(batch.labels["condition"].numpy(), data.condition[batch.target_rows.numpy()])
    assert batch.perturbation_flags.sum() == 0  # no gene is flagged


def test_unknown_held_out_group_and_gene_mode_refusal(cells):
    with pytest.raises(ConfigError, match="task.data_module.heldout_groups: 'type_9' is not a group of the data"):
        PerturbationDataModule(cells, heldout_groups=["type_9"], **LABEL).data
    with pytest.raises(ConfigError, match="task.data_module.condition_input: 'flags'; choose one of genes, label"):
        PerturbationDataModule(cells, **{**LABEL, "condition_input": "flags"}).data


def _hand_data() -> PerturbationData:
    """2 genes, 3 cell types, conditions CTRL (0) and STIM (1); type 2's STIM cell is held out."""
    expr = np.array([[1, 1], [2, 2], [3, 3],  # CTRL of types 0, 1, 2
                     [2, 3], [4, 2],  # STIM type 0 (change [1, 2]) and type 1 (change [2, 0]), trained
                     [3, 5], [3, 4]], dtype=np.float32)  # STIM type 2: changes [0, 2] and [0, 1], held out
    return PerturbationData(gene_ids=np.array([5, 6]), gene_names=["g0", "g1"], expr=expr,
                            condition=np.array([0, 0, 0, 1, 1, 1, 1]), conditions=["CTRL", "STIM"],
                            condition_genes=[np.zeros(0, int)] * 2, group=np.array([0, 1, 2, 0, 1, 2, 2]),
                            split=np.array([0, 0, 0, 0, 0, 2, 2]), labels={}, condition_input="label",
                            group_names=["t0", "t1", "t2"])


def test_metrics_per_cell_type_and_the_other_types_mean_shift_by_hand():
    data = _hand_data()
    shift = data.training_shift()  # per (condition, type) unit: 1 * 3 + type
    assert set(shift) == {3, 4}
    np.testing.assert_allclose(shift[3], [1, 2])
    np.testing.assert_allclose(shift[4], [2, 0])
    rows = np.array([5, 6])
    predicted = np.array([[3, 4], [3, 6]], dtype=np.float32)  # mean change [0, 2] vs true mean [0, 1.5]
    out = perturbation_metrics(data, rows, predicted, top_k=1)
    assert out["unseen/n_perturbations"] == 1.0 and "seen/pearson_delta" not in out
    assert out["unseen/pearson_delta"] == pytest.approx(1.0)
    # the mean shift of the other types: ([1, 2] + [2, 0]) / 2 = [1.5, 1] vs the true [0, 1.5]
    assert out["unseen/mean_shift/pearson_delta"] == pytest.approx(-1.0)
    assert np.isnan(out["unseen/mean_shift/pearson_delta_de1"])  # one gene: no correlation
    assert out["unseen/mse"] == pytest.approx(np.mean((predicted - data.expr[rows]) ** 2))


def test_the_condition_input_changes_the_prediction():
    torch.manual_seed(0)
    model = ScGPTModel(tiny_config(n_conditions=2)).eval()
    gene_ids, values, padding, _ = random_tokens([9, 7])
    layout = TokenLayout(padding_mask=padding)
    with torch.no_grad():
        ctrl = model(gene_ids, values, layout, condition_labels=torch.tensor([0, 0])).expr_pred
        stim = model(gene_ids, values, layout, condition_labels=torch.tensor([1, 0])).expr_pred
    assert not torch.allclose(ctrl[0], stim[0]) and torch.allclose(ctrl[1], stim[1])
    with pytest.raises(ValueError, match="pass condition_labels"):
        model(gene_ids, values, layout)


RUN = ["experiment=kang_response", "model.max_seq_len=64", "logger=none", "data.per_device_batch_size=16",
       "data.global_batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=4",
       "task.data_module.perturbation_key=batch", "task.data_module.control_value=batch_0",
       "task.data_module.heldout_groups=[type_2]", "data.label_keys=[cell_type]"]


def test_recipe_end_to_end_on_synthetic_cells_reports_the_held_out_type_and_the_baseline(tmp_path, store):
    summary = train(compose_config(tmp_path, *RUN, f"data.paths=[{store}]"))
    val = summary["val"]
    assert summary["global_step"] == 4 and val["unseen/n_perturbations"] == 1.0 and val["seen/n_perturbations"] == 2.0
    for key in ("pearson_delta", "pearson_delta_de20", "mean_shift/pearson_delta", "mean_shift/pearson_delta_de20"):
        assert -1.0 <= val[f"unseen/{key}"] <= 1.0
    state = torch.load(summary["checkpoint"], weights_only=True)["state_dict"]
    assert state["model.condition_encoder.weight"].shape == (2, 64)


def test_recipe_on_a_store_without_the_condition_column_names_it_and_exits_2(tmp_path, store):
    with pytest.raises(DataError, match=r"obs has no column 'stim' \(task.data_module.perturbation_key\)"):
        train(compose_config(tmp_path / "api", "experiment=kang_response", f"data.paths=[{store}]", "logger=none"))
    result = subprocess.run([sys.executable, "-m", "scgpt.train", "experiment=kang_response", f"data.paths=[{store}]",
                             "logger=none"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "obs has no column 'stim'" in lines[0]
