"""Checksummed cell stores: damaged bytes in a store stop every read with one line naming the store, the
array, the chunk and its cells (zarr-python and zarrs pipelines, in DataLoader workers, in scgpt-train);
no read ever returns numbers from a damaged chunk; stores of format 1 (no checksums) stay readable."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import data_modules.convert as convert_module
from data_modules.cells import CsrArena
from data_modules.convert import write_store
from data_modules.integrity import has_chunk_checksums
from data_modules.store import CellStore, StoreDamagedError, read_blocks
from data_modules.synthetic import make_synthetic_adata

ONE_LINE = (r"^(?P<store>\S+): X/(?P<array>data|indices|indptr) chunk (?P<chunk>\d+) \(values (?P<a>\d+)-(?P<b>\d+), "
            r"cells (?P<c0>\d+)-(?P<c1>\d+)\) (?P<reason>[^:]+): the store is damaged; restore it from a copy or "
            r"convert it again \(scgpt-data verify \S+ lists every damaged chunk\)$")
PIPELINES = ["0", pytest.param("1", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("zarrs") is None, reason="zarrs not installed"))]


@pytest.fixture(scope="module")
def adata():
    return make_synthetic_adata(n_cells=3000, n_genes=500, n_cell_types=3, seed=0)


@pytest.fixture(scope="module")
def clean(adata, tmp_path_factory):
    """A 3,000-cell store: 600k values, 5 chunks of X/data in one shard."""
    out = tmp_path_factory.mktemp("clean") / "cells.zarr"
    write_store(adata, out, obs_keys=["cell_type"], seed=0)
    return out


def damage(clean, tmp_path, array="data", where=1 / 3, nbytes=4096, seed=0):
    """A copy of ``clean`` with ``nbytes`` random bytes written at ``where`` (share of its size) into the first
    shard of X/``array``, as a failing disk or a bad copy would."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(clean, bad)
    shard = bad / "X" / array / "c" / "0"
    with open(shard, "r+b") as f:
        f.seek(int(os.path.getsize(shard) * where))
        f.write(np.random.default_rng(seed).bytes(nbytes))
    return bad


def all_blocks(store, block=100):
    return [(a, min(a + block, store.n_cells)) for a in range(0, store.n_cells, block)]


def test_new_stores_carry_a_checksum_in_every_chunk_codec_chain(clean):
    import zarr

    store = CellStore(clean)
    assert store.meta["format_version"] == 2 and store.has_checksums
    group = zarr.open_group(str(clean), mode="r")
    for name in ("data", "indices", "indptr"):
        chain = group["X"][name].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert [c["name"] for c in chain][-2:] == ["blosc", "crc32c"]
        assert has_chunk_checksums(group["X"][name])
    assert (ad.read_zarr(clean).X != store.read_counts(0, store.n_cells)).nnz == 0  # anndata reads it


@pytest.mark.parametrize("zarrs", PIPELINES)
def test_4kb_of_random_bytes_in_a_data_shard_stop_reads_with_one_line(clean, tmp_path, monkeypatch, zarrs):
    monkeypatch.setenv("SCGPT_ZARRS", zarrs)
    good, bad = CellStore(clean), CellStore(damage(clean, tmp_path))
    vocab = good.vocab()
    failures = []
    for a, b in all_blocks(bad):
        try:
            got = bad.read_counts(a, b)
        except StoreDamagedError as exc:
            failures.append((a, b, str(exc)))
            continue
        assert (got != good.read_counts(a, b)).nnz == 0  # a read that returns, returns the stored numbers
        table = read_blocks([(bad, a, b)], [], vocab, CsrArena())[0]
        assert np.array_equal(table.counts.toarray(), good.read_counts(a, b).toarray())
    assert failures, "the damaged chunk was never reported"
    for a, b, message in failures:
        match = re.match(ONE_LINE, message)
        assert match, message
        assert match["store"] == str(bad.path) and match["array"] == "data" and match["reason"] == "fails its checksum"
        cells = int(match["c0"]), int(match["c1"])
        assert a <= cells[1] and cells[0] < b  # the failing block holds cells of the named chunk
        indptr = good.read_counts(0, good.n_cells).indptr
        assert indptr[cells[0]] <= int(match["a"]) < indptr[cells[0] + 1]  # the chunk's first value is in cell c0
    with pytest.raises(StoreDamagedError, match=ONE_LINE):  # several blocks read together: the same line
        read_blocks([(bad, a, b) for a, b in all_blocks(bad)], [], vocab, CsrArena())


@pytest.mark.parametrize("zarrs", PIPELINES)
@pytest.mark.parametrize("fault", ["indices", "indptr", "shard index", "missing shard"])
def test_other_damage_is_named_too(clean, tmp_path, monkeypatch, zarrs, fault):
    monkeypatch.setenv("SCGPT_ZARRS", zarrs)
    if fault == "missing shard":
        bad = tmp_path / "bad.zarr"
        shutil.copytree(clean, bad)
        os.remove(bad / "X" / "data" / "c" / "0")
        array, reason = "data", "is missing (its shard file 0 is gone)"
    elif fault == "shard index":  # the index sits in the last bytes of a shard
        bad = damage(clean, tmp_path, "data", where=0.9999, nbytes=64)
        array, reason = "data", "is unreadable (its shard's index fails its checksum)"
    else:
        bad = damage(clean, tmp_path, fault, where=0.2, nbytes=4096 if fault == "indices" else 16)
        array, reason = fault, "fails its checksum"
    store = CellStore(bad)
    with pytest.raises(StoreDamagedError) as info:
        for a, b in all_blocks(store, 500):
            store.read_counts(a, b)
    match = re.match(ONE_LINE, str(info.value))
    assert match and match["array"] == array and match["reason"] == reason, str(info.value)


def test_a_damaged_chunk_stops_a_dataloader_worker_with_the_same_line(clean, tmp_path, monkeypatch):
    """torch rebuilds a worker's exception from its formatted traceback: the one line must survive."""
    from torch.utils.data import DataLoader

    from data_modules.datamodule import CellDataModule

    monkeypatch.setenv("SCGPT_ZARRS", "0")  # zarrs in a forked worker: tests/data_modules/test_zarrs_workers.py
    bad = damage(clean, tmp_path)
    dm = CellDataModule(paths=[str(bad)], per_device_batch_size=64, num_workers=1, block_size=100,
                        buffer_blocks=2, max_seq_len=32, val_fraction=0.05, seed=0)
    dm.setup()
    with pytest.raises(StoreDamagedError) as info:
        for _ in DataLoader(dm._streams["train"], batch_size=None, num_workers=1):
            pass
    assert "\n" not in str(info.value) and re.match(ONE_LINE, str(info.value)), str(info.value)


@pytest.mark.slow
def test_training_on_a_damaged_store_exits_2_with_the_line(clean, tmp_path):
    bad = damage(clean, tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "scgpt.train", f"run_dir={tmp_path / 'run'}", "data=zarr", f"data.paths=[{bad}]",
         "data.num_workers=1", "data.block_size=100", "data.buffer_blocks=2", "data.per_device_batch_size=32",
         "data.global_batch_size=32", "model.d_model=32", "model.d_hid=64", "model.max_seq_len=32",
         "logger=none", "trainer=cpu", "trainer.max_steps=200", "trainer.val_check_interval=200",
         "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2, run.stderr[-3000:]
    # the line, then whatever the run adds about resuming (scgpt/train.py)
    assert last.startswith("error: ") and re.match(ONE_LINE[:-1], last[len("error: "):]), run.stderr[-3000:]


def test_stores_written_before_checksums_stay_readable(adata, clean, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "FORMAT_VERSION", 1)
    monkeypatch.setattr(convert_module, "_create_x", functools.partial(convert_module._create_x, checksums=False))
    old = tmp_path / "old.zarr"
    write_store(adata, old, obs_keys=["cell_type"], seed=0)
    store, new = CellStore(old), CellStore(clean)
    assert store.meta["format_version"] == 1 and not store.has_checksums
    assert (store.read_counts(0, store.n_cells) != new.read_counts(0, new.n_cells)).nnz == 0
    assert store.fingerprint == new.fingerprint  # the fingerprint is of the contents, whatever the format
    assert sp.issparse(ad.read_zarr(old).X)
