"""``scgpt-train``: a Hydra entry point around :func:`train`, a pure function of the config."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from data_modules.datamodule import DataProgress
from scgpt import crash
from scgpt.config import ModelConfig
from scgpt.config_checks import (check_appended_task_keys, check_config, closest_hint, derive_batch_sizes,
                                 expand_sweeps, without_append_hint)
from scgpt.errors import CheckpointError, ConfigError, ScgptError
from scgpt.io import fail, rank_zero_logger
from scgpt.io import write_json_atomic, write_text_atomic
from scgpt.model.attention_backends import build_attention_backend
from scgpt.paths import config_dir
from scgpt.distributed import build_strategy, check_resume, trainer_plugins, world_size
from scgpt.preemption import PreemptionHandler, Preempted, newest_complete_checkpoint
from scgpt.sweeper import register as register_sweeper
from scgpt.tasks.init import apply_init_from, prepare_init_from, task_model_settings
from scgpt.console import console_callbacks, quiet_lightning
from scgpt.tasks.callbacks import AtomicCheckpointIO, CellThroughputMonitor, LastCheckpoint
from scgpt.tracking import finish_run, scrub_secrets, tracking_callbacks

log = rank_zero_logger()


def gradient_accumulation(cfg: DictConfig) -> int:
    """global batch = per-device batch x world size x accumulation; the division must be exact. The batch
    size the user left out (null) is derived from the world size and written into ``cfg.data``."""
    sizes = derive_batch_sizes(cfg.data.get("global_batch_size"), cfg.data.get("per_device_batch_size"),
                               world_size(cfg.trainer))
    if sizes.derived:
        log.info("batch size: %s", sizes.derived)
    cfg.data.global_batch_size, cfg.data.per_device_batch_size = sizes.global_batch, sizes.per_device
    return sizes.accumulation


def model_settings(cfg: DictConfig, datamodule, init=None) -> dict[str, Any]:
    """The model config with the vocabulary (and label counts) of the data filled in, validated."""
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    if settings.get("kind") == "vae" or cfg.task.name == "vae":  # the VAE baseline: no ScGPTModel config
        return _vae_settings(cfg, datamodule, settings, init)
    settings = task_model_settings(cfg, datamodule, settings, init)  # init_from architecture, task heads
    vocab = datamodule.vocab
    settings.update(vocab_size=vocab.size, pad_token_id=vocab.pad_id)
    if settings.get("n_batch_labels") == "auto":
        settings["n_batch_labels"] = datamodule.n_classes("batch")
    ModelConfig.from_mapping(settings)  # raises ConfigError naming the key
    build_attention_backend(settings.get("attention_backend", "sdpa"))  # flash_attn without CUDA fails here
    return settings


def _vae_settings(cfg: DictConfig, datamodule, settings: dict[str, Any], init=None) -> dict[str, Any]:
    """model=vae with task=vae (conf/model/vae.yaml selects it): input size = the data's vocabulary."""
    if settings.get("kind") != "vae" or cfg.task.name != "vae":
        raise ConfigError(f"model={'vae' if settings.get('kind') == 'vae' else '<scGPT>'} with task={cfg.task.name}: "
                          "the VAE baseline runs as model=vae task=vae (model=vae alone selects both)")
    if init is not None:
        raise ConfigError("init_from: the VAE baseline trains from scratch; drop init_from with model=vae")
    settings.update(vocab_size=datamodule.vocab.size, pad_token_id=datamodule.vocab.pad_id)
    return settings


def export_metadata(cfg: DictConfig, datamodule) -> dict[str, Any]:
    """What a checkpoint needs beyond weights to tokenize new cells: vocabulary and tokenizer settings."""
    data = cfg.data
    return {
        "vocab": datamodule.vocab.token_to_id,
        "tokenizer": {"n_bins": int(data.n_bins), "max_seq_len": int(data.max_seq_len),
                      "pad_value": float(data.pad_value), "mask_value": float(data.mask_value),
                      "include_zero_genes": bool(data.include_zero_genes)},
        "data_fingerprint": getattr(datamodule, "fingerprint", None),
    }


def _strategy(cfg: DictConfig):
    return build_strategy(cfg)  # scgpt.distributed: options checked, DeepSpeed also on CPU


def _logger(cfg: DictConfig):
    return instantiate(cfg.logger) if "_target_" in cfg.logger else False


def _check_resume(ckpt_path: str | None) -> str | None:
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).exists():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint; give a path to a last.ckpt of an earlier run")
    crash.check_complete(ckpt_path)  # a truncated file: names the newest complete one beside it
    return str(ckpt_path)


def resume_mismatch(exc: RuntimeError, resume: str, auto: bool, run_dir: Path) -> CheckpointError:
    """Lightning's 'Error(s) in loading state_dict' (a checkpoint of another model) as one line: most often a
    run_dir reused for another model, whose newest checkpoint auto-resume picked up."""
    details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    first = details[0].rstrip(".") if details else "its weights do not fit"
    fix = (f"run it in a new directory (auto-resume took the newest checkpoint of {run_dir}), or resume with the "
           "model settings that run had" if auto else "resume with the model settings it was trained with")
    return CheckpointError(f"ckpt_path={resume}: holds another model than this run's ({first}); {fix}")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own errors through: Hydra wraps exceptions raised in a
    constructor in an InstantiationException, which would turn a one-line ConfigError into a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, ScgptError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def build_task(cfg: DictConfig, model: dict[str, Any]) -> L.LightningModule:
    task = cfg.task
    return build(task.module, model=model,
                       objectives=OmegaConf.to_container(task.objectives, resolve=True),
                       objective_options=OmegaConf.to_container(task.get("objective_options", {}), resolve=True),
                       optimizer=instantiate(task.optimizer), scheduler=instantiate(task.get("scheduler")),
                       seed=int(cfg.seed), _convert_="all")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns (and writes) the run summary."""
    run_dir = Path(cfg.run_dir)
    resume = _check_resume(cfg.get("ckpt_path"))
    auto = resume is None
    if resume is None and cfg.get("auto_resume", True):  # a requeued job: continue where it stopped
        resume = newest_complete_checkpoint(run_dir)
        if resume is not None:
            resume = str(resume)
            log.info("auto-resume: continuing from %s, the newest complete checkpoint in %s", resume, run_dir)
    check_config(cfg)  # every value's type and range, before any work
    accumulate = gradient_accumulation(cfg)
    quiet_lightning(world_size(cfg.trainer))  # Lightning's messages that do not concern the user
    strategy = _strategy(cfg)
    if resume is not None:
        check_resume(resume, cfg)  # ZeRO shards vs strategy and world size, before any work
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build(cfg.data)
    if cfg.task.get("data_module"):  # tasks that pair cells (task=perturbation) wrap the cell data module
        datamodule = build(cfg.task.data_module, cells=datamodule)
    init = prepare_init_from(cfg, datamodule)  # init_from=: its vocabulary for the data, its weights read
    model = model_settings(cfg, datamodule, init)
    task = build_task(cfg, model)
    apply_init_from(cfg, task, init)  # strict load except the heads the task replaces; task.freeze
    task.export_metadata = export_metadata(cfg, datamodule)
    every = int(cfg.checkpoint.every_n_train_steps)
    throughput = CellThroughputMonitor()
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks = [DataProgress(), throughput, LastCheckpoint(last, every)]
    if cfg.checkpoint.get("keep_all"):  # also keep every periodic checkpoint as step-<N>.ckpt
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=-1, every_n_train_steps=every,
                                         filename="step-{step:07d}", auto_insert_metric_name=False))
    logger = _logger(cfg)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks += tracking_callbacks(cfg, logger)  # loss history, gradient norm, rich progress bar
    callbacks += console_callbacks(cfg.trainer)  # the model summary without Lightning's FLOPs column
    callbacks.append(PreemptionHandler(last))  # last: saves after every other callback updated its state
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=logger, callbacks=callbacks,
                          accumulate_grad_batches=accumulate, default_root_dir=str(run_dir),
                          enable_checkpointing=bool(cfg.checkpoint.get("keep_all")),  # last.ckpt: LastCheckpoint
                          plugins=[AtomicCheckpointIO(), *trainer_plugins()])
    config_file = run_dir / "config.yaml"
    previous_config = config_file.read_text() if resume is not None and config_file.is_file() else None
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = scrub_secrets(OmegaConf.to_container(cfg, resolve=True))  # no API key in any saved file
        write_text_atomic(config_file, OmegaConf.to_yaml(OmegaConf.create(resolved)))
        if logger:
            logger.log_hyperparams(resolved)
    started = time.perf_counter()
    preempted, val, test = None, {}, None
    try:
        if cfg.task.get("fit", True):
            trainer.fit(task, datamodule=datamodule, ckpt_path=resume, weights_only=True)  # no pickled code
        else:  # zero-shot tasks (task=embed): evaluate the given weights on the validation cells
            trainer.validate(task, datamodule=datamodule)
        val = _metrics(trainer, "val")
        test = _run_test(trainer, task, datamodule)  # data.test_split: the held-out cells, once, at the end
    except RuntimeError as exc:
        if resume is None or "Error(s) in loading state_dict" not in str(exc):
            raise
        if previous_config is not None and trainer.is_global_zero:  # the run that wrote the checkpoint keeps its config
            write_text_atomic(config_file, previous_config)
        raise resume_mismatch(exc, resume, auto, run_dir) from None
    except Preempted as stop:  # checkpoint saved (and SLURM job requeued): report and end
        preempted = stop
        val = _metrics(trainer, "val")
    summary = {
        "task": cfg.task.name,
        "global_step": int(trainer.global_step),
        "cells_seen": int(task.cells_seen),
        "train_loss_first": None if task.first_loss is None else float(task.first_loss),
        "train_loss_last": None if task.last_loss is None else float(task.last_loss),
        "val": val,
        **({"test": test} if test is not None else {}),
        "cells_per_s": throughput.cells_per_s,
        "tokens_per_s": throughput.tokens_per_s,
        "tflops_per_device": throughput.tflops_per_s,
        "mfu": throughput.mfu,
        "tflops_per_device_work_done": throughput.tflops_per_s_work_done,  # attention on the pairs computed
        "mfu_work_done": throughput.mfu_work_done,  # tflops_per_device / mfu: model FLOPs (scgpt/flops.py)
        "peak_memory_gib": _peak_memory_gib(trainer),
        "attention_backend": task.model.attention_backend,
        "checkpoint": str(last),
        "resumed_from": resume,
        "preempted": None if preempted is None else str(preempted),
        "requeued": bool(preempted and preempted.requeued),
        "world_size": trainer.world_size,
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero:
        summary["plots"] = [str(p) for p in finish_run(logger, callbacks, summary, run_dir)]
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _peak_memory_gib(trainer: L.Trainer) -> float | None:
    """Peak memory allocated on this process's GPU during the run (None on CPU). The strategy's device:
    the module itself is back on the CPU once fit ends."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    return {k.removeprefix(f"{prefix}/"): float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith(f"{prefix}/")}


def _run_test(trainer: L.Trainer, task: L.LightningModule, datamodule) -> dict[str, float] | None:
    """Evaluate the trained weights on the test split (``data.test_split``); None without one."""
    if not getattr(datamodule, "has_test", False):
        return None
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", task, L.LightningModule):
        log.warning("data.test_split: task %s has no test metrics; the held-out cells were not evaluated",
                    type(task).__name__)
        return None
    trainer.test(task, datamodule=datamodule, verbose=False)
    return _metrics(trainer, "test")


def optimized_metric(cfg: DictConfig, summary: dict[str, Any]) -> float | None:
    """The value a sweeper optimises: ``optimized_metric`` (val/<name> or a top-level summary key)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    split = name.split("/", 1)[0] if name.startswith(("val/", "test/")) else None
    value = (summary.get(split) or {}).get(name.split("/", 1)[1]) if split else summary.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        choices = [f"val/{k}" for k in summary.get("val", {})] + ["train_loss_last", "cells_per_s", "tokens_per_s"]
        raise ConfigError(f"optimized_metric={name}: not a number in the run summary; use one of {', '.join(choices)}")
    return float(value)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    crash.begin(cfg.run_dir, list(HydraConfig.get().overrides.task), world_size(cfg.trainer))
    try:
        summary = train(cfg)
        if summary.get("preempted"):  # saved; the requeued job resumes it (exit 143 = stopped by a signal)
            print(f"preempted: {summary['preempted']}", file=sys.stderr)
            sys.exit(0 if summary["requeued"] else 143)
        metric = optimized_metric(cfg, summary)
    except ScgptError as exc:
        raise SystemExit(crash.report(exc))  # one line (with where to resume when it stopped a run)
    except Exception as exc:  # a dead rank, a full disk, an unreadable store: one line, traceback to train.log
        code = crash.report(exc)
        if code is None:
            raise  # a bug: its traceback
        raise SystemExit(code) from None
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(summary["run_dir"])
    return metric  # for sweepers (hparams_search=optuna)


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line; a list under a line ending in ':' (the available
    options of a group) becomes comma-separated."""
    parts: list[str] = []
    listing = False
    for line in (raw.strip() for raw in message.split("Config search path:")[0].splitlines()):
        if not line:
            continue
        if listing and " " not in line:
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    return " ".join(p if p.endswith((".", ":")) else p + "." for p in parts)


def check_overrides(overrides: list[str]) -> None:
    """Compose the config from the command-line overrides before Hydra runs, so that an unknown group option,
    a misspelt key or a malformed override is a one-line ConfigError (exit code 2), not Hydra's report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose("config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as exc:
            hint = closest_hint(str(exc), overrides, lambda others: compose("config", overrides=others))
            message = without_append_hint(one_line(str(exc))) if hint else one_line(str(exc))
            raise ConfigError(f"command line: {message}{hint}") from None
    try:
        check_config(cfg)  # types and ranges of every value (ConfigError names the key)
        check_appended_task_keys(cfg, overrides)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise ConfigError(f"command line: {one_line(str(exc))}") from None


MULTIRUN_FLAGS = ("-m", "--multirun")


def main() -> None:
    """Console entry point ``scgpt-train``. A multirun's jobs are checked one sweep value at a time; Hydra's
    other flags (--help, --cfg, ...) skip the pre-check."""
    args = sys.argv[1:]
    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    if not any(arg.startswith("-") for arg in overrides):
        try:
            for job in (expand_sweeps(overrides) if len(overrides) < len(args) else [overrides]):
                check_overrides(job)
        except ConfigError as exc:
            fail(exc)
    register_sweeper()  # hydra/sweeper=optuna (hparams_search=optuna): scgpt's, which Hydra's scan can miss
    _hydra_main()


if __name__ == "__main__":
    main()
