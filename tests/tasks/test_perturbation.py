"""task=perturbation: paired data (control in, perturbed cell out, flags on the perturbed genes), the Pearson
delta metrics and the mean-shift baseline on hand examples, an end-to-end run with init_from, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_modules.datamodule import CellDataModule
from data_modules.perturbation import SPLITS, PerturbationData, PerturbationDataModule
from data_modules.synthetic import ensure_synthetic_store
from scgpt.errors import ConfigError, DataError
from scgpt.tasks.perturbation import delta_correlations, mean_shift_baseline, perturbation_metrics
from scgpt.train import train

from conftest import compose_config

SYNTH = dict(n_cells=400, n_genes=100, n_cell_types=3, n_batches=1, n_regulators=4, n_perturbations=4, seed=0)
PERT_DATA = [f"data.synthetic.{k}={v}" for k, v in SYNTH.items() if k in ("n_cells", "n_genes", "n_cell_types", "n_batches")] + \
    [f"+data.synthetic.{k}={v}" for k, v in SYNTH.items() if k in ("n_regulators", "n_perturbations")]
TINY = ["model.max_seq_len=64", "logger=none", "data.per_device_batch_size=16", "data.global_batch_size=16",
        "trainer=debug", "trainer.limit_val_batches=1.0"]


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    store = ensure_synthetic_store(tmp_path_factory.mktemp("pert"), **SYNTH)
    cells = CellDataModule(paths=[str(store)], label_keys=["cell_type"], per_device_batch_size=16, max_seq_len=64)
    return PerturbationDataModule(cells, heldout_fraction=0.25, heldout_cell_fraction=0.2)


def test_pairs_a_control_of_the_same_cell_type_and_flags_the_perturbed_gene(datamodule):
    data = datamodule.data
    assert data.n_genes == 63 and len(data.conditions) == 5 and data.conditions[0] == "control"
    cell_type = data.group  # pair_keys = [cell_type]
    for batch in [b for _, b in zip(range(4), datamodule.train_dataloader())]:
        rows = batch.target_rows.numpy()
        controls = [data.controls_of_group[g] for g in cell_type[rows]]
        inputs = batch.values[:, 1:].numpy()
        for i, row in enumerate(rows):
            match = np.flatnonzero((data.expr[controls[i]] == inputs[i]).all(1))
            assert match.size >= 1 and controls[i][match[0]] != row  # a control of its type, not itself
            np.testing.assert_array_equal(batch.target_values[i, 1:].numpy(), data.expr[row])
            flagged = np.flatnonzero(batch.perturbation_flags[i].numpy()) - 1
            np.testing.assert_array_equal(flagged, data.condition_genes[data.condition[row]])
            if data.condition[row]:
                assert data.gene_names[flagged[0]] == data.conditions[data.condition[row]]
        assert (batch.gene_ids[:, 1:].numpy() == data.gene_ids).all() and batch.hidden_mask[:, 1:].all()
        assert not batch.hidden_mask[:, 0].any()


def test_held_out_cells_and_unseen_perturbations_are_never_trained_on(datamodule):
    data = datamodule.data
    trained = np.concatenate([b.target_rows.numpy() for b in datamodule.train_dataloader()])
    validated = np.concatenate([b.target_rows.numpy() for b in datamodule.val_dataloader()])
    unseen = {data.conditions[c] for c in np.unique(data.condition[data.rows("unseen")])}
    assert len(unseen) == 1  # 25% of 4 perturbations
    assert not set(trained) & set(validated)
    assert set(validated) == set(data.rows("seen")) | set(data.rows("unseen"))
    assert not {data.conditions[c] for c in data.condition[trained]} & unseen
    for c in range(1, len(data.conditions)):  # 20% of each seen perturbation's cells held out
        if data.conditions[c] not in unseen:
            cells = np.flatnonzero(data.condition == c)
            assert (data.split[cells] == SPLITS.index("seen")).sum() == round(cells.size * 0.2)


def test_named_held_out_perturbations_and_unknown_names(datamodule):
    name = datamodule.data.conditions[2]
    named = PerturbationDataModule(datamodule.cells, heldout_perturbations=[name])
    unseen = named.data.condition[named.data.rows("unseen")]
    assert set(unseen) == {2}
    with pytest.raises(ConfigError, match="task.data_module.heldout_perturbations: 'NOPE' is not a perturbation"):
        PerturbationDataModule(datamodule.cells, heldout_perturbations=["NOPE"]).data


def test_delta_correlations_on_a_hand_example():
    truth = {1: np.array([10.0, 0.1, -0.2, 5.0, 0.0])}
    assert delta_correlations({1: 2 * truth[1]}, truth, top_k=2) == pytest.approx(
        {"pearson_delta": 1.0, "pearson_delta_de2": 1.0})
    right_on_de = {1: np.array([4.0, -3.0, 3.0, 2.0, -1.0])}  # top-2 DE genes (0 and 3) in the right order
    result = delta_correlations(right_on_de, truth, top_k=2)
    assert result["pearson_delta_de2"] == pytest.approx(1.0)
    assert result["pearson_delta"] == pytest.approx(np.corrcoef(right_on_de[1], truth[1])[0, 1])
    two = {1: truth[1], 2: np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    assert delta_correlations({1: truth[1], 2: -two[2]}, two)["pearson_delta"] == pytest.approx(0.0)  # (1 - 1) / 2


def _hand_data() -> PerturbationData:
    """3 genes; controls of two cell types, perturbation A (trained + one held-out cell), unseen B."""
    expr = np.array([[1, 1, 1], [3, 3, 3], [0, 0, 0], [2, 2, 2],  # controls: type 0 mean 2, type 1 mean 1
                     [2, 5, 0], [1, 2, 3],  # A, trained: changes [0, 3, -2] and [0, 1, 2] -> mean shift [0, 2, 0]
                     [2, 4, 1],  # A, held-out cell of type 0: change [0, 2, -1]
                     [1, 0, 3]], dtype=np.float32)  # B (unseen), type 1: change [0, -1, 2]
    return PerturbationData(gene_ids=np.array([5, 6, 7]), gene_names=["g0", "g1", "g2"], expr=expr,
                            condition=np.array([0, 0, 0, 0, 1, 1, 1, 2]), conditions=["control", "A", "B"],
                            condition_genes=[np.zeros(0, int), np.array([0]), np.array([1])],
                            group=np.array([0, 0, 1, 1, 0, 1, 0, 1]), split=np.array([0, 0, 0, 0, 0, 0, 1, 2]))


def test_mean_shift_baseline_math():
    data = _hand_data()
    np.testing.assert_allclose(data.reference, [[2, 2, 2], [1, 1, 1]])
    shift = data.training_shift()
    assert set(shift) == {1}
    np.testing.assert_allclose(shift[1], [0, 2, 0])
    seen = mean_shift_baseline({1: np.array([0.0, 2, 0]), 3: np.array([2.0, 0, 0])}, [1], seen=True)
    np.testing.assert_allclose(seen[1], [0, 2, 0])  # its own training shift
    unseen = mean_shift_baseline({1: np.array([0.0, 2, 0]), 3: np.array([2.0, 0, 0])}, [2], seen=False)
    np.testing.assert_allclose(unseen[2], [1, 1, 0])  # the average over training perturbations


def test_perturbation_metrics_against_hand_computed_values():
    data = _hand_data()
    rows = np.array([6, 7])
    perfect = data.expr[rows]
    out = perturbation_metrics(data, rows, perfect, top_k=2)
    assert out["seen/pearson_delta"] == pytest.approx(1.0) and out["unseen/pearson_delta"] == pytest.approx(1.0)
    assert out["seen/mse"] == 0.0 and out["seen/n_perturbations"] == 1.0
    # mean shift [0, 2, 0] against the true changes [0, 2, -1] (seen) and [0, -1, 2] (unseen)
    assert out["seen/mean_shift/pearson_delta"] == pytest.approx(np.corrcoef([0, 2, 0], [0, 2, -1])[0, 1])
    assert out["unseen/mean_shift/pearson_delta"] == pytest.approx(np.corrcoef([0, 2, 0], [0, -1, 2])[0, 1])
    assert out["unseen/mean_shift/pearson_delta_de2"] == pytest.approx(-1.0)  # genes 1 and 2: (2, 0) vs (-1, 2)
    wrong = perturbation_metrics(data, rows, data.reference[data.group[rows]] - (perfect - data.reference[[0, 1]]))
    assert wrong["seen/pearson_delta"] == pytest.approx(-1.0)  # predicted changes of the opposite sign


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain")
    return train(compose_config(run, *PERT_DATA, *TINY))["checkpoint"]


def test_end_to_end_from_a_pretrained_checkpoint_reports_both_splits_and_the_baseline(tmp_path, pretrained):
    summary = train(compose_config(tmp_path, "task=perturbation", *PERT_DATA, *TINY, f"init_from={pretrained}",
                                   "trainer.max_steps=6", "trainer.val_check_interval=6"))
    val = summary["val"]
    assert summary["task"] == "perturbation" and summary["global_step"] == 6
    for split in ("seen", "unseen"):
        for key in ("pearson_delta", "pearson_delta_de20"):
            assert -1.0 <= val[f"{split}/{key}"] <= 1.0 and -1.0 <= val[f"{split}/mean_shift/{key}"] <= 1.0
    assert val["seen/n_perturbations"] == 3.0 and val["unseen/n_perturbations"] == 1.0
    assert val["seen/mean_shift/pearson_delta_de20"] > 0.5  # the planted effects are visible in the data
    report = json.loads((tmp_path / "init_report.json").read_text())
    assert report["skipped_prefixes"] == ["embedding.pert_encoder."]
    assert all(k.startswith("embedding.pert_encoder.") for k in report["initialised"]) and report["initialised"]
    assert (tmp_path / "plots" / "perturbation_delta.png").is_file()


def test_missing_perturbation_column_is_one_line_naming_the_field_and_the_fix_exit_2(tmp_path):
    small = ["data.synthetic.n_cells=200", "data.synthetic.n_genes=100", *TINY]
    with pytest.raises(DataError, match=r"obs has no column 'perturbation' \(task.data_module.perturbation_key\); "
                                        r"add it to the store \(scgpt-data convert --obs-keys ...,perturbation\)"):
        train(compose_config(tmp_path / "api", "task=perturbation", *small))
    result = subprocess.run([sys.executable, "-m", "scgpt.train", "task=perturbation", *small], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "obs has no column 'perturbation'" in lines[0]


def test_epoch_sampler_shards_ranks_and_skips_consumed_items_of_the_resumed_epoch():
    from data_modules.perturbation import EpochSampler

    ranks = [EpochSampler(10, seed=3, shuffle=True, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(1)
    items = [list(s) for s in ranks]
    assert all(len(i) == 4 for i in items) and {e for i in items for _, e in i} == {1}
    assert sorted({x for i in items for x, _ in i}) == list(range(10))  # every pair, 2 repeated as padding
    resumed = EpochSampler(10, seed=3, shuffle=True, num_replicas=3, rank=1, resume=lambda: (1, 3))
    resumed.set_epoch(1)
    assert list(resumed) == items[1][3:] and len(resumed) == 4  # the epoch's length, as Lightning counts it
    resumed.set_epoch(2)  # later epochs from their start
    assert len(list(resumed)) == 4


@pytest.mark.slow
def test_resumed_perturbation_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    import torch

    common = ["task=perturbation", *PERT_DATA, *TINY, "trainer.max_steps=30", "trainer.val_check_interval=30"]
    straight = train(compose_config(tmp_path / "straight", *common, "checkpoint.every_n_train_steps=10",
                                    "checkpoint.keep_all=true"))
    for step in (10, 20):  # mid-epoch 0, and its end (the training pairs make 20 batches an epoch)
        interrupted = tmp_path / "straight" / "checkpoints" / f"step-{step:07d}.ckpt"
        resumed = train(compose_config(tmp_path / f"resumed{step}", *common, f"ckpt_path={interrupted}"))
        a = torch.load(straight["checkpoint"], weights_only=True)["state_dict"]
        b = torch.load(resumed["checkpoint"], weights_only=True)["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=f"from step {step}: {key}")
