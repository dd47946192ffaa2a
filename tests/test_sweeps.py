"""Sweeps: Hydra multirun with the Optuna sweeper, the submitit SLURM launcher on a real (local) cluster,
and the command lines a wandb agent runs from sweeps/*.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


from conftest import SMALL_DATA

FAST = [*SMALL_DATA, "trainer=debug"]
SWEEP_SPECS = sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml"))  # wandb specs, not a Hydra group


def _env(**extra) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # scgpt-train of this environment first on PATH
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _scgpt_train(args, cwd, timeout=300, **env):
    return subprocess.run([sys.executable, "-m", "scgpt.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=_env(**env), timeout=timeout)


def _summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.slow
def test_optuna_multirun_runs_seeded_trials_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = _scgpt_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                           "hydra.sweeper.sampler.n_startup_trials=2", "hydra.sweep.dir=sweep", "logger=none", *FAST],
                          cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    summaries = _summaries(sweep)
    assert sorted(summaries) == ["0", "1", "2"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    mses = {name: s["val"]["masked_mse"] for name, s in summaries.items()}
    assert best["best_value"] == pytest.approx(min(mses.values()))
    assert set(best["best_params"]) == {"task.optimizer.lr", "task.optimizer.weight_decay",
                                        "task.generative_fraction", "task.scheduler.warmup_steps"}
    best_trial = min(mses, key=mses.get)
    trial_config = yaml.safe_load((sweep / best_trial / "config.yaml").read_text())
    assert trial_config["task"]["optimizer"]["lr"] == pytest.approx(best["best_params"]["task.optimizer.lr"])
    table = (sweep / "report.md").read_text()
    assert table.splitlines()[2].startswith(f"| {best_trial} |")  # best first
    assert "Best value" in result.stdout + result.stderr and table in result.stdout

    # the sampler is seeded (seed=0): the same sweep proposes the same first trial
    first = yaml.safe_load((sweep / "0" / ".hydra" / "overrides.yaml").read_text())
    again = _scgpt_train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", "hydra.sweep.dir=again",
                          "logger=none", *FAST], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "again" / "0" / ".hydra" / "overrides.yaml").read_text()) == first


def _slurm_ready() -> str | None:
    """Why SLURM tests cannot run here, or None when a node is idle."""
    if not (shutil.which("sinfo") and shutil.which("sbatch")):
        return "sinfo/sbatch not found (start a local cluster with slurm/local-cluster.sh start)"
    try:
        idle = subprocess.run(["sinfo", "-h", "-t", "idle,mix", "-o", "%n"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if idle.returncode != 0:
        return f"sinfo failed: {idle.stderr.strip()[:200]}"
    if not idle.stdout.strip():
        return "no idle SLURM node"
    return None


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_launcher_runs_optuna_trials_as_slurm_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    reason = _slurm_ready()
    if reason:
        pytest.skip(reason)
    result = _scgpt_train(["-m", "hparams_search=optuna", "launcher=slurm_cpu", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.n_jobs=2", "hydra.launcher.timeout_min=10", "hydra.sweep.dir=sweep",
                           "logger=none", *FAST], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    summaries = _summaries(sweep)
    assert sorted(summaries) == ["0", "1"] and all(s["global_step"] == 4 for s in summaries.values())
    job_logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2, "each trial ran as a SLURM job"
    assert all(s["run_dir"] in log.read_text() for log, s in zip(sorted(job_logs), summaries.values()))
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


def agent_command(spec: dict, params: dict) -> list[str]:
    """The command line ``wandb agent`` runs for a sweep spec and sampled parameters (its own macros)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[spec.get("program", "")])
    command = []
    for part in spec["command"]:
        part = str(part)
        command += macros.get(part[2:-1], []) if part.startswith("${") and part.endswith("}") else [part]
    return command


def _first_value(param: dict):
    if "value" in param:
        return param["value"]
    if "values" in param:
        return param["values"][0]
    return param["min"]


@pytest.mark.slow
@pytest.mark.parametrize("spec_path", SWEEP_SPECS, ids=lambda p: p.stem)
def test_wandb_agent_command_line_is_accepted_by_scgpt_train(spec_path, tmp_path):
    pytest.importorskip("wandb")
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["method"] in {"grid", "random", "bayes"} and spec["metric"]["name"].startswith("val/")
    params = {name: _first_value(p) for name, p in spec["parameters"].items()}
    command = agent_command(spec, params)
    assert command[:2] == ["/usr/bin/env", "scgpt-train"] and "${args_no_hyphens}" not in command
    assert all(f"{k}={v}" in command for k, v in params.items())
    run_dir = tmp_path / "run"
    secret = "fakewandbkey0123456789abcdef0123456789abcd"
    result = subprocess.run([*command, *FAST, f"hydra.run.dir={run_dir}", f"+notes.api_key={secret}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env=_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_API_KEY=secret,
                                     WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                                     WANDB_CACHE_DIR=str(tmp_path / "wandb-cache")))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert spec["metric"]["name"].removeprefix("val/") in summary["val"]  # the metric the sweep optimises
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for name, value in params.items():
        node = saved
        for key in name.split("."):
            node = node[key]
        if not isinstance(node, dict):  # a dict: a config group was chosen (model=tiny)
            assert node == value, name
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (run_dir / ".hydra" / "overrides.yaml") in files
    assert not [str(p) for p in files if secret.encode() in p.read_bytes()], "an API key was saved"


@pytest.mark.parametrize("steps, interval", [(6, 100), (7, 3)])
def test_every_run_ends_with_a_validation_at_its_last_step(tmp_path, steps, interval):
    """max_steps below val_check_interval (no periodic validation at all) or not a multiple of it: the run
    still validates at its last step, so the summary has the metric a sweep optimises."""
    import csv

    from scgpt.train import optimized_metric, train

    from conftest import compose_config

    cfg = compose_config(tmp_path, *FAST, f"trainer.max_steps={steps}", f"trainer.val_check_interval={interval}",
                         "optimized_metric=val/masked_mse")
    summary = train(cfg)
    assert summary["global_step"] == steps
    assert optimized_metric(cfg, summary) == summary["val"]["masked_mse"]
    with open(tmp_path / "logs" / "metrics.csv") as f:
        val_steps = [int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("val/masked_mse")]  # 0-based
    periodic = list(range(interval, steps + 1, interval))
    assert val_steps == (periodic if steps in periodic else [*periodic, steps])  # once at the end, not twice
