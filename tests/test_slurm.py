"""slurm/pretrain.sbatch on a real SLURM cluster (CI starts one with slurm/local-cluster.sh): a 2-task DDP run
over gloo through srun, then preemption: SIGUSR1 -> checkpoint -> requeue -> resume -> the final weights of
the uninterrupted run. Skipped when no cluster answers (no sbatch / sinfo, or the node is not up)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "pretrain.sbatch"
STEPS = 200  # long enough (several seconds of training) to signal the job mid-run
OVERRIDES = ["trainer=cpu", "model=tiny", "logger=none", *SMALL_DATA, "data.block_size=16",
             "data.global_batch_size=32", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=50",
             "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=5", "checkpoint.keep_all=true",
             "seed=0"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _cluster_up() -> str | None:
    """None when a SLURM cluster with an idle (or busy) node answers; else the reason to skip."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (start a local cluster with slurm/local-cluster.sh)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not answer ({exc})"
    if states.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states.stdout.split()):
        return f"no SLURM node is up ({(states.stdout + states.stderr).strip()[:200]}); run slurm/local-cluster.sh"
    return None


SKIP = _cluster_up()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def _env(workdir: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # scgpt-train of this environment
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "SCGPT_RUNS": str(workdir / "runs"),
            "OMP_NUM_THREADS": "1"}


def submit(workdir: Path, *overrides: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                             "--cpus-per-task=1", "--time=15", f"--chdir={workdir}",
                             f"--output={workdir}/slurm-%j.out", str(SBATCH), *overrides],
                            capture_output=True, text=True, env=_env(workdir), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(job: str, workdir: Path, done, timeout: float = 420, poll: float = 0.2) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job)
        if done(fields):
            return fields
        if fields.get("JobState") in FINAL:
            break
        time.sleep(poll)
    log = next(workdir.glob(f"slurm-{job}.out"), None)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"job {job} ended as {job_fields(job).get('JobState')}; log:\n{log.read_text()[-4000:] if log else ''}")


def run_dir(workdir: Path, job: str) -> Path:
    return workdir / "runs" / "pretrain" / f"slurm-{job}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One 2-task job run to the end: the end-to-end check and the reference for preemption."""
    workdir = tmp_path_factory.mktemp("slurm-straight")
    job = submit(workdir, *OVERRIDES)
    wait_for(job, workdir, lambda f: f.get("JobState") == "COMPLETED")
    return run_dir(workdir, job)


def test_pretrain_sbatch_runs_two_ranks_of_ddp_through_srun(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS
    assert summary["cells_seen"] == STEPS * 32 and summary["resumed_from"] is None
    assert (uninterrupted / "checkpoints" / "last.ckpt").is_file()
    log = (uninterrupted.parents[2] / f"slurm-{uninterrupted.name.removeprefix('slurm-')}.out").read_text()
    assert "restart 0" in log and "trainer=cpu" in log


def test_preempted_job_checkpoints_requeues_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    job = submit(tmp_path, *OVERRIDES)
    checkpoints = run_dir(tmp_path, job) / "checkpoints"
    wait_for(job, tmp_path, lambda f: (checkpoints / "step-0000005.ckpt").is_file(), poll=0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)  # what --signal=SIGUSR1@120 sends
    fields = wait_for(job, tmp_path, lambda f: int(f.get("Restarts", 0)) >= 1 and
                      f.get("JobState") in ("PENDING", "RUNNING", "COMPLETED"))
    if fields.get("JobState") == "PENDING":  # SLURM holds a requeued job ~2 min (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
    wait_for(job, tmp_path, lambda f: f.get("JobState") == "COMPLETED")

    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "SIGUSR1 received" in log and "restart 1" in log, log[-3000:]
    summary = json.loads((run_dir(tmp_path, job) / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 2
    assert summary["resumed_from"] and Path(summary["resumed_from"]).parent == checkpoints
    assert summary["cells_seen"] == STEPS * 32  # no sample lost or repeated
    a, b = _weights(uninterrupted / "checkpoints" / "last.ckpt"), _weights(checkpoints / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
