"""Reading model weights safely, from every place they come from, into an :class:`ScGPTModel`.

Sources (see :func:`read_checkpoint`):

- a native export directory (``model.safetensors`` + ``config.json`` + ``vocab.json``, checksums verified),
- a Lightning checkpoint file (``last.ckpt``; state dict keys ``model.<native key>``),
- a DeepSpeed ZeRO-2/3 checkpoint directory (consolidated to fp32 on CPU; needs ``scgpt[deepspeed]``),
- an original scGPT model directory (``args.json`` + ``vocab.json`` + ``best_model.pt``), with either the
  flash-attention (``self_attn.Wqkv.*``) or the torch (``self_attn.in_proj_*``) attention key layout.

Nothing is unpickled beyond tensors (``torch.load(weights_only=True)`` or safetensors). Keys are renamed
with an explicit table and loaded strictly: missing, unexpected and shape-mismatched keys are reported
together in one :class:`~scgpt.errors.CheckpointError`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from scgpt.config import ModelConfig
from scgpt.errors import CheckpointError, ConfigError, DataError
from scgpt.model.scgpt import ScGPTModel
from scgpt.tokenizer.vocab import CLS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, GeneVocab
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)

NATIVE_FORMAT, NATIVE_FORMAT_VERSION = "scgpt-native", 1
NATIVE_FILES = ("model.safetensors", "config.json", "vocab.json")
ORIGINAL_FILES = ("args.json", "vocab.json", "best_model.pt")
CHECKSUM_FILE = "checksums.sha256"
TOKENIZER_KEYS = ("n_bins", "max_seq_len", "pad_value", "mask_value", "include_zero_genes")
LIGHTNING_PREFIX = "model."

# native prefix <-> original scGPT prefix; prefixes not listed here have no original name.
PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("embedding.encoder.", "encoder."),
    ("embedding.value_encoder.", "value_encoder."),
    ("transformer_encoder.layers.", "transformer_encoder.layers."),
    ("decoder.", "decoder."),
    ("mvc_decoder.", "mvc_decoder."),
    ("cls_decoder.", "cls_decoder."),
)
FLASH_QKV, TORCH_QKV = "self_attn.Wqkv.", "self_attn.in_proj_"  # Wqkv.weight <-> in_proj_weight
QKV_LAYOUTS = ("in_proj", "Wqkv")


# ------------------------------------------------------------------------------------------------
# What a checkpoint holds once read
# ------------------------------------------------------------------------------------------------
@dataclass
class CheckpointContents:
    state_dict: dict[str, Tensor]  # native ScGPTModel keys
    config: ModelConfig
    vocab: GeneVocab
    tokenizer: dict[str, Any]  # n_bins, max_seq_len, pad/mask values, include_zero_genes, special tokens, ids
    source: str
    kind: str  # native | lightning | deepspeed | scgpt
    metadata: dict[str, Any] = field(default_factory=dict)  # global_step, data_fingerprint, summary, ...


def tokenizer_settings(vocab: GeneVocab, base: Mapping[str, Any]) -> dict[str, Any]:
    """Complete tokenizer settings: the five values of ``base`` plus special tokens and their ids."""
    settings = {key: base[key] for key in TOKENIZER_KEYS}
    settings.update(n_bins=int(settings["n_bins"]), max_seq_len=int(settings["max_seq_len"]),
                    pad_value=float(settings["pad_value"]), mask_value=float(settings["mask_value"]),
                    include_zero_genes=bool(settings["include_zero_genes"]),
                    special_tokens=[t for t in SPECIAL_TOKENS if t in vocab], pad_token=PAD_TOKEN,
                    cls_token=CLS_TOKEN, pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id)
    return settings


# ------------------------------------------------------------------------------------------------
# Raw readers
# ------------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, disallowed global ...
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({reason}); "
                              "the file is corrupt, truncated or not a weights-only checkpoint") from None


class _ErrorKeepingWriter:
    """The file object torch.save writes through: keeps the OSError of a failed write, which torch's zip writer
    would replace by "unexpected pos" (a full disk would not be named)."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch_file(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``; a failed write (ENOSPC: disk full) raises the OS's OSError naming ``path``."""
    with open(path, "wb") as handle:
        writer = _ErrorKeepingWriter(handle)
        try:
            torch.save(obj, writer)
            handle.flush()
        except (OSError, RuntimeError) as exc:
            cause = writer.error or (exc if isinstance(exc, OSError) else None)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from exc


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning ``.ckpt`` as a dict (weights-only unpickling, on CPU)."""
    path = Path(path)
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict'); pass a last.ckpt of scgpt-train")
    return checkpoint


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def read_deepspeed_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A DeepSpeed ZeRO-2/3 checkpoint directory -> a Lightning-style dict whose ``state_dict`` is the
    consolidated fp32 weights on CPU, with the client state (hyper-parameters, ``scgpt``) alongside."""
    directory = Path(directory)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(f"{directory}: is a DeepSpeed ZeRO checkpoint; reading it needs DeepSpeed: "
                              "pip install 'scgpt[deepspeed]'") from None
    tag = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    tag_dirs = [directory / tag] if tag else sorted(p.parent for p in directory.glob("*/*model_states.pt"))
    if not tag_dirs or not tag_dirs[0].is_dir():
        raise CheckpointError(f"{directory}: no DeepSpeed tag directory with *model_states.pt files found")
    model_files = sorted(tag_dirs[0].glob("*mp_rank_00_model_states.pt"), key=lambda p: len(p.name))
    if not model_files:
        raise CheckpointError(f"{tag_dirs[0]}: no mp_rank_00_model_states.pt; the checkpoint is incomplete")
    client = _torch_load(model_files[0])
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag_dirs[0].name)
    except Exception as exc:
        raise CheckpointError(f"{directory}: cannot consolidate the ZeRO shards ({exc}); the checkpoint is "
                              "incomplete or corrupt") from None
    weights = {k.removeprefix("_forward_module."): v.float().cpu() for k, v in weights.items()}
    ds_only = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
               "dp_world_size", "mp_world_size", "param_shapes", "frozen_param_shapes", "shared_params",
               "buffer_names", "ds_config", "ds_version", "frozen_param_fragments")
    checkpoint = {k: v for k, v in client.items() if k not in ds_only}
    checkpoint["state_dict"] = weights
    return checkpoint


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt or truncated") from None


def _read_vocab(path: Path) -> GeneVocab:
    try:
        return GeneVocab.load(path)
    except DataError as exc:
        raise CheckpointError(str(exc)) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(directory: Path) -> None:
    """Check every file listed in ``checksums.sha256`` (sha256sum format); no list, no check."""
    listing = directory / CHECKSUM_FILE
    if not listing.is_file():
        return
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        expected, _, name = line.partition("  ")
        path = directory / name.strip()
        if not path.is_file() or sha256_file(path) != expected.strip():
            raise CheckpointError(f"{path}: checksum does not match {listing.name}; the file is corrupt or was "
                                  "changed after export; export it again")


# ------------------------------------------------------------------------------------------------
# Key renaming: native <-> original scGPT
# ------------------------------------------------------------------------------------------------
def _unmapped(keys: Sequence[str], source: str, direction: str) -> CheckpointError:
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return CheckpointError(f"{source}: {len(keys)} key(s) have no {direction} name: {shown}; "
                           "this architecture cannot be converted")


def native_to_original_keys(state_dict: Mapping[str, Tensor], qkv_layout: str = "in_proj",
                            source: str = "model") -> dict[str, Tensor]:
    """Rename native keys to original scGPT keys; ``qkv_layout`` ``Wqkv`` writes flash-attention names."""
    if qkv_layout not in QKV_LAYOUTS:
        raise ConfigError(f"--qkv-layout: unknown layout {qkv_layout!r}; choose one of {', '.join(QKV_LAYOUTS)}")
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        renamed = next((orig + key[len(nat):] for nat, orig in PREFIX_RENAMES if key.startswith(nat)), None)
        if renamed is None:
            unmapped.append(key)
            continue
        if qkv_layout == "Wqkv":
            renamed = renamed.replace(TORCH_QKV + "weight", FLASH_QKV + "weight").replace(
                TORCH_QKV + "bias", FLASH_QKV + "bias")
        out[renamed] = tensor
    if unmapped:
        raise _unmapped(unmapped, source, "original scGPT")
    return out


def original_to_native_keys(state_dict: Mapping[str, Tensor], source: str = "model") -> dict[str, Tensor]:
    """Rename original scGPT keys (``Wqkv`` or ``in_proj`` attention layout) to native keys."""
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        key_torch = key.replace(FLASH_QKV, TORCH_QKV)
        renamed = next((nat + key_torch[len(orig):] for nat, orig in PREFIX_RENAMES if key_torch.startswith(orig)),
                       None)
        if renamed is None:
            unmapped.append(key)
            continue
        if renamed in out:
            raise CheckpointError(f"{source}: holds both {key} and its other attention layout; keep one")
        out[renamed] = tensor
    if unmapped:
        raise _unmapped(unmapped, source, "native")
    return out


# ------------------------------------------------------------------------------------------------
# Strict loading
# ------------------------------------------------------------------------------------------------
def _listing(label: str, items: list[str]) -> str:
    return f"{len(items)} {label} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})"


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str,
                           skip_prefixes: Iterable[str] = ()) -> None:
    """Load ``state_dict`` into ``model``; any missing, unexpected or shape-mismatched key is an error.

    Keys under ``skip_prefixes`` (e.g. ``("cls_decoder.",)`` for a new classifier) are deliberately left
    as initialised and logged, not loaded.
    """
    skip = tuple(skip_prefixes)

    def skipped(key: str) -> bool:
        return bool(skip) and key.startswith(skip)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not skipped(k)]
    unexpected = [k for k in state_dict if k not in expected and not skipped(k)]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} != model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and not skipped(k)
                  and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        parts = [_listing(label, items) for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if items]
        raise CheckpointError(f"{source}: weights do not fit the model: {'; '.join(parts)}; "
                              "the checkpoint belongs to another architecture or vocabulary")
    keep = {k: v for k, v in state_dict.items() if k in expected and not skipped(k)}
    if skip:
        left = sorted(set(expected) - set(keep))
        log.info("%s: kept %d initialised tensors under %s", source, len(left), ", ".join(skip))
    model.load_state_dict(keep, strict=not skip)


# ------------------------------------------------------------------------------------------------
# Per-source readers -> CheckpointContents
# ------------------------------------------------------------------------------------------------
def _check_vocab_fits(cfg: ModelConfig, vocab: GeneVocab, source: str, where: str) -> None:
    if vocab.size != cfg.vocab_size or PAD_TOKEN not in vocab or vocab.pad_id != cfg.pad_token_id:
        pad = vocab.pad_id if PAD_TOKEN in vocab else None
        raise CheckpointError(f"{source}: the vocabulary from {where} (size {vocab.size}, <pad> id {pad}) does not "
                              f"match the model (vocab_size {cfg.vocab_size}, pad_token_id {cfg.pad_token_id}); "
                              "use the vocabulary the model was trained with")


def _model_config(values: Mapping[str, Any], source: str) -> ModelConfig:
    try:
        return ModelConfig.from_mapping(values)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source}: model config is not valid here ({exc})") from None


def _read_native(directory: Path) -> CheckpointContents:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in NATIVE_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing from the export; export the model again")
    verify_checksums(directory)
    config = _read_json(directory / "config.json")
    if not isinstance(config, dict) or config.get("format") != NATIVE_FORMAT or "model" not in config:
        raise CheckpointError(f"{directory / 'config.json'}: not an scgpt native export config")
    if int(config.get("format_version", 0)) > NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'config.json'}: format_version {config['format_version']} is newer "
                              f"than this scgpt reads ({NATIVE_FORMAT_VERSION}); upgrade scgpt")
    cfg = _model_config(config["model"], str(directory / "config.json"))
    vocab = _read_vocab(directory / "vocab.json")
    _check_vocab_fits(cfg, vocab, str(directory), "vocab.json")
    try:
        weights = load_file(directory / "model.safetensors", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'model.safetensors'}: cannot be read ({exc}); the file is corrupt "
                              "or truncated") from None
    tokenizer = tokenizer_settings(vocab, {**_defaults_from_config(cfg), **config.get("tokenizer", {})})
    return CheckpointContents(weights, cfg, vocab, tokenizer, str(directory), "native", config.get("metadata", {}))


def _defaults_from_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"n_bins": cfg.n_bins, "max_seq_len": cfg.max_seq_len, "pad_value": cfg.pad_value,
            "mask_value": cfg.mask_value, "include_zero_genes": False}


def _run_dir_settings(checkpoint_path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Tokenizer values from the run's ``config.yaml`` and its ``summary.json``, when next to ``checkpoints/``."""
    run_dir = checkpoint_path.resolve().parent.parent
    data, summary = {}, None
    if (run_dir / "config.yaml").is_file():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
            data = {k: v for k, v in (cfg.get("data") or {}).items() if k in TOKENIZER_KEYS}
        except Exception as exc:  # a broken side file must not block reading the weights
            log.warning("%s: ignored (%s)", run_dir / "config.yaml", exc)
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: not valid JSON; ignored", run_dir / "summary.json")
    return data, summary


def _from_lightning(checkpoint: dict[str, Any], path: Path, kind: str, vocab_path: str | None) -> CheckpointContents:
    source = str(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams.get("model"), Mapping):
        raise CheckpointError(f"{source}: no model hyper-parameters; not a checkpoint written by scgpt-train")
    cfg = _model_config(hparams["model"], source)
    state = {k[len(LIGHTNING_PREFIX):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith(LIGHTNING_PREFIX)}
    if not state:
        raise CheckpointError(f"{source}: has no 'model.*' weights; not a checkpoint written by scgpt-train")
    extra = checkpoint.get("scgpt") or {}
    given = _read_vocab(Path(vocab_path)) if vocab_path else None
    if extra.get("vocab"):
        try:
            vocab = GeneVocab(dict(extra["vocab"]))
        except DataError as exc:
            raise CheckpointError(f"{source}: stored vocabulary is invalid ({exc})") from None
        if given is not None and given != vocab:
            raise CheckpointError(f"{source}: --vocab {vocab_path} differs from the vocabulary stored in the "
                                  "checkpoint; drop --vocab")
        where = "the checkpoint"
    elif given is not None:
        vocab, where = given, str(vocab_path)
    else:
        raise CheckpointError(f"{source}: the checkpoint stores no vocabulary; pass the vocab.json it was trained "
                              "with as --vocab")
    _check_vocab_fits(cfg, vocab, source, where)
    run_data, summary = _run_dir_settings(path)
    tokenizer = tokenizer_settings(vocab, {**_defaults_from_config(cfg), **run_data, **(extra.get("tokenizer") or {})})
    metadata = {"global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"),
                "cells_seen": extra.get("cells_seen"), "data_fingerprint": extra.get("data_fingerprint"),
                "attention_backend": extra.get("attention_backend"), "summary": summary,
                "labels": extra.get("labels"), "cls_label_key": extra.get("cls_label_key")}  # class names (annotation)
    return CheckpointContents(state, cfg, vocab, tokenizer, source, kind, metadata)


def config_from_original_args(args: Mapping[str, Any], vocab: GeneVocab, state_dict: Mapping[str, Tensor],
                              source: str) -> ModelConfig:
    """Map an original ``args.json`` (plus what the weights show) to a :class:`ModelConfig`."""
    missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
    if missing:
        raise CheckpointError(f"{source}: lacks {', '.join(missing)}; not an scGPT args.json")
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise CheckpointError(f"{source}: input_emb_style {style!r} is not supported for import (only continuous)")
    if args.get("pre_norm"):
        raise CheckpointError(f"{source}: pre_norm models are not supported for import")
    pad_token = args.get("pad_token", PAD_TOKEN)
    if pad_token not in vocab:
        raise CheckpointError(f"{source}: pad_token {pad_token!r} is not in vocab.json")
    classifier = state_dict.get("cls_decoder.out_layer.weight")
    values = dict(
        vocab_size=vocab.size, pad_token_id=vocab[pad_token], d_model=int(args["embsize"]),
        n_heads=int(args["nheads"]), d_hid=int(args["d_hid"]), n_layers=int(args["nlayers"]),
        n_layers_cls=int(args.get("n_layers_cls", 3)), dropout=float(args.get("dropout", 0.2)),
        pad_value=float(args.get("pad_value", -2)), mask_value=float(args.get("mask_value", -1)),
        n_bins=int(args.get("n_bins", 51)), max_seq_len=int(args.get("max_seq_len", 1200)),
        value_encoding="continuous", cell_emb_style=str(args.get("cell_emb_style", "cls")),
        explicit_zero_prob=bool(args.get("explicit_zero_prob", "decoder.zero_logit.0.weight" in state_dict)),
        mvc_decoder=bool(args.get("MVC", any(k.startswith("mvc_decoder.") for k in state_dict))),
        n_cls_classes=0 if classifier is None else int(classifier.shape[0]),
    )
    return _model_config(values, source)


def _read_original(directory: Path) -> CheckpointContents:
    for name in ORIGINAL_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing; an original scGPT directory holds "
                                  f"{', '.join(ORIGINAL_FILES)}")
    args = _read_json(directory / "args.json")
    if not isinstance(args, dict):
        raise CheckpointError(f"{directory / 'args.json'}: expected a JSON object")
    vocab = _read_vocab(directory / "vocab.json")
    weights = _torch_load(directory / "best_model.pt")
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{directory / 'best_model.pt'}: not a plain state_dict of tensors")
    state = original_to_native_keys(weights, str(directory / "best_model.pt"))
    cfg = config_from_original_args(args, vocab, state, str(directory / "args.json"))
    tokenizer = tokenizer_settings(vocab, {**_defaults_from_config(cfg),
                                           "include_zero_genes": bool(args.get("include_zero_gene", False))})
    return CheckpointContents(state, cfg, vocab, tokenizer, str(directory), "scgpt", {})


def read_checkpoint(path: str | Path, vocab_path: str | None = None) -> CheckpointContents:
    """Read any supported source (see the module docstring) without building a model."""
    path = Path(path)
    if path.is_file():
        return _from_lightning(read_lightning_checkpoint(path), path, "lightning", vocab_path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or model directory")
    if (path / "config.json").is_file() or (path / "model.safetensors").is_file():
        return _read_native(path)
    if (path / "args.json").is_file() or (path / "best_model.pt").is_file():
        return _read_original(path)
    if is_deepspeed_checkpoint(path):
        return _from_lightning(read_deepspeed_checkpoint(path), path, "deepspeed", vocab_path)
    raise CheckpointError(f"{path}: not a model directory: expected a native export ({', '.join(NATIVE_FILES)}), "
                          f"an original scGPT directory ({', '.join(ORIGINAL_FILES)}) or a DeepSpeed checkpoint")


def build_model(contents: CheckpointContents, attention_backend: str | None = "sdpa") -> ScGPTModel:
    """An eval-mode :class:`ScGPTModel` with the checkpoint's weights, loaded strictly."""
    cfg = contents.config
    if attention_backend is not None:
        cfg = replace(cfg, attention_backend=attention_backend)
    model = ScGPTModel(cfg)
    load_state_dict_strict(model, contents.state_dict, contents.source)
    return model.eval()


def load_pretrained(path: str | Path, vocab: str | None = None,
                    attention_backend: str | None = "sdpa") -> tuple[ScGPTModel, GeneVocab, dict[str, Any]]:
    """-> (eval-mode model on CPU, vocabulary, tokenizer settings) from any supported source.

    ``vocab`` (a vocab.json path) is used only for a Lightning / DeepSpeed checkpoint that stores none.
    ``attention_backend`` replaces the recorded one (weights do not depend on it); None keeps it.
    """
    contents = read_checkpoint(path, vocab)
    return build_model(contents, attention_backend), contents.vocab, contents.tokenizer


def vocab_overlap_report(vocab: GeneVocab, gene_names: Sequence[str]) -> str:
    """One line: how many of the data's genes the vocabulary knows, with a few unknown examples."""
    names = [str(g) for g in gene_names]
    known = [g in vocab and g not in SPECIAL_TOKENS for g in names]
    n_known, n = sum(known), len(names)
    share = n_known / n if n else 0.0
    genes_in_vocab = len(vocab) - sum(t in vocab for t in SPECIAL_TOKENS)
    line = (f"{n_known} of {n} genes ({share:.1%}) are in the model vocabulary "
            f"({n_known / max(genes_in_vocab, 1):.1%} of its {genes_in_vocab} genes)")
    unknown = [g for g, k in zip(names, known) if not k][:3]
    return line + (f"; not in it, e.g. {', '.join(unknown)}" if unknown else "")
