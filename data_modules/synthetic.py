"""Synthetic single-cell counts with known ground truth (cell types, gene programs, batch effects).

Counts are negative binomial (Gamma-Poisson, dispersion 0.1-0.3) around ``library size x gene
proportions``. A few housekeeping genes take 30% of the counts; the other genes' baselines are
log-normal (most low, so the matrix is ~60% zeros). Each cell type multiplies every non-housekeeping
gene by its own log-normal(0, 1) factor and the genes of the programs it activates by a further 2-8x
fold change; each batch multiplies every gene by its own log-normal factor and shifts library sizes
(log-normal, median ~3,000 counts). After per-cell binning, gene identity explains about half of the
binned values and cell type a further ~17% (``benchmarks/synthetic_signal.py``). Everything is drawn
from one seeded ``np.random.default_rng`` so a seed fixes the dataset.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_modules.counts_sampler import sample_counts
from data_modules.synthetic_modality import add_modalities
from data_modules.synthetic_perturbation import perturb
from scgpt.errors import ConfigError

GENERATOR_VERSION = 2  # part of the cache name: bump it whenever a seed's counts change
# Chosen so that cell identity drives a real share of the binned values the model learns
# (benchmarks/synthetic_signal.py; BENCHMARKS.md "Pretraining and the cell embedding").
_PROGRAM_SIZE = 40  # genes per program (fewer when the genes do not suffice)
_HOUSEKEEPING_FRACTION = 0.05  # of genes: highly expressed, never in a program
_HOUSEKEEPING_SHARE = 0.3  # of counts taken by housekeeping genes (ribosomal/mitochondrial-like)
_BASE_SIGMA = 2.2  # log-normal spread of the other genes' baseline expression: most genes low, sparse
_FOLD = (2.0, 8.0)  # range of a program's fold change (log-uniform)
_TYPE_SIGMA = 1.0  # log-normal factor per (cell type, gene) on every non-housekeeping gene
_LIBRARY = (3000.0, 0.5)  # median counts per cell and the log-normal spread of library sizes
_DISPERSION = (0.1, 0.3)  # per-gene negative binomial dispersion range


def _check_params(n_cells: int, n_genes: int, n_cell_types: int, n_programs: int, n_batches: int,
                  type_effect: float) -> None:
    for key, value in dict(
        n_cells=n_cells, n_genes=n_genes, n_cell_types=n_cell_types, n_programs=n_programs, n_batches=n_batches
    ).items():
        if int(value) != value or value < 1:
            raise ConfigError(f"synthetic data: {key}={value!r} must be a positive integer")
    if not isinstance(type_effect, (int, float)) or isinstance(type_effect, bool) or not 0 <= type_effect <= 10:
        raise ConfigError(f"synthetic data: type_effect={type_effect!r} must be a number in [0, 10] (1: the default data)")


def _make_programs(
    rng: np.random.Generator, candidates: np.ndarray, n_cell_types: int, n_programs: int
) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Gene indices per program (n_programs, size), drawn from ``candidates``, and each type's programs."""
    size = max(1, min(_PROGRAM_SIZE, candidates.size // (2 * n_programs)))
    perm = rng.permutation(candidates)
    program_genes = perm[np.arange(n_programs * size) % perm.size].reshape(n_programs, size)
    # Each type owns program t (unique when n_programs >= n_cell_types) plus one shared extra program.
    pool = np.arange(n_cell_types, n_programs)
    extras = rng.choice(pool, size=n_cell_types) if pool.size else np.full(n_cell_types, -1)
    type_programs = {
        t: sorted({t % n_programs} | ({int(extras[t])} if extras[t] >= 0 else set())) for t in range(n_cell_types)
    }
    return program_genes, type_programs


def _baseline(rng: np.random.Generator, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline gene proportions (G,) and the indices of non-housekeeping genes.

    A few housekeeping genes take ``_HOUSEKEEPING_SHARE`` of the counts; the rest are log-normal with a wide spread, so most of
    them are lowly expressed and the matrix is sparse as in real data.
    """
    base = rng.lognormal(0.0, _BASE_SIGMA, size=n_genes)
    n_hk = int(n_genes * _HOUSEKEEPING_FRACTION)
    is_hk = np.zeros(n_genes, dtype=bool)
    if n_hk:
        is_hk[rng.choice(n_genes, size=n_hk, replace=False)] = True
        base[is_hk] = rng.lognormal(0.0, 0.7, size=n_hk)
        base[is_hk] *= _HOUSEKEEPING_SHARE / base[is_hk].sum()
        base[~is_hk] *= (1.0 - _HOUSEKEEPING_SHARE) / base[~is_hk].sum()
    return base / base.sum(), np.flatnonzero(~is_hk)


def _fill_empty_cells(rng: np.random.Generator, x: sp.csr_matrix) -> sp.csr_matrix:
    """Add one count to a random gene of every cell that has no counts."""
    empty = np.flatnonzero(np.diff(x.indptr) == 0)
    if empty.size:
        genes = rng.integers(0, x.shape[1], size=empty.size)
        ones = sp.csr_matrix((np.ones(empty.size, np.float32), (empty, genes)), shape=x.shape)
        x = (x + ones).tocsr()
    return x


def make_synthetic_adata(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_cell_types: int = 5,
    n_programs: int | None = None,
    n_batches: int = 1,
    seed: int = 0,
    n_proteins: int = 0,
    n_peaks: int = 0,
    n_regulators: int = 0,
    n_perturbations: int = 0,
    perturbed_fraction: float = 0.5,
    perturbation_factor: float = 0.1,
    regulator_activity: float = 0.0,
    type_effect: float = 1.0,
) -> ad.AnnData:
    """Synthetic raw counts; ``X`` is CSR float32 holding integers, ground truth is in ``obs`` and ``uns``.

    ``n_proteins`` / ``n_peaks`` > 0 append ADT / ATAC features tied to cell type, with var column
    ``feature_type`` (see :mod:`data_modules.synthetic_modality`); off by default.
    ``n_regulators`` > 0 plants a regulator -> target network and ``n_perturbations`` perturbation conditions
    (see :mod:`data_modules.synthetic_perturbation`); off by default. ``regulator_activity`` > 0 also
    varies the regulators (and so their targets) from cell to cell within a type. ``type_effect`` scales
    every cell-type log fold change (programs and per-gene factors): below 1 the types are closer and harder
    to tell apart; 1 is the default data.
    """
    n_programs = 2 * n_cell_types if n_programs is None else n_programs
    _check_params(n_cells, n_genes, n_cell_types, n_programs, n_batches, type_effect)
    rng = np.random.default_rng(seed)

    # Genes: baseline proportions (most genes low), per-gene NB dispersion, programs.
    base, candidates = _baseline(rng, n_genes)  # (G,)
    dispersion = rng.uniform(*_DISPERSION, size=n_genes)
    program_genes, type_programs = _make_programs(rng, candidates, n_cell_types, n_programs)

    # Cell types: a log-normal factor on every non-housekeeping gene, and a 2-8x fold change on their programs.
    type_mult = np.ones((n_cell_types, n_genes))  # (T, G)
    for t, progs in type_programs.items():  # loop over types, not cells
        for p in progs:
            type_mult[t, program_genes[p]] *= np.exp(rng.uniform(np.log(_FOLD[0]), np.log(_FOLD[1])) * type_effect)
    type_mult[:, candidates] *= rng.lognormal(0.0, _TYPE_SIGMA, size=(n_cell_types, candidates.size)) ** type_effect

    # Batches: multiplicative gene effects and library-size shifts.
    if n_batches > 1:
        batch_mult = rng.lognormal(0.0, 0.3, size=(n_batches, n_genes))  # (B, G)
        batch_lib = rng.normal(0.0, 0.3, size=n_batches)
    else:
        batch_mult, batch_lib = np.ones((1, n_genes)), np.zeros(1)

    # Cells: balanced, shuffled type and batch labels; log-normal library size.
    cell_type = rng.permutation(np.arange(n_cells) % n_cell_types)
    batch = rng.permutation(np.arange(n_cells) % n_batches)
    lib = np.exp(np.log(_LIBRARY[0]) + batch_lib[batch] + rng.normal(0.0, _LIBRARY[1], size=n_cells))

    # Per (type, batch) gene proportions, then counts.
    prop = base[None, None, :] * type_mult[:, None, :] * batch_mult[None, :, :]  # (T, B, G)
    prop = (prop / prop.sum(-1, keepdims=True)).reshape(n_cell_types * n_batches, n_genes)
    shape = (1.0 / dispersion).astype(np.float32)
    rows, design = cell_type * n_batches + batch, None
    if n_regulators:  # planted network and perturbations, from their own generator (off: nothing drawn)
        design = perturb(np.random.default_rng([seed, 7]), prop, rows, base=base, candidates=candidates,
                         type_mult=type_mult, n_batches=n_batches, n_regulators=n_regulators,
                         n_perturbations=n_perturbations, perturbed_fraction=perturbed_fraction,
                         perturbation_factor=perturbation_factor, regulator_activity=regulator_activity)
        prop, rows = design.prop, design.rows
    x = sample_counts(rng, prop.astype(np.float32), shape, rows, lib)
    x = _fill_empty_cells(rng, x)

    var_names = np.array([f"SYN{i:05d}" for i in range(n_genes)])
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, [f"type_{t}" for t in range(n_cell_types)]),
            "batch": pd.Categorical.from_codes(batch, [f"batch_{b}" for b in range(n_batches)]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var, modality_uns = pd.DataFrame(index=pd.Index(var_names)), {}
    if n_proteins or n_peaks:  # own generator: the RNA counts above are the same with or without it
        x, var, modality_uns = add_modalities(x, var_names, cell_type, batch, n_cell_types, n_batches,
                                              n_proteins, n_peaks, seed)
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns.update(modality_uns)
    adata.uns["gene_programs"] = {f"program_{p}": var_names[g].tolist() for p, g in enumerate(program_genes)}
    adata.uns["cell_type_programs"] = {
        f"type_{t}": [f"program_{p}" for p in progs] for t, progs in type_programs.items()
    }
    adata.uns["synthetic"] = {
        k: int(v) for k, v in dict(
            n_cells=n_cells, n_genes=n_genes, n_cell_types=n_cell_types, n_programs=n_programs,
            n_batches=n_batches, seed=seed,
        ).items()
    }
    adata.uns["synthetic"].update({k: int(v) for k, v in dict(n_proteins=n_proteins, n_peaks=n_peaks).items() if v})
    if type_effect != 1.0:
        adata.uns["synthetic"]["type_effect"] = float(type_effect)
    if design is not None:
        design.annotate(adata)  # obs['perturbation'], uns['regulatory_network'], uns['perturbations']
    return adata


def _resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    try:
        bound = inspect.signature(make_synthetic_adata).bind(**params)
    except TypeError as e:
        raise ConfigError(f"synthetic data: {e}; valid keys are those of make_synthetic_adata") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def default_dataset_path(cache_dir: str | os.PathLike[str] | None = None, **params: Any) -> Path:
    """``<cache_dir>/synthetic_<cells>x<genes>_t<types>_b<batches>_s<seed>_v<version>[...].zarr``.

    The cache directory defaults to $SCGPT_CACHE. The generator version is in the name, so a store cached by an older generator is never reused.
    """
    p = _resolve_params(params)
    if cache_dir is None:
        cache_dir = os.environ.get("SCGPT_CACHE") or Path.home() / ".cache" / "scgpt"
    name = f"synthetic_{p['n_cells']}x{p['n_genes']}_t{p['n_cell_types']}_b{p['n_batches']}_s{p['seed']}"
    name += f"_v{GENERATOR_VERSION}"
    if p["n_programs"] is not None:
        name += f"_p{p['n_programs']}"
    name += f"_adt{p['n_proteins']}" if p["n_proteins"] else ""
    name += f"_atac{p['n_peaks']}" if p["n_peaks"] else ""
    if p["n_regulators"]:
        name += f"_reg{p['n_regulators']}_pert{p['n_perturbations']}x{p['perturbed_fraction']}f{p['perturbation_factor']}"
        name += f"_act{p['regulator_activity']}" if p["regulator_activity"] else ""
    name += f"_te{p['type_effect']}" if p["type_effect"] != 1.0 else ""
    return Path(cache_dir).expanduser() / f"{name}.zarr"


def ensure_synthetic_store(cache_dir: str | os.PathLike[str] | None = None, **params: Any) -> Path:
    """The cached synthetic dataset as a cell store, made (atomically) on first use."""
    from data_modules.convert import write_store  # the store writer is heavy; only needed on first use

    path = default_dataset_path(cache_dir, **params)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        adata = make_synthetic_adata(**params)
        write_store(adata, path, obs_keys=list(adata.obs.columns), seed=_resolve_params(params)["seed"],
                    name="synthetic", created_by="scgpt built-in synthetic dataset", uns=dict(adata.uns))
    return path
