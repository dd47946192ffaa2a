"""``scgpt-export``: a checkpoint -> a self-contained model directory, native or original scGPT.

``native`` writes ``model.safetensors``, ``config.json`` (model config, tokenizer settings, metadata),
``vocab.json``, a ``README.md`` model card and ``checksums.sha256``. ``scgpt`` writes ``args.json``,
``vocab.json`` and ``best_model.pt`` as the original scGPT code expects them (see
``shared/specs/scgpt-format.md``), for the architectures that code supports; any other option is refused
with a message naming it.

The original ``TransformerModel`` always has a ``cls_decoder`` and its reference embedding loader builds
it with ``n_cls=1``. A model without a classifier is therefore exported with a freshly initialised
(seed 0) one-class ``cls_decoder`` of ``n_layers_cls`` layers, so that every key and shape matches that
loader; it is unused for embeddings. A model with a classifier exports its own.

Exports are written into a temporary directory beside the target and renamed into place: an error
leaves nothing behind, and an existing directory is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from scgpt.checkpoints import (CHECKSUM_FILE, NATIVE_FORMAT, NATIVE_FORMAT_VERSION, QKV_LAYOUTS, CheckpointContents,
                               build_model, native_to_original_keys, read_checkpoint, sha256_file)
from scgpt.config import ModelConfig
from scgpt.errors import CheckpointError, ConfigError, ScgptError
from scgpt.io import OneLineArgumentParser, fail, replace_directory, write_json_atomic, write_text_atomic
from scgpt.model.heads import ClassifierHead
from scgpt.model.scgpt import ScGPTModel

FORMATS = ("native", "scgpt")


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    return shlex.join([prog, *(sys.argv[1:] if argv is None else argv)])


@contextmanager
def staged_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success rename it to ``target``."""
    if target.exists() and not overwrite:
        raise ConfigError(f"{target}: already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a directory; choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        for path in staging.iterdir():
            os.chmod(path, 0o644)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# The original scGPT format
# ------------------------------------------------------------------------------------------------
def original_format_refusals(cfg: ModelConfig) -> list[str]:
    """Options the original scGPT model cannot represent, each as 'key=value: reason'."""
    checks = [
        (cfg.norm_scheme != "post", f"model.norm_scheme={cfg.norm_scheme}: the original encoder is post-norm"),
        (cfg.value_encoding != "continuous", f"model.value_encoding={cfg.value_encoding}: only 'continuous' has the "
                                             "same value inputs and weights in the original"),
        (cfg.n_batch_labels > 0, f"model.n_batch_labels={cfg.n_batch_labels}: batch-label embeddings are not exported"),
        (cfg.batch_discriminator, "model.batch_discriminator=true: the adversarial discriminator is not exported"),
        (cfg.dsbn != "off", f"model.dsbn={cfg.dsbn}: domain-specific batch norm is not exported"),
        (cfg.n_modalities > 0, f"model.n_modalities={cfg.n_modalities}: the original has no modality embedding"),
        (cfg.n_perturbation_flags > 0, f"model.n_perturbation_flags={cfg.n_perturbation_flags}: the original "
                                       "pretrained model has no perturbation embedding"),
        (cfg.n_conditions > 0, f"model.n_conditions={cfg.n_conditions}: the original has no condition embedding"),
        (cfg.layer_norm_eps != 1e-5, f"model.layer_norm_eps={cfg.layer_norm_eps}: the original uses 1e-5"),
    ]
    return [message for refused, message in checks if refused]


def original_state_dict(model: ScGPTModel, qkv_layout: str = "in_proj") -> dict[str, Tensor]:
    """The model's weights under original scGPT names, with a ``cls_decoder`` (one class if it has none)."""
    refusals = original_format_refusals(model.cfg)
    if refusals:
        raise CheckpointError(f"cannot export to --format scgpt: {'; '.join(refusals)}; use --format native")
    state = dict(model.state_dict())
    if model.cls_decoder is None:
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            head = ClassifierHead(model.cfg.d_model, 1, model.cfg.n_layers_cls)
        state.update({f"cls_decoder.{k}": v for k, v in head.state_dict().items()})
    return native_to_original_keys(state, qkv_layout, "model")


def original_args(cfg: ModelConfig, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """``args.json`` with the keys the original loaders read (and the whole-human model records)."""
    return {
        "embsize": cfg.d_model, "nheads": cfg.n_heads, "d_hid": cfg.d_hid, "nlayers": cfg.n_layers,
        "n_layers_cls": cfg.n_layers_cls, "dropout": cfg.dropout, "pad_token": tokenizer["pad_token"],
        "pad_value": tokenizer["pad_value"], "mask_value": tokenizer["mask_value"], "n_bins": tokenizer["n_bins"],
        "max_seq_len": tokenizer["max_seq_len"], "input_style": "binned", "input_emb_style": "continuous",
        "cell_emb_style": cfg.cell_emb_style, "MVC": cfg.mvc_decoder, "explicit_zero_prob": cfg.explicit_zero_prob,
        "include_zero_gene": tokenizer["include_zero_genes"], "fast_transformer": False,
    }


def write_original(directory: Path, model: ScGPTModel, contents: CheckpointContents, qkv_layout: str) -> None:
    vocab = contents.vocab
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"{contents.source}: vocabulary ids are not 0..{len(vocab) - 1} without gaps (size "
                              f"{model.cfg.vocab_size}); the original format sizes the embedding by len(vocab)")
    state = {k: v.detach().cpu().contiguous() for k, v in original_state_dict(model, qkv_layout).items()}
    write_json_atomic(directory / "args.json", original_args(model.cfg, contents.tokenizer))
    vocab.save(directory / "vocab.json")
    torch.save(state, directory / "best_model.pt")


# ------------------------------------------------------------------------------------------------
# The native format
# ------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def model_card(cfg: ModelConfig, contents: CheckpointContents, command: str) -> str:
    meta, tok, vocab = contents.metadata, contents.tokenizer, contents.vocab
    summary = meta.get("summary") or {}
    val = summary.get("val") or {}
    metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(val.items())) or "not recorded"
    rows = [
        ("architecture", f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_hid {cfg.d_hid}, "
                         f"{cfg.norm_scheme}-norm, {cfg.value_encoding} values, cell embedding {cfg.cell_emb_style}"),
        ("vocabulary", f"{len(vocab)} tokens ({len(vocab.genes)} genes)"),
        ("tokenizer", ", ".join(f"{k} {_fmt(tok[k])}" for k in ("n_bins", "max_seq_len", "pad_value", "mask_value",
                                                              "include_zero_genes"))),
        ("training data fingerprint", meta.get("data_fingerprint") or "not recorded"),
        ("global step", _fmt(meta.get("global_step", summary.get("global_step", "not recorded")))),
        ("cells seen", _fmt(meta.get("cells_seen") or summary.get("cells_seen") or "not recorded")),
        ("final validation metrics", metrics),
        ("source", f"{contents.source} ({contents.kind})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# scGPT model

An scGPT-style single-cell foundation model exported by `scgpt-export`.

| | |
|---|---|
{table}

## Files

- `model.safetensors`: the weights (native `ScGPTModel` key names)
- `config.json`: the model config (`model`), tokenizer settings (`tokenizer`) and metadata
- `vocab.json`: gene symbol -> token id
- `checksums.sha256`: `sha256sum -c checksums.sha256` verifies the files

## Use

```python
import scgpt
model, tokenizer = scgpt.load("path/to/this/directory")
embeddings = scgpt.embed(adata, "path/to/this/directory")  # (cells, {cfg.d_model}), L2-normalised
```

or `scgpt-embed cells.h5ad --model path/to/this/directory -o embedded.h5ad`.

## Made by

```
{command}
```
"""


def write_native(directory: Path, model: ScGPTModel, contents: CheckpointContents, command: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "scgpt_format": NATIVE_FORMAT})
    meta = {k: v for k, v in contents.metadata.items() if k != "summary"}
    summary = contents.metadata.get("summary") or {}
    meta.update(source=contents.source, source_kind=contents.kind, final_val_metrics=summary.get("val"))
    config = {"format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "model": model.cfg.to_dict(),
              "tokenizer": contents.tokenizer, "metadata": meta}
    write_json_atomic(directory / "config.json", config)
    contents.vocab.save(directory / "vocab.json")
    write_text_atomic(directory / "README.md", model_card(model.cfg, contents, command))
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(directory.iterdir()) if p.name != CHECKSUM_FILE)
    write_text_atomic(directory / CHECKSUM_FILE, listing)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
def export(checkpoint: str | Path, output: str | Path, fmt: str = "native", vocab: str | None = None,
           overwrite: bool = False, qkv_layout: str = "in_proj", command: str = "") -> Path:
    """Export ``checkpoint`` (any source :func:`scgpt.checkpoints.read_checkpoint` reads) to ``output``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if qkv_layout not in QKV_LAYOUTS:
        raise ConfigError(f"--qkv-layout: unknown layout {qkv_layout!r}; choose one of {', '.join(QKV_LAYOUTS)}")
    source, target = Path(checkpoint).resolve(), Path(output).resolve()
    if target == source or target in source.parents:
        raise ConfigError(f"{output}: is (or contains) the checkpoint being exported; choose another output path")
    if target.exists() and not overwrite:  # before the (possibly long) read
        raise ConfigError(f"{output}: already exists; pass --overwrite to replace it")
    contents = read_checkpoint(checkpoint, vocab)
    model = build_model(contents)
    if fmt == "scgpt":
        refusals = original_format_refusals(model.cfg)
        if refusals:
            raise CheckpointError(f"{checkpoint}: cannot export to --format scgpt: {'; '.join(refusals)}; "
                                  "use --format native")
    with staged_directory(Path(output), overwrite) as staging:
        if fmt == "native":
            write_native(staging, model, contents, command)
        else:
            write_original(staging, model, contents, qkv_layout)
    return Path(output)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="scgpt-export", description="Export a checkpoint to a model directory.")
    parser.add_argument("checkpoint", help="a Lightning .ckpt, a DeepSpeed ZeRO checkpoint directory, a native "
                                           "export or an original scGPT model directory")
    parser.add_argument("-o", "--output", required=True, help="the directory to write")
    parser.add_argument("--format", choices=FORMATS, default="native",
                        help="native (safetensors) or scgpt (args.json, vocab.json, best_model.pt)")
    parser.add_argument("--vocab", help="vocab.json the model was trained with, for checkpoints that store none")
    parser.add_argument("--qkv-layout", choices=QKV_LAYOUTS, default="in_proj",
                        help="attention key names for --format scgpt: in_proj (torch) or Wqkv (flash-attn models)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``scgpt-export``."""
    args = build_parser().parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, args.format, args.vocab, args.overwrite, args.qkv_layout,
                     command=command_line("scgpt-export", argv))
    except ScgptError as exc:
        fail(exc)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
