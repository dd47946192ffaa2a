"""The real CellDataModule over small stores: sharding across ranks x workers, several stores with
different gene spaces and label sets, and exact mid-epoch resume.

(Convert h5ad -> store -> ``anndata.read_zarr`` equality per cell is in test_store.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.datamodule import CellDataModule
from data_modules.convert import write_store
from data_modules.synthetic import make_synthetic_adata
from scgpt.errors import ConfigError, DataError

N_CELLS, N_VAL = 1200, 200  # val_fraction 1/6: 200 val rows (4 blocks), 1000 train rows (20 blocks)
BLOCK, BUFFER, BATCH = 50, 5, 25  # 2 ranks x 2 workers get 5 blocks = 250 cells = 10 batches each


def _adata(n_cells, n_genes, prefix, cell_types, seed):
    adata = make_synthetic_adata(n_cells=n_cells, n_genes=n_genes, n_cell_types=len(cell_types), seed=seed)
    adata.obs_names = [f"{prefix}{i}" for i in range(n_cells)]
    adata.var_names = [f"{prefix}G{i}" if i % 2 else f"G{i}" for i in range(n_genes)]  # half shared by name
    adata.obs["cell_id"] = pd.Categorical(adata.obs_names)
    adata.obs["cell_type"] = pd.Categorical(np.asarray(cell_types)[adata.obs["cell_type"].cat.codes.to_numpy()])
    return adata


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a = _adata(N_CELLS, 40, "a", ["B", "T"], seed=0)
    b = _adata(600, 30, "b", ["NK", "T", "mono"], seed=1)
    write_store(a, root / "a.zarr", obs_keys=["cell_id", "cell_type"], seed=1)
    write_store(b, root / "b.zarr", obs_keys=["cell_id", "cell_type"], seed=2)
    return {"a": (root / "a.zarr", a), "b": (root / "b.zarr", b)}


def _dm(paths, workers=0, rank=0, world=1, **options):
    options = {"label_keys": ["cell_id"], "val_fraction": N_VAL / N_CELLS, "block_size": BLOCK,
               "buffer_blocks": BUFFER, "per_device_batch_size": BATCH, "max_seq_len": 64, "num_workers": workers,
               "seed": 7, **options}
    dm = CellDataModule(paths=[str(p) for p in paths], **options)
    if world > 1:  # what Lightning's trainer tells the data module
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    dm.setup()
    return dm


def _names(dm, batch, key="cell_id"):
    return [dm.label_names[key][c] for c in batch.labels[key].tolist()]


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_ranks_and_workers_cover_every_training_cell_once_per_epoch(two_stores, world, workers):
    store, adata = two_stores["a"]
    seen, per_rank = [], []
    for rank in range(world):
        dm = _dm([store], workers=workers, rank=rank, world=world)
        batches = list(dm.train_dataloader())
        per_rank.append(len(batches))
        assert all(b.n_cells == BATCH for b in batches)
        seen += [name for b in batches for name in _names(dm, b)]
    train = set(ad.read_zarr(store).obs["cell_id"].iloc[N_VAL:].astype(str))
    assert len(set(per_rank)) == 1  # every rank the same number of batches
    assert len(seen) == len(set(seen))  # no cell twice in an epoch
    assert set(seen) == train  # sizes chosen so that nothing is dropped: every training cell, once


def test_uneven_shards_drop_only_remainders(two_stores):
    store, _ = two_stores["a"]
    seen = []
    for rank in range(2):
        dm = _dm([store], workers=2, rank=rank, world=2, per_device_batch_size=40, block_size=64, buffer_blocks=3)
        batches = list(dm.train_dataloader())
        seen += [name for b in batches for name in _names(dm, b)]
        assert len(batches) == dm._streams["train"].plan.batches_per_rank(0)
    assert len(seen) == len(set(seen))
    # each of 2 x 2 workers drops less than a batch per buffer group, plus what the equal-length rule cuts
    assert len(seen) >= 0.6 * (N_CELLS - N_VAL)


def test_stores_with_different_genes_and_labels_stream_through_one_vocabulary(two_stores):
    (path_a, a), (path_b, b) = two_stores["a"], two_stores["b"]
    dm = _dm([path_a, path_b], label_keys=["cell_id", "cell_type"], val_fraction=0.1)
    assert dm.label_names["cell_type"][:2] == ["B", "T"] and set(dm.label_names["cell_type"]) == {"B", "T", "NK", "mono"}
    cells = {**{n: (a, i) for i, n in enumerate(a.obs_names)}, **{n: (b, i) for i, n in enumerate(b.obs_names)}}
    vocab, from_b = dm.vocab, 0
    for batch in dm.train_dataloader():
        for row, (name, cell_type) in enumerate(zip(_names(dm, batch), _names(dm, batch, "cell_type"))):
            adata, i = cells[name]
            from_b += adata is b
            assert cell_type == adata.obs["cell_type"].iloc[i]  # one coding across stores
            real = ~batch.padding_mask[row]
            genes = {vocab.id_to_token(g) for g in batch.gene_ids[row][real][1:].tolist()}
            expressed = set(adata.var_names[adata.X[i].indices])
            assert genes == expressed  # every expressed gene (they fit), mapped through the shared vocabulary
    assert from_b > 0


def _collect(dm, stop=None):
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if stop is not None and i >= stop:
            break
        out.append(batch)
        dm.batches_done += 1  # what the DataProgress callback does after each training step
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("gene_ids", "values", "target_values", "hidden_mask", "gen_mask", "generative", "padding_mask"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert torch.equal(x.labels["cell_id"], y.labels["cell_id"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(two_stores, workers):
    store, _ = two_stores["a"]
    full = _collect(_dm([store], workers=workers))
    assert len(full) == 40
    first = _dm([store], workers=workers)
    _collect(first, stop=13)
    state = first.state_dict()
    assert state["batches_done"] == 13 and state["epoch"] == 0
    resumed = _dm([store], workers=workers)
    resumed.load_state_dict(state)
    _assert_same(_collect(resumed), full[13:])


def test_resume_refuses_another_store_or_world_size(two_stores):
    (path_a, _), (path_b, _) = two_stores["a"], two_stores["b"]
    first = _dm([path_a], rank=0, world=2)
    _collect(first, stop=3)
    state = first.state_dict()
    with pytest.raises(DataError, match="fingerprint"):
        _dm([path_b], rank=0, world=2, val_fraction=0.4).load_state_dict(state)
    with pytest.raises(ConfigError, match="trainer.devices"):
        _dm([path_a]).load_state_dict(state)  # 1 rank now, 2 when saved


def test_batches_do_not_depend_on_the_collator_threads(two_stores, monkeypatch):
    store, _ = two_stores["a"]
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("SCGPT_COLLATE_THREADS", threads)
        runs.append(_collect(_dm([store], per_device_batch_size=250, buffer_blocks=10), stop=2))
    _assert_same(*runs)
