"""Crash reports: a run that dies of something outside the program (a dead rank, a full disk, an unreadable
checkpoint or cell store) ends with one console line saying what happened, what to do, the newest complete
checkpoint and the command that resumes from it; the traceback goes to ``<run_dir>/train.log``.

- :func:`describe` names the fault of an exception (None: not an outside fault, i.e. a bug, whose traceback
  stays on the console).
- :func:`report` writes the traceback to ``train.log``, composes the line, prints it once and returns the exit
  code (2, as for every error the user has to act on).
- :class:`RankWatch` replaces Lightning's observer of the ranks it starts on this machine. Lightning's SIGKILLs
  rank 0 within 5 s of a child's death, racing with rank 0's own report (and, when it wins, leaving no line
  at all). This one gives rank 0 ``grace_s`` to fail in its next collective and report; if rank 0 is still
  running then (stuck in a collective that waits for the dead peer), it reports the dead rank itself and ends
  the process group: no survivor waits on a dead peer.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from scgpt.errors import CheckpointError, ScgptError
from scgpt.io import error_line, process_rank
from scgpt.preemption import checkpoint_step, in_slurm_batch_job, newest_complete_checkpoint

EXIT_CODE = 2  # the run cannot go on until the user acts (resuming included), as for a user's mistake
LOG_NAME = "train.log"
DEAD_RANK_GRACE_S = 10.0  # how long rank 0 may take to notice a dead child in a collective and report
_POLL_S = 0.5

# a collective whose peer process is gone: gloo (CPU), NCCL (GPU), the TCP store
PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|remote (worker|process)|"
                       r"NCCL communicator was aborted|Watchdog caught collective operation timeout|"
                       r"failed to recv|DistNetworkError", re.IGNORECASE)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
UNREADABLE = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE)


class IncompleteCheckpoint(CheckpointError):
    """``ckpt_path=`` names a checkpoint cut off while being written; ``newest`` is the complete one to use."""

    def __init__(self, path: Path, newest: Path | None, step: int | None) -> None:
        self.path, self.newest = Path(path), newest
        where = (f"the newest complete checkpoint in {self.path.parent} is {newest} (step {step})" if newest
                 else f"{self.path.parent} holds no complete checkpoint: start again without ckpt_path=")
        super().__init__(f"ckpt_path={path}: incomplete checkpoint (cut off while being written, or damaged); "
                         f"{where}")


def check_complete(ckpt_path: str | Path) -> None:
    """Refuse a single-file ``ckpt_path`` that does not load (truncated), naming the newest complete one."""
    path = Path(ckpt_path)
    if path.is_file() and checkpoint_step(path) is None:
        newest = newest_complete_checkpoint(path.parent.parent) if path.parent.name == "checkpoints" else None
        raise IncompleteCheckpoint(path, newest, None if newest is None else checkpoint_step(newest))


# ------------------------------------------------------------------------------------------------
# What the run is: set once by the entry point
# ------------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run_dir: Path
    overrides: list[str]  # the command line, to compose the resume command
    world_size: int = 1
    children: list[subprocess.Popen] = field(default_factory=list)  # ranks this process started (Lightning)
    dead: list[tuple[int, int]] = field(default_factory=list)  # (global rank, return code) seen by RankWatch


_RUN: RunInfo | None = None
_EMITTED = threading.Event()
_LOCK = threading.Lock()


def begin(run_dir: str | Path, overrides: list[str], world_size: int = 1) -> RunInfo:
    """Record the run a later :func:`report` describes, and watch the ranks Lightning starts here."""
    global _RUN
    _RUN = RunInfo(Path(run_dir), [a for a in overrides if not a.startswith(_LAUNCHER_ARGS)], world_size)
    _install_rank_watch()
    return _RUN


_LAUNCHER_ARGS = ("ckpt_path=", "hydra.job.name=train_ddp_process_", "hydra.output_subdir=")


# ------------------------------------------------------------------------------------------------
# Naming the fault
# ------------------------------------------------------------------------------------------------
def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# the last line of a DataLoader worker's traceback, which torch re-raises as ``OSError(message)`` (no errno)
WORKER_OS_ERROR = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?\s*$")


def _as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError with its errno: itself, or the one a DataLoader worker raised (parsed)."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno is None and "Original Traceback" in str(exc):
        found = WORKER_OS_ERROR.search(str(exc))
        return OSError(int(found.group(1)), found.group(2), found.group(3)) if found else exc
    return exc


def _os_error(exc: BaseException, codes: tuple[int, ...]) -> OSError | None:
    errors = (_as_os_error(e) for e in _chain(exc))
    return next((e for e in errors if e is not None and e.errno in codes), None)


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def _free_space(path: Path) -> str:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return _size(shutil.disk_usage(probe).free)
    except OSError:
        return "unknown"


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _dead_rank(run: RunInfo) -> str:
    """Which rank stopped: from the ranks this process started, else the other one of two."""
    for rank, proc in enumerate(run.children, start=1):
        code = proc.poll()
        if code not in (None, 0) and not any(r == rank for r, _ in run.dead):
            run.dead.append((rank, code))
    if run.dead:
        return " and ".join(f"rank {rank} of {run.world_size} died ({_signal_name(code)})" for rank, code in run.dead)
    if run.world_size == 2:
        return f"rank {1 - process_rank()} of 2 stopped"
    return f"another rank of {run.world_size} stopped"


def _store_error(exc: BaseException, tb_files: list[str]) -> OSError | None:
    """An unreadable file met while reading cells (in this process, or in a DataLoader worker)."""
    error = _os_error(exc, UNREADABLE)
    in_reader = any("/data_modules/" in f for f in tb_files) or any("/data_modules/" in str(e) for e in _chain(exc))
    return error if error is not None and in_reader else None


def _final_name(path: Path) -> Path:
    """``.last.ckpt.x1y2.tmp`` (an atomic writer's temporary) -> ``last.ckpt``, the file being written."""
    hidden = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    return path.with_name(hidden.group(1)) if hidden else path


def describe(exc: BaseException, run: RunInfo) -> tuple[str, str, str] | None:
    """(what happened, what to do, how to name the checkpoint: ``newest`` or ``intact``) for a fault outside
    the program; None for anything else."""
    frames = [frame.filename for e in _chain(exc) for frame in traceback.extract_tb(e.__traceback__)]
    full = _os_error(exc, DISK_FULL)
    if full is not None:
        path = _final_name(Path(full.filename)) if full.filename else run.run_dir
        return (f"no space left on device writing {path} ({_free_space(path)} free there)",
                "free space (or move the run to a larger disk)", "intact")
    if any(PEER_LOST.search(str(e)) for e in _chain(exc)):
        return (f"{_dead_rank(run)} and rank {process_rank()} lost it in a collective",
                "find why it died (out of memory? its log, or the scheduler's)", "newest")
    store = _store_error(exc, frames)  # also under a store error that took it for damage
    if store is not None:
        return (f"a cell store became unreadable during training ({store.strerror}: {store.filename})",
                "restore the store (or its permissions)", "newest")
    return None


# ------------------------------------------------------------------------------------------------
# The line and the log
# ------------------------------------------------------------------------------------------------
def resume_command(run: RunInfo, checkpoint: Path) -> str:
    """The run's own command from ``checkpoint``, in the same run directory (Hydra's overrides leave out
    ``hydra.run.dir``, so it is named unless ``run_dir=`` already is)."""
    return shlex.join(["scgpt-train", *run.overrides, *_resume_overrides(run, checkpoint)])


def _resume_overrides(run: RunInfo, checkpoint: Path) -> list[str]:
    same_dir = [] if any(a.startswith("run_dir=") for a in run.overrides) else [f"hydra.run.dir={run.run_dir}"]
    return [*same_dir, f"ckpt_path={checkpoint}"]


def how_to_resume(run: RunInfo, checkpoint: Path) -> str:
    """'resume with scgpt-train ...', or in a SLURM batch job (whose script adds its own launch overrides)
    'resume by resubmitting the job with ... added to its arguments'."""
    if in_slurm_batch_job():
        return f"resume by resubmitting the job (sbatch) with {shlex.join(_resume_overrides(run, checkpoint))} " \
               "added to its arguments"
    return f"resume with {resume_command(run, checkpoint)}"


def checkpoint_clause(run: RunInfo, naming: str = "newest") -> str:
    """Where to resume: ``newest`` says "the newest complete checkpoint is X", ``intact`` (a failed write)
    "the previous checkpoint X is intact"."""
    newest = newest_complete_checkpoint(run.run_dir)
    if newest is None:
        return f"no complete checkpoint was written yet: start again with {shlex.join(['scgpt-train', *run.overrides])}"
    step = checkpoint_step(newest)
    where = (f"the previous checkpoint {newest} (step {step}) is intact" if naming == "intact"
             else f"the newest complete checkpoint is {newest} (step {step})")
    return f"{where}: {how_to_resume(run, newest)}"


def write_traceback(run: RunInfo, exc: BaseException | None, note: str = "") -> Path:
    """Append this rank's traceback (or, without one, every thread's stack) to ``<run_dir>/train.log``."""
    path = run.run_dir / LOG_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"\n[{time.strftime('%Y-%m-%d %H:%M:%S')}] rank {process_rank()} (pid {os.getpid()}) "
                         f"stopped{': ' + note if note else ''}\n")
            if exc is not None:
                traceback.print_exception(exc, file=handle)
            else:
                handle.flush()
                faulthandler.dump_traceback(file=handle, all_threads=True)
    except OSError:  # a full disk may refuse even this: the console line still comes
        pass
    return path


def emit(line: str) -> None:
    """Print the report line once per process, whichever thread gets there first."""
    with _LOCK:
        if _EMITTED.is_set():
            return
        _EMITTED.set()
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)


def compose(exc: BaseException, run: RunInfo) -> str | None:
    """The one line for ``exc``, or None when it is not an outside fault (nor a user's error)."""
    if isinstance(exc, IncompleteCheckpoint):
        if exc.newest is None:
            return error_line(exc)
        return f"{error_line(exc)}: {how_to_resume(run, exc.newest)}"
    described = describe(exc, run)
    if described is not None:
        what, todo, naming = described
        log = run.run_dir / LOG_NAME
        return f"error: {what}; {todo}; {checkpoint_clause(run, naming)} (traceback: {log})"
    if isinstance(exc, ScgptError):
        message = _worker_message(str(exc))
        if _during_training(exc):  # e.g. a damaged chunk met mid-run: where to resume once repaired
            return f"error: {' '.join(message.split())}; once fixed, {checkpoint_clause(run)}"
        return f"error: {' '.join(message.split())}"
    return None


def _worker_message(message: str) -> str:
    """A DataLoader worker re-raises our error with its traceback in the message: keep the error's own line."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def _during_training(exc: BaseException) -> bool:
    return any("/lightning/pytorch/loops/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def report(exc: BaseException) -> int | None:
    """Handle a run-ending exception: traceback to train.log, one line on the console; returns the exit code,
    or None when ``exc`` is a bug to show as a traceback."""
    run = _RUN
    if run is None:
        return None
    line = compose(exc, run)
    if line is None:
        return None
    if not isinstance(exc, ScgptError) or _during_training(exc):
        write_traceback(run, exc)
    _end_children(run)
    emit(line)
    return getattr(exc, "exit_code", EXIT_CODE) if isinstance(exc, ScgptError) else EXIT_CODE


def _end_children(run: RunInfo, wait_s: float = 5.0) -> None:
    """Let the other local ranks print their own line first, then make sure none is left waiting."""
    deadline = time.monotonic() + wait_s
    for proc in run.children:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------
# Watching the ranks started on this machine
# ------------------------------------------------------------------------------------------------
class RankWatch(threading.Thread):
    """Watches the child ranks; when one dies, rank 0 has ``grace_s`` to report it, else this reports it."""

    def __init__(self, children: list[subprocess.Popen], grace_s: float = DEAD_RANK_GRACE_S) -> None:
        super().__init__(daemon=True, name="scgpt-rank-watch")
        self.children, self.grace_s = children, grace_s

    def run(self) -> None:
        while True:
            time.sleep(_POLL_S)
            codes = [proc.poll() for proc in self.children]
            if all(code == 0 for code in codes):
                return
            dead = [(rank, code) for rank, code in enumerate(codes, start=1) if code not in (None, 0)]
            if dead:
                break
        run = _RUN or RunInfo(Path.cwd(), [])
        run.dead.extend(d for d in dead if d not in run.dead)
        time.sleep(self.grace_s)  # rank 0 normally fails in its next collective and reports meanwhile
        if _EMITTED.is_set():
            time.sleep(self.grace_s)  # reported: let it exit; if its exit itself hangs, end it below
        else:
            log = write_traceback(run, None, f"{_dead_rank(run)} {self.grace_s:.0f} s ago and this rank had not "
                                             "noticed; its stacks follow")
            emit(f"error: {_dead_rank(run)} while rank 0 waited for it; find why it died (out of memory? "
                 f"its log, or the scheduler's), then {checkpoint_clause(run)} (stacks: {log})")
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
        os._exit(EXIT_CODE)


def _install_rank_watch() -> None:
    """Make Lightning start a :class:`RankWatch` instead of its own observer when it launches local ranks."""
    try:
        from lightning.pytorch.strategies.launchers import subprocess_script
    except ImportError:  # pragma: no cover - Lightning always ships it
        return
    if not hasattr(subprocess_script, "_launch_process_observer"):
        return  # another Lightning: keep its observer

    def launch_rank_watch(children: list[subprocess.Popen]) -> None:
        if _RUN is not None:
            _RUN.children = children
        RankWatch(children).start()

    subprocess_script._launch_process_observer = launch_rank_watch
