"""Stimulation response on real cells (experiment=kang_response): every cell type of Kang et al. 2018 held out
in turn, its STIM cells predicted from its CTRL cells, scored by Pearson of the predicted vs true mean change
(STIM - CTRL) on all panel genes and on the top-20 DE genes, beside the mean-shift baseline of the same run (the
other types' average STIM - CTRL change added to the held-out type's CTRL mean).

Settings (steps, learning rate) are chosen on the seen types' validation cells only (val/seen/pearson_delta_de20:
10% of the training types' STIM cells), with one type held out (``--select-type``), never on a held-out type:

    python benchmarks/real_cells/response.py --select 600:1e-3,600:3e-3   # choose, then every type
    python benchmarks/real_cells/response.py --steps 600 --lr 1e-3          # every type with given settings

Runs go to ``<runs>/response_<type>`` (selection runs: ``response_select_<type>_s<steps>_lr<lr>``); a run whose
summary.json exists with the same steps and learning rate is read, not rerun, unless ``--force``. The table
(markdown) is printed and written with the figures to ``<runs>/response_table.{md,json}``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from train_runs import train_logged

from scgpt.errors import DataError
from scgpt.io import OneLineArgumentParser, fail, write_json_atomic, write_text_atomic

CACHE = Path.home() / ".cache" / "scgpt" / "real_cells"
TYPE_KEY = "cell_type"  # the recipe's pair key: 8 types
SELECT_TYPE = "CD14+ Monocytes"
METRICS = ("pearson_delta", "pearson_delta_de20")


def lr_tag(lr: float) -> str:  # 1e-3, 3e-4
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cell_types(store: Path) -> list[str]:
    """The categories of obs/``TYPE_KEY`` of the store that have cells."""
    import anndata as ad
    import zarr

    obs = zarr.open_group(str(store), mode="r")["obs"]
    if TYPE_KEY not in obs:
        raise DataError(f"{store}: obs has no column {TYPE_KEY!r} (the recipe's cell types); use the Kang store of "
                        "benchmarks/real_cells/stores.py")
    values = ad.io.read_elem(obs[TYPE_KEY])
    return [str(t) for t in values.value_counts().index if (values == t).any()]


def _same_settings(run_dir: Path, steps: int, lr: float) -> bool:
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / "config.yaml")
    return int(config.trainer.max_steps) == steps and float(config.task.optimizer.lr) == lr


def train_held_out(store: Path, held_out: str, run_dir: Path, steps: int, lr: float, force: bool) -> dict:
    """The summary of scgpt-train experiment=kang_response with ``held_out`` held out (run unless done)."""
    summary = run_dir / "summary.json"
    if summary.exists() and not force and _same_settings(run_dir, steps, lr):
        return json.loads(summary.read_text())
    train_logged(held_out, ["experiment=kang_response", f"data.paths=[{store}]",
                            f"task.data_module.heldout_groups=[{held_out}]", f"run_dir={run_dir}", "logger=none",
                            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                            f"checkpoint.every_n_train_steps={steps}", f"task.optimizer.lr={lr}"],
                 run_dir.with_suffix(".log"))
    return json.loads(summary.read_text())


def select(store: Path, runs: Path, grid: list[tuple[int, float]], held_out: str, force: bool) -> tuple[int, float]:
    """The (steps, lr) of the grid with the best val/seen/pearson_delta_de20; its run is kept as the type's."""
    scores = {}
    for steps, lr in grid:
        run_dir = runs / f"response_select_{slug(held_out)}_s{steps}_lr{lr_tag(lr)}"
        val = train_held_out(store, held_out, run_dir, steps, lr, force)["val"]
        scores[(steps, lr)] = val["seen/pearson_delta_de20"]
        print(f"# select ({held_out} held out): steps={steps} lr={lr:g} val/seen/pearson_delta={val['seen/pearson_delta']:.3f}"
              f" val/seen/pearson_delta_de20={scores[(steps, lr)]:.3f}", file=sys.stderr, flush=True)
    steps, lr = max(scores, key=scores.get)
    chosen, final = runs / f"response_select_{slug(held_out)}_s{steps}_lr{lr_tag(lr)}", runs / f"response_{slug(held_out)}"
    if force or not (final / "summary.json").exists() or not _same_settings(final, steps, lr):
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(chosen, final)  # the same command: the chosen selection run is the type's run
    return steps, lr


def row(held_out: str, summary: dict) -> dict:
    val = summary["val"]
    out = {"held_out": held_out, "wall_s": round(summary["wall_seconds"], 1)}
    for metric in METRICS:
        out[f"scgpt_{metric}"] = val[f"unseen/{metric}"]
        out[f"mean_shift_{metric}"] = val[f"unseen/mean_shift/{metric}"]
        out[f"seen_{metric}"] = val[f"seen/{metric}"]
    return out


def markdown(rows: list[dict], steps: int, lr: float) -> str:
    lines = [(f"Held-out cell type (its STIM cells predicted from its CTRL cells); {steps} steps, lr {lr:g}; Pearson "
              "of predicted vs true mean change (STIM - CTRL)."), "",
             ("| held-out type | scGPT all genes | mean shift all genes | scGPT top-20 DE | mean shift top-20 DE "
              "| scGPT - mean shift (top-20) | val/seen top-20 (scGPT) | wall s |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = r["scgpt_pearson_delta_de20"] - r["mean_shift_pearson_delta_de20"]
        lines.append(f"| {r['held_out']} | {r['scgpt_pearson_delta']:.3f} | {r['mean_shift_pearson_delta']:.3f} | "
                     f"{r['scgpt_pearson_delta_de20']:.3f} | {r['mean_shift_pearson_delta_de20']:.3f} | {gap:+.3f} | "
                     f"{r['seen_pearson_delta_de20']:.3f} | {r['wall_s']:.0f} |")
    wins = sum(r["scgpt_pearson_delta_de20"] > r["mean_shift_pearson_delta_de20"] for r in rows)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "held_out"}
    lines.append(f"| mean | {mean['scgpt_pearson_delta']:.3f} | {mean['mean_shift_pearson_delta']:.3f} | "
                 f"{mean['scgpt_pearson_delta_de20']:.3f} | {mean['mean_shift_pearson_delta_de20']:.3f} | "
                 f"{mean['scgpt_pearson_delta_de20'] - mean['mean_shift_pearson_delta_de20']:+.3f} | "
                 f"{mean['seen_pearson_delta_de20']:.3f} | {sum(r['wall_s'] for r in rows):.0f} (total) |")
    lines += ["", f"scGPT above the mean shift on top-20 DE: {wins} / {len(rows)} held-out types"]
    return "\n".join(lines)


def parse_grid(text: str) -> list[tuple[int, float]]:
    try:
        return [(int(s), float(lr)) for s, lr in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise DataError(f"--select {text!r}: not STEPS:LR[,STEPS:LR...]; e.g. --select 600:1e-3,600:3e-3") from None


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=CACHE / "kang.zarr")
    parser.add_argument("--runs", type=Path, default=CACHE / "runs")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--select", help="STEPS:LR,...: choose on val/seen with --select-type held out")
    parser.add_argument("--select-type", default=SELECT_TYPE)
    parser.add_argument("--types", nargs="*", help="held-out types (default: every type of obs/cell_type)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose summary.json exists")
    args = parser.parse_args(argv)
    try:
        if not args.store.exists():
            raise DataError(f"--store {args.store}: no such cell store; make it with benchmarks/real_cells/stores.py")
        started = time.perf_counter()
        steps, lr = args.steps, args.lr
        if args.select:
            steps, lr = select(args.store, args.runs, parse_grid(args.select), args.select_type, args.force)
        types = args.types or cell_types(args.store)
        rows = [row(t, train_held_out(args.store, t, args.runs / f"response_{slug(t)}", steps, lr, args.force))
                for t in types]
    except DataError as exc:
        fail(exc)
    table = markdown(rows, steps, lr)
    print(table)
    print(f"# wall {time.perf_counter() - started:.0f} s for this invocation", file=sys.stderr)
    write_text_atomic(args.runs / "response_table.md", table + "\n")
    write_json_atomic(args.runs / "response_table.json", {"steps": steps, "lr": lr, "rows": rows})


if __name__ == "__main__":
    main()
