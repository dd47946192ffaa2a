"""``scgpt-report RUN_DIR...``: a markdown table comparing runs on their key metrics and settings.

Each argument is a run directory (with ``summary.json``) or a folder holding runs, such as a Hydra
multirun directory. Columns: the key metrics of every run's summary, a few settings that always matter
(model size, learning rate, batch size, steps), and every other config key whose value differs between
the runs (what a sweep varied).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.experimental.callback import Callback

from scgpt.io import error_line

METRICS = [("val/masked_mse", "val masked_mse"), ("val/pearson", "val pearson"), ("val/loss", "val loss"),
           ("train_loss_last", "train loss"), ("global_step", "steps"), ("cells_per_s", "cells/s")]
SETTINGS = [("task.name", "task"), ("model.d_model", "d_model"), ("model.n_layers", "layers"),
            ("task.optimizer.lr", "lr"), ("data.global_batch_size", "batch")]
IGNORED = ("run_dir", "ckpt_path", "hydra.", "logger.", "data.paths", "data.h5ad_path")


class ReportError(Exception):
    pass


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories under the given paths (a path with ``summary.json`` is a run itself)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            runs.append(path)
        elif path.is_dir():
            found = sorted({p.parent for p in path.rglob("summary.json")}, key=_natural)
            if not found:
                raise ReportError(f"{path}: no summary.json in it or below; give a finished run directory")
            runs.extend(found)
        else:
            raise ReportError(f"{path}: no such run directory")
    return runs


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in path.parts]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def metric_value(summary: dict[str, Any], name: str) -> Any:
    """``val/masked_mse`` -> summary['val']['masked_mse'] (``test/...`` likewise); other names are top-level
    summary keys."""
    if name.startswith(("val/", "test/")):
        split, key = name.split("/", 1)
        return (summary.get(split) or {}).get(key)
    return summary.get(name)


def load_run(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return {"dir": run_dir, "summary": summary, "config": _flatten(config or {})}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _varied(runs: list[dict[str, Any]], fixed: set[str]) -> list[str]:
    """Config keys whose values differ between runs; a key that only mirrors another (an interpolation
    such as data.mask_ratios: ${task.mask_ratios}) is shown once. Task keys come first."""
    keys = sorted({k for r in runs for k in r["config"]}, key=lambda k: (not k.startswith("task."), k))
    shown, seen = [], set()
    for key in keys:
        if key in fixed or key.startswith(IGNORED):
            continue
        values = tuple(json.dumps(r["config"].get(key), sort_keys=True, default=str) for r in runs)
        if len(set(values)) > 1 and values not in seen:
            seen.add(values)
            shown.append(key)
    return shown


def _labels(dirs: list[Path]) -> list[str]:
    if len(dirs) == 1:
        return [dirs[0].name or str(dirs[0])]
    parts = [d.resolve().parts for d in dirs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def render(runs: list[dict[str, Any]], sort: str | None = None, descending: bool = False) -> str:
    """The markdown table: one row per run; metrics, then the usual settings, then what varied."""
    if sort:
        def key(run):
            value = metric_value(run["summary"], sort)
            missing = not isinstance(value, (int, float)) or math.isnan(value)
            return (missing, -value if (descending and not missing) else (value if not missing else 0))
        runs = sorted(runs, key=key)
    fixed = {k for k, _ in SETTINGS}
    varied = _varied(runs, fixed)
    header = ["run", *(t for _, t in METRICS), *(t for _, t in SETTINGS), *varied]
    labels = _labels([r["dir"] for r in runs])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, run in zip(labels, runs):
        cells = [label, *(_fmt(metric_value(run["summary"], m)) for m, _ in METRICS),
                 *(_fmt(run["config"].get(k)) for k, _ in SETTINGS), *(_fmt(run["config"].get(k)) for k in varied)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str | Path], sort: str | None = None, descending: bool = False) -> str:
    return render([load_run(d) for d in find_runs(paths)], sort=sort, descending=descending)


class SweepReport(Callback):
    """A Hydra callback (``hydra.callbacks``) that writes ``<sweep dir>/report.md`` when a multirun ends
    and prints it, best trial first by ``optimized_metric``."""

    def __init__(self, descending: bool | None = None) -> None:
        self.descending = descending  # None: from hydra.sweeper.direction (maximize: largest first)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        sweep_dir = Path(config.hydra.sweep.dir)
        descending = self.descending
        if descending is None:
            descending = str(OmegaConf.select(config, "hydra.sweeper.direction", default="")).endswith("maximize")
        try:
            table = report([sweep_dir], sort=config.get("optimized_metric"), descending=descending)
        except ReportError as exc:
            print(f"scgpt-report: {exc}", file=sys.stderr)
            return
        (sweep_dir / "report.md").write_text(table)
        print(f"\nRuns of {sweep_dir} (best first by {config.get('optimized_metric')}):\n\n{table}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``scgpt-report``."""
    parser = argparse.ArgumentParser(prog="scgpt-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or folders holding runs")
    parser.add_argument("--sort", default=None, help="metric to sort by, e.g. val/masked_mse or cells_per_s")
    parser.add_argument("--descending", action="store_true", help="largest first (e.g. for val/pearson)")
    parser.add_argument("--output", "-o", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        table = report(args.runs, sort=args.sort, descending=args.descending)
    except (ReportError, json.JSONDecodeError, yaml.YAMLError) as exc:
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)
    if args.output:
        Path(args.output).write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
