"""``scgpt-data``: convert, synth, inspect, vocab, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from data_modules.store import CellStore
from data_modules.synthetic import make_synthetic_adata
from scgpt.data_cli import main
from scgpt.tokenizer.vocab import GeneVocab


@pytest.fixture(scope="module")
def adata():
    return make_synthetic_adata(n_cells=200, n_genes=40, n_cell_types=3, n_batches=2, seed=1)


@pytest.fixture
def h5ad(adata, tmp_path):
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return path


def _run_error(capsys, argv, tmp_path, *expected):
    """Runs a failing command; checks exit 2, one line naming the problem, and nothing left in tmp_path."""
    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary directory
    return err


def test_convert_prints_a_report_and_writes_a_store(h5ad, tmp_path, capsys, adata):
    out = tmp_path / "out.zarr"
    assert main(["convert", str(h5ad), "-o", str(out), "--obs-keys", "cell_type", "--seed", "5"]) == 0
    report = capsys.readouterr().out
    for text in ("cells written : 200", "cells dropped : 0", "genes matched : 40 of 40", "fingerprint"):
        assert text in report
    store = CellStore(out)
    assert store.obs_columns == ["cell_type", "original_index", "source"]
    assert store.meta["created_by"].startswith("scgpt-data convert") and store.meta["shuffle_seed"] == 5
    assert store.vocab().genes == list(adata.var_names)


def _write(path, adata):
    adata.write_h5ad(path)
    return str(path)


def test_log_normalised_x_suggests_the_counts_layer(adata, tmp_path, capsys):
    logged = adata.copy()
    logged.layers["counts"] = logged.X.copy()
    logged.X = logged.X.log1p()
    path = _write(tmp_path / "logged.h5ad", logged)
    _run_error(capsys, ["convert", path, "-o", str(tmp_path / "o.zarr")], tmp_path,
               "logged.h5ad", "non-negative integers", "--layer counts")
    assert main(["convert", path, "-o", str(tmp_path / "o.zarr"), "--layer", "counts"]) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_late_chunk_leaves_nothing_behind(adata, tmp_path, capsys, bad):
    broken = adata.copy()
    broken.X = broken.X.copy()
    broken.X.data[-1] = bad
    path = _write(tmp_path / "broken.h5ad", broken)
    _run_error(capsys, ["convert", path, "-o", str(tmp_path / "o.zarr"), "--chunk-cells", "30"], tmp_path,
               "broken.h5ad", "NaN or infinite")


def test_duplicate_gene_names(adata, tmp_path, capsys):
    dup = adata.copy()
    dup.var_names = [adata.var_names[0]] + list(adata.var_names[:-1])
    path = _write(tmp_path / "dup.h5ad", dup)
    _run_error(capsys, ["convert", path, "-o", str(tmp_path / "o.zarr")], tmp_path,
               "dup.h5ad", "duplicate gene names", adata.var_names[0], "--gene-column")


def test_low_vocabulary_overlap_reports_matches_and_examples(h5ad, adata, tmp_path, capsys):
    vocab = tmp_path / "vocab.json"
    GeneVocab.from_genes(list(adata.var_names[:10]) + ["OTHER1", "OTHER2"]).save(vocab)
    err = _run_error(capsys, ["convert", str(h5ad), "-o", str(tmp_path / "o.zarr"), "--vocab", str(vocab)],
                     tmp_path, "in.h5ad", "only 10 of 40 genes", "vocab.json", adata.var_names[10])
    assert adata.var_names[15] not in err  # at most five examples
    assert main(["convert", str(h5ad), "-o", str(tmp_path / "o.zarr"), "--vocab", str(vocab),
                 "--min-vocab-overlap", "0.2"]) == 0


def test_empty_inputs(adata, tmp_path, capsys):
    no_cells = _write(tmp_path / "nocells.h5ad", adata[:0].copy())
    _run_error(capsys, ["convert", no_cells, "-o", str(tmp_path / "o.zarr")], tmp_path, "nocells.h5ad", "empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("cell,G1,G2\n")
    _run_error(capsys, ["convert", str(header_only), "-o", str(tmp_path / "o.zarr")], tmp_path, "header.csv", "empty")


def test_existing_output_needs_overwrite(h5ad, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    assert main(["convert", str(h5ad), "-o", str(out)]) == 0
    first = CellStore(out).fingerprint
    capsys.readouterr()
    _run_error(capsys, ["convert", str(h5ad), "-o", str(out)], tmp_path, "o.zarr", "--overwrite")
    assert main(["convert", str(h5ad), "-o", str(out), "--overwrite", "--seed", "1"]) == 0
    assert CellStore(out).fingerprint != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "o.zarr"]


def test_unknown_obs_key_and_layer(h5ad, tmp_path, capsys):
    _run_error(capsys, ["convert", str(h5ad), "-o", str(tmp_path / "o.zarr"), "--obs-keys", "cell_type,donor"],
               tmp_path, "in.h5ad", "'donor'", "cell_type")
    _run_error(capsys, ["convert", str(h5ad), "-o", str(tmp_path / "o.zarr"), "--layer", "counts"],
               tmp_path, "in.h5ad", "'counts'", "--layer")


def test_cells_without_vocabulary_counts_are_dropped_and_reported(adata, tmp_path, capsys):
    x = sp.lil_matrix(adata.X)
    x[:7, :] = 0  # seven cells with no counts at all
    x[7:10, :30] = 0  # three more with counts only in genes the vocabulary lacks
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(x)
    sparse.X.eliminate_zeros()
    path = _write(tmp_path / "sparse.h5ad", sparse)
    vocab = tmp_path / "vocab.json"
    GeneVocab.from_genes(list(adata.var_names[:30])).save(vocab)
    assert main(["convert", path, "-o", str(tmp_path / "o.zarr"), "--vocab", str(vocab)]) == 0
    report = capsys.readouterr().out
    assert "cells written : 190" in report and "cells dropped : 10" in report
    assert "genes matched : 30 of 40" in report
    back = ad.read_zarr(tmp_path / "o.zarr")
    assert back.n_obs == 190 and back.n_vars == 30 and set(back.obs["original_index"]).isdisjoint(range(10))
    assert np.diff(back.X.indptr).min() > 0


def test_synth_inspect_and_vocab(tmp_path, capsys):
    out = tmp_path / "synth.zarr"
    assert main(["synth", "--cells", "120", "--genes", "30", "--cell-types", "4", "--batches", "2",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    vocab_file = tmp_path / "v.json"
    GeneVocab.from_genes([f"SYN{i:05d}" for i in range(15)]).save(vocab_file)
    assert main(["inspect", str(out), "--json", "--vocab", str(vocab_file), "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cells"] == 120 and summary["genes"] == 30
    assert summary["obs_columns"] == {"cell_type": 4, "batch": 2, "original_index": "numeric", "source": 1}
    assert summary["vocab_overlap"]["matched"] == 15 and summary["fingerprint_verified"]
    assert summary["nnz_per_cell"]["min"] >= 1
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cells        : 120" in text and "cell_type (4 categories)" in text and "nonzeros" in text
    assert "gene_programs" in ad.read_zarr(out).uns  # ground truth travels with the store

    genes = tmp_path / "genes.txt"
    genes.write_text("SYN00029\nNEW1\n\nSYN00000\n")
    assert main(["vocab", "--stores", str(out), "-o", str(tmp_path / "v1.json")]) == 0
    v1 = GeneVocab.load(tmp_path / "v1.json")
    assert v1.genes == [f"SYN{i:05d}" for i in range(30)] and v1.pad_id == 30
    assert main(["vocab", "--genes", str(genes), str(vocab_file), "-o", str(tmp_path / "v2.json")]) == 0
    v2 = json.loads((tmp_path / "v2.json").read_text())
    assert list(v2)[:4] == ["SYN00029", "NEW1", "SYN00000", "SYN00001"] and "<pad>" in v2
    capsys.readouterr()
    _run_error(capsys, ["vocab", "--genes", str(genes), "-o", str(tmp_path / "v2.json")], tmp_path, "--overwrite")
    _run_error(capsys, ["inspect", str(tmp_path / "nope.zarr")], tmp_path, "nope.zarr")


def test_gene_column_picks_names_and_keeps_ensembl_ids(adata, tmp_path, capsys):
    ens = adata.copy()
    ens.var["symbol"] = list(adata.var_names)
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    path = _write(tmp_path / "ens.h5ad", ens)
    assert main(["convert", path, "-o", str(tmp_path / "o.zarr"), "--gene-column", "symbol"]) == 0
    var = ad.read_zarr(tmp_path / "o.zarr").var
    assert list(var.index) == list(adata.var_names) and list(var["gene_ids"]) == list(ens.var_names)
    capsys.readouterr()
    _run_error(capsys, ["convert", path, "-o", str(tmp_path / "p.zarr"), "--gene-column", "name"],
               tmp_path, "ens.h5ad", "'name'", "symbol")


def test_console_entry_point_prints_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "scgpt.data_cli", "inspect", str(tmp_path / "missing.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "missing.zarr" in done.stderr and "Traceback" not in done.stderr


def test_verify_passes_a_clean_store_and_lists_a_damaged_chunk(tmp_path, capsys):
    import os
    import shutil

    store = tmp_path / "s.zarr"
    assert main(["synth", "--cells", "3000", "--genes", "300", "-o", str(store)]) == 0
    assert main(["verify", str(store)]) == 0
    assert "clean" in capsys.readouterr().out
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    shard = bad / "X" / "data" / "c" / "0"
    with open(shard, "r+b") as f:  # 4 KB of random bytes inside the shard
        f.seek(os.path.getsize(shard) // 3)
        f.write(np.random.default_rng(0).bytes(4096))
    assert main(["verify", str(store), str(bad)]) == 2
    out, err = capsys.readouterr()
    problems = [line for line in out.splitlines() if line.startswith(str(bad))]
    assert problems and all("fails its checksum" in line for line in problems)
    assert err.strip().startswith(f"error: {bad} (") and "verification failed" in err
    assert main(["inspect", str(bad), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksums    : crc32c per chunk of X" in out and "not recomputed" in out


def _options_without_help(help_text: str) -> list[str]:
    """The argument entries of an argparse --help page with no help text beside or below them."""
    lines = [line for line in help_text.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.endswith(("options:", "positional arguments:")))
    bare = []
    for i, line in enumerate(lines[start:], start):
        entry = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not entry or line.endswith(":"):
            continue
        described_below = i + 1 < len(lines) and re.match(r"^\s{3,}\S", lines[i + 1])
        if not entry.group(2) and not described_below:
            bare.append(entry.group(1))
    return bare


@pytest.mark.parametrize("command", ["convert", "synth", "inspect", "verify", "vocab"])
def test_every_option_of_every_subcommand_has_help_text(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    page = capsys.readouterr().out
    assert "--help" in page and _options_without_help(page) == []
    assert _options_without_help(page + "\n  --bare BARE\n") == ["--bare BARE"]  # the parser sees a bare option
