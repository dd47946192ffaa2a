"""Cell embeddings from a pretrained model: ``scgpt.embed(adata, model_dir)`` and ``scgpt-embed``.

Cells are tokenized as in training (per-cell quantile binning, at most ``max_seq_len`` tokens including
``<cls>``) but nothing is masked; every random choice (tie-breaking between equal bin edges, sampling
genes from cells with more than ``max_seq_len - 1``) comes from a generator seeded by (seed, first row of
the batch), so the same input and batch size give the same embedding. Quantile binning depends only on
the order of a cell's non-zero values, so raw counts and log-normalised values give the same tokens;
negative values (scaled data) are treated as zero.

Rows are read ``chunk_rows`` at a time (a backed ``.h5ad`` or a Zarr cell store), so memory is bounded by
the chunk, not by the file. The CLI copies the input ``.h5ad`` and adds ``obsm["X_scgpt"]`` to the copy
(obs, var, X and the rest kept), streaming the embedding into it; for a store input the output holds obs,
var and the embedding (no X).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from data_modules.collate import CellCollator, CollatorConfig
from data_modules.modality import RNA, SPECIAL, feature_types_of, modality_codes
from scgpt.checkpoints import load_pretrained, vocab_overlap_report
from scgpt.errors import CheckpointError, ConfigError, DataError, ScgptError
from scgpt.io import atomic_path, progress_counter, rank_zero_logger
from scgpt.model.layout import TokenLayout
from scgpt.seeding import make_generator
from scgpt.tokenizer.vocab import SPECIAL_TOKENS, GeneVocab

log = rank_zero_logger(__name__)

OBSM_KEY = "X_scgpt"
GENE_NAME_COLUMNS = ("gene_ids", "feature_name", "gene_symbols", "gene_name")  # tried after var_names
DEFAULT_MIN_OVERLAP = 0.5
EMBED_STREAM = 104_729  # seed coordinate of embedding batches, apart from training streams


@dataclass
class CellTokenizer:
    """The vocabulary and tokenizer settings of a pretrained model; builds mask-free collators."""

    vocab: GeneVocab
    settings: dict[str, Any]

    def collator(self, gene_universe: np.ndarray | None = None,
                 gene_modality: np.ndarray | None = None) -> CellCollator:
        """``gene_modality``: modality id of every vocabulary id, for models with a modality embedding."""
        s = self.settings
        cfg = CollatorConfig(pad_token_id=s["pad_token_id"], cls_token_id=s["cls_token_id"],
                             max_seq_len=s["max_seq_len"], n_bins=s["n_bins"], mask_ratios=(0.0,),
                             mask_value=s["mask_value"], pad_value=s["pad_value"],
                             include_zero_genes=s["include_zero_genes"], generative_fraction=0.0, layout="padded")
        return CellCollator(cfg, gene_universe=gene_universe if s["include_zero_genes"] else None,
                            gene_modality=gene_modality)


def load(path: str | os.PathLike, vocab: str | None = None, attention_backend: str | None = "sdpa"):
    """-> (eval-mode ScGPTModel, CellTokenizer) from a native export, a Lightning checkpoint or an original
    scGPT directory (see :func:`scgpt.checkpoints.load_pretrained`)."""
    model, gene_vocab, settings = load_pretrained(path, vocab, attention_backend)
    if model.cfg.dsbn != "off":
        raise CheckpointError(f"{path}: model.dsbn={model.cfg.dsbn}: the model normalises each batch with its own "
                              "statistics and scgpt-embed has no batch labels; embed with scgpt-train task=embed "
                              f"init_from={path} (data.label_keys with the batch column)")
    return model, CellTokenizer(gene_vocab, settings)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class RowSource:
    """Rows of an expression matrix read a block at a time."""

    n_obs: int
    var_names: list[str]
    var: Any  # pandas DataFrame
    read: Callable[[int, int], Any]  # (start, stop) -> dense array or sparse matrix (cells x genes)
    name: str


def rows_of_anndata(adata, name: str = "adata", layer: str | None = None) -> RowSource:
    """Rows of ``adata.X``, or of ``adata.layers[layer]`` (counts kept in a layer)."""
    if layer is None:
        return RowSource(adata.n_obs, [str(g) for g in adata.var_names], adata.var, lambda a, b: adata.X[a:b], name)
    if layer not in adata.layers:
        raise DataError(f"{name}: no layer {layer!r}; available: {', '.join(map(str, adata.layers)) or 'none'} "
                        "(or layer=None to read X)")
    matrix = adata.layers[layer]
    return RowSource(adata.n_obs, [str(g) for g in adata.var_names], adata.var, lambda a, b: matrix[a:b],
                     f"{name} layer {layer!r}")


def rows_of_store(path: Path) -> RowSource:
    from data_modules.store import CellStore

    store = CellStore(path)
    return RowSource(store.n_cells, store.var_names, store.var, store.read_counts, str(path))


@dataclass
class GeneMatch:
    columns: np.ndarray  # (G,) input columns that are used
    gene_ids: np.ndarray  # (G,) their vocabulary ids
    source: str  # "var_names" or the var column that matched
    report: str


def match_genes(vocab: GeneVocab, var_names: Sequence[str], var, gene_column: str | None,
                min_overlap: float, name: str) -> GeneMatch:
    """Map the input's genes to the vocabulary by name, choosing the best-matching of var_names and the
    usual gene name / Ensembl id columns (or exactly ``gene_column``)."""
    if gene_column is not None:
        if gene_column not in var.columns:
            raise DataError(f"{name}: var has no column {gene_column!r}; available: "
                            f"{', '.join(map(str, var.columns)) or 'none'} (or omit --gene-column to use var_names)")
        candidates = {gene_column: [str(g) for g in var[gene_column]]}
    else:
        candidates = {"var_names": list(var_names)}
        candidates.update({c: [str(g) for g in var[c]] for c in GENE_NAME_COLUMNS if c in var.columns})
    specials = set(SPECIAL_TOKENS)
    scored = {}
    for source, names in candidates.items():
        ids = vocab.encode(names)
        ids[[n in specials for n in names]] = -1
        scored[source] = (int((ids >= 0).sum()), ids, names)
    source = max(scored, key=lambda s: scored[s][0])  # ties keep the first (var_names)
    n_known, ids, names = scored[source]
    report = f"{name}: genes matched by {source}: {vocab_overlap_report(vocab, names)}"
    if not names or n_known / len(names) < min_overlap:
        raise DataError(f"{report}; that is below the minimum overlap {min_overlap:.0%}: pass --gene-column with "
                        "the var column holding gene symbols, or a model whose vocabulary fits these genes")
    _refuse_duplicate_genes(ids, names, source, name)
    columns = np.flatnonzero(ids >= 0)
    return GeneMatch(columns, ids[columns], source, report)


def _refuse_duplicate_genes(ids: np.ndarray, names: Sequence[str], source: str, name: str) -> None:
    """Two input columns naming the same vocabulary gene: one line, never a silent choice between them
    (the converter refuses them too; genes outside the vocabulary are ignored anyway)."""
    genes, columns = np.unique(ids[ids >= 0], return_counts=True)
    repeated = genes[columns > 1]
    if repeated.size:
        examples = sorted({names[i] for i in np.flatnonzero(np.isin(ids, repeated))})[:5]
        column = "adata.var_names" if source == "var_names" else f"adata.var[{source!r}]"
        raise DataError(f"{name}: {repeated.size} genes of the vocabulary name more than one column of {source} "
                        f"(e.g. {', '.join(examples)}); sum the duplicate columns or keep one of each, e.g. "
                        f"adata = adata[:, ~{column}.duplicated()]")


# ------------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------------
def gene_modality_table(vocab: GeneVocab, match: GeneMatch, var, name: str) -> np.ndarray:
    """Modality id of every vocabulary id from the input's ``feature_type`` column (RNA where it has none),
    as the training data module builds it (data_modules.modality.vocab_modalities)."""
    types = feature_types_of(var)
    codes = np.full(len(match.columns), RNA, dtype=np.int64) if types is None else \
        modality_codes(types[match.columns], name)
    table = np.full(vocab.size, SPECIAL, dtype=np.int64)
    table[match.gene_ids] = codes
    return table


def _cells(block, match: GeneMatch) -> tuple[list[dict], int]:
    """A block of rows -> collator cells over the matched genes; also the number of negative values."""
    x = sp.csr_matrix(block[:, match.columns] if sp.issparse(block) else np.asarray(block)[:, match.columns],
                      dtype=np.float32)
    negative = int((x.data < 0).sum())
    x.data[x.data < 0] = 0
    x.eliminate_zeros()
    cells = [{"gene_ids": match.gene_ids[x.indices[x.indptr[i]:x.indptr[i + 1]]],
              "counts": x.data[x.indptr[i]:x.indptr[i + 1]]} for i in range(x.shape[0])]
    return cells, negative


def _tokenize(collator: CellCollator, cells: list[dict], generator: torch.Generator, tokenizer: CellTokenizer):
    """(gene ids, values, padding mask, modality ids or None) for a batch, also when no cell has any
    expressed gene."""
    if collator.cfg.include_zero_genes or any(len(c["gene_ids"]) for c in cells):
        batch = collator(cells, generator)
        return batch.gene_ids, batch.values, batch.padding_mask, batch.modality_ids
    s = tokenizer.settings  # only <cls>: the collator cannot bin an empty batch
    n = len(cells)
    modality = None if collator.gene_modality is None else torch.full((n, 1), SPECIAL)
    return (torch.full((n, 1), s["cls_token_id"]), torch.full((n, 1), s["pad_value"]),
            torch.zeros(n, 1, dtype=torch.bool), modality)


def iter_cell_outputs(model, tokenizer: CellTokenizer, rows: RowSource, match: GeneMatch,
                      head: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64, device: str = "cpu",
                      seed: int = 0, chunk_rows: int = 4096,
                      advance: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, float32 ``head(cell embeddings (n, D))``) for consecutive blocks of rows.

    Cells are tokenized without masking; each batch's random choices come from (seed, its first row). A
    model with a modality embedding gets each token's modality from the input's ``feature_type`` column."""
    modality = gene_modality_table(tokenizer.vocab, match, rows.var, rows.name) if model.cfg.n_modalities else None
    collator = tokenizer.collator(gene_universe=match.gene_ids, gene_modality=modality)
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)
    negatives = 0
    for chunk_start in range(0, rows.n_obs, chunk_rows):
        cells, negative = _cells(rows.read(chunk_start, min(chunk_start + chunk_rows, rows.n_obs)), match)
        negatives += negative
        out = []
        for offset in range(0, len(cells), batch_size):
            batch_cells = cells[offset:offset + batch_size]
            generator = make_generator(seed, EMBED_STREAM, chunk_start + offset)
            gene_ids, values, padding, modality_ids = _tokenize(collator, batch_cells, generator, tokenizer)
            with torch.inference_mode():
                _, _, cell_emb = model.encode(gene_ids.to(device), values.to(device),
                                              TokenLayout(padding_mask=padding.to(device)),
                                              modality_ids=None if modality_ids is None else modality_ids.to(device))
                out.append(head(cell_emb).float().cpu().numpy())  # (B, ...)
            if advance is not None:
                advance(len(batch_cells))
        yield chunk_start, np.concatenate(out).astype(np.float32, copy=False)
    if negatives:
        log.warning("%s: %d negative values were treated as zero; pass raw or log-normalised counts", rows.name,
                    negatives)


def iter_embeddings(model, tokenizer: CellTokenizer, rows: RowSource, match: GeneMatch, batch_size: int = 64,
                    device: str = "cpu", seed: int = 0, chunk_rows: int = 4096,
                    advance: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, L2-normalised float32 embeddings (n, D)) for consecutive blocks of rows."""
    def normalised(cell_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(cell_emb.float(), dim=-1)  # (B, D)

    yield from iter_cell_outputs(model, tokenizer, rows, match, normalised, batch_size, device, seed, chunk_rows,
                                 advance)


def _device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device: unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def _prepare(model, batch_size: int, device: str | None, vocab: str | None):
    """(model on its device, tokenizer, device) from a path to load or a loaded ``(model, tokenizer)``."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size: {batch_size} must be at least 1")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load(model, vocab)
        device = _device(device or "cpu")
        return model.to(device).eval(), tokenizer, device
    if not (isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], CellTokenizer)):
        raise ConfigError(f"model: got {type(model).__name__}; pass a model path or the (model, tokenizer) "
                          "pair scgpt.load returns")
    model, tokenizer = model
    if vocab is not None:
        raise ConfigError("vocab: only for a model path; a loaded model already has its vocabulary")
    device = _device(device) if device else str(next(model.parameters()).device)
    return model.to(device), tokenizer, device


def embed(adata, model, batch_size: int = 64, device: str | None = None,
          gene_column: str | None = None, min_overlap: float = DEFAULT_MIN_OVERLAP, seed: int = 0,
          progress: bool = False, vocab: str | None = None, layer: str | None = None) -> np.ndarray:
    """Cell embeddings (n_obs, d_model), L2-normalised float32, of an AnnData (in memory or backed) or an
    ``.h5ad`` path (opened backed).

    ``model``: a directory or file :func:`load` reads (loaded on each call), or what :func:`scgpt.load`
    returned, ``(model, tokenizer)``, to embed many datasets with one load; a loaded model runs on its own
    device unless ``device`` says otherwise, and is left in the train/eval mode it came in.
    ``layer``: read the counts from ``adata.layers[layer]`` instead of ``adata.X``."""
    model, tokenizer, device = _prepare(model, batch_size, device, vocab)
    opened = isinstance(adata, (str, os.PathLike))
    if opened:
        adata = _read_h5ad_backed(Path(adata))
    training = model.training
    try:
        rows = rows_of_anndata(adata, str(adata.filename) if adata.isbacked else "adata", layer)
        match = match_genes(tokenizer.vocab, rows.var_names, rows.var, gene_column, min_overlap, rows.name)
        log.info(match.report)
        out = np.empty((rows.n_obs, model.cfg.d_model), dtype=np.float32)
        model.eval()
        with progress_counter(progress, rows.n_obs) as advance:
            for start, block in iter_embeddings(model, tokenizer, rows, match, batch_size, device, seed,
                                                advance=advance):
                out[start:start + len(block)] = block
    finally:
        model.train(training)
        if opened:
            adata.file.close()
    return out


def _read_h5ad_backed(path: Path):
    import anndata as ad

    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing .h5ad")
    try:
        return ad.read_h5ad(path, backed="r")
    except Exception as exc:  # h5py / anndata raise many types for a corrupt file
        raise DataError(f"{path}: cannot be read as .h5ad ({type(exc).__name__}); check the file") from None


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _open_input(path: Path):
    """-> (RowSource, the backed AnnData or None for a store)."""
    if path.is_dir():
        if not (path / "zarr.json").is_file():
            raise DataError(f"{path}: a directory but not a cell store (no zarr.json); pass an .h5ad or a store "
                            "written by scgpt-data convert")
        return rows_of_store(path), None
    if path.suffix != ".h5ad":
        raise DataError(f"{path}: unsupported input; pass an .h5ad file or a cell store directory")
    adata = _read_h5ad_backed(path)
    return rows_of_anndata(adata, str(path)), adata


def _output_skeleton(path: Path, out_tmp: Path, rows: RowSource) -> None:
    """The output file before its embedding: a copy of the .h5ad, or obs and var of a store."""
    import anndata as ad

    if not path.is_dir():
        shutil.copyfile(path, out_tmp)
        return
    import zarr

    from data_modules.store_format import anndata_writing

    obs = ad.io.read_elem(zarr.open_group(str(path), mode="r")["obs"])
    with anndata_writing():
        ad.AnnData(obs=obs, var=rows.var).write_h5ad(out_tmp)


def _write_umap(embedding: np.ndarray, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import umap
    except ImportError:
        print(f"skipping --umap {png}: needs umap-learn and matplotlib (pip install umap-learn matplotlib)",
              file=sys.stderr)
        return
    coords = umap.UMAP(random_state=0).fit_transform(embedding)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(coords[:, 0], coords[:, 1], s=2, linewidths=0)
    ax.set(xticks=[], yticks=[], title="scGPT cell embeddings (UMAP)")
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=150)
    finally:
        plt.close(fig)


def check_paths(input_path: str | os.PathLike, output: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """(input, output) of a CLI that writes a copy of its input as .h5ad: refuses a bad suffix, the input
    itself, an existing output without ``overwrite`` and a missing input."""
    src, out = Path(input_path), Path(output)
    if out.suffix != ".h5ad":
        raise ConfigError(f"-o {out}: the output must be an .h5ad file")
    if out.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"-o {out}: is the input file; write to another path")
    if out.exists() and not overwrite:
        raise ConfigError(f"-o {out}: already exists; pass --overwrite to replace it")
    if not src.exists():
        raise DataError(f"{src}: no such file or store")
    return src, out


@contextlib.contextmanager
def output_copy(src: Path, out: Path, rows: "RowSource"):
    """An open h5py file on a temporary copy of the input (obs and var of a store) beside ``out``; renamed
    to ``out`` only when the block ends without an error, else removed."""
    import h5py

    with atomic_path(out) as tmp:
        _output_skeleton(src, tmp, rows)
        with h5py.File(tmp, "r+") as f:
            yield f


def embed_file(input_path: str | os.PathLike, model_dir: str | os.PathLike, output: str | os.PathLike,
               batch_size: int = 64, device: str = "cpu", gene_column: str | None = None,
               min_overlap: float = DEFAULT_MIN_OVERLAP, overwrite: bool = False, umap_png: str | None = None,
               progress: bool = True, vocab: str | None = None, seed: int = 0) -> Path:
    """The work of ``scgpt-embed``: INPUT -> OUTPUT.h5ad with ``obsm["X_scgpt"]``, written atomically."""

    src, out = check_paths(input_path, output, overwrite)
    if umap_png and not Path(umap_png).resolve().parent.is_dir():
        raise ConfigError(f"--umap {umap_png}: its directory does not exist")
    rows, adata = _open_input(src)
    model, tokenizer, device = _prepare(model_dir, batch_size, device, vocab)
    match = match_genes(tokenizer.vocab, rows.var_names, rows.var, gene_column, min_overlap, rows.name)
    print(match.report, file=sys.stderr)
    with output_copy(src, out, rows) as f:
        obsm = f.require_group("obsm")
        obsm.attrs.setdefault("encoding-type", "dict")
        obsm.attrs.setdefault("encoding-version", "0.1.0")
        if OBSM_KEY in obsm:
            del obsm[OBSM_KEY]
        dataset = obsm.create_dataset(OBSM_KEY, shape=(rows.n_obs, model.cfg.d_model), dtype="float32")
        dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
        with progress_counter(progress, rows.n_obs) as advance:
            for start, block in iter_embeddings(model, tokenizer, rows, match, batch_size, device, seed,
                                                advance=advance):
                dataset[start:start + len(block)] = block
        embedding = dataset[:] if umap_png else None
        if adata is not None:
            adata.file.close()
    if umap_png:
        _write_umap(embedding, Path(umap_png))
    return out


def build_parser():
    from scgpt.io import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="scgpt-embed", description="Embed cells with a pretrained model.")
    parser.add_argument("input", help="an .h5ad file or a cell store directory (scgpt-data convert)")
    parser.add_argument("--model", required=True, help="a native export, Lightning checkpoint or scGPT directory")
    parser.add_argument("-o", "--output", required=True, help="the .h5ad to write, with obsm['X_scgpt']")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--gene-column", help="var column with gene symbols (default: the best of var_names, "
                                              f"{', '.join(GENE_NAME_COLUMNS)})")
    parser.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                        help="smallest share of the input's genes that must be in the model vocabulary")
    parser.add_argument("--vocab", help="vocab.json, for a Lightning checkpoint that stores none")
    parser.add_argument("--umap", metavar="PNG", help="also draw a UMAP of the embeddings (needs umap-learn)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``scgpt-embed``."""
    from scgpt.io import fail

    args = build_parser().parse_args(argv)
    try:
        out = embed_file(args.input, args.model, args.output, args.batch_size, args.device, args.gene_column,
                         args.min_overlap, args.overwrite, args.umap, not args.no_progress, args.vocab)
    except ScgptError as exc:
        fail(exc)
    print(out)
    return 0



class _CallableModule(types.ModuleType):
    """Makes ``scgpt.embed(adata, model_dir, ...)`` call :func:`embed` while ``scgpt.embed`` stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
