"""Every config in conf/ composes and instantiates; derived settings are checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate

from data_modules.convert import write_store
from data_modules.synthetic import make_synthetic_adata
from scgpt.config import ModelConfig
from scgpt.config_checks import check_config
from scgpt.errors import ConfigError
from scgpt.model import ScGPTModel
from scgpt.paths import config_dir
from scgpt.train import _logger, _strategy, build_task, gradient_accumulation, model_settings

from conftest import SMALL_DATA, compose_config

GROUPS = sorted(p.name for p in config_dir().iterdir()
                if p.is_dir() and any(p.glob("*.yaml")) and p.name != "experiment")  # recipes: composed below
EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_config_groups_are_the_documented_ones():
    assert set(GROUPS) >= {"task", "model", "data", "trainer", "strategy", "logger"}
    assert {"tiny", "small", "scgpt_whole_human"} <= set(_options("model"))
    assert {"cpu", "gpu", "debug"} <= set(_options("trainer"))
    assert {"auto", "ddp"} <= set(_options("strategy")) and {"csv", "none"} <= set(_options("logger"))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "cells.zarr"
    write_store(make_synthetic_adata(n_cells=400, n_genes=100, seed=1), path, obs_keys=["cell_type"])
    return path


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes_and_instantiates(group, option, tmp_path, store_path):
    overrides = [*SMALL_DATA, f"{group}={option}"]
    if group == "data" and option == "zarr":
        overrides = [o for o in overrides if not o.startswith("data.synthetic")] + [f"data.paths=[{store_path}]"]
    if (group, option) == ("task", "vae"):  # the VAE baseline runs as model=vae task=vae
        overrides.append("model=vae")
    if (group, option) == ("task", "multiomic"):  # needs a second modality (var feature_type) in the data
        overrides.append("+data.synthetic.n_proteins=8")
    if (group, option) == ("task", "perturbation"):  # needs perturbed cells (obs perturbation) in the data
        overrides += ["+data.synthetic.n_regulators=4", "+data.synthetic.n_perturbations=4"]
    cfg = compose_config(tmp_path, *overrides)
    check_config(cfg)  # every value's type and range
    gradient_accumulation(cfg)  # fills in a batch size left null
    datamodule = instantiate(cfg.data)
    if cfg.task.get("data_module"):  # task=perturbation pairs cells: it wraps the cell data module
        datamodule = instantiate(cfg.task.data_module, cells=datamodule)
    settings = model_settings(cfg, datamodule)
    if settings.get("kind") == "vae":  # conf/model/vae.yaml: the VAE baseline, not a ScGPTModel
        from scgpt.model.vae import VAE

        assert VAE.from_settings(settings).latent_dim == cfg.model.latent_dim and cfg.task.name == "vae"
    else:
        with torch.device("meta"):  # the whole-human shape without allocating it
            model = ScGPTModel(ModelConfig(**settings))
        assert model.cfg.d_model == cfg.model.d_model
    task = build_task(cfg, settings)
    assert task.objectives
    _strategy(cfg), _logger(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert get_class(cfg.trainer._target_)  # a GPU trainer cannot be built here; its target must resolve
    else:
        instantiate(cfg.trainer, strategy=_strategy(cfg), logger=_logger(cfg))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_recipe_passes_the_value_checks(experiment, tmp_path, store_path):
    cfg = compose_config(tmp_path, f"experiment={experiment}", f"data.paths=[{store_path}]")
    check_config(cfg)
    assert gradient_accumulation(cfg) >= 1


def test_whole_human_model_has_the_published_shape(tmp_path):
    cfg = compose_config(tmp_path, "model=scgpt_whole_human")
    model = cfg.model
    assert (model.d_model, model.n_layers, model.n_heads, model.d_hid, model.max_seq_len, model.n_bins) == \
        (512, 12, 8, 512, 1200, 51)


def test_gradient_accumulation_is_derived_from_global_and_per_device_batch(tmp_path):
    cfg = compose_config(tmp_path, "data.per_device_batch_size=16", "data.global_batch_size=64")
    assert gradient_accumulation(cfg) == 4
    cfg = compose_config(tmp_path, "data.per_device_batch_size=16", "data.global_batch_size=64", "trainer.devices=2")
    assert gradient_accumulation(cfg) == 2
    cfg = compose_config(tmp_path, "data.per_device_batch_size=16", "data.global_batch_size=40")
    with pytest.raises(ConfigError, match="data.global_batch_size"):
        gradient_accumulation(cfg)


@pytest.mark.parametrize("override, key", [
    ("model.d_model=30", "model.d_model"),
    ("model.max_seq_len=1", "model.max_seq_len"),
    ("model.attention_backend=xformers", "model.attention_backend"),
])
def test_inconsistent_settings_fail_before_any_work(tmp_path, override, key):
    cfg = compose_config(tmp_path, *SMALL_DATA, override)
    with pytest.raises(ConfigError, match=key):
        model_settings(cfg, instantiate(cfg.data))
