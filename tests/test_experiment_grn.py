"""experiment=kang_grn (the pretrained model's gene networks scored against a reference on real cells): it
composes with a user's store, reference file and checkpoint, evaluates without training, and a missing reference
file or reference column, or a store without the response recipe's cell-type column, is one line and exit 2.
Also the ChIP target lists of benchmarks/real_cells/grn.py become a regulator -> target file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config

from data_modules.convert import write_store
from data_modules.synthetic import make_synthetic_adata
from scgpt.errors import DataError
from scgpt.train import train

SMALL = ["model.max_seq_len=64", "data.per_device_batch_size=16", "data.global_batch_size=16", "logger=none",
         "data.val_fraction=0.3", "task.network_genes=60", "task.knockout_max_regulators=4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = make_synthetic_adata(n_cells=200, n_genes=80, n_cell_types=3, n_batches=2, seed=2)
    adata.obs["stim"] = np.where(adata.obs["batch"].astype(str) == "batch_0", "CTRL", "STIM")
    path = tmp_path_factory.mktemp("stores") / "kang.zarr"
    write_store(adata, path, obs_keys=["batch", "stim"])  # no cell_type column
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Omnipath-like: 4 regulators x 10 targets (transcriptional) and post-translational rows to be dropped."""
    genes = [f"SYN{i:05d}" for i in range(80)]
    rows = [(genes[r], genes[10 + 10 * r + t], "transcriptional") for r in range(4) for t in range(10)]
    rows += [(genes[5], genes[t], "post_translational") for t in range(40, 60)]
    path = tmp_path_factory.mktemp("ref") / "edges.csv"
    pd.DataFrame(rows, columns=["source", "target", "type"]).to_csv(path, index=False)
    return path


def test_kang_grn_composes_with_the_users_store_reference_and_checkpoint(tmp_path, store, reference):
    cfg = compose_config(tmp_path, "experiment=kang_grn", f"data.paths=[{store}]", f"task.reference_edges={reference}",
                         "init_from=/data/my_pretrain/last.ckpt")
    assert list(cfg.data.paths) == [str(store)] and cfg.task.reference_edges == str(reference)
    assert cfg.init_from == "/data/my_pretrain/last.ckpt" and cfg.task.fit is False
    assert dict(cfg.task.reference_where) == {"type": "transcriptional"} and cfg.model.value_encoding == "scaling"


def test_kang_grn_evaluates_every_network_from_the_regulators_without_training(tmp_path, store, reference):
    summary = train(compose_config(tmp_path, "experiment=kang_grn", f"data.paths=[{store}]", "init_from=null",
                                   f"task.reference_edges={reference}", *SMALL))
    val = summary["val"]
    assert summary["global_step"] == 0  # the given weights, evaluated
    # scored from the 4 regulators' rows only: a denser candidate set than all pairs
    assert val["grn_auprc_random"] < val["grn_from_regulators_auprc_random"] < 1.0
    for prefix in ("", "attn/", "coexpr/", "knockout/"):
        assert 0.0 <= val[f"{prefix}grn_from_regulators_auprc"] <= 1.0


def _cli(tmp_path, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scgpt.train", *overrides, "logger=none", "init_from=null"],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_missing_reference_file_is_one_line_and_exit_2(tmp_path, store):
    result = _cli(tmp_path, "experiment=kang_grn", f"data.paths=[{store}]", f"task.reference_edges={tmp_path}/no.parquet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: task.reference_edges:") and "no such file" in lines[0]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("summary.json"))


def test_reference_without_the_regulator_column_names_it(tmp_path, store, reference):
    with pytest.raises(DataError, match=r"has no column 'TF' \(task.reference_columns / reference_where\)"):
        train(compose_config(tmp_path, "experiment=kang_grn", f"data.paths=[{store}]", "init_from=null",
                             f"task.reference_edges={reference}", "task.reference_columns=[TF,target]", *SMALL))


def test_response_recipe_on_a_store_without_cell_types_names_the_column(tmp_path, store):
    result = _cli(tmp_path, "experiment=kang_response", f"data.paths=[{store}]")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "'cell_type'" in lines[0], result.stderr


def test_chip_target_lists_become_one_edge_file_over_cell_lines(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "real_cells"))
    from grn import chip_edges

    lists = {"CJUN HUVEC": ["FOS", "EGR1"], "CJUN K562": ["EGR1", "MYC"], "STAT1 GM12878": ["IRF1", "STAT1"]}
    (tmp_path / "chip.json").write_text(json.dumps(lists))
    frame = pd.read_csv(chip_edges(tmp_path / "chip.json", tmp_path / "edges.tsv"), sep="\t")
    edges = set(zip(frame["source"], frame["target"]))
    assert edges == {("JUN", "FOS"), ("JUN", "EGR1"), ("JUN", "MYC"), ("STAT1", "IRF1")}  # alias, union, no self
    with pytest.raises(DataError, match="no such file"):
        chip_edges(tmp_path / "missing.json", tmp_path / "x.tsv")
