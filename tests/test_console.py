"""What a plain training run prints: steps of max_steps, the loss and cells/s; no Lightning message that
does not concern the user (scgpt/console.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

from scgpt.console import SRUN_HINT, quiet_lightning

NOT_SHOWN = {
    "Epoch 0/-2": "Epoch",  # Lightning's bar in a run bounded by steps
    "Total FLOPs: 0": "FLOPs",  # Lightning's summary without an example input
    "litlogger advertisement": "litlogger",
    "srun hint": "srun",
    "torch deprecation inside Lightning": "deprecated",
    "IterableDataset __len__ warning": "IterableDataset",
}


def test_a_debug_run_shows_steps_loss_and_cells_per_s_and_no_lightning_noise(tmp_path):
    fake_bin = tmp_path / "bin"  # SLURM tools on the PATH, as on a cluster's login node
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "80",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scgpt.train", "trainer=debug", "logger=csv",
                             f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    for what, text in NOT_SHOWN.items():
        assert text not in console, f"{what}: {console}"
    bar = next(line for line in console.splitlines() if line.startswith("step "))
    assert re.search(r" 4/4 .*loss: \d+\.\d{3} cells/s: [\d,]+$", bar), bar  # max_steps 4, on one line
    assert "Parameters: " in console


def test_the_srun_hint_is_dropped_only_for_a_single_process():
    for world, shown in ((2, True), (1, False)):
        with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
            warnings.simplefilter("always")
            quiet_lightning(world)
            warnings.warn(f"{SRUN_HINT}. HINT: ...", UserWarning)
        assert bool(caught) == shown, world
