"""Predict cell labels of a query with a finetuned annotation model: ``scgpt-annotate`` and
``scgpt.annotate.predict_labels``.

The model is a ``last.ckpt`` of ``scgpt-train task=annotation`` or its native export: both carry the
classifier's class names and the obs field it was trained on (``cls_label_key``). Cells are tokenized
exactly as ``scgpt-embed`` does (no masking, seeded by the batch's first row). The output is a copy of the
input ``.h5ad`` (for a cell store: its obs and var) with ``obs["predicted_<label>"]`` (categorical, the
model's classes) and ``obs["predicted_<label>_confidence"]`` (the softmax probability of that class).
When the query has the label column itself, its labels must be classes the model knows, and the accuracy
of the predictions on the labelled cells is printed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from data_modules.store_format import anndata_writing
from scgpt.checkpoints import build_model, read_checkpoint
from scgpt.embed import (DEFAULT_MIN_OVERLAP, CellTokenizer, GeneMatch, RowSource, _device, _open_input,
                         check_paths, iter_cell_outputs, match_genes, output_copy, rows_of_anndata)
from scgpt.errors import CheckpointError, ConfigError, DataError, ScgptError
from scgpt.io import progress_counter


@dataclass
class Classifier:
    model: Any  # eval-mode ScGPTModel with a cls_decoder
    tokenizer: CellTokenizer
    label_key: str  # the obs field the classifier was trained on
    classes: list[str]  # class names, in the order of the logits


def load_classifier(path: str | os.PathLike, vocab: str | None = None, device: str = "cpu") -> Classifier:
    """A finetuned annotation model from a checkpoint or export; refuses one without a classifier head."""
    contents = read_checkpoint(path, vocab)
    n_classes = contents.config.n_cls_classes
    if not n_classes:
        raise CheckpointError(f"{path}: has no classifier head (n_cls_classes=0); finetune it first with "
                              "scgpt-train task=annotation init_from=<this checkpoint> and use that run's last.ckpt")
    if getattr(contents.config, "dsbn", "off") not in ("off", False, None):
        raise CheckpointError(f"{path}: uses domain-specific batch norm (model.dsbn), which needs the query's batch "
                              "among the training batches; annotate with a model finetuned without DSBN")
    label_key = contents.metadata.get("cls_label_key") or "label"
    classes = (contents.metadata.get("labels") or {}).get(label_key)
    if classes is None:
        classes = [str(i) for i in range(n_classes)]  # e.g. an original scGPT directory: no names stored
    if len(classes) != n_classes:
        raise CheckpointError(f"{path}: stores {len(classes)} class names for {label_key!r} but the classifier has "
                              f"{n_classes} outputs; export the checkpoint again")
    model = build_model(contents).to(device).eval()
    return Classifier(model, CellTokenizer(contents.vocab, contents.tokenizer), label_key, [str(c) for c in classes])


def iter_probabilities(clf: Classifier, rows: RowSource, match: GeneMatch, batch_size: int = 64,
                       device: str = "cpu", seed: int = 0, chunk_rows: int = 4096,
                       advance: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, class probabilities (n, C) float32) for consecutive blocks of rows, tokenized as
    scgpt-embed tokenizes them."""
    def probabilities(cell_emb: torch.Tensor) -> torch.Tensor:
        return torch.softmax(clf.model.cls_decoder(cell_emb).float(), dim=-1)  # (B, C)

    yield from iter_cell_outputs(clf.model, clf.tokenizer, rows, match, probabilities, batch_size, device, seed,
                                 chunk_rows, advance)


def check_query_labels(labels: pd.Series | None, clf: Classifier, name: str) -> None:
    """Refuse query labels (in the classifier's obs field) that the model never saw."""
    if labels is None:
        return
    seen = set(labels.dropna().astype(str))
    unknown = sorted(seen - set(clf.classes))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise DataError(f"{name}: obs[{clf.label_key!r}] has labels the model never saw: {shown} (it knows "
                        f"{', '.join(clf.classes)}); map them to those classes, or rename the column to predict "
                        "without comparing")


def predictions_frame(probabilities: np.ndarray, clf: Classifier, index) -> pd.DataFrame:
    """obs columns ``predicted_<key>`` (categorical over the model's classes) and ``..._confidence``."""
    column = f"predicted_{clf.label_key}"
    codes = probabilities.argmax(1) if len(probabilities) else np.zeros(0, dtype=np.int64)
    return pd.DataFrame({column: pd.Categorical.from_codes(codes, categories=clf.classes),
                         f"{column}_confidence": probabilities.max(1) if len(probabilities) else np.zeros(0)},
                        index=index)


def predict_labels(adata, model: str | os.PathLike, batch_size: int = 64, device: str = "cpu",
                   gene_column: str | None = None, min_overlap: float = DEFAULT_MIN_OVERLAP, seed: int = 0,
                   vocab: str | None = None) -> pd.DataFrame:
    """Predicted labels and confidences of an AnnData's cells (a DataFrame indexed like ``adata.obs``)."""
    clf = load_classifier(model, vocab, _device(device))
    check_query_labels(adata.obs[clf.label_key] if clf.label_key in adata.obs else None, clf, "adata")
    rows = rows_of_anndata(adata)
    match = match_genes(clf.tokenizer.vocab, rows.var_names, rows.var, gene_column, min_overlap, rows.name)
    probs = np.empty((rows.n_obs, len(clf.classes)), dtype=np.float32)
    for start, block in iter_probabilities(clf, rows, match, batch_size, device, seed):
        probs[start:start + len(block)] = block
    return predictions_frame(probs, clf, adata.obs_names)


def _query_obs(path: Path, adata) -> pd.DataFrame:
    if adata is not None:
        return adata.obs
    import anndata as ad
    import zarr

    return ad.io.read_elem(zarr.open_group(str(path), mode="r")["obs"])


def annotate_file(input_path: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike,
                  batch_size: int = 64, device: str = "cpu", gene_column: str | None = None,
                  min_overlap: float = DEFAULT_MIN_OVERLAP, overwrite: bool = False, progress: bool = True,
                  vocab: str | None = None, seed: int = 0) -> tuple[Path, float | None]:
    """The work of ``scgpt-annotate``: INPUT -> OUTPUT.h5ad with the prediction columns in obs, written
    atomically; also returns the accuracy on cells that carry the label (None when the query has none)."""
    import anndata as ad

    src, out = check_paths(input_path, output, overwrite)
    clf = load_classifier(model, vocab, _device(device))
    rows, adata = _open_input(src)
    try:
        obs = _query_obs(src, adata).copy()
        truth = obs[clf.label_key] if clf.label_key in obs else None
        check_query_labels(truth, clf, str(src))
        match = match_genes(clf.tokenizer.vocab, rows.var_names, rows.var, gene_column, min_overlap, rows.name)
        print(match.report, file=sys.stderr)
        probs = np.empty((rows.n_obs, len(clf.classes)), dtype=np.float32)
        with progress_counter(progress, rows.n_obs) as advance:
            for start, block in iter_probabilities(clf, rows, match, batch_size, device, seed, advance=advance):
                probs[start:start + len(block)] = block
        predicted = predictions_frame(probs, clf, obs.index)
        obs = obs.drop(columns=[c for c in predicted.columns if c in obs.columns]).join(predicted)
        with output_copy(src, out, rows) as f, anndata_writing():
            del f["obs"]
            ad.io.write_elem(f, "obs", obs)
    finally:
        if adata is not None:
            adata.file.close()
    accuracy = None
    if truth is not None and truth.notna().any():
        known = truth.notna().to_numpy()
        accuracy = float((predicted.iloc[:, 0].astype(str).to_numpy()[known] == truth.astype(str).to_numpy()[known]).mean())
    return out, accuracy


def build_parser():
    from scgpt.io import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="scgpt-annotate", description="Predict cell labels with a finetuned "
                                   "annotation model (scgpt-train task=annotation).")
    parser.add_argument("input", help="an .h5ad file or a cell store directory (scgpt-data convert)")
    parser.add_argument("--model", required=True, help="the annotation run's last.ckpt or its native export")
    parser.add_argument("-o", "--output", required=True,
                        help="the .h5ad to write, with obs['predicted_<label>'] and obs['predicted_<label>_confidence']")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gene-column", help="var column with gene symbols (default: the best-matching one)")
    parser.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                        help="smallest share of the input's genes that must be in the model vocabulary")
    parser.add_argument("--vocab", help="vocab.json, for a Lightning checkpoint that stores none")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``scgpt-annotate``."""
    from scgpt.io import fail

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        fail(ConfigError(f"--batch-size: {args.batch_size} must be at least 1"))
    try:
        out, accuracy = annotate_file(args.input, args.model, args.output, args.batch_size, args.device,
                                      args.gene_column, args.min_overlap, args.overwrite, not args.no_progress,
                                      args.vocab)
    except ScgptError as exc:
        fail(exc)
    if accuracy is not None:
        print(f"accuracy on the query's own labels: {accuracy:.4f}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
