"""Config values checked before anything runs (scgpt/config_schema.py, scgpt/config_checks.py): a bad value on
the command line is one line naming the key and what it accepts, exit 2, no traceback; a misspelt key or group
option suggests the closest real one, and every suggestion works when applied; the batch size left out is
derived from the world size; a small store trains with the default loader settings."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import subprocess
import sys

import pytest

from data_modules.datamodule import CellDataModule
from scgpt.config_checks import BatchSizes, derive_batch_sizes
from scgpt.config_schema import DataConfig
from scgpt.errors import ConfigError
from scgpt.paths import config_dir
from scgpt.train import check_overrides, gradient_accumulation, train

from conftest import SMALL_DATA, compose_config

QUIET = ["trainer=debug", "logger=none", "trainer.enable_progress_bar=false"]
SMALL = [o for o in SMALL_DATA if "batch_size" not in o]  # 400 cells x 200 genes, batch sizes left out


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "scgpt.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)


# ---- the command line, as a new user types it ----------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["data.per_device_batch_size=abc"], "error: data.per_device_batch_size: 'abc' is not an integer >= 1 (or null)"),
    (["model.dropout=high"], "error: model.dropout: 'high' is not a number (e.g. model.dropout=0.2)"),
    (["data.per_device_batch_size=0"], "error: data.per_device_batch_size: 0 is not an integer >= 1 (or null)"),
    (["trainer.max_steps=-5"], "error: trainer.max_steps: -5 is not an integer >= 1, or -1 (no limit)"),
    (["-m", "trainer=debugg"], ("error: command line: In 'config': Could not find 'trainer/debugg'. Available "
                                "options in 'trainer': cpu, debug, gpu. Did you mean trainer=debug?")),
    (["model.d_modle=64"], "error: command line: Could not override 'model.d_modle'. Did you mean model.d_model?"),
], ids=["batch-abc", "dropout-high", "batch-0", "max_steps-5", "multirun-typo", "misspelt-key"])
def test_bad_value_on_the_command_line_is_one_line_exit_2(args, message, tmp_path):
    result = _cli(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]  # no traceback, no warnings
    assert list(tmp_path.iterdir()) == []  # no runs/ or multirun/ directory: nothing ran


def test_help_lists_the_config_groups_and_no_sweep_group(tmp_path):
    result = _cli(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("== Configuration groups ==", 1)[1].split("==", 1)[0]
    groups = {line.split(":", 1)[0] for line in section.splitlines() if re.match(r"^\w+: ", line)}
    shipped = {p.name for p in config_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert groups == shipped and {"task", "model", "data", "trainer"} <= groups
    assert "sweep" not in groups  # wandb sweep specs live in sweeps/, outside the config groups


# ---- values checked in process (the same check the command line runs) ----------------------------------
@pytest.mark.parametrize("override, message", [
    ("data.block_size=0", "data.block_size: 0 is not an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers: -1 is not an integer >= 0"),
    ("data.layout=dense", "data.layout: 'dense' is not one of padded, packed"),
    ("data.val_fraction=0", "data.val_fraction: 0 is not a number in (0, 1)"),
    ("data.per_device_batch_size=2.5", "data.per_device_batch_size: 2.5 is not an integer >= 1 (or null)"),
    ("model.n_layers=two", "model.n_layers: 'two' is not an integer (e.g. model.n_layers=12)"),
    ("trainer.precision=8", "trainer.precision: 8 is not one of 32-true, bf16-mixed"),
    ("trainer.devices=0", "trainer.devices: 0 is not an integer >= 1, or -1 (all) or one of auto"),
    ("task.objectives.gep=-1", "task.objectives.gep: -1 is not a number >= 0"),  # was the whole mapping
    ("task.optimizer.lr=-0.1", "task.optimizer.lr: -0.1 is not a number >= 0"),
    ("seed=-3", "seed: -3 is not an integer >= 0"),
    ("checkpoint.every_n_train_steps=0", "checkpoint.every_n_train_steps: 0 is not an integer >= 1"),
    ("+data.block_sise=64", "data.block_sise: unknown key; did you mean data.block_size?"),
    ("+trainer.max_stepz=3", "trainer.max_stepz: unknown key; did you mean trainer.max_steps?"),
    ("+model.d_modle=64", "model.d_modle: unknown key; did you mean model.d_model?"),  # was refused after data loading
    ("+task.lable_key=cell_type", "task.lable_key: unknown key; did you mean +task.label_key?"),  # was ignored
    ("+task.optimizer.weight_decy=0.1", "task.optimizer.weight_decy: unknown key; did you mean "
                                        "task.optimizer.weight_decay?"),
])
def test_every_section_checks_type_and_range_naming_the_key(override, message):
    with pytest.raises(ConfigError) as refused:
        check_overrides([override])
    assert str(refused.value).startswith(message)


def test_a_new_task_key_with_no_near_neighbour_is_kept_for_the_task():
    check_overrides(["+task.my_option=3", "++task.generative_fraction=0.3"])


def test_the_data_checks_follow_the_data_module_arguments():
    """DataConfig has a rule for every CellDataModule argument, with the same default."""
    arguments = {name: p.default for name, p in inspect.signature(CellDataModule.__init__).parameters.items()
                 if name != "self"}
    rules = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    assert rules == arguments


# ---- every suggestion works when applied ---------------------------------------------------------------
def _apply(overrides: list[str], message: str) -> list[str]:
    """The command line with the error's suggestion applied: 'did you mean KEY' renames the misspelt key,
    'Did you mean group=option' and 'set key=value' replace that override."""
    rename = re.search(r"(?:'|^)\+?([\w.]+)[:'].*[Dd]id you mean (\+?[\w.]+)\?$", message)
    choice = re.search(r"Did you mean (\w+)=(\w+)\?$", message)
    setting = re.search(r"; set ([\w.]+)=(\S+)$", message)
    if choice:
        return [o for o in overrides if not o.startswith(f"{choice[1]}=")] + [f"{choice[1]}={choice[2]}"]
    if setting:
        return [o for o in overrides if not o.startswith(f"{setting[1]}=")] + [f"{setting[1]}={setting[2]}"]
    assert rename, f"no suggestion in: {message}"
    return [re.sub(rf"^\+?{re.escape(rename[1])}=", f"{rename[2]}=", o) for o in overrides]


@pytest.mark.parametrize("override", ["trainer=debugg", "model=tinny", "model.d_modle=64", "trainer.max_step=3",
                                      "+data.block_sise=64", "+trainer.max_stepz=3", "+model.d_modle=64",
                                      "+task.lable_key=cell_type"])
def test_a_misspelt_key_or_option_suggests_one_that_works(override):
    with pytest.raises(ConfigError, match="[Dd]id you mean") as refused:
        check_overrides([override])
    assert "To append to your config use" not in str(refused.value)  # Hydra's '+key' would add a key no code reads
    fixed = _apply([override], str(refused.value))
    assert fixed != [override]
    check_overrides(fixed)  # composes and passes every check


@pytest.mark.parametrize("batch", ["data.per_device_batch_size=400", "data.global_batch_size=400"])
def test_a_batch_too_large_for_the_split_names_a_size_that_runs(batch, tmp_path):
    """380 training cells: no batch of 400 on the one rank; the suggested per-device size, applied, trains."""
    with pytest.raises(ConfigError, match="set data.per_device_batch_size=200$") as refused:
        train(compose_config(tmp_path / "refused", *SMALL, *QUIET, batch))
    fixed = _apply([batch], str(refused.value))
    summary = train(compose_config(tmp_path / "fixed", *SMALL, *QUIET, *fixed))
    assert summary["global_step"] == 4


# ---- batch sizes from the world size -------------------------------------------------------------------
def test_the_batch_size_left_out_is_derived_from_the_world_size():
    assert derive_batch_sizes(64, None, 2) == BatchSizes(64, 32, 1, "data.per_device_batch_size = 64 / 2 devices = 32")
    assert derive_batch_sizes(None, 32, 2) == BatchSizes(64, 32, 1, "data.global_batch_size = 32 x 2 devices = 64")
    assert derive_batch_sizes(None, None, 2).per_device == 32 and derive_batch_sizes(None, None, 2).global_batch == 64
    assert derive_batch_sizes(128, 32, 2) == BatchSizes(128, 32, 2, None)  # both given: accumulation
    with pytest.raises(ConfigError, match=r"^data.global_batch_size: 32 is not a multiple of per_device_batch_size "
                                          r"32 x 2 devices; pick a multiple of 64$"):
        derive_batch_sizes(32, 32, 2)
    with pytest.raises(ConfigError, match=r"^data.global_batch_size: 63 cells do not split over 2 devices"):
        derive_batch_sizes(63, None, 2)


def test_the_derived_batch_size_is_said_in_the_log(tmp_path, caplog):
    """The sbatch dry run's case: a 64-cell global batch over 2 devices (it failed when both had defaults)."""
    cfg = compose_config(tmp_path, "data.global_batch_size=64", "trainer.devices=2")
    with caplog.at_level(logging.INFO, logger="scgpt"):
        assert gradient_accumulation(cfg) == 1
    assert cfg.data.per_device_batch_size == 32
    assert "batch size: data.per_device_batch_size = 64 / 2 devices = 32" in caplog.messages


# ---- a small store with the default loader settings ----------------------------------------------------
def test_a_2000_cell_store_trains_with_the_default_loader_settings(tmp_path, caplog):
    """`scgpt-data synth --cells 2000 --genes 500` then data=zarr as shipped (1024-cell blocks, 4 workers, 32
    cells per device): the blocks and workers adapt to the store, said once in the log."""
    from scgpt.data_cli import main as scgpt_data

    store = tmp_path / "cells.zarr"
    assert scgpt_data(["synth", "--cells", "2000", "--genes", "500", "-o", str(store)]) == 0
    with caplog.at_level(logging.INFO, logger="scgpt"):
        summary = train(compose_config(tmp_path / "run", "data=zarr", f"data.paths=[{store}]", "model=tiny", *QUIET))
    assert summary["global_step"] == 4 and summary["cells_seen"] == 4 * 32
    adapted = [m for m in caplog.messages if m.startswith("data: train ")]
    assert len(adapted) == 1 and "data.block_size=1024 x data.num_workers=4" in adapted[0], caplog.messages
