"""One ``scgpt-train`` run of a real-cell benchmark, its output in a log file (shared by run/grn/response.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scgpt.errors import DataError


def train_logged(name: str, overrides: list[str], log: Path) -> None:
    """``scgpt-train OVERRIDES`` with stdout and stderr in ``log``; DataError with its last line if it fails."""
    command = [sys.executable, "-m", "scgpt.train", *overrides]
    print(f"# {name}: scgpt-train {' '.join(overrides)}", file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        last = (log.read_text().strip().splitlines() or ["?"])[-1]
        raise DataError(f"{name}: scgpt-train exited {code} ({last}); see {log}")
