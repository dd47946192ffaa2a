"""scIB integration metrics as scib-metrics (Luecken et al. 2022; YosefLab/scib-metrics) defines them, in numpy.

Graph LISI: a kNN graph of the embedding (``n_neighbors`` = 90 with the cell itself, as scib-metrics'
Benchmarker), a Gaussian kernel on each cell's neighbour distances whose precision is found by bisection so
that the kernel's entropy equals log(perplexity) (perplexity = floor(n_neighbors / 3)), the cell itself left
out; the Simpson index of the labels under that kernel, and its inverse (the effective number of labels
around the cell). iLISI is the median over cells of the batch LISI, scaled to [0, 1] as ``(m - 1) / (B - 1)``;
cLISI the median cell-type LISI scaled as ``(C - m) / (C - 1)`` (1 = neighbourhoods of one type). The ASW
scores and NMI/ARI come from :func:`scgpt.metrics.integration_metrics` (same definitions as scib-metrics:
``silhouette_label``, ``silhouette_batch``, k-means with as many clusters as cell types).
"""

from __future__ import annotations

import numpy as np

N_NEIGHBORS = 90
BISECTION_STEPS = 50
TOLERANCE = 1e-5


def knn_graph(emb: np.ndarray, n_neighbors: int = N_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) Euclidean distances and indices of each cell's ``k`` nearest cells, the cell itself included."""
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, len(emb))
    distances, indices = NearestNeighbors(n_neighbors=k).fit(emb).kneighbors(emb)
    return distances.astype(np.float64), indices


def _entropy_and_kernel(distances: np.ndarray, keep: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: entropy H and normalised weights P of exp(-d * beta) over the kept neighbours. (N,), (N, k)."""
    weights = np.where(keep, np.exp(-distances * beta[:, None]), 0.0)  # (N, k)
    total = weights.sum(1)  # (N,)
    safe = np.where(total > 0, total, 1.0)
    entropy = np.where(total > 0, np.log(safe) + beta * (distances * weights).sum(1) / safe, 0.0)
    return entropy, weights / safe[:, None]


def _calibrated_kernel(distances: np.ndarray, keep: np.ndarray, perplexity: float) -> tuple[np.ndarray, np.ndarray]:
    """Bisection on each row's precision beta (from 1) until its kernel entropy is log(perplexity)."""
    n = len(distances)
    beta, lo, hi = np.ones(n), np.full(n, -np.inf), np.full(n, np.inf)
    entropy, weights = _entropy_and_kernel(distances, keep, beta)
    target = np.log(perplexity)
    for _ in range(BISECTION_STEPS):
        diff = entropy - target
        active = np.abs(diff) > TOLERANCE
        if not active.any():
            break
        too_flat = active & (diff > 0)  # entropy too high: sharpen (raise beta)
        too_sharp = active & (diff <= 0)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_sharp, beta, hi)
        raised = np.where(np.isinf(hi), beta * 2, (beta + hi) / 2)
        lowered = np.where(np.isinf(lo), beta / 2, (beta + lo) / 2)
        beta = np.where(too_flat, raised, np.where(too_sharp, lowered, beta))
        new_entropy, new_weights = _entropy_and_kernel(distances, keep, beta)
        entropy = np.where(active, new_entropy, entropy)
        weights = np.where(active[:, None], new_weights, weights)
    return entropy, weights


def lisi(distances: np.ndarray, indices: np.ndarray, labels: np.ndarray, perplexity: float | None = None) -> np.ndarray:
    """(N,) per-cell LISI: 1 / Simpson index of ``labels`` in the perplexity-calibrated kNN kernel."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    n_labels = int(codes.max()) + 1
    if perplexity is None:
        perplexity = float(np.floor(indices.shape[1] / 3))
    keep = indices != np.arange(len(indices))[:, None]  # the cell itself is not its own neighbour
    entropy, weights = _calibrated_kernel(distances, keep, perplexity)
    shares = np.zeros((len(codes), n_labels))  # (N, n_labels): kernel mass per label
    np.add.at(shares, (np.repeat(np.arange(len(codes)), indices.shape[1]), codes[indices].reshape(-1)),
              weights.reshape(-1))
    simpson = np.where(entropy == 0, -1.0, (shares ** 2).sum(1))
    return 1.0 / simpson


def ilisi(distances: np.ndarray, indices: np.ndarray, batches: np.ndarray) -> float:
    """Median batch LISI scaled to [0, 1]: 0 = every neighbourhood one batch, 1 = all batches evenly mixed."""
    n_batches = len(np.unique(batches))
    if n_batches < 2:
        return float("nan")
    return float((np.nanmedian(lisi(distances, indices, batches)) - 1) / (n_batches - 1))


def clisi(distances: np.ndarray, indices: np.ndarray, cell_types: np.ndarray) -> float:
    """Median cell-type LISI scaled to [0, 1]: 1 = every neighbourhood one cell type."""
    n_types = len(np.unique(cell_types))
    if n_types < 2:
        return float("nan")
    return float((n_types - np.nanmedian(lisi(distances, indices, cell_types))) / (n_types - 1))


def lisi_scores(emb: np.ndarray, cell_types: np.ndarray, batches: np.ndarray,
                n_neighbors: int = N_NEIGHBORS) -> dict[str, float]:
    """``ilisi`` and ``clisi`` of an embedding on one kNN graph."""
    if len(emb) < 4:
        return {"ilisi": float("nan"), "clisi": float("nan")}
    distances, indices = knn_graph(emb, n_neighbors)
    return {"ilisi": ilisi(distances, indices, batches), "clisi": clisi(distances, indices, cell_types)}
