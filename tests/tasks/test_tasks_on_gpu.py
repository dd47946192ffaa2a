"""Every task trains, validates and tests on a CUDA device end to end (their metric collection moves GPU
tensors to the host). Skipped without CUDA; run on a GPU machine with ``pytest -m gpu tests/tasks``."""

from __future__ import annotations

import pytest
import torch

from scgpt.train import train

from conftest import SMALL_DATA, compose_config

GPU = [*SMALL_DATA, "logger=none", "trainer=debug", "trainer.accelerator=gpu", "trainer.limit_val_batches=1.0",
       "data.val_fraction=0.3"]
HELD_OUT = ["data.synthetic.n_batches=2", "data.test_split={key:batch,values:[batch_1]}"]
NETWORK = ["++data.synthetic.n_regulators=6", "++data.synthetic.n_perturbations=4"]

TASKS = {
    "pretrain": [*HELD_OUT],
    "annotation": ["task=annotation", *HELD_OUT],
    "integration": ["task=integration", "data.synthetic.n_batches=2"],
    "multiomic": ["task=multiomic", "+data.synthetic.n_proteins=16", "+data.synthetic.n_peaks=60"],
    "perturbation": ["task=perturbation", *NETWORK],
    "grn": ["task=grn", "++data.synthetic.n_regulators=6"],
    "vae": ["model=vae", *HELD_OUT],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_runs_on_a_gpu(tmp_path, name):
    summary = train(compose_config(tmp_path, *GPU, *TASKS[name]))
    assert summary["global_step"] == 4 and summary["val"], name
    if name == "annotation":
        assert 0.0 <= summary["test"]["accuracy"] <= 1.0
