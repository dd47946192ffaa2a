"""A planted regulator -> target network and perturbation conditions for the synthetic generator.

Off by default (``n_regulators=0``): :func:`data_modules.synthetic.make_synthetic_adata` then calls
nothing here and its output is unchanged. When on, every random number is drawn from the generator
the caller passes (``np.random.default_rng([seed, 7])``), never from the generator of the counts.

The model, multiplicative on the gene proportions of each (cell type, batch) before sampling:

- ``n_regulators`` regulator genes are drawn from the best-expressed quarter of the non-housekeeping
  genes; each gets 10-20 targets from the better-expressed half (regulators excluded, so no cascades),
  with weights ``w``: positive with probability 0.8, ``|w|`` uniform in [0.5, 1].
- A regulator's level differs per cell type: its program fold change times a log-normal factor
  (sigma 0.5) applied to the regulator gene itself.
- Each target is multiplied by ``(level / geometric-mean level over types) ** w``: targets follow their
  regulators across cell types.
- Perturbation condition ``c`` (``n_perturbations`` of them, one per regulator, the first regulators
  in order) multiplies its regulator by ``perturbation_factor`` (0.1: knockdown; > 1: overexpression),
  so each of its targets moves by ``w * log(factor)`` in log expression.
- ``perturbed_fraction`` of the cells, chosen at random, are split evenly over the conditions; the
  others are ``control``.
- ``regulator_activity`` > 0 (log-normal sigma; 0 = off) also varies the regulators from cell to cell
  within a type, as transcription-factor activity does: each cell is in one of ``ACTIVITY_STATES``
  states drawn at random, each state multiplies every regulator by its own log-normal factor and each
  target by that factor to the edge's weight. Targets then follow their regulators inside every cell
  type, not only across types.

Recorded: ``obs['perturbation']`` ('control' or the regulator's gene name), ``uns['regulatory_network']``
(``regulator``, ``target``, ``weight`` arrays, one entry per edge), ``uns['perturbations']`` (the
perturbed genes and the factor) and the parameters in ``uns['synthetic']``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from scgpt.errors import ConfigError

CONTROL = "control"
TARGETS_PER_REGULATOR = (10, 20)  # inclusive range
POSITIVE_SHARE = 0.8  # of edge weights; knocking a regulator down mostly lowers its targets
TYPE_LEVEL_SIGMA = 0.5
ACTIVITY_STATES = 16  # per-cell regulator activity states (regulator_activity > 0)


@dataclass
class PlantedNetwork:
    regulators: np.ndarray  # (R,) gene index of each regulator
    edge_regulator: np.ndarray  # (E,) position of the edge's regulator in ``regulators``
    edge_target: np.ndarray  # (E,) target gene index
    edge_weight: np.ndarray  # (E,) exponent of the regulator's relative level
    type_level: np.ndarray  # (T, R) log-normal level factor of each regulator per cell type


def check_params(n_regulators: int, n_perturbations: int, perturbed_fraction: float, perturbation_factor: float,
                 n_candidates: int) -> None:
    if int(n_regulators) != n_regulators or n_regulators < 0:
        raise ConfigError(f"synthetic data: n_regulators={n_regulators!r} must be a non-negative integer")
    if int(n_perturbations) != n_perturbations or not 0 <= n_perturbations <= n_regulators:
        raise ConfigError(f"synthetic data: n_perturbations={n_perturbations!r} must be an integer between 0 and "
                          f"n_regulators={n_regulators}; raise n_regulators")
    if n_regulators and 2 * n_regulators + TARGETS_PER_REGULATOR[0] > n_candidates:
        raise ConfigError(f"synthetic data: n_regulators={n_regulators} is too many for {n_candidates} "
                          "non-housekeeping genes; lower it or raise n_genes")
    if n_perturbations and not 0.0 < perturbed_fraction < 1.0:
        raise ConfigError(f"synthetic data: perturbed_fraction={perturbed_fraction!r} must be in (0, 1)")
    if not perturbation_factor > 0.0 or perturbation_factor == 1.0:
        raise ConfigError(f"synthetic data: perturbation_factor={perturbation_factor!r} must be positive and not 1 "
                          "(< 1 knocks regulators down, > 1 overexpresses them)")


def plant_network(rng: np.random.Generator, base: np.ndarray, candidates: np.ndarray, n_regulators: int,
                  n_cell_types: int) -> PlantedNetwork:
    """Regulators, their targets and weights, and each regulator's per-type level factor."""
    ranked = candidates[np.argsort(-base[candidates], kind="stable")]  # better-expressed first
    regulators = rng.choice(ranked[: max(n_regulators, ranked.size // 4)], size=n_regulators, replace=False)
    pool = np.setdiff1d(ranked[: max(TARGETS_PER_REGULATOR[1], ranked.size // 2)], regulators)
    sizes = rng.integers(TARGETS_PER_REGULATOR[0], TARGETS_PER_REGULATOR[1] + 1, size=n_regulators)
    targets = [rng.choice(pool, size=min(int(s), pool.size), replace=False) for s in sizes]
    edge_regulator = np.repeat(np.arange(n_regulators), [t.size for t in targets])
    edge_target = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    sign = np.where(rng.random(edge_target.size) < POSITIVE_SHARE, 1.0, -1.0)
    weight = sign * rng.uniform(0.5, 1.0, size=edge_target.size)
    type_level = rng.lognormal(0.0, TYPE_LEVEL_SIGMA, size=(n_cell_types, n_regulators))
    return PlantedNetwork(regulators.astype(np.int64), edge_regulator, edge_target.astype(np.int64), weight, type_level)


def condition_log_multipliers(net: PlantedNetwork, type_mult: np.ndarray, n_perturbations: int,
                              factor: float) -> np.ndarray:
    """(T, P, G) log multiplier of each gene per cell type and condition (0: control, p: regulator p - 1)."""
    n_types, n_genes = type_mult.shape
    n_regulators = net.regulators.size
    log_factor = np.zeros((1 + n_perturbations, n_regulators))  # (P, R)
    log_factor[np.arange(1, 1 + n_perturbations), np.arange(n_perturbations)] = np.log(factor)
    own = np.log(net.type_level)  # (T, R): the regulator gene itself, beyond its program fold change
    level = np.log(type_mult[:, net.regulators]) + own  # (T, R) log level of each regulator
    level = level - level.mean(0, keepdims=True)  # relative to the geometric mean over types
    out = np.zeros((n_types, 1 + n_perturbations, n_genes))  # (T, P, G)
    out[:, :, net.regulators] += own[:, None, :] + log_factor[None, :, :]
    shifted = level[:, None, :] + log_factor[None, :, :]  # (T, P, R) log level in each condition
    contribution = shifted[:, :, net.edge_regulator] * net.edge_weight  # (T, P, E)
    np.add.at(out, (slice(None), slice(None), net.edge_target), contribution)
    return out


def activity_log_multipliers(rng: np.random.Generator, net: PlantedNetwork, n_genes: int,
                             sigma: float) -> np.ndarray:
    """(S, G) log multiplier of each gene in each activity state (S = 1, all zero, when ``sigma`` is 0)."""
    if sigma <= 0:
        return np.zeros((1, n_genes))
    activity = rng.normal(0.0, sigma, size=(ACTIVITY_STATES, net.regulators.size))  # (S, R) log activity
    out = np.zeros((ACTIVITY_STATES, n_genes))
    out[:, net.regulators] += activity
    np.add.at(out, (slice(None), net.edge_target), activity[:, net.edge_regulator] * net.edge_weight)  # (S, E)
    return out


def assign_conditions(rng: np.random.Generator, n_cells: int, n_perturbations: int, fraction: float) -> np.ndarray:
    """(n_cells,) condition per cell: 0 control, p > 0 perturbation p; balanced over perturbations."""
    condition = np.zeros(n_cells, dtype=np.int64)
    if n_perturbations:
        perturbed = rng.permutation(n_cells)[: int(round(n_cells * fraction))]
        condition[perturbed] = 1 + np.arange(perturbed.size) % n_perturbations
    return condition


@dataclass
class PerturbationDesign:
    """What :func:`perturb` hands back to the generator: the proportions and rows to sample, and the records."""

    prop: np.ndarray  # (T * B * P * S, G) gene proportions per (type, batch, condition, activity state)
    rows: np.ndarray  # (n_cells,) row of ``prop`` for each cell
    network: PlantedNetwork
    condition: np.ndarray  # (n_cells,)
    params: dict

    def annotate(self, adata: ad.AnnData) -> None:
        """Write the perturbation column and the network into ``adata`` (obs and uns)."""
        genes = np.asarray(adata.var_names)
        names = [CONTROL, *genes[self.network.regulators[: self.params["n_perturbations"]]].tolist()]
        adata.obs["perturbation"] = pd.Categorical.from_codes(self.condition, names)
        net = self.network
        adata.uns["regulatory_network"] = {
            "regulator": genes[net.regulators[net.edge_regulator]].astype(object),
            "target": genes[net.edge_target].astype(object),
            "weight": net.edge_weight.astype(np.float64),
        }
        adata.uns["perturbations"] = {"genes": np.array(names[1:], dtype=object),
                                      "factor": float(self.params["perturbation_factor"])}
        adata.uns["synthetic"].update({k: (float(v) if isinstance(v, float) else int(v)) for k, v in self.params.items()})


def perturb(rng: np.random.Generator, prop: np.ndarray, rows: np.ndarray, *, base: np.ndarray,
            candidates: np.ndarray, type_mult: np.ndarray, n_batches: int, n_regulators: int,
            n_perturbations: int, perturbed_fraction: float, perturbation_factor: float,
            regulator_activity: float = 0.0) -> PerturbationDesign:
    """Plant the network into the (type, batch) proportions ``prop`` (T * B, G) and expand them by condition
    (and by activity state when ``regulator_activity`` > 0)."""
    check_params(n_regulators, n_perturbations, perturbed_fraction, perturbation_factor, candidates.size)
    if not regulator_activity >= 0:
        raise ConfigError(f"synthetic data: regulator_activity={regulator_activity!r} must be >= 0 (0: off)")
    n_types, n_genes = type_mult.shape
    net = plant_network(rng, base, candidates, n_regulators, n_types)
    log_mult = condition_log_multipliers(net, type_mult, n_perturbations, perturbation_factor)  # (T, P, G)
    n_conditions = 1 + n_perturbations
    types_of_rows = np.arange(prop.shape[0]) // n_batches  # (T * B,)
    out = prop[:, None, :] * np.exp(log_mult[types_of_rows])  # (T * B, P, G)
    condition = assign_conditions(rng, rows.size, n_perturbations, perturbed_fraction)
    rows = rows * n_conditions + condition
    if regulator_activity > 0:  # drawn after everything above, so the network and conditions do not change
        states = np.exp(activity_log_multipliers(rng, net, n_genes, regulator_activity))  # (S, G)
        out = out[:, :, None, :] * states[None, None]  # (T * B, P, S, G)
        rows = rows * states.shape[0] + rng.integers(0, states.shape[0], size=rows.size)
    out = (out / out.sum(-1, keepdims=True)).reshape(-1, n_genes)
    params = dict(n_regulators=n_regulators, n_perturbations=n_perturbations, perturbed_fraction=float(perturbed_fraction),
                  perturbation_factor=float(perturbation_factor))
    if regulator_activity > 0:
        params["regulator_activity"] = float(regulator_activity)
    return PerturbationDesign(out, rows, net, condition, params)
