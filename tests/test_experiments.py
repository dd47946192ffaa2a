"""conf/experiment/: every recipe composes with a user's store paths and builds its data module and task; a recipe
on a store without the obs column it needs names the column and exits with code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hydra.utils import instantiate

from data_modules.convert import write_store
from data_modules.synthetic import make_synthetic_adata
from scgpt.paths import config_dir
from scgpt.train import build_task, model_settings

from conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
MINE = ["kang_pretrain", "kang_annotation", "kang_integration"]


def _kang_like(path, with_stim: bool = True):
    """A small store with Kang's obs columns (seurat_annotations, stim) in place of the synthetic ones."""
    adata = make_synthetic_adata(n_cells=300, n_genes=80, n_cell_types=3, n_batches=2, seed=2)
    adata.obs["seurat_annotations"] = adata.obs["cell_type"].astype(str)
    if with_stim:
        adata.obs["stim"] = np.where(adata.obs["batch"].astype(str) == "batch_0", "CTRL", "STIM")
    keys = ["seurat_annotations", "cell_type", "batch"] + (["stim"] if with_stim else [])
    write_store(adata, path, obs_keys=keys)
    return path


@pytest.fixture(scope="module")
def kang_store(tmp_path_factory):
    return _kang_like(tmp_path_factory.mktemp("stores") / "kang.zarr")


def test_the_kang_recipes_exist():
    assert set(MINE) <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, kang_store, tmp_path):
    cfg = compose_config(tmp_path, f"experiment={experiment}", f"data.paths=[{kang_store}]")
    assert cfg.task.name and cfg.model and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("experiment", MINE)
def test_the_kang_recipes_build_their_task(experiment, kang_store, tmp_path):
    cfg = compose_config(tmp_path, f"experiment={experiment}", f"data.paths=[{kang_store}]", "data.num_workers=0")
    datamodule = instantiate(cfg.data)
    if cfg.task.get("data_module"):
        datamodule = instantiate(cfg.task.data_module, cells=datamodule)
    settings = model_settings(cfg, datamodule)
    task = build_task(cfg, settings)
    assert task is not None and cfg.task.name
    assert cfg.data._target_.endswith("CellDataModule")


def test_recipes_select_their_task_and_labels(kang_store, tmp_path):
    annotation = compose_config(tmp_path, "experiment=kang_annotation", f"data.paths=[{kang_store}]")
    assert annotation.task.name == "annotation" and annotation.task.label_key == "seurat_annotations"
    assert dict(annotation.data.test_split) == {"key": "stim", "values": ["STIM"]}
    integration = compose_config(tmp_path, "experiment=kang_integration", f"data.paths=[{kang_store}]")
    assert integration.task.name == "integration" and integration.task.batch_key == "stim"
    pretrain = compose_config(tmp_path, "experiment=kang_pretrain", f"data.paths=[{kang_store}]")
    assert pretrain.task.name == "pretrain" and list(pretrain.data.label_keys) == []


def test_a_store_without_stim_names_the_column_and_exits_2(tmp_path):
    store = _kang_like(tmp_path / "no_stim.zarr", with_stim=False)
    command = [sys.executable, "-m", "scgpt.train", "experiment=kang_annotation", f"data.paths=[{store}]",
               f"run_dir={tmp_path / 'run'}", "data.num_workers=0", "trainer.max_steps=2", "model.max_seq_len=32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "stim" in last and "Traceback" not in result.stderr
