"""Experiment tracking: the wandb logger factory, secret scrubbing, training callbacks for tracking
(gradient norm, loss history, rich progress bar) and the end-of-run hand-off (plots, summary)."""

from __future__ import annotations

import contextlib
import math
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback

from scgpt.io import rank_zero_logger

log = rank_zero_logger()

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
# key=value pairs with a secret-looking key, as in Hydra overrides ("+logger.api_key=...", "a=1,b.token=x")
SECRET_ASSIGNMENT = re.compile(r"((?:^|,|\s)[+~]{0,2}[\w.\-/@]*?(?:api[_-]?key|token|secret|password|passwd"
                               r"|credential)[\w\-]*=)([^,\s]+)", re.IGNORECASE)
SECRET_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "HF_TOKEN", "NEPTUNE_API_TOKEN", "COMET_API_KEY")
REDACTED = "<redacted>"


# ---- secrets ----------------------------------------------------------------------------------
def _secret_values() -> list[str]:
    return [v for v in (os.environ.get(name) for name in SECRET_ENV) if v and len(v) >= 8]


def scrub_secrets(data: Any, _secrets: list[str] | None = None) -> Any:
    """A copy of a (nested) config container with secret-looking keys and known secret values redacted.

    Keys named like ``api_key``, ``token``, ``password`` lose their value; any string containing the
    value of ``WANDB_API_KEY`` (and similar variables) has it replaced, wherever it appears.
    """
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(data, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "")
                    else scrub_secrets(v, secrets)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(scrub_secrets(v, secrets) for v in data)
    if isinstance(data, str):
        for secret in secrets:
            data = data.replace(secret, REDACTED)
        data = SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, data)
    return data


def scrub_yaml_file(path: str | Path) -> bool:
    """Redact secrets in a saved YAML file in place (atomically); True when something was redacted."""
    import yaml

    from scgpt.io import write_text_atomic

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    clean = scrub_secrets(data)
    if clean == data:
        return False
    write_text_atomic(path, yaml.safe_dump(clean, sort_keys=False))
    return True


class ScrubHydraOutputs(HydraCallback):
    """A Hydra callback: redacts secrets from the files Hydra itself saves, ``<run_dir>/.hydra/*.yaml``
    (config, hydra config, command-line overrides) and a sweep's ``multirun.yaml``."""

    def on_job_start(self, config, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        if hydra_cfg.get("output_subdir"):
            for path in (Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir).glob("*.yaml"):
                scrub_yaml_file(path)
        self._scrub_multirun(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self._scrub_multirun(config)

    @staticmethod
    def _scrub_multirun(config) -> None:
        sweep_dir = config.hydra.get("sweep", {}).get("dir")
        if sweep_dir and (Path(sweep_dir) / "multirun.yaml").is_file():
            scrub_yaml_file(Path(sweep_dir) / "multirun.yaml")


# ---- wandb ------------------------------------------------------------------------------------
def wandb_api_key_configured() -> bool:
    """True when wandb could log in: ``WANDB_API_KEY`` is set or ``wandb login`` wrote a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """``online``/``offline``/``disabled``: the config's choice, else ``$WANDB_MODE``, else online only
    when an API key is configured."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        from scgpt.errors import ConfigError

        raise ConfigError(f"logger.mode={mode}: use online, offline or disabled (or null to decide from the API key)")
    return mode


def wandb_logger(save_dir: str, project: str = "scgpt", name: str | None = None, entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, job_type: str | None = None,
                 mode: str | None = None, log_model: bool = False, **kwargs: Any):
    """A Lightning ``WandbLogger`` writing its run files under ``<save_dir>/wandb``.

    Offline unless an API key is configured (or ``mode``/``$WANDB_MODE`` says otherwise); offline runs
    are uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``. The key itself is never
    taken from the config: set ``WANDB_API_KEY`` or run ``wandb login``.
    """
    try:
        import wandb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from scgpt.errors import ConfigError

        raise ConfigError("logger=wandb: the wandb package is not installed; pip install 'scgpt[wandb]'") from exc
    mode = wandb_mode(mode)
    if wandb.run is not None:  # a previous run in this process (a sweep's earlier trial) that did not finish
        wandb.finish()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    name = name or Path(save_dir).name
    log.info("wandb: %s run %r in project %r (files in %s/wandb)", mode, name, project, save_dir)
    return _wandb_logger_class()(save_dir=str(save_dir), dir=str(save_dir), project=project, name=name, entity=entity,
                       group=group, tags=list(tags or []), job_type=job_type, mode=mode,
                       offline=mode == "offline", log_model=log_model, **kwargs)


@contextlib.contextmanager
def scrubbed_argv():
    """``sys.argv`` with secrets redacted, for the duration (wandb records the command line)."""
    original = sys.argv
    sys.argv = scrub_secrets(list(original))
    try:
        yield
    finally:
        sys.argv = original


def _wandb_logger_class():
    from lightning.pytorch.loggers import WandbLogger

    class ScrubbedWandbLogger(WandbLogger):
        """Lightning's WandbLogger, starting its run with secrets redacted from the recorded command line."""

        @property
        def experiment(self):
            with scrubbed_argv():
                return WandbLogger.experiment.fget(self)

    return ScrubbedWandbLogger


# ---- callbacks --------------------------------------------------------------------------------
class GradNormMonitor(L.Callback):
    """Logs ``train/grad_norm``: the global L2 norm of the gradients (after unscaling, before clipping)."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every:
            return
        squares = [p.grad.detach().float().pow(2).sum() for p in pl_module.parameters() if p.grad is not None]
        if squares:
            import torch

            pl_module.log("train/grad_norm", torch.stack(squares).sum().sqrt(), on_step=True, on_epoch=False)


class MetricHistory(L.Callback):
    """Keeps (step, metric) rows of the training and validation losses in memory, whatever the logger,
    for the end-of-run plots."""

    TRAIN = ("train/loss",)
    VAL = ("val/loss", "val/masked_mse", "val/pearson")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def _record(self, trainer, keys) -> None:
        row = {k: float(trainer.callback_metrics[k]) for k in keys if k in trainer.callback_metrics}
        if row:
            self.rows.append({"step": int(trainer.global_step), **row})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, self.TRAIN)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, self.VAL)


class FinalValidation(L.Callback):
    """Validates at the last training step when the last periodic validation was earlier (``max_steps``
    below or not a multiple of ``val_check_interval``, or the final epoch's last batch), so that every run
    ends with validation metrics in its summary (what a sweep optimises). It asks Lightning to stop at that
    step, as early stopping does, and Lightning validates before stopping."""

    def __init__(self) -> None:
        self._validated_step = -1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._validated_step != trainer.global_step and self._last_step(trainer):
            trainer.should_stop = True

    @staticmethod
    def _last_step(trainer) -> bool:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        final_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs > 0
        return final_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def progress_bar(trainer_cfg) -> list[L.Callback]:
    """A rich progress bar when the trainer shows one (Lightning's default would be tqdm)."""
    if not trainer_cfg.get("enable_progress_bar", True):
        return []
    try:
        from scgpt.console import StepProgressBar

        return [StepProgressBar(leave=True)]  # step/max_steps, loss, cells/s
    except (ImportError, ModuleNotFoundError):  # pragma: no cover - rich is a dependency
        return []


def tracking_callbacks(cfg, logger) -> list[L.Callback]:
    """Callbacks that train() adds for tracking: loss history and a validation at the last step always;
    gradient norm with a logger; the rich progress bar when the trainer shows progress."""
    callbacks: list[L.Callback] = [MetricHistory(), FinalValidation()]
    if logger:
        callbacks.append(GradNormMonitor())
    return callbacks + progress_bar(cfg.trainer)


# ---- the end of a run -------------------------------------------------------------------------
def _flat(prefix: str, data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}{key}/", value))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[f"{prefix}{key}"] = value
    return out


def finish_run(logger, callbacks: list[L.Callback], summary: dict[str, Any], run_dir: str | Path) -> list[Path]:
    """Rank zero, after fit: write the loss-curve PNG, hand the summary and plots to wandb and close
    its run (so that a sweep's next trial in this process starts a new one). Returns the PNGs written."""
    from scgpt.plots import plot_loss_curves

    history = next((c for c in callbacks if isinstance(c, MetricHistory)), None)
    pngs = plot_loss_curves(history.rows if history else [], Path(run_dir) / "plots" / "loss.png")
    for one in (logger if isinstance(logger, (list, tuple)) else [logger]):
        if any(cls.__name__ == "WandbLogger" for cls in type(one).__mro__):
            _finish_wandb(one, summary, pngs)
    return pngs


def _finish_wandb(logger, summary: dict[str, Any], pngs: list[Path]) -> None:
    import wandb

    run = logger.experiment
    flat = {f"summary/{k}": v for k, v in _flat("", summary).items()
            if not (isinstance(v, float) and math.isnan(v))}
    run.summary.update(scrub_secrets(flat))
    if pngs:
        run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in pngs})
    run.finish()
