"""Paired perturbation data: a control cell's expression in, a perturbed cell's expression out.

Perturbation datasets are small (thousands to a few hundred thousand cells over a few thousand genes), so
this module reads every cell of the stores into memory once and serves a map-style dataset of pairs,
instead of the streaming path of :mod:`data_modules.datamodule`.

- **Genes**: one fixed panel for every cell (as in GEARS): the ``max_seq_len - 1`` genes with the highest
  mean expression over the cells that are not *unseen*, always including the perturbed genes. Every cell
  is ``<cls>`` + the panel.
- **Condition input** (``condition_input``): ``genes`` (GEARS): the conditions are perturbed genes
  ('A+B' for combinations), flagged on their tokens (``model.n_perturbation_flags``); ``label``: the
  conditions are any values (a stimulation, a drug: Kang's CTRL / STIM), given to the model as a learned
  per-cell embedding (``model.n_conditions``; batches carry the target's code as ``labels['condition']``),
  and changes are measured per (condition, group) *unit* instead of per condition.
- **Values**: log1p of counts normalised to 10,000 per cell (over all genes of the store), as GEARS and
  scGPT's perturbation finetuning use; inputs and targets alike. Not binned: per-cell quantile bins
  would hide the change in level that the task predicts.
- **Pairs**: the target is a cell of a perturbation (or a control cell, which teaches the identity
  response); the input is a random control cell of the same group (``pair_keys``, default the cell
  type), re-drawn each epoch from ``(seed, epoch, target row)``. Evaluation pairs are drawn once.
- **Splits**: perturbations named in ``heldout_perturbations`` (else a seeded ``heldout_fraction`` of
  them) are *unseen*: none of their cells is trained on. With ``condition_input=label`` the unseen cells
  are instead those of every non-control condition in the groups named in ``heldout_groups`` (the held-out
  cell type benchmark of scGen / CPA: a type's STIM cells are predicted from its CTRL cells, which are
  trained on as identity targets). Of every other perturbation (unit) a seeded
  ``heldout_cell_fraction`` of the cells is held out (*seen*). Both are in the validation loader; every
  control cell is a training target and an input for any pair.
- **Reference**: each cell's control reference is the mean control expression of its group, so expression
  changes are measured against controls of the same composition.

Exact resume: the pair order is a function of (seed, epoch), each rank takes every ``world``-th pair of
it (:class:`EpochSampler`), and the data module's state records the epoch and the batches consumed in it,
so a run resumed mid-epoch skips exactly those and goes on with the pairs the uninterrupted run would have
drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_modules.collate import CellBatch
from scgpt.errors import ConfigError, DataError
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)

SPLITS = ("train", "seen", "unseen")  # split codes 0, 1, 2 of target cells
CONDITION_INPUTS = ("genes", "label")  # how the model is told the target's condition (module docstring)


@dataclass
class PerturbationBatch(CellBatch):
    """A :class:`CellBatch` (padded, every cell ``<cls>`` + the gene panel) with perturbation flags."""

    perturbation_flags: Tensor | None = None  # (B, L) long: 1 on the perturbed genes' tokens
    target_rows: Tensor | None = None  # (B,) row of each target cell in :class:`PerturbationData`


@dataclass
class PerturbationData:
    """Every cell in memory over the gene panel, with conditions, groups and splits."""

    gene_ids: np.ndarray  # (G,) vocabulary ids of the panel
    gene_names: list[str]
    expr: np.ndarray  # (N, G) float32 log1p-normalised expression
    condition: np.ndarray  # (N,) 0 control, c > 0 ``conditions[c]``
    conditions: list[str]  # names; [0] is the control value
    condition_genes: list[np.ndarray]  # per condition: panel positions of its perturbed genes
    group: np.ndarray  # (N,) pairing group code
    split: np.ndarray  # (N,) 0 train, 1 seen held-out cells, 2 unseen perturbations; controls 0
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) codes passed to the model (batch)
    condition_input: str = "genes"  # genes: flags on perturbed genes; label: a condition embedding, per-group units
    group_names: list[str] = field(default_factory=list)
    reference: np.ndarray = field(init=False)  # (n_groups, G) mean control expression per group
    controls_of_group: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        controls = np.flatnonzero(self.condition == 0)
        self.n_groups = n_groups = int(self.group.max(initial=0)) + 1
        self.controls_of_group = [controls[self.group[controls] == g] for g in range(n_groups)]
        for g, rows in enumerate(self.controls_of_group):
            if rows.size == 0:
                self.controls_of_group[g] = controls  # no control of that group: any control
        self.reference = np.stack([self.expr[rows].mean(0) for rows in self.controls_of_group]).astype(np.float32)

    @property
    def n_genes(self) -> int:
        return self.gene_ids.size

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def delta(self, rows: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """(n, G) expression minus each cell's group control reference (``values`` default: the truth)."""
        return (self.expr[rows] if values is None else values) - self.reference[self.group[rows]]

    @property
    def by_group(self) -> bool:
        """Changes are measured per (condition, group) unit (``condition_input=label``), else per condition."""
        return self.condition_input == "label"

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """(n,) the unit code of each row: its condition, or condition * n_groups + group when ``by_group``."""
        return self.condition[rows] * self.n_groups + self.group[rows] if self.by_group else self.condition[rows]

    def unit_condition(self, unit: int) -> int:
        return int(unit) // self.n_groups if self.by_group else int(unit)

    def unit_name(self, unit: int) -> str:
        name = self.conditions[self.unit_condition(unit)]
        return f"{name} | {self.group_names[int(unit) % self.n_groups]}" if self.by_group else name

    def training_shift(self) -> dict[int, np.ndarray]:
        """Mean change versus control of each unit's training cells (perturbed only): the mean-shift baseline."""
        rows = self.rows("train")
        rows = rows[self.condition[rows] > 0]
        units = self.unit(rows)
        return {int(u): self.delta(rows[units == u]).mean(0) for u in np.unique(units)}

    def partner(self, target: int, seed: Sequence[int]) -> int:
        """A random control of the target's group (not the target itself), from ``seed``."""
        pool = self.controls_of_group[self.group[target]]  # sorted rows
        rng = np.random.default_rng([*seed, target])
        own = int(np.searchsorted(pool, target))
        if own < pool.size and pool[own] == target and pool.size > 1:
            i = int(rng.integers(pool.size - 1))
            return int(pool[i + (i >= own)])
        return int(pool[rng.integers(pool.size)])


# ---- reading -------------------------------------------------------------------------------------
def check_column(store, key: str, what: str) -> None:
    if key not in store.obs_columns:
        raise DataError(f"{store.path}: obs has no column {key!r} ({what}); add it to the store "
                        f"(scgpt-data convert --obs-keys ...,{key}) or set {what} to an existing column; "
                        f"available: {', '.join(store.obs_columns) or 'none'}")


def _column(store, key: str, what: str) -> np.ndarray:
    check_column(store, key, what)
    values = store.read_obs(key)
    if store.is_categorical(key):
        names = np.asarray(store.label_categories(key) + [""], dtype=object)
        return names[values].astype(str)  # code -1 (missing) -> ''
    return np.asarray(values).astype(str)


def obs_keys(perturbation_key: str, pair_keys: Sequence[str], batch_key: str | None) -> dict[str, str]:
    """The obs columns the task reads: option name -> column."""
    keys = {"perturbation_key": perturbation_key, **{f"pair_keys[{i}]": k for i, k in enumerate(pair_keys)}}
    return {**keys, "batch_key": batch_key} if batch_key else keys


def read_cells(sources, vocab, keys: dict[str, str]) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """All cells as log1p(normalised) CSR over vocabulary ids, and the string obs columns ``keys``
    (name -> column) of each cell."""
    blocks, columns = [], {name: [] for name in keys}
    for store in sources:
        for name, key in keys.items():
            columns[name].append(_column(store, key, f"task.data_module.{name}"))
        counts = store.read_counts(0, store.n_cells).astype(np.float32)
        totals = np.asarray(counts.sum(1)).ravel()
        counts = sp.diags(1e4 / np.maximum(totals, 1.0)).astype(np.float32) @ counts
        counts.data = np.log1p(counts.data)
        ids = vocab.encode(list(store.var_names))
        counts = counts.tocoo()
        keep = ids[counts.col] >= 0
        blocks.append(sp.csr_matrix((counts.data[keep], (counts.row[keep], ids[counts.col[keep]])),
                                    shape=(store.n_cells, vocab.size)))
    return sp.vstack(blocks, format="csr"), {k: np.concatenate(v) for k, v in columns.items()}


def _split_conditions(names: list[str], heldout: Sequence[str] | None, fraction: float, seed: int) -> set[str]:
    """The unseen perturbations: the named ones, else a seeded ``fraction`` (at least 1, at most all but 1)."""
    if heldout is not None:
        unknown = [h for h in heldout if h not in names]
        if unknown:
            raise ConfigError(f"task.data_module.heldout_perturbations: {unknown[0]!r} is not a perturbation of the data; "
                              f"choose from {', '.join(names)}")
        return set(heldout)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"task.data_module.heldout_fraction: {fraction} must be in [0, 1)")
    n = min(max(int(round(len(names) * fraction)), 1 if fraction > 0 else 0), max(len(names) - 1, 0))
    return set(np.random.default_rng([seed, 5]).permutation(names)[:n].tolist())


def build_perturbation_data(sources, vocab, *, max_genes: int, perturbation_key: str = "perturbation",
                            control_value: str = "control", pair_keys: Sequence[str] = ("cell_type",),
                            batch_key: str | None = None, heldout_perturbations: Sequence[str] | None = None,
                            heldout_fraction: float = 0.25, heldout_cell_fraction: float = 0.2,
                            seed: int = 0, condition_input: str = "genes",
                            heldout_groups: Sequence[str] | None = None) -> PerturbationData:
    if condition_input not in CONDITION_INPUTS:
        raise ConfigError(f"task.data_module.condition_input: {condition_input!r}; choose one of "
                          f"{', '.join(CONDITION_INPUTS)}")
    x, obs = read_cells(sources, vocab, obs_keys(perturbation_key, pair_keys, batch_key))
    label = obs["perturbation_key"]
    if not (label == control_value).any():
        raise DataError(f"{sources[0].path}: no cell has {perturbation_key}={control_value!r}; set "
                        "task.data_module.control_value to the value that marks control cells")
    names = sorted(set(label) - {control_value, ""})
    if condition_input == "label":
        return _label_conditions(x, obs, label, names, where=f"{sources[0].path}: obs {perturbation_key!r}",
                                 max_genes=max_genes, control_value=control_value,
                                 pair_keys=pair_keys, heldout_groups=heldout_groups,
                                 heldout_cell_fraction=heldout_cell_fraction, seed=seed, vocab=vocab)
    if heldout_groups:
        raise ConfigError("task.data_module.heldout_groups: needs condition_input=label (with gene perturbations, "
                          "hold out perturbations with heldout_perturbations)")
    genes_of = {n: n.split("+") for n in names}  # GEARS style 'A+B' for combinations
    usable = [n for n in names if all(g in vocab for g in genes_of[n])]
    if len(usable) < len(names):
        log.warning("perturbation: %d perturbations of genes outside the vocabulary are dropped: %s",
                    len(names) - len(usable), ", ".join(sorted(set(names) - set(usable))[:10]))
    if not usable:
        raise DataError(f"{sources[0].path}: no perturbation in obs {perturbation_key!r} names a gene of the "
                        f"vocabulary; values must be gene names (or 'A+B'), controls {control_value!r}")
    conditions = [control_value, *usable]
    code = {name: c for c, name in enumerate(conditions)}
    condition = np.array([code.get(v, -1) for v in label])
    keep = condition >= 0
    x, condition = x[keep], condition[keep]
    obs = {k: v[keep] for k, v in obs.items()}

    perturbed_ids = np.array(sorted({int(vocab[g]) for n in usable for g in genes_of[n]}), dtype=np.int64)
    if perturbed_ids.size > max_genes:
        raise ConfigError(f"model.max_seq_len: {perturbed_ids.size} perturbed genes do not fit in {max_genes} "
                          "gene tokens; raise model.max_seq_len")
    group_names, group = _groups(obs, pair_keys, condition.size)
    unseen = _split_conditions(usable, heldout_perturbations, heldout_fraction, seed)
    split = _assign_splits(np.where(condition > 0, condition, -1), {conditions.index(n) for n in unseen},
                           heldout_cell_fraction, seed)
    panel = _gene_panel(x, split, perturbed_ids, max_genes)
    position = {int(g): i for i, g in enumerate(panel)}
    condition_genes = [np.zeros(0, np.int64)] + [np.array([position[int(vocab[g])] for g in genes_of[n]])
                                                 for n in usable]
    labels = {}
    if batch_key:
        labels["batch"] = np.unique(obs["batch_key"], return_inverse=True)[1]
    return PerturbationData(panel.astype(np.int64), [vocab.id_to_token(int(g)) for g in panel],
                            x[:, panel].toarray().astype(np.float32), condition, conditions, condition_genes,
                            group.astype(np.int64), split, labels, group_names=group_names)


def _groups(obs: dict[str, np.ndarray], pair_keys: Sequence[str], n: int) -> tuple[list[str], np.ndarray]:
    """(group names, (n,) group code) of the cells: the ``pair_keys`` values joined by '|'."""
    if not pair_keys:
        return [""], np.zeros(n, np.int64)
    joined = ["|".join(t) for t in zip(*[obs[f"pair_keys[{i}]"] for i in range(len(pair_keys))])]
    names, group = np.unique(joined, return_inverse=True)
    return [str(v) for v in names], group.astype(np.int64)


def _gene_panel(x: sp.csr_matrix, split: np.ndarray, forced: np.ndarray, max_genes: int) -> np.ndarray:
    """Sorted vocabulary ids: ``forced`` and the genes of highest mean expression over the cells that are not
    unseen (held-out cells never choose the genes), among the genes expressed in any cell."""
    known = x[split != SPLITS.index("unseen")]
    mean = np.asarray(known.mean(0)).ravel()
    mean[forced] = np.inf  # always in the panel
    candidates = np.union1d(np.flatnonzero(np.asarray((x != 0).sum(0)).ravel() > 0), forced)
    return np.sort(candidates[np.argsort(-mean[candidates], kind="stable")][:max_genes])


def _label_conditions(x, obs, label, names, *, where, max_genes, control_value, pair_keys, heldout_groups,
                      heldout_cell_fraction, seed, vocab) -> PerturbationData:
    """``condition_input=label``: any condition values, an embedding per condition, held-out (group,
    condition) units: every non-control cell of the ``heldout_groups`` is unseen."""
    if not names:
        raise DataError(f"{where} has only the control value {control_value!r}; the task needs cells of at least "
                        "one other condition (or set task.data_module.control_value)")
    conditions = [control_value, *names]
    code = {name: c for c, name in enumerate(conditions)}
    keep = label != ""
    x, condition = x[keep], np.array([code[v] for v in label[keep]])
    group_names, group = _groups({k: v[keep] for k, v in obs.items()}, pair_keys, condition.size)
    unknown = [g for g in heldout_groups or [] if g not in group_names]
    if unknown:
        raise ConfigError(f"task.data_module.heldout_groups: {unknown[0]!r} is not a group of the data "
                          f"(pair_keys {list(pair_keys)}); choose from {', '.join(group_names)}")
    split = _assign_splits(np.where(condition > 0, condition * len(group_names) + group, -1), set(),
                           heldout_cell_fraction, seed)
    held = np.isin(group, [group_names.index(g) for g in heldout_groups or []]) & (condition > 0)
    split[held] = SPLITS.index("unseen")
    panel = _gene_panel(x, split, np.zeros(0, np.int64), max_genes)
    return PerturbationData(panel.astype(np.int64), [vocab.id_to_token(int(g)) for g in panel],
                            x[:, panel].toarray().astype(np.float32), condition, conditions,
                            [np.zeros(0, np.int64)] * len(conditions), group, split,
                            {"condition": condition}, condition_input="label", group_names=group_names)


def _assign_splits(unit: np.ndarray, unseen: set[int], cell_fraction: float, seed: int) -> np.ndarray:
    """(N,) split codes from each cell's ``unit`` (-1: a control, always trained on): the ``unseen`` units
    whole; of each other unit a seeded ``cell_fraction`` of its cells (at least 1, never all) seen."""
    if not 0.0 <= cell_fraction < 1.0:
        raise ConfigError(f"task.data_module.heldout_cell_fraction: {cell_fraction} must be in [0, 1)")
    split = np.zeros(unit.size, np.int64)
    rng = np.random.default_rng([seed, 6])
    for u in np.unique(unit[unit >= 0]):
        rows = np.flatnonzero(unit == u)
        if int(u) in unseen:
            split[rows] = SPLITS.index("unseen")
        else:
            n = min(max(int(round(rows.size * cell_fraction)), 1 if cell_fraction > 0 else 0), rows.size - 1)
            split[rng.permutation(rows)[:n]] = SPLITS.index("seen")
    return split


# ---- pairs, batches, loaders ---------------------------------------------------------------------
class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)`` for this rank: a seeded permutation per epoch (or the order as is), padded to
    a multiple of ``num_replicas`` by repeating its start, of which rank r takes items r, r + world, ...; the
    dataset draws each pair's control from (seed, epoch, row). ``resume()`` -> (epoch, items of this rank
    already consumed in it) leaves those out (exact resume); it is read when an epoch starts, so a
    checkpoint restored after the loader was built still counts. A DistributedSampler, so Lightning does
    not wrap it in another."""

    def __init__(self, n: int, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0,
                 resume: Callable[[], tuple[int, int]] = lambda: (-1, 0)) -> None:
        self.n, self.seed, self.shuffle, self.epoch, self.drop_last = n, seed, shuffle, 0, False
        self.num_replicas, self.rank = max(1, int(num_replicas)), int(rank)
        self.per_rank = -(-n // self.num_replicas)  # ceil
        self.resume = resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _skipped(self) -> int:
        epoch, items = self.resume()
        return min(items, self.per_rank) if self.epoch == epoch else 0

    def __len__(self) -> int:
        """The whole epoch's share, also when resuming: Lightning counts the batches it already ran in."""
        return self.per_rank

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        padded = np.resize(order, self.per_rank * self.num_replicas)  # repeats the start (DistributedSampler's padding)
        mine = padded[self.rank::self.num_replicas][self._skipped():]
        return iter([(int(i), self.epoch) for i in mine])


class PairedPerturbationDataset(Dataset):
    """Map-style: item ``(i, epoch)`` is (target row ``targets[i]``, a control row of its group, the rows
    whose mean expression is the target: ``targets[i]`` and ``target_cells - 1`` random other targets of the
    same condition and group; 1 (default) trains on single cells, more average out counting noise)."""

    def __init__(self, data: PerturbationData, targets: np.ndarray, seed: int, target_cells: int = 1) -> None:
        self.data, self.targets, self.seed, self.target_cells = data, targets, seed, int(target_cells)
        keys = data.condition[targets] * (int(data.group.max(initial=0)) + 1) + data.group[targets]
        self.peers = {int(k): targets[keys == k] for k in np.unique(keys)} if self.target_cells > 1 else {}
        self.key_of = dict(zip(targets.tolist(), keys.tolist()))

    def __len__(self) -> int:
        return self.targets.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        index, epoch = key
        target = int(self.targets[index])
        rows = np.array([target])
        if self.target_cells > 1:
            pool = self.peers[self.key_of[target]]
            rng = np.random.default_rng([self.seed, epoch, target, 1])
            rows = np.r_[target, pool[rng.integers(pool.size, size=self.target_cells - 1)]]
        return target, self.data.partner(target, (self.seed, epoch)), rows


class PairCollator:
    """(target, control) rows -> :class:`PerturbationBatch`: ``<cls>`` + panel genes, the control's values in,
    the target's values out, every gene token hidden (predicted), flags on the target's perturbed genes."""

    def __init__(self, data: PerturbationData, cls_id: int, pad_value: float) -> None:
        self.data, self.cls_id, self.pad_value = data, cls_id, pad_value

    def __call__(self, pairs: list[tuple[int, int, np.ndarray]]) -> PerturbationBatch:
        d = self.data
        targets = np.array([p[0] for p in pairs])
        controls = np.array([p[1] for p in pairs])
        target_expr = np.stack([d.expr[p[2]].mean(0) for p in pairs])  # (B, G)
        n, length = targets.size, d.n_genes + 1
        gene_ids = np.concatenate([np.full((n, 1), self.cls_id), np.broadcast_to(d.gene_ids, (n, d.n_genes))], 1)
        pad = np.full((n, 1), self.pad_value, np.float32)
        values = np.concatenate([pad, d.expr[controls]], 1)  # (B, L)
        target_values = np.concatenate([pad, target_expr], 1)  # (B, L)
        flags = np.zeros((n, length), np.int64)
        for i, c in enumerate(d.condition[targets]):
            flags[i, 1 + d.condition_genes[c]] = 1
        hidden = np.ones((n, length), bool)
        hidden[:, 0] = False
        return PerturbationBatch(
            gene_ids=torch.as_tensor(gene_ids, dtype=torch.long), values=torch.as_tensor(values),
            target_values=torch.as_tensor(target_values), hidden_mask=torch.as_tensor(hidden),
            gen_mask=torch.zeros(n, length, dtype=torch.bool), generative=torch.zeros(n, dtype=torch.bool),
            padding_mask=torch.zeros(n, length, dtype=torch.bool), max_seqlen=length,
            labels={k: torch.as_tensor(v[targets]) for k, v in d.labels.items()},
            perturbation_flags=torch.as_tensor(flags), target_rows=torch.as_tensor(targets))


class PerturbationDataModule(L.LightningDataModule):
    """Wraps the cell data module (stores, vocabulary, ``init_from`` vocabulary) and serves paired batches:
    training pairs, and one validation loader with the held-out cells of seen perturbations and the cells
    of unseen perturbations. Built by ``train()`` from ``task.data_module`` around ``cfg.data``."""

    def __init__(self, cells, perturbation_key: str = "perturbation", control_value: str = "control",
                 pair_keys: Sequence[str] = ("cell_type",), batch_key: str | None = None,
                 heldout_perturbations: Sequence[str] | None = None, heldout_fraction: float = 0.25,
                 heldout_cell_fraction: float = 0.2, target_cells: int = 1, condition_input: str = "genes",
                 heldout_groups: Sequence[str] | None = None) -> None:
        super().__init__()
        if int(target_cells) < 1:
            raise ConfigError(f"task.data_module.target_cells: {target_cells} must be at least 1")
        self.target_cells = int(target_cells)
        self.cells = cells
        self.options: dict[str, Any] = dict(
            perturbation_key=perturbation_key, control_value=control_value, pair_keys=list(pair_keys),
            batch_key=batch_key, heldout_perturbations=None if heldout_perturbations is None else
            [str(h) for h in heldout_perturbations], heldout_fraction=heldout_fraction,
            heldout_cell_fraction=heldout_cell_fraction, condition_input=str(condition_input),
            heldout_groups=None if heldout_groups is None else [str(g) for g in heldout_groups])
        self.seed, self.batch_size = int(cells.seed), int(cells.per_device_batch_size)
        self.num_workers = int(cells.num_workers)
        self._data: PerturbationData | None = None
        self._epoch, self.batches_done = 0, 0
        self._resume: tuple[int, int] = (-1, 0)  # (epoch, batches already consumed in it) from a checkpoint
        for store in cells.sources:  # a missing column stops the run here, before any training is set up
            for name, key in obs_keys(perturbation_key, pair_keys, batch_key).items():
                check_column(store, key, f"task.data_module.{name}")

    # what train() and init_from need from a data module: the cell data module's answers
    sources = property(lambda self: self.cells.sources)
    vocab = property(lambda self: self.cells.vocab)
    fingerprint = property(lambda self: self.cells.fingerprint)
    label_names = property(lambda self: self.cells.label_names)

    @property
    def n_conditions(self) -> int:
        """Rows of the model's condition embedding (``model_heads.n_conditions: auto``): every condition,
        control included, with ``condition_input=label``; 0 with gene flags."""
        return len(self.data.conditions) if self.data.by_group else 0

    def n_classes(self, label_key: str) -> int:
        return self.cells.n_classes(label_key)

    def label_counts(self, label_key: str, split: str = "train") -> np.ndarray:
        return self.cells.label_counts(label_key, split)

    def use_vocab(self, vocab) -> None:
        if self._data is not None:
            raise RuntimeError("use_vocab must be called before setup()")
        self.cells.use_vocab(vocab)

    def prepare_data(self) -> None:
        self.cells.prepare_data()

    @property
    def data(self) -> PerturbationData:
        """The paired dataset (read on first use)."""
        if self._data is None:
            max_genes = int(self.cells.collator_options["max_seq_len"]) - 1
            self._data = build_perturbation_data(self.sources, self.vocab, max_genes=max_genes, seed=self.seed,
                                                 **self.options)
            counts = {s: int((self._data.split == i).sum()) for i, s in enumerate(SPLITS)}
            log.info("perturbation: %d genes, %d conditions; cells %s", self._data.n_genes,
                     len(self._data.conditions) - 1, counts)
        return self._data

    def setup(self, stage: str | None = None) -> None:
        if self.data.rows("train").size == 0:
            raise DataError(f"{self.sources[0].path}: no training cells left after the held-out splits; "
                            "lower task.data_module.heldout_fraction or heldout_cell_fraction")

    def _loader(self, targets: np.ndarray, train: bool) -> DataLoader:
        data = self.data
        vocab = self.vocab
        dataset = PairedPerturbationDataset(data, targets, self.seed if train else self.seed + 1,
                                            self.target_cells if train else 1)
        world, rank = self._world()
        resume = (lambda: (self._resume[0], self._resume[1] * self.batch_size)) if train else (lambda: (-1, 0))
        sampler = EpochSampler(len(dataset), self.seed, train, world, rank, resume)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=PairCollator(data, vocab.cls_id, float(self.cells.collator_options["pad_value"])),
                          drop_last=train and sampler.per_rank >= self.batch_size, num_workers=self.num_workers)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data.rows("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(np.concatenate([self.data.rows("seen"), self.data.rows("unseen")]), train=False)

    # ---- exact resume (DataProgress keeps the position) -------------------------------------
    def start_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self.batches_done = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        skipped = self._resume[1] if self._resume[0] == self._epoch else 0
        return {"fingerprint": self.fingerprint, "seed": self.seed, "epoch": self._epoch,
                "batches_done": skipped + self.batches_done, "world_size": self._world()[0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("checkpoint was trained on other data (store fingerprint differs); resume with the same "
                            "data, or start a new run with init_from= instead of ckpt_path=")
        if state.get("seed") != self.seed:
            raise ConfigError(f"seed: the checkpoint used seed {state.get('seed')}; resume with seed={state.get('seed')}")
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        if done and state.get("world_size") != self._world()[0]:
            raise ConfigError(f"trainer.devices: the checkpoint stopped mid-epoch with {state.get('world_size')} ranks, "
                              "and the pair order of each rank depends on it; resume with the same number")
        self._epoch, self._resume, self.batches_done = epoch, (epoch, done), 0
