"""Strategies on CPU with real processes: 2-process DDP over gloo, DeepSpeed ZeRO-2 / ZeRO-3 (DS_ACCELERATOR=cpu)
with sharded checkpoints and resume; atomic checkpoint writes; auto-resume; the errors a user can cause.

Multi-process runs launch this file as a driver (``python tests/test_distributed.py OUT OVERRIDES...``) once
per rank, with the environment torchrun would set; each rank saves its own parameters for the checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import SMALL_DATA, compose_config  # noqa: E402

FAST = [*SMALL_DATA, "trainer=debug", "logger=none"]
MULTI = ["data.block_size=16", "data.global_batch_size=32"]  # every rank gets blocks of the small data
HAS_DEEPSPEED = subprocess.run([sys.executable, "-c", "import importlib.util as u, sys; "
                                "sys.exit(u.find_spec('deepspeed') is None)"]).returncode == 0
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed "
                                     "(pip install --no-build-isolation 'scgpt[deepspeed]')")


# ------------------------------------------------------------------------------------------------
# Launching ranks
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, run_dir: Path, *overrides: str, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run ``train()`` in ``n`` processes on this machine (rank ``i`` gets LOCAL_RANK=i); returns them."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank), "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(run_dir), f"trainer.devices={n}", *overrides],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _check_ok(results) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"


def _driver(run_dir: str, overrides: list[str]) -> int:
    """One rank: train, then save this rank's parameters (DDP: the full module on every rank)."""
    import scgpt.train as train_module
    from scgpt.errors import ScgptError

    built = {}
    build_task = train_module.build_task

    def capture(cfg, model):
        built["task"] = build_task(cfg, model)
        return built["task"]

    train_module.build_task = capture
    try:
        summary = train_module.train(compose_config(run_dir, *overrides))
    except ScgptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rank = int(os.environ.get("RANK", "0"))
    model = built["task"].model
    if not any(getattr(p, "ds_numel", None) for p in model.parameters()):  # ZeRO-3 parameters are shards
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(run_dir) / f"rank{rank}.pt")
    (Path(run_dir) / f"summary.rank{rank}.json").write_text(json.dumps(summary, default=str))
    return 0


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_two_process_ddp_on_cpu_keeps_parameters_identical_across_ranks(tmp_path):
    _check_ok(launch(2, tmp_path, *FAST, "strategy=ddp", *MULTI))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4 and summary["cells_seen"] == 4 * 32
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    initial = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)  # bit-identical replicas
        torch.testing.assert_close(initial[f"model.{key}"], a[key], atol=0, rtol=0, msg=key)
    ranks_summaries = [json.loads((tmp_path / f"summary.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world_size"] == 2 for s in ranks_summaries)


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on CPU
# ------------------------------------------------------------------------------------------------
def _consolidated(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from scgpt.checkpoints import read_deepspeed_checkpoint

    return read_deepspeed_checkpoint(checkpoint_dir)["state_dict"]


@needs_deepspeed
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_trains_writes_shards_and_resumes_exactly(tmp_path, stage):
    common = [*FAST, f"strategy=deepspeed_zero{stage}", "trainer.max_steps=6", "trainer.val_check_interval=3",
              *MULTI]
    straight = tmp_path / "straight"
    _check_ok(launch(2, straight, *common, "checkpoint.every_n_train_steps=4", "checkpoint.keep_all=true"))
    shards = straight / "checkpoints" / "step-0000004.ckpt"
    assert (shards / "latest").read_text().strip() == "checkpoint"
    assert len(list((shards / "checkpoint").glob("*optim_states.pt"))) == 2  # one shard per rank
    assert not list((straight / "checkpoints").glob(".*"))  # no staging directory left behind
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["world_size"] == 2

    resumed = tmp_path / "resumed"
    _check_ok(launch(2, resumed, *common, f"ckpt_path={shards}"))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"] == str(shards)
    a, b = _consolidated(straight / "checkpoints" / "last.ckpt"), _consolidated(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------
# Errors a user can cause: one line naming the key or file, exit code 2
# ------------------------------------------------------------------------------------------------
def _fake_zero_checkpoint(path: Path, world: int = 2, stage: int = 2) -> Path:
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"dp_world_size": world, "global_step": 4, "ds_config": {"zero_optimization": {"stage": stage}}},
               tag / "mp_rank_00_model_states.pt")
    for rank in range(world):
        torch.save({}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return path


def _cli(args, cwd):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "scgpt.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_unknown_strategy_option_is_one_line_naming_the_key(tmp_path):
    result = _cli([*FAST, "strategy=ddp", "+strategy.find_unused_params=true"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: strategy.find_unused_params: not an option of DDPStrategy")
    assert "find_unused_parameters" in lines[0]


def test_zero_checkpoint_given_to_a_ddp_run_names_the_file_and_the_strategy(tmp_path):
    ckpt = _fake_zero_checkpoint(tmp_path / "zero.ckpt")
    result = _cli([*FAST, f"ckpt_path={ckpt}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path={ckpt}: is a DeepSpeed ZeRO-2 checkpoint; resume it with strategy=deepspeed_zero2 (the "
        "strategy that wrote it), or export its weights with scgpt-export and start a new run from them"]


@needs_deepspeed
def test_zero_checkpoint_of_another_world_size_or_stage_is_refused_before_any_work(tmp_path):
    from scgpt.errors import CheckpointError, ConfigError
    from scgpt.train import train

    ckpt = _fake_zero_checkpoint(tmp_path / "zero.ckpt", world=2, stage=2)
    with pytest.raises(ConfigError, match=r"trainer.devices: .*2 processes and this run has 1"):
        train(compose_config(tmp_path / "run", *FAST, "strategy=deepspeed_zero2", f"ckpt_path={ckpt}"))
    with pytest.raises(CheckpointError, match=r"ZeRO stage 2, this run uses stage 3; resume with strategy.stage=2"):
        train(compose_config(tmp_path / "run", *FAST, "strategy=deepspeed_zero3", f"ckpt_path={ckpt}"))
    single = tmp_path / "single.ckpt"
    torch.save({"global_step": 1, "state_dict": {}}, single)
    with pytest.raises(CheckpointError, match="single-file checkpoint"):
        train(compose_config(tmp_path / "run", *FAST, "strategy=deepspeed_zero2", f"ckpt_path={single}"))


def test_incomplete_zero_directory_is_refused(tmp_path):
    from scgpt.errors import CheckpointError
    from scgpt.train import train

    ckpt = _fake_zero_checkpoint(tmp_path / "zero.ckpt", world=2)
    next(ckpt.glob("checkpoint/*optim_states.pt")).unlink()  # a rank died before writing its shard
    with pytest.raises(CheckpointError, match="not a complete DeepSpeed checkpoint"):
        train(compose_config(tmp_path / "run", *FAST, f"ckpt_path={ckpt}"))


@pytest.mark.parametrize("override, key", [("strategy.stage=5", "strategy.stage"),
                                           ("trainer.precision=16-mixed", "trainer.precision"),
                                           ("strategy.offload_parameters=true", "strategy.offload_parameters")])
@needs_deepspeed
def test_bad_deepspeed_settings_name_the_key(tmp_path, override, key):
    from scgpt.errors import ConfigError
    from scgpt.train import _strategy

    with pytest.raises(ConfigError, match=key):
        _strategy(compose_config(tmp_path, *FAST, "strategy=deepspeed_zero2", override))


# ------------------------------------------------------------------------------------------------
# Atomic checkpoints and auto-resume (one process)
# ------------------------------------------------------------------------------------------------
def test_checkpoint_writes_are_atomic_and_resume_skips_half_written_files(tmp_path):
    from scgpt.preemption import newest_complete_checkpoint
    from scgpt.tasks.callbacks import AtomicCheckpointIO

    directory = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "state_dict": {}}, directory / "step-3.ckpt")
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": {}}, directory / "last.ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "step-3.ckpt"]  # no temporaries left
    assert newest_complete_checkpoint(tmp_path) == directory / "last.ckpt"
    # a kill -9 during a write: the temporary is ignored; a truncated newest file is skipped
    (directory / ".last.ckpt.tmp-123").write_bytes(b"PK\x03\x04 half")
    (directory / "last.ckpt").write_bytes((directory / "last.ckpt").read_bytes()[:50])
    assert newest_complete_checkpoint(tmp_path) == directory / "step-3.ckpt"
    # a DeepSpeed directory moved aside just before a crash still counts; a staging one does not
    _fake_zero_checkpoint(directory / ".step-9.ckpt.old")
    _fake_zero_checkpoint(directory / ".step-11.ckpt.tmp")
    assert newest_complete_checkpoint(tmp_path) == directory / ".step-9.ckpt.old"


def test_a_rerun_in_the_same_run_dir_resumes_from_its_newest_checkpoint(tmp_path):
    from scgpt.train import train

    first = train(compose_config(tmp_path, *FAST))
    assert first["resumed_from"] is None
    again = train(compose_config(tmp_path, *FAST, "trainer.max_steps=6"))
    assert Path(again["resumed_from"]).parent == tmp_path / "checkpoints"  # last.ckpt (or last-v1.ckpt, same step)
    assert again["global_step"] == 6 and again["cells_seen"] == 6 * 16


# ------------------------------------------------------------------------------------------------
# The Dockerfile (no Docker engine here: checked statically against pyproject)
# ------------------------------------------------------------------------------------------------
def test_dockerfile_installs_the_extras_pyproject_declares_and_runs_scgpt_train():
    import re
    import tomllib

    root = HERE.parent
    dockerfile = (root / "Dockerfile").read_text()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    installed = re.search(r'pip install --no-build-isolation "\.\[([a-z,]+)\]"', dockerfile)
    assert installed, "the Dockerfile must pip install the project with its extras"
    extras = set(installed.group(1).split(","))
    assert extras == {"gpu", "deepspeed", "wandb"} and extras <= set(project["optional-dependencies"])
    assert re.search(r"^FROM nvidia/cuda:", dockerfile, re.M) and re.search(r"^ARG CUDA_ARCH=", dockerfile, re.M)
    assert "TORCH_CUDA_ARCH_LIST=${CUDA_ARCH}" in dockerfile and "FLASH_ATTN_CUDA_ARCHS=${CUDA_ARCH}" in dockerfile
    assert 'ENTRYPOINT ["scgpt-train"]' in dockerfile and "scgpt-train" in project["scripts"]
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (root / copied).exists(), copied
    ignored = set((root / ".dockerignore").read_text().split())
    assert not {"scgpt", "data_modules", "conf", "pyproject.toml"} & ignored


if __name__ == "__main__":
    sys.exit(_driver(sys.argv[1], sys.argv[2:]))
