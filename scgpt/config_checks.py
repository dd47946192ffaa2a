"""Checks of a composed ``scgpt-train`` config before anything runs: every value's type and range, keys the
code does not know (with the closest real key), and the batch sizes derived from the world size."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from scgpt.config import ModelConfig
from scgpt.config_schema import DataConfig, RunConfig, TaskConfig, TrainerConfig, check_annotated_types, unknown_key
from scgpt.errors import ConfigError

DEFAULT_PER_DEVICE_BATCH = 32  # cells per device when neither batch size is given
CELL_DATA_MODULE = "data_modules.datamodule.CellDataModule"
LIGHTNING_TRAINERS = ("lightning.Trainer", "lightning.pytorch.Trainer", "lightning.pytorch.trainer.trainer.Trainer")


def _section(cfg: DictConfig, name: str) -> dict[str, Any]:
    node = cfg.get(name)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}


def check_model_types(model: Mapping[str, Any], heads: Mapping[str, Any]) -> None:
    """The scGPT model's int / float / bool keys hold such values (ranges: ``ModelConfig`` once the data's
    vocabulary is known). ``auto`` values are filled from the data later."""
    if model.get("kind") == "vae":
        return
    known = {f.name for f in fields(ModelConfig)}
    for name in model:  # refused later by ModelConfig.from_mapping anyway: here, before any work, with a guess
        if name not in known:
            raise unknown_key("model", name, known)
    check_annotated_types(ModelConfig, {k: v for k, v in model.items() if v != "auto"}, "model")
    check_annotated_types(ModelConfig, {k: v for k, v in heads.items() if v != "auto"}, "task.model_heads")


def check_trainer_keys(trainer: Mapping[str, Any]) -> None:
    """``+trainer.max_stepz=1`` reaches Lightning as an unexpected argument: refuse it here, by name."""
    if trainer.get("_target_") not in LIGHTNING_TRAINERS:
        return
    import lightning

    known = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    for name in trainer:
        if name != "_target_" and name not in known:
            raise unknown_key("trainer", name, known)


def check_config(cfg: DictConfig) -> None:
    """Every value of the run keys and the model, data, trainer and task groups, in that order; the first
    problem is a one-line :class:`ConfigError` naming the key and what it accepts."""
    RunConfig.from_mapping({k: cfg.get(k) for k in ("seed", "ckpt_path", "init_from", "optimized_metric", "checkpoint")
                            if k in cfg})
    task = _section(cfg, "task")
    check_model_types(_section(cfg, "model"), task.get("model_heads") or {})
    data = _section(cfg, "data")
    if data.get("_target_") == CELL_DATA_MODULE:
        DataConfig.from_mapping(data)
    trainer = _section(cfg, "trainer")
    TrainerConfig.from_mapping(trainer)
    check_trainer_keys(trainer)
    TaskConfig.from_mapping(task)


@dataclass(frozen=True)
class BatchSizes:
    global_batch: int  # cells per optimizer step over all devices
    per_device: int  # cells per forward pass on one device
    accumulation: int  # forward passes per optimizer step
    derived: str | None  # what was filled in, for the log (None: both were given)


def derive_batch_sizes(global_batch: int | None, per_device: int | None, world: int) -> BatchSizes:
    """global = per-device x world x accumulation. Given one, the other follows from the world size
    (accumulation 1); given neither, 32 cells per device; given both, the division must be exact."""
    if global_batch is None and per_device is None:
        per_device = DEFAULT_PER_DEVICE_BATCH
        return BatchSizes(per_device * world, per_device, 1, f"data.global_batch_size = {per_device} cells per device "
                          f"x {world} devices = {per_device * world} (neither batch size given)")
    if global_batch is None:
        return BatchSizes(per_device * world, per_device, 1,
                          f"data.global_batch_size = {per_device} x {world} devices = {per_device * world}")
    if per_device is None:
        if global_batch % world:
            raise ConfigError(f"data.global_batch_size: {global_batch} cells do not split over {world} devices; "
                              f"give a multiple of {world} or also set data.per_device_batch_size")
        return BatchSizes(global_batch, global_batch // world, 1,
                          f"data.per_device_batch_size = {global_batch} / {world} devices = {global_batch // world}")
    if global_batch % (per_device * world):
        raise ConfigError(f"data.global_batch_size: {global_batch} is not a multiple of per_device_batch_size "
                          f"{per_device} x {world} devices; pick a multiple of {per_device * world}")
    return BatchSizes(global_batch, per_device, global_batch // (per_device * world), None)


# ---- the command line -----------------------------------------------------------------------------------
def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (the hydra node excluded), without resolving values."""
    keys = []
    for name in cfg.keys():
        if name == "hydra" and not prefix:
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys += config_keys(node, f"{key}.")
    return keys


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """A multirun's command line as the override lists of the jobs to check: every value of each sweep
    (``trainer=debug,cpu``, ``range(1,4)``) once, the other sweeps at their first value. Interval and
    glob sweeps (a sweeper draws from them) are left to the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        head = f"{override.get_key_element()}="
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif isinstance(override.value(), (ChoiceSweep, RangeSweep)):
            choices.append([head + v for v in override.sweep_string_iterator()] or [override.input_line])
        # interval(...) / glob(...): not enumerable here
    first = [c[0] for c in choices]
    jobs = [first]
    for i, options in enumerate(choices):
        jobs += [first[:i] + [value] + first[i + 1:] for value in options[1:]]
    return jobs


def closest_hint(message: str, overrides: list[str], compose) -> str:
    """For Hydra's "Could not override 'a.b'" / "Could not find 'group/option'": the nearest real key or option,
    from the config composed without that override ('' when nothing is close)."""
    import re

    from scgpt.config_schema import closest

    missing_key = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct",
                                                                                   message)
    missing_option = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing_option:
        group, option = missing_option.groups()
        options = re.search(r"Available options in '[^']+':((?:\s+\S+)+)", message)
        guess = closest(option, options.group(1).split()) if options else None
        return f" Did you mean {group}={guess}?" if guess else ""
    if not missing_key:
        return ""
    key = missing_key.group(1)
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        known = config_keys(compose(others))
    except Exception:  # the rest of the command line does not compose either: no hint
        return ""
    guess = closest(key, known)
    return f" Did you mean {guess}?" if guess else ""


def check_appended_task_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """``+task.lable_key=x`` appends a key no code reads, as tasks take keys of their own (``task`` is not a
    strict section): refused where the key it adds is close to one that was already there (a new key with no
    near neighbour is a task's own, and stays)."""
    from scgpt.config_schema import closest, dotted

    for override in overrides:
        if not override.startswith("+task.") or override.startswith("++"):  # '++' may override an existing key
            continue
        *parents, name = override[1:].split("=", 1)[0].split(".")
        if parents == ["task", "objectives"]:  # the task refuses an unknown objective itself, naming the choices
            continue
        node = OmegaConf.select(cfg, ".".join(parents))
        existing = {str(k) for k in node.keys()} - {name} if isinstance(node, DictConfig) else set()
        shared = {f.name for f in fields(TaskConfig)} if parents == ["task"] else set()  # any task may take them
        if name in shared:
            continue
        guess = closest(name, existing | shared)
        if guess:  # an existing key is set as it is; a shared one this task's config leaves out is appended
            parent = ".".join(parents)
            fix = dotted(parent, guess) if guess in existing else f"+{dotted(parent, guess)}"
            raise ConfigError(f"{dotted(parent, name)}: unknown key; did you mean {fix}?")


def without_append_hint(message: str) -> str:
    """Hydra's "To append to your config use +a.b=1" invites a key no code reads (a model key is refused later,
    a task key ignored): dropped where a close real key is suggested instead."""
    import re

    return re.sub(r"\s*To append to your config use \S+?\.(?=\s|$)", "", message)
