"""Linear baselines for cell-type annotation on a held-out batch of the synthetic data.

The annotation task's own baseline (``pca_logreg_transfer_accuracy`` in ``summary.json``) is fitted on the
validation cells only (what the task collects). This script fits the baselines on **every cell outside the
held-out batch** (the training and validation cells the model learns from) and scores them on the held-out
batch, on two views of the counts:

- ``lognorm``: log1p of counts normalised to 10,000 per cell (the usual scanpy view), all genes;
- ``binned``: each cell's non-zero counts binned per cell into 51 quantile bins (what the model reads), all genes.

For each view: PCA (50 components) + logistic regression, and logistic regression on all genes (L2, C=0.1).

    python benchmarks/annotation_baseline.py                              # conf/data/synthetic.yaml, batch_1 held out
    python benchmarks/annotation_baseline.py --set n_batches=2 --set type_effect=0.25
"""

from __future__ import annotations

import argparse

import numpy as np


def lognorm(x) -> np.ndarray:
    """(C, G) counts -> log1p(counts / library * 1e4)."""
    dense = x.toarray().astype(np.float32)
    return np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1.0) * 1e4)


def binned(x, n_bins: int = 51, seed: int = 0) -> np.ndarray:
    """(C, G) counts -> per-cell bins in {0, ..., n_bins - 1}, as the collator bins them."""
    from scgpt.tokenizer.binning import bin_rows

    dense = x.toarray().astype(np.float32)
    uniform = np.random.default_rng(seed).random(dense.shape, dtype=np.float32)
    return bin_rows(dense, np.ones(dense.shape, dtype=bool), n_bins, uniform)


def baseline_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of PCA(50) + logistic regression and of logistic regression on every gene."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    pca = PCA(n_components=min(50, min(train_x.shape) - 1), random_state=seed).fit(train_x)
    on_pca = LogisticRegression(max_iter=3000).fit(pca.transform(train_x), train_y)
    on_genes = LogisticRegression(max_iter=3000, C=0.1).fit(train_x, train_y)
    return {"pca_logreg": float((on_pca.predict(pca.transform(test_x)) == test_y).mean()),
            "logreg_all_genes": float((on_genes.predict(test_x) == test_y).mean())}


def main(argv: list[str] | None = None) -> None:
    import yaml

    from data_modules.synthetic import make_synthetic_adata
    from scgpt.paths import config_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a make_synthetic_adata parameter on top of conf/data/synthetic.yaml's (repeatable)")
    p.add_argument("--held-out", default="batch_1", help="the batch scored (never fitted on); default batch_1")
    args = p.parse_args(argv)
    params = dict(yaml.safe_load((config_dir() / "data" / "synthetic.yaml").read_text())["synthetic"])
    params.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    adata = make_synthetic_adata(**params)
    held = (adata.obs["batch"] == args.held_out).to_numpy()
    if not held.any() or held.all():
        raise SystemExit(f"--held-out {args.held_out}: must name one of several batches "
                         f"({', '.join(adata.obs['batch'].cat.categories)})")
    y = adata.obs["cell_type"].cat.codes.to_numpy()
    print("params:", params, "| held out:", args.held_out, f"({held.sum()} cells; fitted on {(~held).sum()})")
    for view, transform in (("lognorm", lognorm), ("binned", binned)):
        x = transform(adata.X)
        scores = baseline_accuracies(x[~held], y[~held], x[held], y[held])
        print(f"{view:<8} " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
