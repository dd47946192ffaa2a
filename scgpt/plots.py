"""PNG figures for a run directory: loss curves, confusion matrices and 2-D cell embeddings.

matplotlib is optional (the ``tracking`` extra): without it each function logs one note and writes
nothing. Figures are written to a temporary name and renamed, like every other run output.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from scgpt.io import atomic_path, rank_zero_logger

log = rank_zero_logger()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("plots skipped: matplotlib is not installed (pip install 'scgpt[tracking]')")
        return None
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``metrics.csv`` as {column: float}, empty cells left out."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[key])) for r in rows
              if key in r and "step" in r and r[key] is not None and math.isfinite(float(r[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> list[Path]:
    """Training loss (and validation loss / masked MSE where present) against the optimizer step.

    ``rows`` are dicts with a ``step`` and metric names as logged (``train/loss``, ``val/loss``, ...),
    as kept by :class:`scgpt.tracking.MetricHistory` or read by :func:`read_metrics_csv`.
    Returns the PNGs written (none without matplotlib or without data).
    """
    train = _series(rows, "train/loss")
    if not train[0]:
        return []
    plt = _pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*train, label="train/loss", linewidth=1)
    for key, style in (("val/loss", "o-"), ("val/masked_mse", "s--")):
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        return [_save(fig, Path(path))]
    finally:
        plt.close(fig)


def plot_run_dir(run_dir: str | Path) -> list[Path]:
    """Redraw ``plots/loss.png`` of a finished run from its ``logs/metrics.csv``."""
    metrics = Path(run_dir) / "logs" / "metrics.csv"
    if not metrics.is_file():
        log.info("plots skipped: %s does not exist (run with logger=csv)", metrics)
        return []
    return plot_loss_curves(read_metrics_csv(metrics), Path(run_dir) / "plots" / "loss.png")


def plot_confusion_matrix(matrix, labels: Sequence[str], path: str | Path, title: str = "confusion matrix") -> list[Path]:
    """A row-normalised confusion matrix (rows: true label, columns: predicted) with the counts."""
    plt = _pyplot()
    if plt is None:
        return []
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    share = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 30:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    try:
        return [_save(fig, Path(path))]
    finally:
        plt.close(fig)


def plot_embedding(coords, labels: Sequence[Any], path: str | Path, title: str = "cells") -> list[Path]:
    """A scatter of 2-D cell coordinates (a UMAP or any projection) coloured by label."""
    plt = _pyplot()
    if plt is None:
        return []
    import numpy as np

    coords, labels = np.asarray(coords, dtype=float), np.asarray([str(x) for x in labels])
    fig, ax = plt.subplots(figsize=(6, 5))
    for label in sorted(set(labels.tolist())):
        chosen = labels == label
        ax.scatter(coords[chosen, 0], coords[chosen, 1], s=4, label=label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    if len(set(labels.tolist())) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    try:
        return [_save(fig, Path(path))]
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 2-D maps of cell embeddings (integration, zero-shot embedding)
# ------------------------------------------------------------------------------------------------
MAP_METHODS = ("auto", "umap", "pca")


def embedding_2d(emb, seed: int = 0, method: str = "auto"):
    """(N, 2) coordinates of an (N, D) embedding and the method used: UMAP with umap-learn (the ``umap``
    extra), PCA otherwise; ``auto`` takes UMAP when it is installed and logs a note when it falls back."""
    import numpy as np

    if method not in MAP_METHODS:
        from scgpt.errors import ConfigError

        raise ConfigError(f"task.module.embedding_map: unknown value {method!r}; "
                          f"choose one of {', '.join(MAP_METHODS)}")
    emb = np.asarray(emb, dtype=np.float32)
    if method in ("auto", "umap") and len(emb) > 16:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                from scgpt.errors import ConfigError

                raise ConfigError("task.module.embedding_map=umap: umap-learn is not installed; "
                                  "pip install 'scgpt[umap]', or use embedding_map=pca") from None
            log.info("embedding map: umap-learn is not installed, drawing PCA instead (pip install 'scgpt[umap]')")
        else:
            import warnings

            with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": seeded is intended
                warnings.simplefilter("ignore", UserWarning)
                reducer = umap.UMAP(n_neighbors=min(15, len(emb) - 1), min_dist=0.3, random_state=seed, n_epochs=200)
                return reducer.fit_transform(emb), "UMAP"
    centred = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    return (xy if xy.shape[1] == 2 else np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))), "PCA"


def plot_cell_maps(embeddings: dict[str, Any], colourings: dict[str, tuple[Any, Sequence[str]]], path: str | Path,
                   seed: int = 0, method: str = "auto", max_cells: int = 5000) -> list[Path]:
    """One row per embedding (``{"scGPT": emb, "PCA": pca}``), one column per colouring (``{"batch": (codes,
    names)}``; code -1 = missing, grey). At most ``max_cells`` cells, the same seeded sample in every panel."""
    plt = _pyplot()
    if plt is None or not embeddings or not colourings:
        return []
    import numpy as np

    n = len(next(iter(embeddings.values())))
    keep = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    fig, axes = plt.subplots(len(embeddings), len(colourings), squeeze=False,
                             figsize=(4.5 * len(colourings), 4 * len(embeddings)))
    for row, (name, emb) in zip(axes, embeddings.items()):
        xy, used = embedding_2d(np.asarray(emb)[keep], seed, method)
        for ax, (key, (codes, names)) in zip(row, colourings.items()):
            _scatter_by_label(ax, xy, np.asarray(codes)[keep], names)
            ax.set_title(f"{name}: {used} by {key}")
    try:
        return [_save(fig, Path(path))]
    finally:
        plt.close(fig)


def _scatter_by_label(ax, xy, codes, names: Sequence[str]) -> None:
    missing = codes < 0
    if missing.any():
        ax.scatter(xy[missing, 0], xy[missing, 1], s=3, c="lightgrey", label="NA")
    for code, name in enumerate(names):
        chosen = codes == code
        if chosen.any():
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=3, label=str(name))
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
