"""Data-loading throughput: our store + streaming DataModule against anndata backed mode, annbatch and scDataset.

Prints one JSON object per line (one per measurement) and a final ``summary`` line.

    python benchmarks/dataloader.py --cells 200000 --nnz 1500 --workdir /tmp/scgpt-dl-bench \
        --annbatch-python /tmp/annbatch-venv/bin/python

Data: a generated cell x gene count matrix (``--genes`` genes; each cell expresses a uniformly random
share in [2/3, 4/3] x ``--nnz`` of them, geometric counts >= 1) is written once, in row chunks, as an
.h5ad (for anndata backed mode) and converted with ``convert_to_store`` into our Zarr store (which
annbatch and scDataset read too: it is an AnnData Zarr store with a CSR ``X``). Both are cached in
``--workdir``.

Measured, each in a fresh subprocess so that peak RSS is its own (``ru_maxrss`` of the process, and of
its largest DataLoader worker):
- ``ours_raw``: CSR rows through the real stream (contiguous blocks -> shuffle buffer -> batch rows),
  no tokenization; ``ours_tokenized``: batches of the real ``CellDataModule`` at ``--max-seq-len``;
  both with 0 and 2 DataLoader workers; shuffle on.
- ``decode_only``: the X reads alone (our contiguous blocks in a random order into a reused buffer, no
  shuffle, no batches): the ceiling of any loader reading this store with these settings and pipeline.
- ``collator``: tokenization alone (``CellCollator.collate_table`` on an 8,192-cell block in memory).
- ``anndata_backed``: ``read_h5ad(backed="r")`` and one random (sorted) row index per batch.
- ``annbatch``: ``Loader(shuffle=True)`` over the store's ``X`` with the same contiguous-read settings as
  ours (chunk_size = block_size, preload_nchunks = buffer_blocks) and with its documented example
  settings (chunk_size 32, preload_nchunks 512); run with ``--annbatch-python`` (it needs Python >= 3.12).
- ``scdataset``: ``scDataset`` with ``BlockShuffling(block_size)`` over the store's ``X`` (same buffer size).
- ``rss_scaling``: peak RSS streaming tokenized batches from a 1M- and a 10M-cell store of tiny cells.
- ``--checksum-cost``: only the read cost of the per-chunk crc32c checksums (format 2): decode only and
  ours raw on the store and on a format-1 copy of the same cells, interleaved; medians of cells per CPU-second.

Throughput is cells after the first batch / seconds after it; ``first_batch_s`` is the time from
creating the iterator to the first batch. Each measurement stops after ``--seconds`` or ``--max-cells``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ANNBATCH_SCRIPT = r"""
import json, sys, time
import anndata as ad, numpy as np, zarr
from annbatch import Loader

store, batch, chunk, preload, seconds, max_cells = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5]), int(sys.argv[6])
pipeline = sys.argv[7]
if pipeline == "zarrs":  # annbatch's recommended codec pipeline
    import zarrs  # noqa: F401
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
X = ad.io.sparse_dataset(zarr.open_group(store, mode="r")["X"])
cpu0 = time.process_time()
loader = Loader(chunk_size=chunk, preload_nchunks=preload, batch_size=batch, shuffle=True, drop_last=True,
                preload_to_gpu=False, rng=np.random.default_rng(0)).add_dataset(X)
start = time.perf_counter()
it = iter(loader)
first = next(it)["X"]
t_first = time.perf_counter()
cpu_first = time.process_time()
cells = 0
for out in it:
    cells += out["X"].shape[0]
    if time.perf_counter() - t_first > seconds or cells >= max_cells:
        break
elapsed = time.perf_counter() - t_first
cpu = time.process_time() - cpu_first
print(json.dumps({"cells": cells, "seconds": elapsed, "first_batch_s": t_first - start, "cpu_s": cpu,
                  "cells_per_cpu_s": cells / cpu if cpu > 0 else None,
                  "first_batch_nnz": int(first.nnz), "codec_pipeline": pipeline,
                  "peak_rss_mib": next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024}))
"""


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def write_wide_h5ad(path: Path, n_cells: int, n_genes: int, mean_nnz: int, seed: int = 0, chunk: int = 2000) -> None:
    """A CSR .h5ad written in row chunks (bounded memory): obs/var via anndata, X appended with h5py."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.h5ad")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        ad.io.write_elem(f, "obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)])))
        ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index([f"GENE{i}" for i in range(n_genes)])))
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 18,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,))
        indptr = x.create_dataset("indptr", shape=(n_cells + 1,), dtype="int64")
        indptr[0] = 0
        nnz = 0
        for a in range(0, n_cells, chunk):
            b = min(a + chunk, n_cells)
            share = rng.uniform(2 / 3, 4 / 3, b - a).astype(np.float32) * (mean_nnz / n_genes)
            rows, cols = np.nonzero(rng.random((b - a, n_genes), dtype=np.float32) < share[:, None])
            values = rng.geometric(0.35, rows.size).astype(np.float32)
            data.resize((nnz + rows.size,))
            indices.resize((nnz + rows.size,))
            data[nnz:] = values
            indices[nnz:] = cols.astype(np.int32)
            indptr[a + 1:b + 1] = nnz + np.cumsum(np.bincount(rows, minlength=b - a))
            nnz += rows.size
    os.replace(tmp, path)


def ensure_wide_data(workdir: Path, n_cells: int, n_genes: int, mean_nnz: int,
                     checksums: bool = True) -> tuple[Path, Path, dict]:
    """The generated .h5ad and its store (``checksums=False``: a format-1 store, no per-chunk crc32c)."""
    name = f"wide_{n_cells}x{n_genes}_nnz{mean_nnz}"
    h5ad, store = workdir / f"{name}.h5ad", workdir / f"{name}{'' if checksums else '_format1'}.zarr"
    info = {}
    if not h5ad.exists():
        start = time.perf_counter()
        write_wide_h5ad(h5ad, n_cells, n_genes, mean_nnz)
        info["h5ad_write_s"] = time.perf_counter() - start
    if not store.exists():
        start = time.perf_counter()
        _convert(h5ad, store, checksums)
        info["convert_s"] = time.perf_counter() - start
    return h5ad, store, info


def _convert(h5ad: Path, store: Path, checksums: bool) -> None:
    import functools
    from unittest import mock

    from data_modules import convert

    if checksums:
        convert.convert_to_store([h5ad], store, chunk_cells=20_000)
        return
    # a store as written before format 2 (the way tests/data_modules/test_checksums.py writes one)
    with mock.patch.object(convert, "FORMAT_VERSION", 1), \
            mock.patch.object(convert, "_create_x", functools.partial(convert._create_x, checksums=False)):
        convert.convert_to_store([h5ad], store, chunk_cells=20_000)


def checksum_cost(args, common: dict, store: Path, plain: Path) -> None:
    """The read cost of per-chunk checksums: the same cells from a format-2 store (crc32c) and a format-1
    one (none), decode only and ours raw (0 workers), zarr-python and zarrs, interleaved over the repeats;
    the summary gives the median cells per CPU-second and the ratio with / without checksums."""
    batch = int(args.batch_sizes.split(",")[0])
    records = []
    for repeat in range(args.repeats):
        for kind in ("decode_only", "ours_raw"):
            for pipeline in args.pipelines.split(","):
                order = (("crc32c", store), ("none", plain))
                for label, path in order[::-1] if repeat % 2 else order:  # who goes first alternates
                    r = run_measure(kind, {**common, "store": str(path), "batch": batch, "workers": 0,
                                           "pipeline": pipeline})
                    records.append(emit({"kind": kind, "checksums": label, "pipeline": pipeline, "batch": batch,
                                         "workers": 0, "repeat": repeat, **r}))
    summary = {}
    for kind in ("decode_only", "ours_raw"):
        for pipeline in args.pipelines.split(","):
            medians = {}
            for label in ("crc32c", "none"):
                values = [r["cells_per_cpu_s"] for r in records if r["kind"] == kind and r["pipeline"] == pipeline
                          and r["checksums"] == label and r.get("cells_per_cpu_s")]
                medians[label] = float(np.median(values)) if values else None
                summary[f"{kind}_{pipeline}_{label}_median_cells_per_cpu_s"] = (round(medians[label])
                                                                                 if values else None)
            if medians["crc32c"] and medians["none"]:
                summary[f"{kind}_{pipeline}_with_over_without"] = round(medians["crc32c"] / medians["none"], 3)
            pairs = {}  # each repeat's two runs were back to back: their ratio sees the same load
            for r in records:
                if r["kind"] == kind and r["pipeline"] == pipeline and r.get("cells_per_cpu_s"):
                    pairs.setdefault(r["repeat"], {})[r["checksums"]] = r["cells_per_cpu_s"]
            ratios = [p["crc32c"] / p["none"] for p in pairs.values() if len(p) == 2]
            if ratios:
                summary[f"{kind}_{pipeline}_median_paired_ratio"] = round(float(np.median(ratios)), 3)
    emit({"kind": "summary", "loadavg_1m_at_end": round(os.getloadavg()[0], 2), **summary})


def ensure_tiny_store(workdir: Path, n_cells: int, nnz: int = 10, n_genes: int = 2000) -> Path:
    """``n_cells`` cells with ``nnz`` counts each (one gene in each of ``nnz`` gene ranges)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from data_modules.convert import write_store

    store = workdir / f"tiny_{n_cells}x{nnz}.zarr"
    if store.exists():
        return store
    rng = np.random.default_rng(0)
    span = n_genes // nnz
    indices = (rng.integers(0, span, (n_cells, nnz)) + np.arange(nnz) * span).ravel().astype(np.int32)
    counts = sp.csr_matrix((rng.integers(1, 5, n_cells * nnz).astype(np.float32), indices,
                            np.arange(n_cells + 1, dtype=np.int64) * nnz), shape=(n_cells, n_genes))
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=pd.Index([f"GENE{i}" for i in range(n_genes)])))
    write_store(adata, store, chunk_cells=min(n_cells, 500_000))
    return store


# ------------------------------------------------------------------------------------------------
# Measurements (each runs in its own process: ``--measure KIND --args JSON``)
# ------------------------------------------------------------------------------------------------
class RawRows:
    """A stand-in collator: the batch's rows as CSR (what annbatch yields), as tensors so that workers
    hand them over through shared memory."""

    def collate_table(self, table, rows, generator):
        import torch

        indptr, indices, data = table.take(rows)
        return {"indptr": torch.from_numpy(indptr), "indices": torch.from_numpy(indices),
                "counts": torch.from_numpy(data)}


def _vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak resident set of a process (``VmHWM``; unlike ``ru_maxrss`` it starts afresh at exec)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


class PeakRss:
    """Samples the peak RSS of this process's children (DataLoader workers) every 20 ms."""

    def __init__(self) -> None:
        import threading

        self.worker_mib, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.02):
            try:
                children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
            except OSError:
                children = []
            for pid in children:
                self.worker_mib = max(self.worker_mib, _vm_hwm_mib(pid))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mib": round(_vm_hwm_mib(), 1), "peak_rss_worker_mib": round(self.worker_mib, 1)}


def _children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live children (DataLoader workers)."""
    me, total = os.getpid(), 0.0
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    except OSError:
        return 0.0
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _n_cells(batch) -> int:
    if isinstance(batch, np.ndarray):  # an indptr
        return batch.size - 1
    if isinstance(batch, dict):
        return int(batch["indptr"].numel()) - 1
    if hasattr(batch, "n_cells"):
        return batch.n_cells
    return int(batch.shape[0])


def _time_iterator(make_iter, seconds: float, max_cells: int) -> dict:
    start = time.perf_counter()
    it = make_iter()
    first = next(it)
    t_first = time.perf_counter()
    cpu_first = time.process_time() + _children_cpu_s()
    cells = 0
    for batch in it:
        cells += _n_cells(batch)
        if time.perf_counter() - t_first > seconds or cells >= max_cells:
            break
    elapsed = time.perf_counter() - t_first
    cpu = time.process_time() + _children_cpu_s() - cpu_first
    del it
    return {"first_batch_s": t_first - start, "first_batch_cells": _n_cells(first), "cells": cells,
            "seconds": elapsed, "cells_per_s": cells / elapsed if elapsed > 0 else None,
            "cpu_s": cpu, "cells_per_cpu_s": cells / cpu if cpu > 0 else None}


def measure(kind: str, a: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    peak = PeakRss()
    # the codec pipeline: our stores decode X blocks with zarrs when it is installed (SCGPT_ZARRS=0 forces
    # zarr-python; workers inherit the setting); scDataset reads through zarr's global setting (setting it
    # globally for ours would make forked workers fall back to zarr-python: see block_codec_pipeline)
    if "pipeline" in a:
        os.environ["SCGPT_ZARRS"] = "1" if a["pipeline"] == "zarrs" else "0"
    if a.get("pipeline") == "zarrs" and kind == "scdataset":
        import zarr
        import zarrs  # noqa: F401

        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    if kind in ("ours_raw", "ours_tokenized"):
        from data_modules.datamodule import CellDataModule

        dm = CellDataModule(paths=[a["store"]], per_device_batch_size=a["batch"], num_workers=a["workers"],
                            block_size=a["block"], buffer_blocks=a["buffer"], max_seq_len=a["max_seq_len"],
                            val_fraction=a["val_fraction"], generative_fraction=0.5, seed=0)
        dm.setup()
        if kind == "ours_raw":
            dm._streams["train"].collator = RawRows()
        result = _time_iterator(lambda: iter(dm.train_dataloader()), a["seconds"], a["max_cells"])
    elif kind == "decode_only":  # the X reads alone: our blocks in a random order, no shuffle buffer or batches
        from data_modules.cells import CsrArena
        from data_modules.store import CellStore, read_blocks

        store = CellStore(a["store"])
        vocab = store.vocab()
        starts = np.random.default_rng(0).permutation(np.arange(0, store.n_cells - a["block"] + 1, a["block"]))
        arena = CsrArena()

        def blocks():  # a shuffle buffer's blocks at a time, read as the stream reads them
            for i in range(0, len(starts), a["buffer"]):
                arena.reset()
                group = [(store, int(s), int(s) + a["block"]) for s in starts[i:i + a["buffer"]]]
                tables = read_blocks(group, [], vocab, arena)
                yield np.zeros(sum(t.n_cells for t in tables) + 1)  # (as an indptr: its length counts the cells)

        result = _time_iterator(blocks, a["seconds"], a["max_cells"])
    elif kind == "collator":  # tokenization alone: one 8,192-cell block in memory, batches of its rows
        import torch

        from data_modules.collate import CellCollator, CollatorConfig
        from data_modules.store import CellStore

        store = CellStore(a["store"])
        table = store.read_block(0, 8192, [], store.vocab())
        collator = CellCollator(CollatorConfig(pad_token_id=0, cls_token_id=1, max_seq_len=a["max_seq_len"],
                                               generative_fraction=0.5))
        order = np.random.default_rng(0).permutation(table.n_cells)

        def batches():
            for rep in range(1000):
                for i in range(0, table.n_cells - a["batch"] + 1, a["batch"]):
                    yield collator.collate_table(table, order[i:i + a["batch"]], torch.Generator().manual_seed(i))

        result = _time_iterator(batches, a["seconds"], a["max_cells"])
    elif kind == "anndata_backed":
        import anndata as ad

        adata = ad.read_h5ad(a["h5ad"], backed="r")
        rng = np.random.default_rng(0)

        def batches():
            while True:
                rows = np.sort(rng.choice(adata.n_obs, a["batch"], replace=False))
                yield adata.X[rows]

        result = _time_iterator(batches, a["seconds"], a["max_cells"])
    elif kind == "scdataset":
        import anndata as ad
        import zarr
        from scdataset import scDataset
        from scdataset.strategy import BlockShuffling

        class Rows:  # scDataset wants len() and x[sorted indices]
            def __init__(self, x):
                self.x = x

            def __len__(self):
                return self.x.shape[0]

            def __getitem__(self, rows):
                return self.x[rows]

        x = Rows(ad.io.sparse_dataset(zarr.open_group(a["store"], mode="r")["X"]))
        fetch_factor = max(1, a["block"] * a["buffer"] // a["batch"])
        dataset = scDataset(x, BlockShuffling(block_size=a["block"]), batch_size=a["batch"], fetch_factor=fetch_factor,
                            drop_last=True, seed=0)
        result = _time_iterator(lambda: iter(DataLoader(dataset, batch_size=None, num_workers=a["workers"])),
                                a["seconds"], a["max_cells"])
        result["fetch_factor"] = fetch_factor
    else:
        raise ValueError(kind)
    return {**result, **peak.stop()}


def run_measure(kind: str, args: dict, timeout: float = 240) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--args", json.dumps(args)]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout} s (hung?)"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_annbatch(python: str, store: Path, batch: int, chunk: int, preload: int, seconds: float, max_cells: int,
                 pipeline: str) -> dict:
    out = subprocess.run([python, "-c", ANNBATCH_SCRIPT, str(store), str(batch), str(chunk), str(preload),
                          str(seconds), str(max_cells), pipeline], check=False, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cells_per_s"] = result["cells"] / result["seconds"] if result["seconds"] > 0 else None
    return result


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def machine() -> dict:
    import platform

    import torch

    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "loadavg_1m_at_start": round(load[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/scgpt-dl-bench")
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=1500, help="mean non-zeros per cell")
    p.add_argument("--batch-sizes", default="256,4096")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--buffer-blocks", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--seconds", type=float, default=15.0, help="time budget of each measurement after its first batch")
    p.add_argument("--max-cells", type=int, default=120_000, help="cell budget of each measurement")
    p.add_argument("--annbatch-python", default=None, help="a Python >= 3.12 with annbatch installed")
    p.add_argument("--pipelines", default="zarr-python,zarrs",
                   help="zarr codec pipelines for the raw runs (the last also for tokenized runs: our default "
                        "when zarrs is installed); zarrs needs `pip install zarrs` in both venvs")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the raw ours/annbatch runs")
    p.add_argument("--skip", default="", help="comma list of: backed, annbatch, scdataset, rss")
    p.add_argument("--rss-cells", default="1000000,10000000")
    p.add_argument("--checksum-cost", action="store_true",
                   help="only the read cost of per-chunk checksums: the store with crc32c (format 2) against the "
                        "same cells without (format 1), decode only and ours raw, first batch size, --repeats")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, json.loads(args.args))))
        return

    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    h5ad, store, info = ensure_wide_data(workdir, args.cells, args.genes, args.nnz)
    from data_modules.store import CellStore

    opened = CellStore(store)
    emit({"kind": "data", "store": str(store), "cells": opened.n_cells, "genes": opened.n_genes, "nnz": opened.nnz,
          "nnz_per_cell": opened.nnz / opened.n_cells, "store_mib": _du(store), "h5ad_mib": _du(h5ad),
          **info, "machine": machine()})
    val_fraction = min(0.2, max(0.01, (2 * args.block_size + 1) / opened.n_cells))  # a val block per worker
    common = {"val_fraction": val_fraction, "store": str(store), "h5ad": str(h5ad), "block": args.block_size, "buffer": args.buffer_blocks,
              "max_seq_len": args.max_seq_len, "seconds": args.seconds, "max_cells": args.max_cells}
    if args.checksum_cost:
        plain = ensure_wide_data(workdir, args.cells, args.genes, args.nnz, checksums=False)[1]
        versions = (opened.meta["format_version"], CellStore(plain).meta["format_version"])
        if versions != (2, 1):  # a store cached in --workdir by older code
            sys.exit(f"error: --workdir {workdir}: stores of format {versions}, not (2, 1); use an empty --workdir")
        emit({"kind": "data", "store": str(plain), "format_version": 1, "store_mib": _du(plain)})
        checksum_cost(args, common, store, plain)
        return
    records = []
    pipelines = args.pipelines.split(",")
    have_annbatch = "annbatch" not in skip and args.annbatch_python and Path(args.annbatch_python).exists()
    if "annbatch" not in skip and not have_annbatch:
        emit({"kind": "annbatch", "skipped": "no --annbatch-python (annbatch needs Python >= 3.12)"})
    for batch in map(int, args.batch_sizes.split(",")):
        r = run_measure("collator", {**common, "batch": batch, "workers": 0})
        records.append(emit({"kind": "collator", "batch": batch, "workers": 0, **r}))
        for repeat in range(args.repeats):  # raw runs of ours and annbatch interleaved; the summary takes the best
            for pipeline in pipelines:  # the ceiling: decoding the same blocks, nothing else
                r = run_measure("decode_only", {**common, "batch": batch, "workers": 0, "pipeline": pipeline})
                records.append(emit({"kind": "decode_only", "batch": batch, "workers": 0, "pipeline": pipeline,
                                     "repeat": repeat, **r}))
            for workers in map(int, args.workers.split(",")):
                for pipeline in pipelines:
                    r = run_measure("ours_raw", {**common, "batch": batch, "workers": workers, "pipeline": pipeline})
                    records.append(emit({"kind": "ours_raw", "batch": batch, "workers": workers, "pipeline": pipeline,
                                         "repeat": repeat, **r}))
            if have_annbatch:
                runs = [("same_as_ours", args.block_size, args.buffer_blocks, p) for p in pipelines]
                runs.append(("doc_example", 32, 512, pipelines[-1]))
                for label, chunk, preload, pipeline in runs:
                    r = run_annbatch(args.annbatch_python, store, batch, chunk, preload, args.seconds, args.max_cells,
                                     pipeline)
                    records.append(emit({"kind": "annbatch", "settings": label, "batch": batch, "workers": 0,
                                         "pipeline": pipeline, "chunk_size": chunk, "preload_nchunks": preload,
                                         "repeat": repeat, **r}))
        for workers in map(int, args.workers.split(",")):
            r = run_measure("ours_tokenized", {**common, "batch": batch, "workers": workers, "pipeline": pipelines[-1]})
            records.append(emit({"kind": "ours_tokenized", "batch": batch, "workers": workers,
                                 "pipeline": pipelines[-1], **r}))
        if "scdataset" not in skip:
            r = run_measure("scdataset", {**common, "batch": batch, "workers": 0, "seconds": min(args.seconds, 10.0)})
            records.append(emit({"kind": "scdataset", "batch": batch, "workers": 0, "block": args.block_size, **r}))
        if "backed" not in skip:
            r = run_measure("anndata_backed", {**common, "batch": batch, "workers": 0,
                                               "seconds": min(args.seconds, 10.0)})
            records.append(emit({"kind": "anndata_backed", "batch": batch, "workers": 0, **r}))
    if "rss" not in skip:
        for n in map(int, args.rss_cells.split(",")):
            tiny = ensure_tiny_store(workdir, n)
            r = run_measure("ours_tokenized", {**common, "store": str(tiny), "batch": 256, "workers": 0, "val_fraction": 0.01,
                                               "max_cells": 256 * 200})
            records.append(emit({"kind": "rss_scaling", "store_cells": n, "nnz_per_cell": 10, "batch": 256,
                                 "workers": 0, "store_mib": _du(tiny), **r}))
    emit({"kind": "summary", **summarize(records)})


def _du(path: Path) -> float:
    path = Path(path)
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def summarize(records: list[dict]) -> dict:
    def rate(kind, batch, workers=0, key="cells_per_s", **extra):  # the best of the repeats
        return max((r[key] for r in records
                    if r.get("kind") == kind and r.get("batch") == batch and r.get("workers") == workers
                    and all(r.get(k) == v for k, v in extra.items()) and r.get(key)), default=None)

    out = {}
    for batch in sorted({r["batch"] for r in records if "batch" in r}):
        for pipeline in ("zarr-python", "zarrs"):
            ours = rate("ours_raw", batch, pipeline=pipeline)
            for label in ("same_as_ours", "doc_example"):
                theirs = rate("annbatch", batch, settings=label, pipeline=pipeline)
                if ours and theirs:
                    out[f"raw_vs_annbatch_{label}_{pipeline}_b{batch}"] = round(ours / theirs, 2)
                ours_cpu = rate("ours_raw", batch, key="cells_per_cpu_s", pipeline=pipeline)
                theirs_cpu = rate("annbatch", batch, key="cells_per_cpu_s", settings=label, pipeline=pipeline)
                if ours_cpu and theirs_cpu:  # cells per CPU-second: steadier on a shared machine
                    out[f"raw_per_cpu_vs_annbatch_{label}_{pipeline}_b{batch}"] = round(ours_cpu / theirs_cpu, 2)
            best_raw = max(filter(None, [rate("ours_raw", batch, w, pipeline=pipeline) for w in (0, 1, 2)]), default=None)
            theirs = rate("annbatch", batch, settings="same_as_ours", pipeline=pipeline)
            if best_raw and theirs:
                out[f"raw_best_workers_vs_annbatch_{pipeline}_b{batch}"] = round(best_raw / theirs, 2)
        best = max(filter(None, [rate("ours_tokenized", batch, w) for w in (0, 1, 2)]), default=None)
        out[f"tokenized_best_cells_per_s_b{batch}"] = round(best) if best else None
        per_cpu = [r["cells_per_cpu_s"] for r in records if r.get("kind") == "ours_tokenized"
                   and r.get("batch") == batch and r.get("cells_per_cpu_s")]
        out[f"tokenized_best_cells_per_cpu_s_b{batch}"] = round(max(per_cpu)) if per_cpu else None
    rss = {r["store_cells"]: r["peak_rss_mib"] for r in records if r.get("kind") == "rss_scaling" and "peak_rss_mib" in r}
    if len(rss) >= 2:
        small, large = min(rss), max(rss)
        out["rss_ratio_large_over_small"] = round(rss[large] / rss[small], 3)
    return out


if __name__ == "__main__":
    main()
