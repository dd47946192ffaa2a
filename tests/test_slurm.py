"""slurm/pretrain.sbatch on a real SLURM cluster (CI starts two nodes with slurm/local-cluster.sh start --nodes 2):
2-rank DDP runs over gloo through srun, as 2 tasks on one node and as 1 task on each of two nodes; every
training cell once per epoch across the ranks; then preemption: SIGUSR1 -> checkpoint -> requeue -> resume ->
the final weights of the uninterrupted run. Skipped when no cluster answers (no sbatch / sinfo, or no node
is up); the two-node cases when only one node is up."""

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
import yaml
from conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "pretrain.sbatch"
STEPS = 100  # 10 epochs; long enough (several seconds of training) to signal the job mid-run
# 400 cells, 80 of them validation: 320 training cells = 20 blocks of 16, dealt 10 to each of 2 ranks, 10 batches
# of 16 per rank per epoch and no remainder, so every training cell is seen exactly once per epoch
TRAIN_ROWS = range(80, 400)  # stores are shuffled when written; the first val_fraction rows validate
OVERRIDES = ["trainer=cpu", "model=tiny", "logger=none", *SMALL_DATA, "data.val_fraction=0.2", "data.block_size=16",
             "data.global_batch_size=32", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=50",
             "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=5", "checkpoint.keep_all=true",
             "seed=0"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# Loaded by every Python process of a job (PYTHONPATH): appends the store rows of each training batch a rank
# collates to <dir>/rank<R>-<node>.txt, one line per batch: "<epoch> <row> <row> ...".
RECORD_CELLS = r"""
import os
if os.environ.get("SCGPT_TEST_CELL_LOG"):
    import numpy as np
    from data_modules import stream
    _read, _collate = stream.CellBatchStream._read, stream.CellCollator.collate_table

    def _recording_read(self, group, arena):
        table = _read(self, group, arena)
        if self.plan.shuffle:  # training blocks only
            table.test_rows = np.concatenate([np.arange(b.start, b.stop) + b.source * 10**9 for b in group])
            table.test_epoch = self.epoch
        return table

    def _recording_collate(self, table, rows, generator):
        if hasattr(table, "test_rows"):
            name = f"rank{os.environ['SLURM_PROCID']}-{os.environ['SLURMD_NODENAME']}.txt"
            with open(os.path.join(os.environ["SCGPT_TEST_CELL_LOG"], name), "a") as f:
                f.write(" ".join(map(str, [table.test_epoch, *table.test_rows[rows]])) + "\n")
        return _collate(self, table, rows, generator)

    stream.CellBatchStream._read, stream.CellCollator.collate_table = _recording_read, _recording_collate
"""


def _cluster_up() -> str | None:
    """None when a SLURM cluster with an idle (or busy) node answers; else the reason to skip."""
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (start a local cluster with slurm/local-cluster.sh)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not answer ({exc})"
    if states.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states.stdout.split()):
        return f"no SLURM node is up ({(states.stdout + states.stderr).strip()[:200]}); run slurm/local-cluster.sh"
    return None


def _ready_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10,
                         check=False).stdout
    return len({line.split()[0] for line in out.splitlines() if line.split()[1].startswith(("idle", "mix", "alloc"))})


SKIP = _cluster_up()
NODES_UP = _ready_nodes() if SKIP is None else 0
TWO_NODES = pytest.mark.skipif(SKIP is None and NODES_UP < 2,
                               reason="one SLURM node; start two with slurm/local-cluster.sh start --nodes 2")
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # scgpt-train of this environment
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "SCGPT_RUNS": str(workdir / "runs"),
            "OMP_NUM_THREADS": "1", **extra}


def submit(workdir: Path, *overrides: str, nodes: int = 1, record_cells: bool = False) -> str:
    """pretrain.sbatch with 2 ranks: 2 tasks on one node, or 1 task on each of 2 nodes."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = {}
    if record_cells:
        (workdir / "record").mkdir()
        (workdir / "record" / "sitecustomize.py").write_text(RECORD_CELLS)
        (workdir / "cells").mkdir()
        extra = {"PYTHONPATH": str(workdir / "record"), "SCGPT_TEST_CELL_LOG": str(workdir / "cells")}
    result = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={2 // nodes}",
                             "--gpus-per-node=0", "--cpus-per-task=1", "--time=15", f"--chdir={workdir}",
                             f"--output={workdir}/slurm-%j.out", str(SBATCH), *overrides],
                            capture_output=True, text=True, env=_env(workdir, **extra), timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30,
                         check=False).stdout
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
    subprocess.run(["scancel", job], timeout=30, check=False)
    pytest.fail(f"job {job} ended as {job_fields(job).get('JobState')}; log:\n{log.read_text()[-4000:] if log else ''}")


def run_dir(workdir: Path, job: str) -> Path:
    return workdir / "runs" / "pretrain" / f"slurm-{job}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _layout(nodes: int):
    return pytest.param(nodes, id=f"{nodes}node", marks=[TWO_NODES] if nodes == 2 else [])


@pytest.fixture(scope="module", params=[_layout(1), _layout(2)])
def uninterrupted(request, tmp_path_factory) -> tuple[int, Path]:
    """One 2-rank job run to the end (2 tasks on 1 node, or 1 task on each of 2 nodes): the end-to-end check
    and the reference for preemption."""
    nodes = request.param
    workdir = tmp_path_factory.mktemp(f"slurm-straight-{nodes}node")
    job = submit(workdir, *OVERRIDES, nodes=nodes, record_cells=True)
    wait_for(job, workdir, lambda f: f.get("JobState") == "COMPLETED")
    return nodes, run_dir(workdir, job)


def test_pretrain_sbatch_runs_two_ranks_of_ddp_through_srun(uninterrupted):
    nodes, run = uninterrupted
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == STEPS
    assert summary["cells_seen"] == STEPS * 32 and summary["resumed_from"] is None
    assert (run / "checkpoints" / "last.ckpt").is_file()
    log = (run.parents[2] / f"slurm-{run.name.removeprefix('slurm-')}.out").read_text()
    assert "restart 0" in log and "trainer=cpu" in log
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == nodes and config["trainer"]["devices"] == 2 // nodes


def test_ranks_see_every_training_cell_once_per_epoch(uninterrupted):
    """Each rank records the store rows of the batches it trained on: the two ranks ran on as many nodes as
    the job has, and in every epoch together saw each training cell exactly once."""
    nodes, run = uninterrupted
    records = sorted((run.parents[2] / "cells").glob("rank*.txt"))
    assert [p.name.split("-", 1)[0] for p in records] == ["rank0", "rank1"]
    assert len({p.stem.split("-", 1)[1] for p in records}) == nodes  # one rank per node on 2 nodes
    seen: dict[int, list[list[int]]] = {}
    for rank, path in enumerate(records):
        for line in path.read_text().splitlines():
            epoch, *rows = map(int, line.split())
            seen.setdefault(epoch, [[], []])[rank] += rows
    batches_per_epoch = len(TRAIN_ROWS) // 32
    assert sorted(seen) == list(range(STEPS // batches_per_epoch))
    for epoch, (rank0, rank1) in seen.items():
        assert len(rank0) == len(rank1) == len(TRAIN_ROWS) // 2, epoch
        assert sorted(rank0 + rank1) == list(TRAIN_ROWS), f"epoch {epoch}: a cell missing or seen twice"


# preemption on the widest layout up (two nodes in CI): the requeue path is the same for both, and each run is long
@pytest.mark.parametrize("uninterrupted", [_layout(min(NODES_UP, 2) or 1)], indirect=True)
def test_preempted_job_checkpoints_requeues_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    nodes, reference = uninterrupted
    job = submit(tmp_path, *OVERRIDES, nodes=nodes)
    checkpoints = run_dir(tmp_path, job) / "checkpoints"
    wait_for(job, tmp_path, lambda f: (checkpoints / "step-0000005.ckpt").is_file(), poll=0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)  # what --signal=SIGUSR1@120 sends
    fields = wait_for(job, tmp_path, lambda f: int(f.get("Restarts", 0)) >= 1 and
                      f.get("JobState") in ("PENDING", "RUNNING", "COMPLETED"))
    if fields.get("JobState") == "PENDING":  # SLURM holds a requeued job ~2 min (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30, check=False)
    wait_for(job, tmp_path, lambda f: f.get("JobState") == "COMPLETED")

    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "SIGUSR1 received" in log and "restart 1" in log, log[-3000:]
    summary = json.loads((run_dir(tmp_path, job) / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 2
    assert summary["resumed_from"] and Path(summary["resumed_from"]).parent == checkpoints
    assert summary["cells_seen"] == STEPS * 32  # no sample lost or repeated
    a, b = _weights(reference / "checkpoints" / "last.ckpt"), _weights(checkpoints / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------
# An Optuna sweep whose trials are SLURM jobs (launcher=slurm: the Hydra submitit launcher)
# ------------------------------------------------------------------------------------------------
SWEEP = ["-m", "hparams_search=optuna", "launcher=slurm", "trainer=cpu", "model=tiny", "logger=none", *SMALL_DATA,
         "data.block_size=16", "trainer.max_steps=10", "trainer.val_check_interval=10",
         "trainer.enable_progress_bar=false", "hydra.sweeper.n_jobs=2", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10"]


def _sweep(workdir: Path, n_trials: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scgpt.train", *SWEEP, f"hydra.sweeper.n_trials={n_trials}",
                           f"hydra.sweep.dir={workdir / 'sweep'}"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True, timeout=400, check=False)


def _slurm_tasks_with_results(sweep: Path) -> list[str]:
    """The SLURM job (array task) ids submitit ran for the sweep and got a result back from."""
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_result.pkl")))


def test_optuna_sweep_runs_its_trials_as_slurm_jobs_and_the_same_command_continues_the_study(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from test_sweeps import _study

    first = _sweep(tmp_path, n_trials=2)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert len(_slurm_tasks_with_results(sweep)) == 2  # one SLURM (array) task per trial, each returned
    first_trials = _study(sweep).trials
    assert [t.state.name for t in first_trials] == ["COMPLETE", "COMPLETE"]
    for trial in first_trials:  # each value is its job's validation metric
        summary = json.loads((sweep / str(trial.number) / "summary.json").read_text())
        assert trial.value == pytest.approx(summary["val"]["masked_mse"])

    again = _sweep(tmp_path, n_trials=3)  # the same sweep, one trial more: only that one runs
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(sweep).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [t.params for t in trials[:2]] == [t.params for t in first_trials]  # the first two not run again
    assert len(_slurm_tasks_with_results(sweep)) == 3
