"""train(cfg) end to end with the tiny model: the run directory contract, learning, resuming, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from scgpt.errors import CheckpointError
from scgpt.train import train

from conftest import SMALL_DATA, compose_config

FAST = [*SMALL_DATA, "trainer=debug"]
SUMMARY_KEYS = {"task", "global_step", "cells_seen", "train_loss_first", "train_loss_last", "val", "cells_per_s",
                "tokens_per_s", "attention_backend", "checkpoint", "resumed_from"}


def test_train_writes_the_run_directory_contract(tmp_path):
    summary = train(compose_config(tmp_path, *FAST))
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["task"] == "pretrain" and summary["global_step"] == 4
    assert summary["cells_seen"] == 4 * 16 and summary["resumed_from"] is None
    assert summary["attention_backend"] == "sdpa"
    assert {"masked_mse", "pearson", "loss", "gep", "gen", "mvc"} <= set(summary["val"])
    assert summary["cells_per_s"] > 0 and summary["tokens_per_s"] > summary["cells_per_s"]
    assert 0 < summary["tflops_per_device_work_done"] < summary["tflops_per_device"]  # generated tokens: fewer pairs
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and summary["checkpoint"].endswith("last.ckpt")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 64 and saved["run_dir"] == str(tmp_path)  # resolved
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled code
    assert checkpoint["global_step"] == 4


@pytest.mark.slow
def test_masked_value_loss_falls_and_predictions_track_the_truth(tmp_path):
    summary = train(compose_config(tmp_path, *SMALL_DATA, "trainer=cpu", "trainer.max_steps=200",
                                   "trainer.val_check_interval=200", "task.scheduler.warmup_steps=10", "logger=none"))
    assert summary["train_loss_last"] < 0.3 * summary["train_loss_first"]
    assert summary["val"]["pearson"] > 0.5  # beyond predicting each gene's mean


def test_packed_layout_trains(tmp_path):
    summary = train(compose_config(tmp_path, *FAST, "data.layout=packed", "model.attention_backend=reference"))
    assert summary["global_step"] == 4 and summary["attention_backend"] == "reference"


def test_packed_known_first_layout_trains(tmp_path):
    """data.layout=packed_known_first (every cell's known tokens, then every cell's generated ones): the
    pretraining task with its generative cells (task.generative_fraction 0.5) trains, validates and counts FLOPs."""
    summary = train(compose_config(tmp_path, *FAST, "data.layout=packed_known_first"))
    assert summary["global_step"] == 4 and summary["train_loss_last"] > 0
    assert {"masked_mse", "pearson", "gen"} <= set(summary["val"])
    assert 0 < summary["tflops_per_device_work_done"] < summary["tflops_per_device"]  # generated tokens seen


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path):
    first = train(compose_config(tmp_path / "a", *FAST))
    resumed = train(compose_config(tmp_path / "b", *FAST, "trainer.max_steps=8", f"ckpt_path={first['checkpoint']}"))
    assert resumed["global_step"] == 8
    assert resumed["cells_seen"] == 8 * 16
    assert resumed["resumed_from"] == first["checkpoint"]


def test_a_run_dir_reused_for_another_model_is_refused_in_one_line_and_keeps_its_config(tmp_path):
    """Auto-resume picks up the newest checkpoint of the run directory; one of another model was a 'size
    mismatch' traceback, and the new run had overwritten the directory's config.yaml."""
    train(compose_config(tmp_path, *FAST))
    config_before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(CheckpointError) as refused:
        train(compose_config(tmp_path, *FAST, "model.d_model=32", "trainer.max_steps=8"))
    message = str(refused.value)
    assert message.startswith(f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}: holds another model than this "
                              "run's (size mismatch for model."), message
    assert message.endswith(f"run it in a new directory (auto-resume took the newest checkpoint of {tmp_path}), "
                            "or resume with the model settings that run had")
    assert "\n" not in message
    assert (tmp_path / "config.yaml").read_text() == config_before


def test_resume_from_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="ckpt_path=.*nope.ckpt"):
        train(compose_config(tmp_path, *FAST, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def _cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "scgpt.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_cli_runs_from_any_directory_and_prints_the_run_dir_last(tmp_path):
    result = _cli([*FAST, "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = result.stdout.strip().splitlines()[-1]
    assert run_dir.startswith(str(tmp_path / "runs" / "pretrain"))
    assert json.loads(open(os.path.join(run_dir, "summary.json")).read())["global_step"] == 4


def test_cli_config_error_is_one_line_and_exit_code_2(tmp_path):
    result = _cli([*FAST, "model.d_model=30"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.d_model: d_model 30 is not divisible by n_heads 4; pick a multiple"]


@pytest.mark.parametrize("override, message", [
    ("data.val_fraction=2", "error: data.val_fraction: 2 is not a number in (0, 1)"),  # the config check
    ("+task.objectives.mlm=1", "error: task.objectives.mlm: unknown objective"),
])
def test_errors_raised_in_constructors_are_one_line_too(tmp_path, override, message):
    result = _cli([*FAST, override], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cli_gpu_attention_kernel_on_cpu_is_one_line_naming_the_fix(tmp_path):
    result = _cli([*FAST, "model.attention_backend=flash_attn4"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.attention_backend: flash_attn4 needs a CUDA GPU; use model.attention_backend=sdpa on this machine"]


def test_cli_unknown_group_option_lists_the_available_ones(tmp_path):
    result = _cli(["model=huge"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: command line: In 'config': Could not find 'model/huge'. "
        "Available options in 'model': scgpt_whole_human, small, tiny, vae."]


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_stepz=1", "Could not override 'trainer.max_stepz'. Did you mean trainer.max_steps?"),
    ("trainer.max_steps=[1", "no viable alternative at input '[1'"),
])
def test_cli_bad_override_is_one_line_and_exit_code_2(tmp_path, override, expected):
    result = _cli([override], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: command line: ") and expected in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing half-written


def _weights(checkpoint_path):
    return torch.load(checkpoint_path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # 23 batches per epoch: the step-30 checkpoint resumes mid-epoch 1; dropout stays on
    common = [*SMALL_DATA, "trainer=debug", "trainer.max_steps=40", "trainer.val_check_interval=20", "logger=none"]
    straight = train(compose_config(tmp_path / "straight", *common, "checkpoint.every_n_train_steps=10",
                                    "checkpoint.keep_all=true"))
    interrupted = tmp_path / "straight" / "checkpoints" / "step-0000030.ckpt"
    resumed = train(compose_config(tmp_path / "resumed", *common, f"ckpt_path={interrupted}"))
    assert resumed["global_step"] == straight["global_step"] == 40
    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    first = train(compose_config(tmp_path / "a", *FAST))
    with pytest.raises(Exception, match="fingerprint differs"):
        train(compose_config(tmp_path / "b", *FAST, "data.synthetic.seed=5", f"ckpt_path={first['checkpoint']}"))


def test_fused_adamw_clips_gradients_under_bf16_mixed_precision(tmp_path):
    """Lightning refuses gradient clipping for fused AdamW under any mixed precision; without an fp16 grad
    scaler (bf16-mixed, as trainer=gpu) the task clips itself, and the clipped norm is at most the limit."""
    from scgpt.tasks.base import TrainingTask

    norms = []
    original = TrainingTask.configure_gradient_clipping

    def recording(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    TrainingTask.configure_gradient_clipping = recording
    try:
        summary = train(compose_config(tmp_path, *FAST, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.01",
                                       "task.module.fused_adamw=true"))
    finally:
        TrainingTask.configure_gradient_clipping = original
    assert summary["global_step"] == 4 and len(norms) == 4
    assert max(norms) <= 0.01 * 1.01
