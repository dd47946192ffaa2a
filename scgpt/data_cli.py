"""``scgpt-data``: convert raw counts into cell stores, write synthetic stores, inspect stores, build vocabularies.

Every user error prints ``error: <message>`` as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scgpt.errors import ScgptError
from scgpt.io import error_line

PROG = "scgpt-data"


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="validate inputs and write one shuffled cell store")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".h5ad, 10x .h5, mtx directory, .csv/.tsv")
    p.add_argument("-o", "--out", required=True, help="output store directory (e.g. cells.zarr)")
    p.add_argument("--vocab", help="vocabulary JSON; default: built from the input genes and kept in the store")
    p.add_argument("--gene-column", help="var column holding gene names (10x/mtx: 'name' or 'gene_ids')")
    p.add_argument("--layer", help="h5ad layer holding raw counts ('raw' for .raw.X); default X")
    p.add_argument("--obs-keys", type=_comma_list, help="obs columns to keep, comma separated; default all shared")
    p.add_argument("--min-vocab-overlap", type=_share, default=0.5, help="least share of genes in the vocabulary")
    p.add_argument("--chunk-cells", type=_positive, default=10_000, help="cells read and shuffled per chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time row shuffle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    p = sub.add_parser("synth", help="write the synthetic ground-truth dataset as a store")
    p.add_argument("--cells", type=_positive, required=True, help="number of cells to sample")
    p.add_argument("--genes", type=_positive, required=True, help="number of genes (named SYN00000, SYN00001, ...)")
    p.add_argument("--cell-types", type=_positive, default=5,
                   help="cell types (obs cell_type), each with its own gene programmes (default %(default)s)")
    p.add_argument("--batches", type=_positive, default=1,
                   help="batches (obs batch), each with its own gene and library-size effect (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and the row shuffle (default %(default)s)")
    p.add_argument("-o", "--out", required=True, help="output store directory (e.g. synthetic.zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    p = sub.add_parser("inspect", help="summarise a store")
    p.add_argument("store", help="a cell store directory")
    p.add_argument("--vocab", help="report the overlap of the store's genes with this vocabulary")
    p.add_argument("--verify", action="store_true",
                   help="read every value: recompute the fingerprint and check the chunks (as verify does)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("verify", help="check stores: every chunk's checksum, every value, the fingerprint")
    p.add_argument("stores", nargs="+", metavar="STORE", help="cell store directories")

    p = sub.add_parser("vocab", help="a vocabulary JSON from the genes of stores or gene lists")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--stores", nargs="+", metavar="STORE", help="cell stores whose genes make the vocabulary")
    group.add_argument("--genes", nargs="+", metavar="FILE",
                       help="text files with one gene per line, or vocabulary .json files")
    p.add_argument("-o", "--out", required=True, help="output vocabulary JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def _print_report(report) -> None:
    print(f"wrote {report.path}")
    print(f"  cells written : {report.n_cells}")
    print(f"  cells dropped : {report.n_cells_dropped} (no counts in vocabulary genes)")
    print(f"  genes matched : {report.n_genes} of {report.n_genes_input}")
    print(f"  nonzeros      : {report.nnz}")
    if report.n_values_rounded:
        from data_modules.convert import ROUNDING_TOLERANCE

        print(f"  rounded       : {report.n_values_rounded} float counts within {ROUNDING_TOLERANCE:g} (relative) "
              "of an integer, taken as that integer")
    print(f"  fingerprint   : {report.fingerprint}")
    print(f"  seconds       : {report.seconds:.1f}")


def _convert(args: argparse.Namespace, created_by: str) -> None:
    from data_modules.convert import convert_to_store

    report = convert_to_store(
        args.inputs, args.out, vocab=args.vocab, gene_column=args.gene_column, layer=args.layer,
        obs_keys=args.obs_keys, min_vocab_overlap=args.min_vocab_overlap, chunk_cells=args.chunk_cells,
        seed=args.seed, overwrite=args.overwrite, created_by=created_by, progress=sys.stderr.isatty(),
    )
    _print_report(report)


def _synth(args: argparse.Namespace, created_by: str) -> None:
    from data_modules.convert import write_store
    from data_modules.synthetic import make_synthetic_adata
    from scgpt.errors import DataError

    if Path(args.out).exists() and not args.overwrite:  # fail before sampling
        raise DataError(f"{args.out}: output exists; pass --overwrite to replace it")
    adata = make_synthetic_adata(n_cells=args.cells, n_genes=args.genes, n_cell_types=args.cell_types,
                                 n_batches=args.batches, seed=args.seed)
    report = write_store(adata, args.out, seed=args.seed, overwrite=args.overwrite, created_by=created_by,
                         name="synthetic", progress=sys.stderr.isatty(), uns=dict(adata.uns))
    _print_report(report)


def inspect_store(path: str, vocab_path: str | None = None, verify: bool = False) -> dict:
    """The summary ``scgpt-data inspect`` prints."""
    from data_modules.store import CellStore
    from scgpt.tokenizer.vocab import GeneVocab

    store = CellStore(path)
    per_cell = store.nnz_per_cell()
    summary = {
        "path": str(store.path), "cells": store.n_cells, "genes": store.n_genes, "nnz": store.nnz,
        "nnz_per_cell": {"mean": float(per_cell.mean()), "median": float(np.median(per_cell)),
                         "min": int(per_cell.min()), "max": int(per_cell.max())},
        "obs_columns": {c: (len(store.label_categories(c)) if store.is_categorical(c) else "numeric")
                        for c in store.obs_columns},
        "shuffle_seed": store.meta.get("shuffle_seed"), "created_by": store.meta.get("created_by"),
        "fingerprint": store.fingerprint, "format_version": store.meta.get("format_version"),
        "checksums": store.has_checksums,
    }
    if vocab_path is not None:
        known = int((GeneVocab.load(vocab_path).encode(store.var_names) >= 0).sum())
        summary["vocab_overlap"] = {"vocab": vocab_path, "matched": known, "share": known / store.n_genes}
    if verify:
        from data_modules.integrity import verify_store

        result = verify_store(store, report=lambda line: None, progress=sys.stderr.isatty())
        summary["fingerprint_verified"], summary["problems"] = result.fingerprint_matches, result.problems
    return summary


def _inspect(args: argparse.Namespace, created_by: str) -> None:
    summary = inspect_store(args.store, args.vocab, args.verify)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    npc = summary["nnz_per_cell"]
    print(f"store        : {summary['path']}")
    print(f"cells        : {summary['cells']}")
    print(f"genes        : {summary['genes']}")
    print(f"nonzeros     : {summary['nnz']} (per cell: mean {npc['mean']:.1f}, median {npc['median']:.0f}, "
          f"min {npc['min']}, max {npc['max']})")
    if "vocab_overlap" in summary:
        ov = summary["vocab_overlap"]
        print(f"vocab overlap: {ov['matched']} of {summary['genes']} genes ({100 * ov['share']:.1f}%) in {ov['vocab']}")
    columns = [f"{c} (numeric)" if n == "numeric" else f"{c} ({n} categor{'y' if n == 1 else 'ies'})"
               for c, n in summary["obs_columns"].items()]
    print("obs columns  : " + (", ".join(columns) or "none"))
    print(f"shuffle seed : {summary['shuffle_seed']}")
    print("checksums    : " + ("crc32c per chunk of X" if summary["checksums"] else
                                f"none (store format {summary['format_version']}, written before checksums; "
                                "convert it again to add them)"))
    verified = summary.get("fingerprint_verified", "unchecked")
    print(f"fingerprint  : {summary['fingerprint']} " + {
        "unchecked": "(not checked: --verify or scgpt-data verify reads the data to check it)",
        True: "(verified)", False: "(MISMATCH: the data changed)",
        None: "(not recomputed: some chunks cannot be read)"}[verified])
    for line in summary.get("problems", [])[:10]:
        print(f"problem      : {line}")
    if len(summary.get("problems", [])) > 10:
        print(f"problem      : ... and {len(summary['problems']) - 10} more (scgpt-data verify lists them)")


def _verify(args: argparse.Namespace, created_by: str) -> None:
    from data_modules.integrity import verify_store
    from data_modules.store import CellStore
    from scgpt.errors import DataError

    damaged = []
    for path in args.stores:
        store = CellStore(path)
        result = verify_store(store, report=lambda line: print(line, flush=True), progress=sys.stderr.isatty())
        if result.clean:
            print(f"{store.path}: clean ({store.n_cells} cells, {store.nnz} values: every value a non-negative "
                  "integer, fingerprint matches, " + ("every chunk's checksum matches)" if result.checksums
                                                      else "no chunk checksums in this format 1 store)"))
        else:
            n = len(result.problems)
            damaged.append(f"{store.path} ({n} problem{'s' if n > 1 else ''})")
    if damaged:
        raise DataError(f"{', '.join(damaged)}: verification failed (each problem listed above); restore the "
                        "store from a copy or convert it again")


def _read_gene_list(path: str) -> list[str]:
    from scgpt.errors import DataError
    from scgpt.tokenizer.vocab import GeneVocab

    if path.endswith(".json"):  # an existing vocabulary: its genes in id order
        return GeneVocab.load(path).genes
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the gene list ({e}); pass a text file with one gene per line") from None
    return [line.strip() for line in lines if line.strip()]


def _vocab(args: argparse.Namespace, created_by: str) -> None:
    import pandas as pd

    from data_modules.store import CellStore
    from scgpt.errors import DataError
    from scgpt.tokenizer.vocab import SPECIAL_TOKENS, GeneVocab

    if Path(args.out).exists() and not args.overwrite:
        raise DataError(f"{args.out}: output exists; pass --overwrite to replace it")
    if args.stores:
        lists = [CellStore(s).var_names for s in args.stores]
    else:
        lists = [_read_gene_list(f) for f in args.genes]
    genes = [g for g in pd.unique(np.array([g for genes in lists for g in genes], dtype=object))
             if g not in SPECIAL_TOKENS]
    if not genes:
        raise DataError(f"{(args.stores or args.genes)[0]}: no genes found; pass non-empty stores or gene lists")
    vocab = GeneVocab.from_genes(genes)
    vocab.save(args.out)
    print(f"wrote {args.out}: {len(genes)} genes + {len(vocab) - len(genes)} special tokens")


_COMMANDS = {"convert": _convert, "synth": _synth, "inspect": _inspect, "verify": _verify, "vocab": _vocab}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 after printing ``error: <message>``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    created_by = shlex.join([PROG, *argv])
    try:
        _COMMANDS[args.command](args, created_by)
    except ScgptError as e:
        print(error_line(e), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
