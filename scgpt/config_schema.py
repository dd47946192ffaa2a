"""Typed sections of the composed config: the data, trainer, task and run keys, each with the values it accepts.

A field's rule is a predicate plus the words a user reads when it fails, so every refusal is one line
naming the key and what it accepts: ``data.per_device_batch_size: 0 is not an integer >= 1 (or null)``.
Only keys present in the config are checked; a strict section also refuses keys it does not know and
names the closest known one. :mod:`scgpt.config_checks` applies these to a composed Hydra config.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Mapping, get_type_hints

from scgpt.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    accepts: str  # what the key accepts, in words: "an integer >= 1"
    valid: Callable[[Any], bool]

    def check(self, key: str, value: Any) -> None:
        if not self.valid(value):
            raise ConfigError(f"{key}: {value!r} is not {self.accepts}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> tuple[str, Callable]:
    if low is not None and high is not None:
        words = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        words = f"{'>' if low_open else '>='} {low}"
    else:
        words = "" if high is None else f"{'<' if high_open else '<='} {high}"

    def inside(v: float) -> bool:
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below
    return words, inside


def integer(low: int | None = None, high: int | None = None, *, none: bool = False, also: str = "") -> Rule:
    """An int (not a bool, not 2.0) inside the bounds; ``also``: one more accepted value, e.g. '-1 (no limit)'."""
    words, inside = _bounds(low, high, False, False)
    extra = int(also.split()[0]) if also else None
    accepts = " ".join(p for p in ("an integer", words) if p) + (f", or {also}" if also else "") + \
        (" (or null)" if none else "")
    return Rule(accepts, lambda v: (none and v is None) or (_is_int(v) and (inside(v) or v == extra)))


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           none: bool = False) -> Rule:
    words, inside = _bounds(low, high, low_open, high_open)
    accepts = " ".join(p for p in ("a number", words) if p) + (" (or null)" if none else "")
    return Rule(accepts, lambda v: (none and v is None) or (_is_number(v) and inside(v)))


def one_of(*choices: Any, none: bool = False) -> Rule:
    accepts = "one of " + ", ".join(str(c) for c in choices) + (" (or null)" if none else "")
    return Rule(accepts, lambda v: (none and v is None) or (not isinstance(v, bool) and v in choices))


def either(*rules: Rule) -> Rule:
    return Rule(" or ".join(r.accepts for r in rules), lambda v: any(r.valid(v) for r in rules))


def list_of(item: Rule, *, none: bool = False) -> Rule:
    accepts = f"a list of {item.accepts.removeprefix('a ').removeprefix('an ')}" + (" (or null)" if none else "")
    plural = accepts.replace("a list of integer", "a list of integers").replace("a list of number", "a list of numbers")
    return Rule(plural, lambda v: (none and v is None) or
                (isinstance(v, (list, tuple)) and all(item.valid(x) for x in v)))


@dataclass(frozen=True)
class MappingOf(Rule):
    """A mapping whose every value follows ``item``; a bad entry is named by its own key (``task.objectives.gep``)."""

    item: Rule = None

    def check(self, key: str, value: Any) -> None:
        super().check(key, value)
        for name, entry in value.items():
            self.item.check(f"{key}.{name}", entry)


def mapping_of(item: Rule) -> Rule:
    return MappingOf(f"a mapping {{name: {item.accepts.removeprefix('a ').removeprefix('an ')}}}",
                     lambda v: isinstance(v, Mapping), item)


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a string", lambda v: isinstance(v, str))
TEXT_OR_NULL = Rule("a string (or null)", lambda v: v is None or isinstance(v, str))
MAPPING = Rule("a mapping {key: value}", lambda v: isinstance(v, Mapping))
MAPPING_OR_NULL = Rule("a mapping {key: value} (or null)", lambda v: v is None or isinstance(v, Mapping))
SHARE = number(0, 1)


def rule(default: Any, check: Rule | type) -> Any:
    """A dataclass field with its rule (or a nested section class) in the metadata."""
    return field(default=default, metadata={"rule": check})


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to a misspelt one (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def dotted(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def unknown_key(key: str, name: str, known: Iterable[str]) -> ConfigError:
    guess = closest(name, known)
    hint = f"did you mean {dotted(key, guess)}?" if guess else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{dotted(key, name)}: unknown key; {hint}")


@dataclass
class Section:
    """A config section: ``from_mapping`` checks each present key's rule (recursing into nested sections)."""

    KEY: ClassVar[str] = ""
    STRICT: ClassVar[bool] = False  # refuse keys that are not fields
    EXTRA_KEYS: ClassVar[frozenset[str]] = frozenset({"_target_"})  # accepted without a rule

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str | None = None) -> "Section":
        key = key or cls.KEY
        specs = {f.name: f.metadata.get("rule") for f in fields(cls)}
        given: dict[str, Any] = {}
        for name, value in values.items():
            if name not in specs:
                if cls.STRICT and name not in cls.EXTRA_KEYS:
                    raise unknown_key(key, name, specs)
                continue
            check = specs[name]
            if isinstance(check, type) and issubclass(check, Section):
                if value is not None:  # a nested section (null: absent)
                    MAPPING.check(dotted(key, name), value)
                    value = check.from_mapping(value, dotted(key, name))
            elif check is not None:
                check.check(dotted(key, name), value)
            given[name] = value
        return cls(**given)


def check_annotated_types(cls: type, values: Mapping[str, Any], key: str) -> None:
    """The int / float / bool fields of dataclass ``cls`` present in ``values`` hold values of that type (str
    fields check their choices themselves): ``model.dropout=high`` is one line, not a TypeError later."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name not in values:
            continue
        value, hint = values[f.name], hints.get(f.name)
        example = f" (e.g. {key}.{f.name}={f.default})" if f.default not in (MISSING, None) else ""
        if hint is int and not _is_int(value):
            raise ConfigError(f"{key}.{f.name}: {value!r} is not an integer{example}")
        if hint is float and not _is_number(value):
            raise ConfigError(f"{key}.{f.name}: {value!r} is not a number{example}")
        if hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{key}.{f.name}: {value!r} is not true or false")


# ---- the sections -------------------------------------------------------------------------------------
LAYOUTS = ("padded", "packed", "packed_known_first")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64", 32, 16, 64)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
SPLIT = Rule("null or {key: <obs column>, values: [...]}", lambda v: v is None or isinstance(v, Mapping))
PATHS = Rule("a list of store paths or a manifest path", lambda v: v is None or isinstance(v, (str, list, tuple)))


@dataclass
class DataConfig(Section):
    """``data.*``: the arguments of :class:`data_modules.datamodule.CellDataModule` (same names, same defaults;
    ``tests/test_config_checks.py`` keeps the two in step). Batch sizes: give one and the other is derived
    from the world size (``scgpt.config_checks.derive_batch_sizes``)."""

    KEY: ClassVar[str] = "data"
    STRICT: ClassVar[bool] = True
    paths: Any = rule(None, PATHS)
    synthetic: Any = rule(None, MAPPING_OR_NULL)  # its values: data_modules.synthetic checks them
    vocab_path: str | None = rule(None, TEXT_OR_NULL)
    label_keys: list = rule((), list_of(TEXT))
    val_fraction: float = rule(0.05, number(0, 1, low_open=True, high_open=True))
    block_size: int = rule(1024, integer(1))
    buffer_blocks: int = rule(8, integer(1))
    per_device_batch_size: int | None = rule(None, integer(1, none=True))
    global_batch_size: int | None = rule(None, integer(1, none=True))
    num_workers: int = rule(0, integer(0))
    max_seq_len: int = rule(1200, integer(2))
    n_bins: int = rule(51, integer(3))
    mask_ratios: list = rule((0.25, 0.5, 0.75), list_of(number(0, 1, high_open=True)))
    mask_value: float = rule(-1.0, number())
    pad_value: float = rule(-2.0, number())
    include_zero_genes: bool = rule(False, BOOLEAN)
    generative_fraction: float = rule(0.5, SHARE)
    layout: str = rule("padded", one_of(*LAYOUTS))
    min_vocab_overlap: float = rule(0.5, SHARE)
    seed: int = rule(0, integer(0))
    cache_dir: str | None = rule(None, TEXT_OR_NULL)
    val_split: Any = rule(None, SPLIT)
    test_split: Any = rule(None, SPLIT)
    domain_key: str | None = rule(None, TEXT_OR_NULL)


@dataclass
class TrainerConfig(Section):
    """``trainer.*``: the Lightning Trainer options the shipped configs set (other Trainer options pass
    unchecked; a key that is no Trainer option is refused by :func:`scgpt.config_checks.check_config`)."""

    KEY: ClassVar[str] = "trainer"
    accelerator: str = rule("auto", one_of(*ACCELERATORS))
    devices: Any = rule("auto", either(integer(1, also="-1 (all)"), one_of("auto"), list_of(integer(0))))
    num_nodes: int = rule(1, integer(1))
    precision: Any = rule("32-true", Rule("one of " + ", ".join(PRECISIONS[:7]), lambda v: v in PRECISIONS))
    max_steps: int = rule(-1, integer(1, also="-1 (no limit)"))
    max_epochs: int | None = rule(None, integer(1, none=True, also="-1 (no limit)"))
    val_check_interval: Any = rule(None, either(integer(1), number(0, 1, low_open=True), Rule("null", lambda v: v is None)))
    check_val_every_n_epoch: int | None = rule(None, integer(1, none=True))
    limit_val_batches: Any = rule(1.0, either(integer(0), number(0, 1)))
    num_sanity_val_steps: int = rule(0, integer(0, also="-1 (all)"))
    gradient_clip_val: float | None = rule(None, number(0, none=True))
    log_every_n_steps: int = rule(50, integer(1))
    enable_progress_bar: bool = rule(True, BOOLEAN)
    enable_model_summary: bool = rule(True, BOOLEAN)


@dataclass
class OptimizerConfig(Section):
    lr: float = rule(1e-3, number(0))
    weight_decay: float = rule(0.0, number(0))
    betas: list = rule((0.9, 0.999), list_of(number(0, 1, high_open=True)))


@dataclass
class SchedulerConfig(Section):
    warmup_steps: int = rule(0, integer(0))
    min_lr_ratio: float = rule(0.0, SHARE)


@dataclass
class FreezeConfig(Section):
    STRICT: ClassVar[bool] = True
    embeddings: bool = rule(False, BOOLEAN)
    encoder_layers: int = rule(0, integer(0))


@dataclass
class TaskConfig(Section):
    """``task.*``: the keys tasks share, and a few task-specific ones (a task may add keys of its own)."""

    KEY: ClassVar[str] = "task"
    name: str = rule("pretrain", TEXT)
    fit: bool = rule(True, BOOLEAN)
    label_key: str | None = rule(None, TEXT_OR_NULL)
    batch_key: str | None = rule(None, TEXT_OR_NULL)
    domain_key: str | None = rule(None, TEXT_OR_NULL)
    module: Any = rule(None, MAPPING)
    data_module: Any = rule(None, MAPPING_OR_NULL)
    model_heads: Any = rule(None, MAPPING_OR_NULL)
    objectives: Any = rule(None, mapping_of(number(0)))  # {objective: weight >= 0}
    objective_options: Any = rule(None, MAPPING_OR_NULL)
    freeze: FreezeConfig | None = rule(None, FreezeConfig)
    init_skip: list = rule((), list_of(TEXT))
    mask_ratios: list = rule((0.25, 0.5, 0.75), list_of(number(0, 1, high_open=True)))
    generative_fraction: float = rule(0.5, SHARE)
    optimizer: OptimizerConfig | None = rule(None, OptimizerConfig)
    scheduler: SchedulerConfig | None = rule(None, SchedulerConfig)
    modality_dropout: float = rule(0.0, number(0, 1, high_open=True))
    attention_layer: int = rule(-1, integer())
    knockout_max_regulators: int = rule(64, integer(0))


@dataclass
class CheckpointConfig(Section):
    STRICT: ClassVar[bool] = True
    every_n_train_steps: int = rule(100, integer(1))
    keep_all: bool = rule(False, BOOLEAN)


@dataclass
class RunConfig(Section):
    """The top-level keys of conf/config.yaml that are not groups."""

    KEY: ClassVar[str] = ""
    seed: int = rule(0, integer(0))
    ckpt_path: str | None = rule(None, TEXT_OR_NULL)
    init_from: str | None = rule(None, TEXT_OR_NULL)
    optimized_metric: str | None = rule(None, TEXT_OR_NULL)
    checkpoint: CheckpointConfig | None = rule(None, CheckpointConfig)
