"""Sweeps: Hydra multirun with our Optuna sweeper (scgpt/sweeper.py; its study in the sweep directory
survives a crash), the submitit SLURM launcher on a real (local) cluster, and the command lines a wandb agent
runs from sweeps/*.yaml."""

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
    pytest.importorskip("optuna")
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


DIE_AT_JOB = """
import os

from hydra.experimental.callback import Callback


class DieAtJob(Callback):
    \"\"\"The sweep process dies (as by kill -9) when job `job` has started: that trial is running.\"\"\"

    def __init__(self, job):
        self.job = job

    def on_job_start(self, config, **kwargs):
        if config.hydra.job.num == self.job:
            os._exit(137)
"""


def _study(sweep_dir: Path, name: str = "pretrain"):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal"))))


@pytest.mark.slow
def test_an_optuna_sweep_killed_after_two_of_four_trials_continues_with_the_same_command(tmp_path):
    pytest.importorskip("optuna")
    (tmp_path / "die_at_job.py").write_text(DIE_AT_JOB)
    command = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4", "logger=none", *FAST]
    killed = _scgpt_train([*command, "+hydra.callbacks.die._target_=die_at_job.DieAtJob", "+hydra.callbacks.die.job=2"],
                          cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert killed.returncode == 137, killed.stderr[-3000:]
    sweep = tmp_path / "runs" / "optuna" / "pretrain"  # the default sweep dir of hparams_search=optuna
    assert sorted(_summaries(sweep)) == ["0", "1"]
    finished = {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in ("0", "1")}

    again = _scgpt_train(command, cwd=tmp_path)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 2 was running when the previous sweep stopped: marked failed, not counted" in again.stdout + again.stderr
    summaries = _summaries(sweep)
    assert sorted(summaries) == ["0", "1", "3", "4"]  # 2 was killed; 0 and 1 were not run again
    assert {n: (sweep / n / "summary.json").stat().st_mtime_ns for n in ("0", "1")} == finished
    study = _study(sweep)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    # the seeded sampler (random for its first 10 trials) does not propose trials 0 and 1 again
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    for trial in complete:  # each trial's value is its run's metric, and its run had its parameters
        run = sweep / str(trial.number)
        assert trial.value == pytest.approx(summaries[str(trial.number)]["val"]["masked_mse"])
        assert yaml.safe_load((run / "config.yaml").read_text())["task"]["optimizer"]["lr"] == pytest.approx(
            trial.params["task.optimizer.lr"])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["n_trials"] == 4 and best["best_value"] == pytest.approx(min(t.value for t in complete))

    done = _scgpt_train(command, cwd=tmp_path)  # the study has its 4 trials: nothing more to run
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(_summaries(sweep)) == ["0", "1", "3", "4"] and len(_study(sweep).trials) == 5


@pytest.mark.slow
def test_an_optuna_study_refuses_another_command_or_direction_with_one_line(tmp_path):
    pytest.importorskip("optuna")
    command = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=0", "hydra.sweep.dir=sweep", "logger=none", *FAST]
    made = _scgpt_train(command, cwd=tmp_path)  # creates the study, runs no trial
    assert made.returncode == 0, made.stderr[-3000:]
    assert (tmp_path / "sweep" / "optuna.journal").is_file()
    other = _scgpt_train([*command, "trainer.max_steps=5"], cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        "error: hydra.sweeper.params: the study 'pretrain' in sweep/optuna.journal was run with other overrides "
        "(+trainer.max_steps=5); run its command again or start a new study (hydra.sweeper.study_name or "
        "hydra.sweep.dir)")
    flipped = _scgpt_train([*command, "hydra.sweeper.direction=maximize"], cwd=tmp_path)
    assert flipped.returncode == 2
    assert flipped.stderr.strip().splitlines()[-1] == (
        "error: hydra.sweeper.direction: the study 'pretrain' in sweep/optuna.journal was made to minimize; keep "
        "that or start a new study (hydra.sweeper.study_name or hydra.sweep.dir)")


def test_the_search_space_follows_hydras_sweep_grammar():
    pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from scgpt.sweeper import search_space

    space, fixed = search_space(["a=tag(log, interval(1e-4, 3e-3))", "b=interval(0, 1)", "d=choice(10, 30, 100)",
                                 "e=range(1, 4)", "model=small", "f=choice(x, 'y z')"])
    assert space == {"a": FloatDistribution(1e-4, 3e-3, log=True),
                     "b": FloatDistribution(0.0, 1.0),  # Hydra's intervals are floats
                     "d": CategoricalDistribution([10, 30, 100]),
                     "e": CategoricalDistribution([1, 2, 3]),  # Hydra's range: the stop is left out
                     "f": CategoricalDistribution(["x", "y z"])}
    assert fixed == {"model": "small"}


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
