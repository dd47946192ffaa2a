"""A store of 1M tiny cells opens and streams batches without ever loading X."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_modules.datamodule import CellDataModule
from data_modules.convert import write_store
from data_modules.store import CellStore

N_CELLS, NNZ, N_GENES = 1_000_000, 10, 200
X_BYTES = N_CELLS * NNZ * (4 + 4) + (N_CELLS + 1) * 8  # data + indices + indptr, uncompressed: 88 MB


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    rng = np.random.default_rng(0)
    span = N_GENES // NNZ
    indices = (rng.integers(0, span, (N_CELLS, NNZ)) + np.arange(NNZ) * span).ravel().astype(np.int32)
    counts = sp.csr_matrix((rng.integers(1, 5, N_CELLS * NNZ).astype(np.float32), indices,
                            np.arange(N_CELLS + 1, dtype=np.int64) * NNZ), shape=(N_CELLS, N_GENES))
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=pd.Index([f"G{i}" for i in range(N_GENES)])))
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(N_CELLS) % 3, "b1", "b2"))
    path = tmp_path_factory.mktemp("big") / "cells.zarr"
    write_store(adata, path, obs_keys=["batch"], chunk_cells=250_000)
    return path


def test_a_million_cells_open_and_stream_without_loading_x(big_store, monkeypatch):
    reads = []
    original = CellStore.read_counts

    def recording(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(CellStore, "read_counts", recording)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        dm = CellDataModule(paths=[str(big_store)], label_keys=["batch"], block_size=1024, buffer_blocks=4,
                            per_device_batch_size=256, max_seq_len=32, val_fraction=0.01)
        dm.setup()
        assert dm.sources[0].n_cells == N_CELLS
        batches = []
        for batch in dm.train_dataloader():
            batches.append(batch)
            if len(batches) == 40:  # 10,240 cells: 3 buffer groups
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(b.n_cells == 256 and b.gene_ids.shape[1] == NNZ + 1 for b in batches)
    assert set(np.concatenate([b.labels["batch"].numpy() for b in batches])) <= {0, 1}
    assert sum(reads) <= 3 * 4 * 1024  # only the buffer groups it streamed, in whole blocks
    assert peak < X_BYTES / 4, f"peak traced memory {peak / 2**20:.0f} MiB; X is {X_BYTES / 2**20:.0f} MiB"
