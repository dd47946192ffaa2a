"""Evaluation metrics for finetuning tasks, on numpy arrays (scikit-learn underneath).

Integration metrics follow the scIB definitions (Luecken et al. 2022) computed with scikit-learn rather
than scib-metrics (which pulls in jax): cell-type ASW rescaled to [0, 1], batch ASW as the mean of
``1 - |silhouette|`` of batch labels within each cell type, an iLISI-style kNN batch mixing score (inverse
Simpson index of batches among each cell's neighbours, rescaled so 0 = one batch, 1 = perfect mixing), and
NMI/ARI of k-means clusters against cell types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of scgpt
        from scgpt.errors import ConfigError

        raise ConfigError("finetuning metrics need scikit-learn: pip install scikit-learn") from None


# ------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------
def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """accuracy, macro_f1 and f1/<class> over cells with a label (y_true >= 0)."""
    _sklearn()
    from sklearn.metrics import accuracy_score, f1_score

    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    labels = np.arange(len(class_names))
    out = {"accuracy": float(accuracy_score(y_true, y_pred)),
           "macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))}
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    present = set(np.unique(y_true).tolist())
    out.update({f"f1/{name}": float(f) for i, (name, f) in enumerate(zip(class_names, per_class)) if i in present})
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: rows true class, columns predicted."""
    keep = y_true >= 0
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true[keep], y_pred[keep]), 1)
    return matrix


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------
def pca_embedding(x, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of a (cells, genes) matrix (dense or sparse); the unintegrated baseline embedding."""
    _sklearn()
    from sklearn.decomposition import PCA

    n = max(1, min(n_components, min(x.shape) - 1))
    dense = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return PCA(n_components=n, random_state=seed).fit_transform(dense.astype(np.float32))


def knn_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated kNN classification accuracy of ``labels`` from the embedding (labelled cells only)."""
    _sklearn()
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    keep = labels >= 0
    emb, labels = emb[keep], labels[keep]
    counts = np.bincount(labels) if labels.size else np.zeros(0, dtype=np.int64)
    folds = int(min(folds, counts[counts > 0].min())) if counts.size else 0
    if folds < 2 or len(labels) < 2 * k:
        return float("nan")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    model = KNeighborsClassifier(n_neighbors=min(k, len(labels) // folds))
    return float(cross_val_score(model, emb, labels, cv=splitter).mean())


def logistic_regression_accuracy(emb: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated logistic-regression accuracy (the linear-probe / PCA baseline of annotation)."""
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    keep = labels >= 0
    emb, labels = emb[keep], labels[keep]
    counts = np.bincount(labels)
    folds = int(min(folds, counts[counts > 0].min())) if counts.size else 0
    if folds < 2:
        return float("nan")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(max_iter=2000), emb, labels, cv=splitter).mean())


def batch_mixing(emb: np.ndarray, batches: np.ndarray, k: int = 15) -> float:
    """iLISI-style: mean inverse Simpson index of batches in each cell's k neighbours, rescaled to [0, 1]."""
    _sklearn()
    from sklearn.neighbors import NearestNeighbors

    n_batches = len(np.unique(batches))
    if n_batches < 2 or len(batches) <= k:
        return float("nan")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    neighbours = batches[idx[:, 1:]]  # (N, k), self excluded
    shares = np.stack([(neighbours == b).mean(1) for b in np.unique(batches)], axis=1)  # (N, n_batches)
    inverse_simpson = 1.0 / (shares ** 2).sum(1)
    return float(((inverse_simpson - 1.0) / (n_batches - 1.0)).mean())


def integration_metrics(emb: np.ndarray, cell_types: np.ndarray, batches: np.ndarray, seed: int = 0,
                        k: int = 15) -> dict[str, float]:
    """celltype_asw, batch_asw, batch_mixing, ilisi, clisi, nmi, ari, knn_accuracy (higher is better for every one)."""
    _sklearn()
    from scgpt.scib import lisi_scores
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples, \
        silhouette_score

    keep = cell_types >= 0
    emb, cell_types, batches = emb[keep], cell_types[keep], batches[keep]
    out: dict[str, float] = {}
    n_types = len(np.unique(cell_types))
    out["celltype_asw"] = float((silhouette_score(emb, cell_types) + 1) / 2) if 1 < n_types < len(emb) else float("nan")
    per_type = []
    for t in np.unique(cell_types):
        rows = cell_types == t
        if len(np.unique(batches[rows])) > 1 and rows.sum() > len(np.unique(batches[rows])):
            per_type.append(np.mean(1.0 - np.abs(silhouette_samples(emb[rows], batches[rows]))))
    out["batch_asw"] = float(np.mean(per_type)) if per_type else float("nan")
    out["batch_mixing"] = batch_mixing(emb, batches, k)
    out.update(lisi_scores(emb, cell_types, batches))  # scIB's graph iLISI / cLISI (scgpt/scib.py)
    clusters = KMeans(n_clusters=max(2, n_types), n_init=10, random_state=seed).fit_predict(emb)
    out["nmi"] = float(normalized_mutual_info_score(cell_types, clusters))
    out["ari"] = float(adjusted_rand_score(cell_types, clusters))
    out["knn_accuracy"] = knn_accuracy(emb, cell_types, seed=seed)
    return out


# ------------------------------------------------------------------------------------------------
# Ranking (GRN) and correlation (perturbation)
# ------------------------------------------------------------------------------------------------
def edge_recovery(scores: np.ndarray, truth: np.ndarray, top_k: int | None = None) -> dict[str, float]:
    """AUPRC and early precision (precision among the top ``top_k`` = number of true edges) of a score
    matrix against a boolean ground-truth matrix of the same shape, with their random expectations."""
    _sklearn()
    from sklearn.metrics import average_precision_score

    s, t = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(truth, dtype=bool).ravel()
    k = int(top_k or t.sum())
    top = np.argsort(-s, kind="stable")[:k]
    density = float(t.mean())
    return {"auprc": float(average_precision_score(t, s)), "auprc_random": density,
            "early_precision": float(t[top].mean()) if k else float("nan"), "early_precision_random": density}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------------------------
# Plots (PNG; skipped with a note when matplotlib is missing)
# ------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        log.info("matplotlib is not installed; plots skipped")
        return None


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 1 + 0.5 * len(class_names)))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_embedding(emb: np.ndarray, colourings: dict[str, tuple[np.ndarray, Sequence[str]]],
                   path: str | Path, seed: int = 0) -> Path | None:
    """2-D map of the embedding (UMAP when umap-learn is installed, else PCA), one panel per colouring."""
    plt = _pyplot()
    if plt is None:
        return None
    try:
        import umap  # type: ignore

        xy, method = umap.UMAP(random_state=seed).fit_transform(emb), "UMAP"
    except ImportError:
        xy, method = pca_embedding(emb, 2, seed), "PCA"
    fig, axes = plt.subplots(1, len(colourings), figsize=(4.5 * len(colourings), 4), squeeze=False)
    for ax, (title, (codes, names)) in zip(axes[0], colourings.items()):
        for c, name in enumerate(names):
            rows = codes == c
            if rows.any():
                ax.scatter(xy[rows, 0], xy[rows, 1], s=4, label=name)
        ax.set_title(f"{method} by {title}")
        ax.legend(fontsize=6, markerscale=2, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
