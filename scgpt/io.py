"""The plumbing every CLI and writer shares, in one place: atomic writes (a temporary name in the same
directory, renamed when complete), one-line failures, progress bars on stderr, and the rank-zero logger."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scgpt.errors import ScgptError


# ---- atomic writes ------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (``.NAME.<random>.tmp``: finders of complete files skip
    it); when the block ends without an error it is renamed to ``path``, else removed. ``durable`` also
    fsyncs the file and the directory, so the rename survives a crash (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory ``new`` to ``target``; an existing ``target`` is removed only after the
    rename, so a crash leaves either the old or the new one whole."""
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
        os.replace(new, target)
        shutil.rmtree(retired, ignore_errors=True) if retired.is_dir() else retired.unlink()
    else:
        os.replace(new, target)


# ---- one-line failures ---------------------------------------------------------------------------
def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line, whatever line breaks the message holds."""
    return "error: " + " ".join(str(exc).split())


def fail(exc: ScgptError) -> None:
    """What every CLI does with a user's mistake: one line on stderr, the error's exit code (2), no traceback."""
    print(error_line(exc), file=sys.stderr)
    raise SystemExit(exc.exit_code)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: ...`` line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


# ---- progress bars -------------------------------------------------------------------------------
def progress_bar(enabled: bool = True, *, elapsed: bool = False, transient: bool = False):
    """A rich ``Progress`` on stderr (description, bar, done/total, remaining time); disabled, it draws
    nothing. Without a terminal rich prints only the finished bar, so logs stay short."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn()] if elapsed else []
    return Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
                    transient=transient)


@contextmanager
def progress_counter(enabled: bool, total: int, description: str = "cells") -> Iterator[Callable[[int], None] | None]:
    """A progress bar of ``total`` items: yields ``advance(n)``, or None when disabled (nothing drawn)."""
    if not enabled:
        yield None
        return
    with progress_bar(elapsed=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ---- the rank-zero logger ------------------------------------------------------------------------
def process_rank() -> int:
    """This process's global rank: Lightning's once a strategy has set it, else the launcher's variables."""
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        rank = getattr(rank_zero_only, "rank", None)
        if rank is not None:
            return int(rank)
    except ImportError:
        pass
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


class _RankZeroOnly(logging.Filter):
    """Info and debug records on rank 0 only; warnings and errors from every rank (one rank's problem)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or process_rank() == 0


def rank_zero_logger(name: str = "scgpt") -> logging.Logger:
    """A logger whose info records are dropped on every rank but 0 (library code logs through it, so a
    multi-process run says each thing once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroOnly) for f in logger.filters):
        logger.addFilter(_RankZeroOnly())
    return logger
