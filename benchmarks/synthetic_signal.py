"""How much of the binned expression the model learns to predict is cell identity, and how much is not.

The tokens of a cell are its non-zero genes with their counts binned per cell (51 bins, quantile edges,
random tie-breaking: :func:`scgpt.tokenizer.binning.bin_rows`, as the collator does). This script bins
the cells of a synthetic dataset the same way and reports the share of the binned values' variance
explained by the means of gene, gene + cell type and gene + cell type + batch groups (fitted on one half
of the cells, R^2 on the other half, so the figures are not inflated by small groups), plus the Pearson
correlation and mean squared error those group means reach: the ``gene only`` Pearson / MSE is what a
model that ignores the cell can reach (compare it with a pretraining run's val Pearson / val GEP).

    python benchmarks/synthetic_signal.py                       # the default data (conf/data/synthetic.yaml)
    python benchmarks/synthetic_signal.py --n-cells 2000 --set n_genes=300 --set n_batches=1
"""

from __future__ import annotations

import argparse

import numpy as np


def binned_tokens(adata, n_bins: int = 51, seed: int = 0) -> dict[str, np.ndarray]:
    """(token,) arrays: gene index, cell type code, batch code and bin of every non-zero gene of every cell."""
    from scgpt.tokenizer.binning import bin_rows

    x = adata.X.toarray().astype(np.float32)  # (C, G)
    valid = np.ones(x.shape, dtype=bool)
    bins = bin_rows(x, valid, n_bins, np.random.default_rng(seed).random(x.shape, dtype=np.float32))  # (C, G)
    cell, gene = np.nonzero(x)
    return dict(cell=cell, gene=gene, bin=bins[cell, gene].astype(np.float64),
                type=adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)[cell],
                batch=adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)[cell])


def _group_prediction(key: np.ndarray, y: np.ndarray, fit: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Mean of ``y`` over the ``fit`` tokens of each group ``key``; ``fallback`` where a group has none."""
    n = int(key.max()) + 1
    total = np.bincount(key[fit], weights=y[fit], minlength=n)
    count = np.bincount(key[fit], minlength=n)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)[key]
    return np.where(np.isnan(mean), fallback, mean)


def signal_shares(tokens: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, float]]:
    """R^2 and Pearson on held-out cells of the gene / gene + type / gene + type + batch group means."""
    y = tokens["bin"]
    n_cells = int(tokens["cell"].max()) + 1
    fit = (np.random.default_rng(seed).random(n_cells) < 0.5)[tokens["cell"]]  # half of the cells fit the means
    test = ~fit
    n_genes, n_types = int(tokens["gene"].max()) + 1, int(tokens["type"].max()) + 1
    keys = {
        "gene only": tokens["gene"],
        "gene + type": tokens["gene"] + n_genes * tokens["type"],
        "gene + type + batch": tokens["gene"] + n_genes * (tokens["type"] + n_types * tokens["batch"]),
    }
    out, previous = {}, np.full(y.shape, y[fit].mean())
    var = np.var(y[test])
    for name, key in keys.items():
        pred = _group_prediction(key, y, fit, previous)  # (N,)
        r2 = 1.0 - np.mean((y[test] - pred[test]) ** 2) / var
        out[name] = dict(r2=float(r2), pearson=float(np.corrcoef(y[test], pred[test])[0, 1]),
                         mse=float(np.mean((y[test] - pred[test]) ** 2)))
        previous = pred
    return out


def describe(adata) -> dict[str, float]:
    """Counts per cell, expressed genes per cell, zero share and the share of counts of the top 5% genes."""
    x = adata.X.tocsr()
    lib = np.asarray(x.sum(1)).ravel()
    gene_total = np.sort(np.asarray(x.sum(0)).ravel())[::-1]
    top = max(1, int(0.05 * x.shape[1]))
    return dict(median_counts=float(np.median(lib)), median_expressed=float(np.median(np.diff(x.indptr))),
                zeros=1.0 - x.nnz / (x.shape[0] * x.shape[1]), top5pct_gene_share=float(gene_total[:top].sum() / lib.sum()),
                ones_share=float(np.mean(x.data == 1)))


def main(argv: list[str] | None = None) -> None:
    import yaml

    from data_modules.synthetic import make_synthetic_adata
    from scgpt.paths import config_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=2000, help="cells measured (default 2000; the data's own size if larger)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a make_synthetic_adata parameter on top of conf/data/synthetic.yaml's (repeatable)")
    args = p.parse_args(argv)
    params = dict(yaml.safe_load((config_dir() / "data" / "synthetic.yaml").read_text())["synthetic"])
    params.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    adata = make_synthetic_adata(**params)
    print("params:", params)
    print("data:", {k: round(v, 3) for k, v in describe(adata).items()})
    shares = signal_shares(binned_tokens(adata[: args.n_cells]))
    print(f"{'model of the binned value':<22} {'R^2 (held-out cells)':>20} {'Pearson':>8} {'MSE':>7}")
    for name, s in shares.items():
        print(f"{name:<22} {s['r2']:>20.3f} {s['pearson']:>8.3f} {s['mse']:>7.1f}")
    r2 = [s["r2"] for s in shares.values()]
    print(f"shares: gene {r2[0]:.3f}, + type {r2[1] - r2[0]:.3f}, + batch {r2[2] - r2[1]:.3f}, rest {1 - r2[2]:.3f}")


if __name__ == "__main__":
    main()
