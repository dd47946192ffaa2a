"""Hydra's Optuna sweeper for ``scgpt-train -m hparams_search=optuna``, on a current Optuna (>= 4).

The study lives in the sweep directory (``hydra.sweeper.storage``: an Optuna journal file by default, which is
safe on NFS/Lustre; an ``sqlite:///`` or other database URL also works; null keeps it in memory). Running the
same command again continues the study: ``n_trials`` counts the trials of the study, so a re-run runs only the
ones still missing; trials that finished are not run again; a trial that was running when the sweep died is
marked failed and not counted. The seeded sampler is re-seeded with ``seed + trials so far``, so a continued
study does not propose its first points again.

Hydra accepts sweepers only from the ``hydra_plugins`` package: ``hydra_plugins.scgpt_sweeper.OptunaSweeper``
is this class under that name, registered by :func:`register` (an editable install hides it from Hydra's scan).
The search space is Hydra's override grammar: ``interval(a, b)``, ``tag(log, interval(a, b))``, ``choice(...)``,
``range(a, b[, step])``; other values are fixed for every trial.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from scgpt.errors import ConfigError
from scgpt.io import fail, rank_zero_logger, write_text_atomic

log = rank_zero_logger(__name__)
URL_SCHEMES = ("sqlite://", "postgresql", "mysql", "oracle", "mssql")  # database storages (SQLAlchemy URLs)


def register() -> None:
    """Make the sweeper known to Hydra (an editable install's ``hydra_plugins`` is not scanned)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.scgpt_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)


def open_storage(storage: str | None):
    """None: in memory; a database URL: Optuna's RDB storage; anything else: a journal file at that path."""
    if storage is None:
        return None
    if str(storage).startswith(URL_SCHEMES):
        return str(storage)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(storage)))


def distribution(override) -> Any:
    """An Optuna distribution for a sweep override, or the value of a fixed one (as override text)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, (ChoiceSweep, RangeSweep)):  # range: its values exactly (stop excluded, as Hydra's)
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, IntervalSweep):  # Hydra's intervals are floats (integers: range or choice)
        return FloatDistribution(value.start, value.end, log="log" in value.tags)
    raise ConfigError(f"hydra.sweeper.params: {override.input_line}: not a choice, range or interval sweep")


def search_space(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(distributions of the swept keys, values of the fixed keys) from override strings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import BaseDistribution

    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides):
        value = distribution(override)
        (space if isinstance(value, BaseDistribution) else fixed)[override.get_key_element()] = value
    return space, fixed


class OptunaJournalSweeper(Sweeper):
    """Asks the study for ``n_jobs`` trials at a time, launches them, tells it their ``optimized_metric``."""

    def __init__(self, sampler: Any, direction: str, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: DictConfig | None) -> None:
        self.sampler, self.direction, self.storage = sampler, str(direction), storage
        self.study_name, self.n_trials, self.n_jobs = study_name or "sweep", int(n_trials), max(1, int(n_jobs))
        self.max_failure_rate = float(max_failure_rate)
        self.params = OmegaConf.to_container(params) if params else {}

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        try:
            study, space, fixed = self._open_study(arguments)
        except ConfigError as exc:
            fail(exc)
        done = _finished(study)
        log.info("study %s (%s): %d of %d trials done", self.study_name, self.storage or "in memory", done,
                 self.n_trials)
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            overrides = [tuple(f"{k}={v}" for k, v in {**t.params, **fixed}.items()) for t in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)  # job dir = trial number
            self._tell(study, trials, returns)
            done += len(trials)
        self._save_results(study)

    def _open_study(self, arguments: list[str]):
        try:
            import optuna
            from optuna.storages.journal import JournalFileBackend  # noqa: F401 (optuna >= 4)
        except ImportError:
            raise ConfigError("hparams_search=optuna: needs optuna >= 4 (pip install 'optuna>=4', or the tracking "
                              "extra; hydra-optuna-sweeper, which needs optuna < 3, is no longer used)") from None
        command = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space, fixed = search_space(command)
        storage = open_storage(self.storage)
        study = optuna.create_study(study_name=self.study_name, storage=storage, load_if_exists=True,
                                    direction=self.direction, sampler=self._sampler(storage))
        where = f"the study {self.study_name!r} in {self.storage}"
        if study.direction.name.lower() != self.direction:
            raise ConfigError(f"hydra.sweeper.direction: {where} was made to {study.direction.name.lower()}; "
                              "keep that or start a new study (hydra.sweeper.study_name or hydra.sweep.dir)")
        saved = study.user_attrs.get("overrides")
        if saved is None:
            study.set_user_attr("overrides", command)
        elif sorted(saved) != sorted(command):
            changes = [f"+{o}" for o in command if o not in saved] + [f"-{o}" for o in saved if o not in command]
            raise ConfigError(f"hydra.sweeper.params: {where} was run with other overrides ({', '.join(changes)}); "
                              "run its command again or start a new study (hydra.sweeper.study_name or "
                              "hydra.sweep.dir)")
        _fail_interrupted(study)
        return study, space, fixed

    def _sampler(self, storage) -> Any:
        """The configured sampler; a seeded one continuing a study is seeded with seed + trials so far."""
        import optuna

        if not isinstance(self.sampler, functools.partial):
            return self.sampler
        seed = self.sampler.keywords.get("seed")
        if seed is not None and storage is not None:
            try:
                seed += len(optuna.load_study(study_name=self.study_name, storage=storage).trials)
            except KeyError:  # a new study
                pass
        return self.sampler(seed=seed) if "seed" in self.sampler.keywords else self.sampler()

    def _tell(self, study, trials, returns) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        failures = []
        for trial, ret in zip(trials, returns):
            trial.set_user_attr("launched", True)  # finished by this sweeper (a failure counts as run)
            value = ret.return_value if ret.status == JobStatus.COMPLETED else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                study.tell(trial, float(value))
                continue
            study.tell(trial, state=TrialState.FAIL)
            failures.append((trial.number, ret, value))
            log.warning("trial %d failed: %s", trial.number,
                        ret._return_value if ret.status == JobStatus.FAILED else f"it returned {value!r}")
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            number, ret, value = failures[0]
            if ret.status == JobStatus.FAILED:
                ret.return_value  # noqa: B018 (raises the trial's own exception: a bug has its traceback)
            fail(ConfigError(f"optimized_metric: trial {number} returned {value!r}, not a number; set "
                             "optimized_metric=val/<metric> (or raise hydra.sweeper.max_failure_rate)"))

    def _save_results(self, study) -> None:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
        results = {"name": "optuna", "study_name": self.study_name, "storage": self.storage,
                   "n_trials": len(complete)}
        if complete:
            results.update(best_trial=study.best_trial.number, best_params=study.best_params,
                           best_value=study.best_value)
            log.info("Best parameters: %s", study.best_params)
            log.info("Best value: %s", study.best_value)
        write_text_atomic(Path(self.config.hydra.sweep.dir) / "optimization_results.yaml",
                          OmegaConf.to_yaml(OmegaConf.create(results)))


def _finished(study) -> int:
    """Trials that count towards n_trials: complete, or failed after this sweeper launched them."""
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and bool(t.user_attrs.get("launched")))
               for t in study.get_trials(deepcopy=False))


def _fail_interrupted(study) -> None:
    """Trials left running by a sweep that died: failed, not counted (a single sweeper drives a study)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("trial %d was running when the previous sweep stopped: marked failed, not counted",
                    trial.number)
