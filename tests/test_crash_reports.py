"""Faults from outside the program end a run with one console line (what happened, what to do, the newest
complete checkpoint and the resume command), exit code 2, the traceback in <run_dir>/train.log, and nothing
lost: the checkpoint the line names loads.

Each test injects the fault into a real ``scgpt-train`` process: a killed rank (``kill -9`` of rank 1 of a
2-process run, per CPU strategy), a full disk while ``last.ckpt`` is rewritten, a truncated ``ckpt_path=``,
a cell store deleted or unreadable mid-run. In-process faults are injected by running this file as a driver
(``python tests/test_crash_reports.py FAULT OVERRIDES...``), which patches one function and calls ``main()``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import SMALL_DATA
from test_distributed import needs_deepspeed

FAST = [*SMALL_DATA, "trainer=debug", "logger=none", "trainer.val_check_interval=1000"]
ENDLESS = ["trainer.max_steps=100000", "checkpoint.every_n_train_steps=2"]  # runs until the fault stops it


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_started_runs():
    """A failed test leaves no training process behind (its ranks share its session)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(run_dir: Path, args: list[str], driver: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """``scgpt-train`` (or this file as a driver injecting ``driver``) in the background; console to files."""
    command = ([sys.executable, __file__, driver] if driver else [sys.executable, "-m", "scgpt.train"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    run_dir.mkdir(parents=True, exist_ok=True)
    out = open(run_dir.parent / "stdout.txt", "w")  # noqa: SIM115 - the child writes it until it exits
    err = open(run_dir.parent / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen([*command, f"hydra.run.dir={run_dir}", *args], env=env, stdout=out, stderr=err,
                            start_new_session=True)
    _STARTED.append(proc)
    return proc


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> tuple[int, str]:
    """Exit code and the last line on stderr (a hang fails the test)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not exit within {timeout} s of the fault (a survivor hangs)")
    lines = (run_dir.parent / "stderr.txt").read_text().strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (path.parent.parent.parent / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _named_checkpoint_loads(line: str) -> tuple[Path, int]:
    """The checkpoint and step the line names; the checkpoint must be complete at that step."""
    from scgpt.preemption import checkpoint_step

    found = re.search(r"checkpoint (?:is )?(\S+) \(step (\d+)\)", line)
    assert found, line
    path, step = Path(found.group(1)), int(found.group(2))
    assert checkpoint_step(path) == step and step > 0, line
    assert re.search(rf"resume with scgpt-train .* ckpt_path={re.escape(str(path))}( \(traceback|$)", line), line
    assert f" hydra.run.dir={path.parent.parent} " in line, line  # resumes in the same run directory
    return path, step


def test_in_a_slurm_batch_job_the_resume_is_a_resubmission_with_the_checkpoint(tmp_path, monkeypatch):
    from scgpt import crash

    run = crash.RunInfo(tmp_path / "slurm-7", ["task=pretrain", "trainer.num_nodes=2"], 2)
    checkpoint = tmp_path / "slurm-7" / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NAME", "scgpt-pretrain")
    assert crash.how_to_resume(run, checkpoint) == (
        f"resume by resubmitting the job (sbatch) with hydra.run.dir={tmp_path / 'slurm-7'} ckpt_path={checkpoint} "
        "added to its arguments")
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: the command itself
    assert crash.how_to_resume(run, checkpoint).startswith("resume with scgpt-train task=pretrain trainer.num_nodes=2 ")


def test_resume_command_continues_in_the_same_run_directory(tmp_path):
    from scgpt import crash

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    default_dir = crash.RunInfo(tmp_path / "run", ["trainer=debug"], 1)
    assert crash.resume_command(default_dir, checkpoint) == (
        f"scgpt-train trainer=debug hydra.run.dir={tmp_path / 'run'} ckpt_path={checkpoint}")
    named_dir = crash.RunInfo(tmp_path / "run", ["trainer=debug", f"run_dir={tmp_path / 'run'}"], 1)
    assert crash.resume_command(named_dir, checkpoint) == (
        f"scgpt-train trainer=debug run_dir={tmp_path / 'run'} ckpt_path={checkpoint}")


def test_a_bug_is_not_taken_for_an_outside_fault(tmp_path):
    from scgpt import crash

    run = crash.RunInfo(tmp_path, ["trainer.max_steps=4"])
    assert crash.compose(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), run) is None  # its traceback
    assert crash.compose(KeyError("global_step"), run) is None
    full = crash.compose(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".x.ckpt.ab12.tmp")), run)
    assert full.startswith(f"error: no space left on device writing {tmp_path / 'x.ckpt'} ("), full
    assert "no complete checkpoint was written yet: start again with scgpt-train trainer.max_steps=4" in full


# ------------------------------------------------------------------------------------------------
# A killed rank: the survivor reports it and exits, for every strategy that runs on CPU
# ------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("needs Linux /proc to find the rank-1 process")
    return [int(p) for p in path.read_text().split()]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_zero2", marks=needs_deepspeed),
                                      pytest.param("deepspeed_zero3", marks=needs_deepspeed)])
def test_killed_rank_ends_the_run_with_one_line_naming_it_and_the_checkpoint(tmp_path, strategy):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, [*FAST, *ENDLESS, f"strategy={strategy}", "trainer.devices=2", "data.block_size=16",
                            "data.global_batch_size=32"])
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(2)  # a few steps on: the fault hits mid-training
    (rank1,) = _children(proc.pid)
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    code, line = _finish(proc, run_dir)
    print(f"{strategy}: rank 0 exited {time.monotonic() - killed:.1f} s after kill -9 of rank 1")
    assert code == 2, line
    assert line.startswith("error: rank 1 of 2 died (killed by SIGKILL)"), line
    assert f"(traceback: {run_dir / 'train.log'})" in line
    _named_checkpoint_loads(line)
    log = (run_dir / "train.log").read_text()
    assert "Traceback" in log and "Traceback" not in (tmp_path / "stderr.txt").read_text()


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan rank is reaped by init, not by this process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_rank_zero_leaves_rank_one_to_name_it_and_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, [*FAST, *ENDLESS, "strategy=ddp", "trainer.devices=2", "data.block_size=16",
                            "data.global_batch_size=32"])
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(2)
    (rank1,) = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # rank 0, the process Lightning started rank 1 from
    proc.wait()
    deadline = time.monotonic() + 60
    while _running(rank1):
        assert time.monotonic() < deadline, "rank 1 did not exit within 60 s of rank 0's death (it hangs)"
        time.sleep(0.2)
    line = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert line.startswith("error: rank 0 of 2 stopped and rank 1 lost it in a collective; "), line
    _named_checkpoint_loads(line)


def _stuck_rank_zero(run_dir: str) -> None:
    """Rank 0 blocked for good in a collective (no error comes) when its child rank 1 dies."""
    from scgpt import crash

    checkpoint = Path(run_dir) / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"global_step": 3}, checkpoint)
    run = crash.begin(run_dir, ["trainer.devices=2"], world_size=2)
    run.children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])]
    crash.RankWatch(run.children, grace_s=0.5).start()
    print(run.children[0].pid, flush=True)
    time.sleep(600)


def test_rank_zero_stuck_on_a_dead_rank_is_ended_by_the_watch_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, [], driver="stuck_rank_zero")
    stdout = tmp_path / "stdout.txt"
    deadline = time.monotonic() + 60
    while not stdout.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.1)
    os.kill(int(stdout.read_text()), signal.SIGKILL)
    code, line = _finish(proc, run_dir, timeout=60)
    assert code == 2, line
    assert line.startswith("error: rank 1 of 2 died (killed by SIGKILL) while rank 0 waited for it; find why it "
                           "died"), line
    _named_checkpoint_loads(line.removesuffix(f" (stacks: {run_dir / 'train.log'})"))
    assert "_stuck_rank_zero" in (run_dir / "train.log").read_text()  # the stacks of the stuck rank


# ------------------------------------------------------------------------------------------------
# A full disk while last.ckpt is rewritten
# ------------------------------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail as on a full disk once a few bytes went in."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data) -> int:
        self.handle.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _inject_disk_full() -> None:
    import builtins

    from scgpt import checkpoints

    saves = []

    def filling_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller
        if "w" in mode and "last.ckpt" in str(path):
            saves.append(path)
            if len(saves) >= 2:  # the first last.ckpt is written, its rewrite meets a full disk
                return _FullDisk(handle)
        return handle

    checkpoints.open = filling_open


# every rank's torch.save into the staging directory of a DeepSpeed checkpoint fails once last.ckpt exists
_FULL_DISK_ON_DEEPSPEED_RESAVE = """
import errno, os
from pathlib import Path
import torch
_save = torch.save
def _filling_save(obj, f, *args, **kwargs):
    path = Path(str(f)) if isinstance(f, (str, os.PathLike)) else None
    staging = next((p for p in (path.parents if path else []) if p.name == ".last.ckpt.tmp"), None)
    if staging is not None and (staging.parent / "last.ckpt").is_dir():
        path.write_bytes(b"0123456789")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _save(obj, f, *args, **kwargs)
torch.save = _filling_save
"""


@needs_deepspeed
def test_full_disk_during_a_deepspeed_save_keeps_the_previous_checkpoint_and_no_half_written_one(tmp_path):
    from scgpt.distributed import deepspeed_checkpoint_info

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FULL_DISK_ON_DEEPSPEED_RESAVE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    args = [*FAST, *ENDLESS, "strategy=deepspeed_zero2", "trainer.devices=2", "data.block_size=16",
            "data.global_batch_size=32"]
    code, line = _finish(_start(run_dir, args, env=env), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert code == 2, line
    assert line.startswith(f"error: no space left on device writing {last.parent / '.last.ckpt.tmp'}/"), line
    assert f"the previous checkpoint {last} (step 2) is intact: resume with scgpt-train " in line
    _named_checkpoint_loads(line)
    assert deepspeed_checkpoint_info(last)["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # the half-written one is gone


def test_full_disk_while_rewriting_last_ckpt_names_the_path_and_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    code, line = _finish(_start(run_dir, [*FAST, *ENDLESS], driver="disk_full"), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert code == 2, line
    assert line.startswith(f"error: no space left on device writing {last} ("), line
    assert re.search(r"\(\d+(\.\d)? (B|KiB|MiB|GiB|TiB) free there\)", line), line
    assert f"the previous checkpoint {last} (step 2) is intact: resume with scgpt-train " in line
    path, _ = _named_checkpoint_loads(line)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind
    assert "No space left on device" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------------------------
# A truncated checkpoint passed as ckpt_path=
# ------------------------------------------------------------------------------------------------
def test_truncated_ckpt_path_is_named_incomplete_with_the_newest_complete_one_beside_it(tmp_path):
    from conftest import compose_config

    from scgpt.train import train

    first = tmp_path / "first"
    train(compose_config(first, *FAST, "checkpoint.every_n_train_steps=2", "checkpoint.keep_all=true"))
    directory = first / "checkpoints"
    (directory / "last.ckpt").write_bytes((directory / "last.ckpt").read_bytes()[:4000])  # cut off mid-write
    run_dir = tmp_path / "second"
    code, line = _finish(_start(run_dir, [*FAST, f"ckpt_path={directory / 'last.ckpt'}"]), run_dir)
    newest = directory / "step-0000004.ckpt"
    assert code == 2, line
    assert line == (f"error: ckpt_path={directory / 'last.ckpt'}: incomplete checkpoint (cut off while being "
                    f"written, or damaged); the newest complete checkpoint in {directory} is {newest} (step 4): "
                    f"resume with scgpt-train {' '.join(FAST)} hydra.run.dir={run_dir} ckpt_path={newest}")
    assert torch.load(newest, weights_only=True)["global_step"] == 4


# ------------------------------------------------------------------------------------------------
# A cell store deleted, or unreadable, during the run
# ------------------------------------------------------------------------------------------------
def test_store_moved_away_mid_run_is_one_line_naming_it_not_fill_values(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"  # a private store: this test moves it away
    proc = _start(run_dir, [*FAST, *ENDLESS, "data.block_size=16"], env={"SCGPT_CACHE": str(cache)})
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    (store,) = [p for p in cache.rglob("*.zarr") if (p / "zarr.json").is_file()]
    store.rename(tmp_path / "elsewhere.zarr")  # as an unmount would
    code, line = _finish(proc, run_dir)
    assert code == 2, line
    # checked before each read: gone; gone between that check and the read: its chunks are missing
    gone = ("the cell store is gone (deleted, moved or unmounted during the run); put it back",
            "is missing (its shard file")
    assert line.startswith(f"error: {store}: ") and any(what in line for what in gone), line
    assert "; once fixed, the newest complete checkpoint is " in line, line
    _named_checkpoint_loads(line)


def _inject_unreadable_store(run_dir: str) -> None:
    from data_modules import codecs

    read_into = codecs._read_into

    async def denied(pairs):
        if (Path(run_dir) / "checkpoints" / "last.ckpt").exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "STORE/X/data/c/0")
        return await read_into(pairs)

    codecs._read_into = denied


@pytest.mark.parametrize("workers", [0, 1])  # read here, or in a DataLoader worker (torch re-raises it)
def test_store_permission_error_mid_run_is_one_line(tmp_path, workers):
    run_dir = tmp_path / "run"
    args = [*FAST, *ENDLESS, "data.block_size=16", f"data.num_workers={workers}"]
    code, line = _finish(_start(run_dir, args, driver="unreadable_store"), run_dir)
    assert code == 2, line
    assert line.startswith("error: a cell store became unreadable during training (Permission denied: "
                           "STORE/X/data/c/0); restore the store (or its permissions); the newest complete "
                           "checkpoint is "), line
    _named_checkpoint_loads(line)
    assert "PermissionError" in (run_dir / "train.log").read_text()


def _driver(fault: str, args: list[str]) -> None:
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    {"disk_full": _inject_disk_full, "unreadable_store": lambda: _inject_unreadable_store(run_dir),
     "stuck_rank_zero": lambda: _stuck_rank_zero(run_dir)}[fault]()
    from scgpt.train import main

    sys.argv = ["scgpt-train", *args]
    main()


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2:])
