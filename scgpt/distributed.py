"""Parallelism in one place: the Lightning strategy a config asks for, the cluster plugins, and the checks
that a checkpoint can resume under that strategy and world size.

- ``strategy: {name: auto}`` passes a Lightning strategy name through; ``_target_`` configs are built with
  their options checked against the class first, so a mistyped option is one line naming the key.
- :class:`DeepSpeedStrategy` is Lightning's DeepSpeed ZeRO strategy that also runs on CPU (``DS_ACCELERATOR=cpu``
  and gloo: CI exercises the real ZeRO code path) and writes its sharded checkpoint directory atomically.
- Under SLURM, Lightning's own requeue handler is switched off: :mod:`scgpt.preemption` saves at a step
  boundary on every rank and requeues, instead of saving from inside a signal handler.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from scgpt.errors import CheckpointError, ConfigError
from scgpt.io import rank_zero_logger

log = rank_zero_logger()

DEEPSPEED_INSTALL = "pip install --no-build-isolation 'scgpt[deepspeed]'"


# ------------------------------------------------------------------------------------------------
# Building the strategy
# ------------------------------------------------------------------------------------------------
def is_deepspeed(strategy_cfg: DictConfig) -> bool:
    target = str(strategy_cfg.get("_target_", "")) or str(strategy_cfg.get("name", ""))
    return "deepspeed" in target.lower()


def _check_options(strategy_cfg: DictConfig, cls: type) -> None:
    """Every key of ``strategy`` must be a keyword of ``cls`` (or of a base class it forwards to)."""
    known: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        known |= {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
        if klass is DDPStrategy:  # its **kwargs go to torch's DistributedDataParallel
            known |= set(inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters) - {"self"}
            break
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    for key in strategy_cfg:
        if key.startswith("_") or key == "name":
            continue
        if key not in known:
            close = sorted(k for k in known if k[:4] == key[:4]) or sorted(known)[:8]
            raise ConfigError(f"strategy.{key}: not an option of {cls.__name__}; remove it or use one of "
                              f"{', '.join(close)}")


def _check_deepspeed(cfg: DictConfig) -> None:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
        precision = str(cfg.trainer.get("precision", "32-true"))
        if precision.startswith("16"):
            raise ConfigError(f"trainer.precision: {precision} (fp16) needs CUDA with DeepSpeed; on CPU use "
                              "trainer.precision=32-true or bf16-mixed")
    stage = cfg.strategy.get("stage", 2)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.stage: {stage} is not a ZeRO stage; pick 1, 2 or 3")
    if cfg.strategy.get("offload_parameters") and stage != 3:
        raise ConfigError("strategy.offload_parameters: parameter offload needs ZeRO stage 3; set strategy.stage=3 "
                          "or use strategy=deepspeed_zero3_offload")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"strategy={cfg.strategy.get('name', 'deepspeed')}: DeepSpeed is not installed; "
                          f"{DEEPSPEED_INSTALL}, or pick strategy=ddp") from None


def build_strategy(cfg: DictConfig) -> Any:
    """The ``strategy`` argument of the Trainer for ``cfg``: a strategy object, or a Lightning name."""
    strategy_cfg = cfg.strategy
    if "_target_" not in strategy_cfg:
        return strategy_cfg.get("name", "auto")
    try:
        cls = get_class(strategy_cfg._target_)
    except Exception:
        raise ConfigError(f"strategy._target_: cannot import {strategy_cfg._target_}; check the class path") from None
    _check_options(strategy_cfg, cls)
    if is_deepspeed(strategy_cfg):
        _check_deepspeed(cfg)
    options = OmegaConf.to_container(strategy_cfg, resolve=True)
    options.pop("name", None)
    if is_deepspeed(strategy_cfg):
        if options.get("logging_batch_size_per_gpu", "auto") == "auto":  # our loaders have no batch_sampler
            options["logging_batch_size_per_gpu"] = int(cfg.data.per_device_batch_size)
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            options["pin_memory"] = False  # page-locked buffers are a CUDA feature
    return instantiate(options, _convert_="all")


def trainer_plugins() -> list[Any]:
    """Under SLURM: Lightning's environment without its own auto-requeue (scgpt.preemption does that)."""
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


# ------------------------------------------------------------------------------------------------
# DeepSpeed on CUDA and on CPU
# ------------------------------------------------------------------------------------------------
try:
    from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed
except ImportError:  # pragma: no cover - lightning always ships the class; deepspeed itself is optional
    _LightningDeepSpeed = DDPStrategy  # type: ignore[misc,assignment]


class DeepSpeedStrategy(_LightningDeepSpeed):  # type: ignore[misc,valid-type]
    """Lightning's DeepSpeed ZeRO strategy, plus:

    - CPU processes (``DS_ACCELERATOR=cpu``, gloo): Lightning only accepts CUDA; here CPU devices get an index
      per local rank, which is all DeepSpeed needs.
    - ``zero_overrides``: extra keys merged into DeepSpeed's ``zero_optimization`` section (for example
      ``stage3_prefetch_bucket_size``); ``force_ds_cpu_optimizer: false`` lets an offloaded run keep the task's
      torch optimizer.
    - Atomic checkpoints: every rank writes its shards into a hidden sibling directory, which rank 0 renames
      into place once all are done, so ``last.ckpt`` is always a complete checkpoint or absent.
    """

    def __init__(self, *args: Any, zero_overrides: dict[str, Any] | None = None,
                 force_ds_cpu_optimizer: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if zero_overrides:
            self.config.setdefault("zero_optimization", {}).update(zero_overrides)
        if force_ds_cpu_optimizer is not None:
            self.config["zero_force_ds_cpu_optimizer"] = bool(force_ds_cpu_optimizer)

    def _on_cpu(self) -> bool:
        return all(d.type == "cpu" for d in (self.parallel_devices or [self.root_device]))

    def setup_environment(self) -> None:
        if self._on_cpu():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            DDPStrategy.setup_environment(self)  # skips Lightning's CUDA-only check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():
            self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        super().setup_distributed()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        staging = final.with_name(f".{final.name}.tmp")
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)
        self.barrier("scgpt.deepspeed.stage")
        try:
            super().save_checkpoint(checkpoint, staging, storage_options)
            self.barrier("scgpt.deepspeed.saved")
        except BaseException:
            if self.is_global_zero:  # a rank failed to write (a full disk) or died: never leave half a checkpoint
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.is_global_zero:
            replace_directory(staging, final)
        self.barrier("scgpt.deepspeed.renamed")


def replace_directory(new: Path, final: Path) -> None:
    """Put the complete directory ``new`` at ``final``. The old one is moved aside first (``.NAME.old``, which
    resume also accepts), so at every instant one complete checkpoint exists under a known name."""
    aside = final.with_name(f".{final.name}.old")
    if aside.exists():
        shutil.rmtree(aside)
    if final.is_dir():
        os.rename(final, aside)
    elif final.exists():
        final.unlink()
    os.rename(new, final)
    if aside.exists():
        shutil.rmtree(aside)


# ------------------------------------------------------------------------------------------------
# Which checkpoint can resume which run
# ------------------------------------------------------------------------------------------------
def deepspeed_checkpoint_info(path: Path) -> dict[str, Any] | None:
    """For a complete ZeRO checkpoint directory: {stage, world_size, global_step}; None when ``path`` is not
    one or is incomplete (a shard missing)."""
    path = Path(path)
    if not path.is_dir() or not (path / "latest").is_file():
        return None
    tag_dir = path / (path / "latest").read_text().strip()
    states = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"), key=lambda p: len(p.name))
    if not states:
        return None
    try:
        client = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    world = int(client.get("dp_world_size", 1))
    stage = int(((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    shards = list(tag_dir.glob("*optim_states.pt"))
    if len(shards) < world:
        return None
    return {"stage": stage, "world_size": world, "global_step": int(client.get("global_step", 0))}


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the trainer config will start: devices per node x nodes."""
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer_cfg.get("num_nodes", 1))


def expected_world_size(cfg: DictConfig) -> int:
    return world_size(cfg.trainer)


def check_resume(ckpt_path: str | Path, cfg: DictConfig) -> None:
    """Refuse, before any work, a checkpoint that this strategy and world size cannot resume."""
    path = Path(ckpt_path)
    deepspeed_run = is_deepspeed(cfg.strategy)
    if path.is_dir():
        info = deepspeed_checkpoint_info(path)
        if info is None:
            raise CheckpointError(f"ckpt_path={path}: a directory but not a complete DeepSpeed checkpoint (no 'latest' "
                                  "file, or a shard is missing); pass a complete one")
        if not deepspeed_run:
            raise CheckpointError(f"ckpt_path={path}: is a DeepSpeed ZeRO-{info['stage']} checkpoint; resume it with "
                                  f"strategy=deepspeed_zero{max(info['stage'], 2)} (the strategy that wrote it), or "
                                  "export its weights with scgpt-export and start a new run from them")
        stage = int(cfg.strategy.get("stage", 2))
        if info["stage"] != stage:
            raise CheckpointError(f"ckpt_path={path}: was written with ZeRO stage {info['stage']}, this run uses "
                                  f"stage {stage}; resume with strategy.stage={info['stage']}")
        world = expected_world_size(cfg)
        if info["world_size"] != world:
            raise ConfigError(f"trainer.devices: ckpt_path={path} holds ZeRO shards of {info['world_size']} processes "
                              f"and this run has {world}; resume with trainer.devices x trainer.num_nodes = "
                              f"{info['world_size']}, or export its weights with scgpt-export and start a new run")
    elif deepspeed_run and not cfg.strategy.get("load_full_weights", False):
        raise CheckpointError(f"ckpt_path={path}: is a single-file checkpoint and a DeepSpeed run resumes from a ZeRO "
                              "checkpoint directory; resume with the strategy that wrote it (strategy=ddp or auto)")
