"""PCA baselines of task=multiomic on a store's validation cells (its first ``val_fraction`` rows, as the
data module splits them): cell-type kNN accuracy of PCA on log-normalised counts of all features, of each
modality alone, and of their concatenation. Prints JSON.

    python benchmarks/multiomic_baseline.py <store.zarr> --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.sparse as sp

from data_modules.modality import MODALITY_NAMES, store_modalities
from data_modules.store import CellStore
from scgpt.metrics import knn_accuracy, pca_embedding


def log_normalised(x):
    x = x.multiply(1e4 / np.maximum(np.asarray(x.sum(1)), 1)).tocsr()
    x.data = np.log1p(x.data)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--label", default="cell_type")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = CellStore(args.store)
    n_val = max(1, round(store.n_cells * args.val_fraction))
    x = store.read_counts(0, n_val)
    labels = store.read_obs(args.label, 0, n_val)
    modality = store_modalities(store)
    out = {"cells": n_val}
    for m in np.unique(modality):
        part = log_normalised(x[:, modality == m])  # each modality normalised on its own library size
        out[f"pca_lognorm/knn_accuracy/{MODALITY_NAMES[m]}_only"] = knn_accuracy(
            pca_embedding(part, 50, args.seed), labels, seed=args.seed)
    joint = log_normalised(x[:, modality == 0])
    for m in np.unique(modality)[1:]:
        joint = sp.hstack([joint, log_normalised(x[:, modality == m])], format="csr")
    out["pca_lognorm/knn_accuracy"] = knn_accuracy(pca_embedding(joint, 50, args.seed), labels, seed=args.seed)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
