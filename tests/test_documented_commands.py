"""The commands the documentation tells a new user to run, run as written: the README's main job, and the CPU
dry runs at the top of slurm/pretrain.sbatch (those need a SLURM cluster with an idle node, e.g. after
slurm/local-cluster.sh start --nodes 2, and are skipped otherwise)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of this environment (scgpt-train)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("SCGPT_RUNS", None)  # runs/ under the working directory, as for a user
    return env


def readme_main_job() -> str:
    """The first command block of the README's set-up section."""
    setup = (ROOT / "README.md").read_text().split("## Set up on a fresh machine", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", setup, re.DOTALL).group(1).strip()


def sbatch_dry_runs() -> list[str]:
    """The CPU dry-run commands in the header comment of slurm/pretrain.sbatch, continuation lines joined."""
    header = [line[1:].strip() for line in (ROOT / "slurm" / "pretrain.sbatch").read_text().splitlines()
              if line.startswith("#") and not line.startswith(("#!", "#SBATCH"))]
    text = "\n".join(header).split("CPU dry run", 1)[1].replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith("sbatch ")]


@pytest.mark.slow
def test_the_readme_main_job_runs_as_written(tmp_path):
    """`pip install ... && scgpt-train`: the environment is installed (the pip part); scgpt-train itself runs
    exactly as written (300 steps of the tiny model on synthetic data) and prints the run directory last."""
    command = readme_main_job()
    *setup, run = [part.strip() for part in command.split("&&")]
    assert all(part.startswith("pip install") for part in setup) and run == "scgpt-train"
    done = subprocess.run([str(BIN / "scgpt-train")], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs" / "pretrain"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 300 and summary["train_loss_last"] < summary["train_loss_first"]


def _idle_nodes() -> int:
    if not all(shutil.which(tool) for tool in ("sbatch", "sinfo", "scontrol")):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len({line.split()[0] for line in out.splitlines() if line.split()[1].startswith("idle")})


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f).get("JobState", "")


def _nodes(command: str) -> int:
    found = re.search(r"--nodes=(\d+)", command)
    return int(found.group(1)) if found else 1


def test_the_sbatch_header_documents_cpu_dry_runs():
    commands = sbatch_dry_runs()
    assert len(commands) >= 1 and all("slurm/pretrain.sbatch" in c and "--gpus-per-node=0" in c for c in commands)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("index", range(len(sbatch_dry_runs())))
def test_the_sbatch_cpu_dry_run_runs_as_written(index, tmp_path):
    """Submitted from a directory holding slurm/ (as from a clone), after the header's `mkdir -p logs/slurm`;
    the job completes and its run directory has the summary of the steps asked for."""
    command = sbatch_dry_runs()[index]
    if _idle_nodes() < _nodes(command):
        pytest.skip(f"needs {_nodes(command)} idle SLURM node(s) (slurm/local-cluster.sh start --nodes 2)")
    (tmp_path / "slurm").symlink_to(ROOT / "slurm")
    (tmp_path / "logs" / "slurm").mkdir(parents=True)
    submitted = subprocess.run(shlex.split(command), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=60, check=False)
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    deadline, state = time.monotonic() + 600, ""
    while time.monotonic() < deadline and state not in FINAL:
        time.sleep(1)
        state = _job_state(job)
    if state not in FINAL:
        subprocess.run(["scancel", job], timeout=30, check=False)
    logs = "".join(p.read_text()[-3000:] for p in (tmp_path / "logs" / "slurm").glob(f"*-{job}.out"))
    assert state == "COMPLETED", f"job {job}: {state or 'still running'}\n{logs}"
    steps = int(re.search(r"trainer.max_steps=(\d+)", command).group(1))
    summary = json.loads((tmp_path / "runs" / "pretrain" / f"slurm-{job}" / "summary.json").read_text())
    assert summary["global_step"] == steps
