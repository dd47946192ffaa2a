"""The Rust zarrs codec pipeline decodes the streamed blocks, and DataLoader workers never hang on it.

zarrs decodes on a process-wide thread pool that a forked child inherits without its threads. The
streams run in a subprocess with a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import data_modules.codecs as codecs_module
import data_modules.convert as convert_module
from data_modules.codecs import PYTHON_PIPELINE, ZARRS_PIPELINE, block_codec_pipeline
from data_modules.convert import write_store
from data_modules.store import CellStore
from data_modules.synthetic import make_synthetic_adata

pytest.importorskip("zarrs")

SCRIPT = textwrap.dedent("""
    import json, sys
    from torch.utils.data import DataLoader, IterableDataset
    from data_modules.datamodule import CellDataModule
    from data_modules.codecs import zarrs_started_here

    class Probe(IterableDataset):  # one worker's cells, then the pipeline that decoded its blocks
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            cells = [int(c) for batch in self.stream for c in batch.labels["cell_id"]]
            pipes = sorted({type(s._cache["block", "X/data"].async_array.codec_pipeline).__name__
                            for s in self.stream.sources if ("block", "X/data") in s._cache})
            yield {"cells": cells, "pipelines": pipes}

    def make(workers):
        dm = CellDataModule(paths=[sys.argv[1]], per_device_batch_size=16, num_workers=workers, block_size=32,
                            buffer_blocks=2, max_seq_len=32, val_fraction=0.1, seed=0, label_keys=["cell_id"])
        dm.setup()
        return dm

    def run(dm):
        out = list(DataLoader(Probe(dm._streams["train"]), batch_size=None, num_workers=dm.num_workers))
        return {"cells": sorted(c for o in out for c in o["cells"]), "pipelines": sorted({p for o in out for p in o["pipelines"]})}

    workers = make(2)
    result = {"parent_zarrs_after_setup": zarrs_started_here(), "workers": run(workers)}
    result["main"] = run(make(0))  # zarrs' pool now runs in this process ...
    result["workers_after_main"] = run(workers)  # ... and workers forked from it must not hang
    result["parent_zarrs_at_end"] = zarrs_started_here()
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = make_synthetic_adata(n_cells=400, n_genes=60, seed=0)
    adata.obs["cell_id"] = [f"c{i}" for i in range(adata.n_obs)]
    path = tmp_path_factory.mktemp("zarrs") / "s.zarr"
    # small chunks, so that every block read spans several and zarrs decodes them on its thread pool (a
    # read within one chunk runs inline and would not show the hang: checked, it does hang without the
    # fallback of block_codec_pipeline on this store)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("DATA_CHUNK", 256), ("DATA_SHARD", 16 * 256), ("INDPTR_CHUNK", 64),
                            ("INDPTR_SHARD", 16 * 64)):
            patch.setattr(convert_module, name, value)
        write_store(adata, path, obs_keys=["cell_id"], seed=1)
    return path


def test_zarrs_is_the_default_block_pipeline_when_installed(monkeypatch, store):
    monkeypatch.delenv("SCGPT_ZARRS", raising=False)
    assert block_codec_pipeline() == ZARRS_PIPELINE
    monkeypatch.setenv("SCGPT_ZARRS", "0")
    assert block_codec_pipeline() == PYTHON_PIPELINE
    cs = CellStore(store)
    assert type(cs._block_array("X/data").async_array.codec_pipeline).__name__ == "BatchedCodecPipeline"
    monkeypatch.setenv("SCGPT_ZARRS", "1")
    fast = CellStore(store)
    assert type(fast._block_array("X/data").async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
    assert type(fast._array("X/indptr").async_array.codec_pipeline).__name__ == "BatchedCodecPipeline"
    vocab = cs.vocab()
    a, b = cs.read_block(0, 300, [], vocab), fast.read_block(0, 300, [], vocab)
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices) and np.array_equal(a.data, b.data)


def test_two_workers_stream_with_zarrs_without_hanging(store):
    env_script = [sys.executable, "-c", SCRIPT, str(store)]
    try:
        out = subprocess.run(env_script, capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "SCGPT_ZARRS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("a DataLoader with zarrs-decoded stores hung (no result within 120 s)")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["parent_zarrs_after_setup"] is False  # setup() never starts zarrs' pool in the parent
    assert result["workers"]["pipelines"] == ["ZarrsCodecPipeline"]  # the workers decode with zarrs ...
    assert result["main"]["pipelines"] == ["ZarrsCodecPipeline"] and result["parent_zarrs_at_end"] is True
    assert result["workers_after_main"]["pipelines"] == ["BatchedCodecPipeline"]  # ... or fall back, never hang
    cells = result["workers"]["cells"]
    assert len(cells) == len(set(cells)) > 200  # each training cell once per epoch
    assert result["workers_after_main"]["cells"] == cells


def test_a_global_zarrs_setting_marks_the_process_so_its_forks_fall_back(monkeypatch, store):
    import zarr

    from data_modules.codecs import inherited_zarrs_pool, zarrs_started_here

    monkeypatch.setattr(codecs_module, "_ZARRS_PIDS", set())  # this test's own record (metadata reads only)
    cs = CellStore(store)
    cs.vocab()
    assert not zarrs_started_here()
    with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):  # a user's global setting: anything may use it
        other = CellStore(store)
        other.vocab()
        assert zarrs_started_here()  # so DataLoader workers forked from here decode with zarr-python
        assert type(other._array("X/indptr").async_array.codec_pipeline).__name__ == "BatchedCodecPipeline"
    monkeypatch.setattr(codecs_module.os, "getpid", lambda: -1)  # as seen from a forked child
    assert inherited_zarrs_pool() and block_codec_pipeline() == PYTHON_PIPELINE
