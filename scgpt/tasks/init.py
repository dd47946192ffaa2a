"""``init_from=``: start a task from pretrained weights (a Lightning checkpoint, a native export or an
original scGPT directory).

1. :func:`prepare_init_from` (after the data module is made): reads the checkpoint, makes the data module
   tokenize with the checkpoint's vocabulary and refuses data whose genes barely overlap it.
2. :func:`task_model_settings` (inside ``model_settings``): the architecture comes from the checkpoint, the
   task adds its heads (``task.model_heads``; ``auto`` counts classes in the data).
3. :func:`apply_init_from` (after the task is built): builds the model, loads the weights strictly except for
   an explicit list of head prefixes the task replaces, freezes what ``task.freeze`` says, and writes
   ``init_report.json`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scgpt.checkpoints import CheckpointContents, load_state_dict_strict, read_checkpoint, vocab_overlap_report
from scgpt.errors import CheckpointError, ConfigError
from scgpt.tokenizer.vocab import SPECIAL_TOKENS
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)

# Settings a task may choose; every other model setting is the architecture and comes from the checkpoint.
TASK_KEYS = ("n_cls_classes", "n_batch_labels", "batch_discriminator", "n_modalities", "n_perturbation_flags",
             "n_conditions", "dsbn", "dropout", "attention_backend", "max_seq_len", "n_layers_cls")
# Settings only task.model_heads may change (never copied from the model group): the pooling has no weights.
HEAD_ONLY_KEYS = ("cell_emb_style",)
# Weights under these prefixes exist only with the head (or have a head-dependent shape).
HEAD_PREFIXES = {
    "n_cls_classes": ("cls_decoder.",),
    "n_layers_cls": ("cls_decoder.",),
    "n_batch_labels": ("batch_encoder.", "decoder.", "mvc_decoder.", "batch_discriminator.", "dsbn."),
    "batch_discriminator": ("batch_discriminator.",),
    "dsbn": ("dsbn.",),
    "n_modalities": ("embedding.modality_encoder.",),
    "n_perturbation_flags": ("embedding.pert_encoder.",),
    "n_conditions": ("condition_encoder.",),
}
AUTO_LABELS = {"n_cls_classes": "label_key", "n_batch_labels": "batch_key"}


def prepare_init_from(cfg: DictConfig, datamodule) -> CheckpointContents | None:
    """Read ``init_from`` and make ``datamodule`` use its vocabulary; None without ``init_from``."""
    path = cfg.get("init_from")
    if not path:
        return None
    if not Path(path).exists():
        raise CheckpointError(f"init_from={path}: no such checkpoint or export; give a last.ckpt, an export "
                              "directory or an original scGPT model directory")
    contents = read_checkpoint(path, cfg.get("init_vocab"))
    if cfg.task.get("new_feature_tokens"):  # task=multiomic: ADT / ATAC features the checkpoint never saw
        from scgpt.tasks.multiomic import add_feature_tokens

        add_feature_tokens(contents, datamodule, int(cfg.seed), float(cfg.data.get("min_vocab_overlap", 0.5)))
    genes = list(dict.fromkeys(g for store in datamodule.sources for g in store.var_names))
    known = sum(g in contents.vocab and g not in SPECIAL_TOKENS for g in genes) / max(len(genes), 1)
    report = vocab_overlap_report(contents.vocab, genes)
    minimum = float(cfg.data.get("min_vocab_overlap", 0.5))
    if known < minimum:
        raise CheckpointError(f"init_from={path}: {report}; below data.min_vocab_overlap={minimum}: the checkpoint "
                              "was trained on other genes (map gene names with scgpt-data convert --gene-column, "
                              "or pick a checkpoint for this species and gene namespace)")
    log.info("init_from=%s: %s", path, report)
    datamodule.use_vocab(contents.vocab)
    contents.metadata["vocab_overlap"] = report
    return contents


def task_model_settings(cfg: DictConfig, datamodule, settings: dict[str, Any],
                        init: CheckpointContents | None = None) -> dict[str, Any]:
    """Model settings with the checkpoint's architecture (when ``init`` is given) and the task's heads."""
    heads = _container(cfg.task.get("model_heads"))
    for key in heads:
        if key not in TASK_KEYS + HEAD_ONLY_KEYS:
            raise ConfigError(f"task.model_heads.{key}: not a head setting; choose from "
                              f"{', '.join(TASK_KEYS + HEAD_ONLY_KEYS)}")
    for key, label in AUTO_LABELS.items():
        if heads.get(key) == "auto":
            heads[key] = _count_classes(cfg, datamodule, label)
    if heads.get("n_modalities") == "auto":  # task=multiomic: refuses data without a second modality
        from scgpt.tasks.multiomic import modality_embedding_size

        heads["n_modalities"] = modality_embedding_size(datamodule)
    if heads.get("n_conditions") == "auto":  # task=perturbation with condition_input=label: its conditions
        heads["n_conditions"] = int(getattr(datamodule, "n_conditions", 0))
    if init is not None:
        ckpt = init.config.to_dict()
        changed = {k: (settings[k], ckpt[k]) for k in ckpt if k not in TASK_KEYS and k in settings
                   and k not in ("vocab_size", "pad_token_id") and settings[k] != ckpt[k]}
        if changed:
            log.warning("init_from: the architecture comes from the checkpoint; ignored model settings %s",
                        ", ".join(f"{k}={a} (checkpoint {b})" for k, (a, b) in changed.items()))
        task_values = {k: settings[k] for k in TASK_KEYS if k in settings}
        settings = {**ckpt, **task_values}
        n_bins = int(cfg.data.get("n_bins", ckpt["n_bins"]))
        if n_bins != ckpt["n_bins"]:
            raise ConfigError(f"data.n_bins: {n_bins} differs from the init_from checkpoint's {ckpt['n_bins']}; "
                              f"set model.n_bins={ckpt['n_bins']}")
    settings.update(heads)
    return settings


def _container(node) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _count_classes(cfg: DictConfig, datamodule, label: str) -> int:
    key = cfg.task.get(label)
    if not key:
        raise ConfigError(f"task.{label}: needed to size the head (model_heads ... auto); name an obs column")
    if key not in list(cfg.data.get("label_keys") or []):
        raise ConfigError(f"task.{label}: {key!r} is not in data.label_keys {list(cfg.data.label_keys)}; "
                          f"add it, e.g. data.label_keys=[{', '.join([*cfg.data.label_keys, key])}]")
    return datamodule.n_classes(key)


def skip_prefixes(model_cfg, ckpt_cfg, extra=()) -> tuple[str, ...]:
    """Head prefixes whose weights the task replaces: heads added, removed or resized versus the checkpoint."""
    model, ckpt = model_cfg.to_dict(), ckpt_cfg.to_dict()
    skip = [p for key, prefixes in HEAD_PREFIXES.items() if model.get(key) != ckpt.get(key) for p in prefixes]
    return tuple(dict.fromkeys([*skip, *extra]))


def freeze(model, embeddings: bool = False, encoder_layers: int = 0) -> list[str]:
    """Stop gradients into the input embeddings and/or the first ``encoder_layers`` encoder layers."""
    layers = model.transformer_encoder.layers
    if not 0 <= encoder_layers <= len(layers):
        raise ConfigError(f"task.freeze.encoder_layers: {encoder_layers} must be between 0 and {len(layers)}")
    frozen = []
    modules = ([("embedding", model.embedding)] if embeddings else []) + \
        [(f"transformer_encoder.layers.{i}", layers[i]) for i in range(encoder_layers)]
    for name, module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
        frozen.append(name)
    return frozen


def apply_init_from(cfg: DictConfig, task, init: CheckpointContents | None) -> dict[str, Any] | None:
    """Load ``init`` into the task's model (built now), then freeze; returns the report (also as JSON)."""
    options = _container(cfg.task.get("freeze"))
    unknown = set(options) - {"embeddings", "encoder_layers"}
    if unknown:
        raise ConfigError(f"task.freeze.{sorted(unknown)[0]}: unknown option; use embeddings and encoder_layers")
    if init is None and not any(options.values()):
        return None
    task.configure_model()  # built eagerly (not sharded at construction under ZeRO-3)
    report: dict[str, Any] = {}
    if init is not None:
        extra = list(cfg.task.get("init_skip") or [])
        skip = skip_prefixes(task.model_cfg, init.config, extra)
        expected = task.model.state_dict()
        load_state_dict_strict(task.model, init.state_dict, init.source, skip_prefixes=skip)
        fresh = sorted(k for k in expected if skip and k.startswith(skip))
        dropped = sorted(k for k in init.state_dict if skip and k.startswith(skip))
        report.update(source=init.source, kind=init.kind, skipped_prefixes=list(skip),
                      loaded=len(expected) - len(fresh), initialised=fresh, not_loaded_from_checkpoint=dropped,
                      missing=[], unexpected=[], vocab_overlap=init.metadata.get("vocab_overlap"))
        log.info("init_from=%s: loaded %d tensors; %d new under %s; %d checkpoint tensors not used",
                 init.source, report["loaded"], len(fresh), ", ".join(skip) or "-", len(dropped))
    report["frozen"] = freeze(task.model, bool(options.get("embeddings")), int(options.get("encoder_layers") or 0))
    task.init_report = report
    run_dir = Path(cfg.run_dir)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "init_report.json").write_text(json.dumps(report, indent=1))
    return report
