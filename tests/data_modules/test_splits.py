"""Held-out splits by obs value (data.val_split / data.test_split): exactly the cells with the value, still
streamed in blocks, still exactly resumable; and the one-line errors for unknown keys and values."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.datamodule import CellDataModule
from data_modules.convert import write_store
from data_modules.synthetic import make_synthetic_adata
from scgpt.errors import ConfigError

N_CELLS = 900


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = make_synthetic_adata(n_cells=N_CELLS, n_genes=40, n_cell_types=3, n_batches=3, seed=0)
    adata.obs["cell_id"] = pd.Categorical(adata.obs_names)
    path = tmp_path_factory.mktemp("split") / "a.zarr"
    write_store(adata, path, obs_keys=["cell_id", "cell_type", "batch"], seed=1)
    return path


def _dm(path, **options):
    options = {"label_keys": ["cell_id", "cell_type", "batch"], "val_fraction": 0.1, "block_size": 40,
               "buffer_blocks": 3, "per_device_batch_size": 20, "max_seq_len": 32, "seed": 3, **options}
    dm = CellDataModule(paths=[str(path)], **options)
    dm.setup()
    return dm


def _ids(dm, loader):
    return [dm.label_names["cell_id"][c] for b in loader for c in b.labels["cell_id"].tolist()]


TEST = {"key": "batch", "values": ["batch_1"]}


def test_test_split_holds_exactly_the_cells_with_the_value(store):
    obs = ad.read_zarr(store).obs
    dm = _dm(store, test_split=TEST)
    test, val, train = _ids(dm, dm.test_dataloader()), _ids(dm, dm.val_dataloader()), _ids(dm, dm.train_dataloader())
    expected = set(obs.loc[obs["batch"] == "batch_1", "cell_id"].astype(str))
    assert len(test) == len(set(test)) and set(test) == expected  # every held-out cell once, nothing else
    rest = obs.loc[obs["batch"] != "batch_1", "cell_id"].astype(str).tolist()  # store order
    n_val = round(len(rest) * 0.1)
    assert sorted(val) == sorted(rest[:n_val])  # val: the first val_fraction of the cells that are not test
    assert set(train) <= set(rest[n_val:]) and len(train) == len(set(train))
    assert len(train) >= len(rest[n_val:]) - 20 * 3  # only remainders of buffer groups are dropped
    counts = dm.label_counts("batch", "train")
    assert counts[dm.label_names["batch"].index("batch_1")] == 0 and counts.sum() == len(rest) - n_val


def test_val_split_by_value_and_default_without_splits_unchanged(store):
    obs = ad.read_zarr(store).obs
    dm = _dm(store, val_split={"key": "batch", "values": ["batch_0"]}, test_split=TEST)
    assert set(_ids(dm, dm.val_dataloader())) == set(obs.loc[obs["batch"] == "batch_0", "cell_id"].astype(str))
    assert set(_ids(dm, dm.train_dataloader())) <= set(obs.loc[obs["batch"] == "batch_2", "cell_id"].astype(str))
    plain = _dm(store)  # no splits: the first val_fraction rows, as before
    assert sorted(_ids(plain, plain.val_dataloader())) == sorted(obs["cell_id"].astype(str).tolist()[:90])
    assert not plain.has_test and plain.row_ranges() == {"train": [(90, N_CELLS)], "val": [(0, 90)]}


def _collect(dm, stop=None):
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if stop is not None and i >= stop:
            break
        out.append(batch)
        dm.batches_done += 1
    return out


def test_resume_with_a_split_is_exact(store):
    full = _collect(_dm(store, test_split=TEST))
    first = _dm(store, test_split=TEST)
    _collect(first, stop=7)
    resumed = _dm(store, test_split=TEST)
    resumed.load_state_dict(first.state_dict())
    rest = _collect(resumed)
    assert len(rest) == len(full) - 7 > 0
    for x, y in zip(rest, full[7:]):
        for name in ("gene_ids", "values", "target_values", "padding_mask"):
            assert torch.equal(getattr(x, name), getattr(y, name))
        assert torch.equal(x.labels["cell_id"], y.labels["cell_id"])
    with pytest.raises(ConfigError, match="resume with the same splits"):
        _dm(store).load_state_dict(first.state_dict())


def test_block_reads_of_a_sparse_split_are_windowed_and_contiguous(store, monkeypatch):
    from data_modules.splits import RowSubset

    dm = _dm(store, test_split=TEST)
    reads = []
    original = type(dm.sources[0]).read_block

    def spy(self, start, stop, *args):
        reads.append((start, stop))
        return original(self, start, stop, *args)

    monkeypatch.setattr(type(dm.sources[0]), "read_block", spy)
    monkeypatch.setattr(RowSubset, "min_window", 50)
    monkeypatch.setattr(RowSubset, "window_factor", 1)
    subset = dm.split_sources("test")[0][0]
    table = subset.read_block(0, 40, ["cell_id"], dm.vocab)
    assert table.n_cells == 40 and len(reads) > 1  # ~120 rows spanned: windows of at most 50
    assert all(b - a <= 50 for a, b in reads)
    rows = subset.rows[:40]
    full = dm.sources[0].read_block(0, N_CELLS, ["cell_id"], dm.vocab)
    assert np.array_equal(table.labels["cell_id"], full.labels["cell_id"][rows])
    assert (table.counts != full.counts[rows]).nnz == 0


@pytest.mark.parametrize("spec, message", [
    ({"key": "donor", "values": ["d1"]}, r"data.test_split.key: obs column 'donor' is not in .*available: "),
    ({"key": "batch", "values": ["batch_9"]}, r"data.test_split.values: 'batch_9' not found in obs column 'batch'"),
    ({"key": "batch"}, r"data.test_split: expected \{key: <obs column>, values"),
    ({"key": "batch", "values": ["batch_0", "batch_1", "batch_2"]}, r"data.val_split / data.test_split: leaves no"),
])
def test_bad_split_options_name_the_key_and_the_fix(store, spec, message):
    with pytest.raises(ConfigError, match=message):
        _dm(store, test_split=spec)


def test_overlapping_val_and_test_splits_are_refused(store):
    with pytest.raises(ConfigError, match="select the same cells"):
        _dm(store, val_split={"key": "batch", "values": ["batch_1"]}, test_split=TEST)
