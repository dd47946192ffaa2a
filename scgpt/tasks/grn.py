"""Gene regulatory networks from a trained model, scored against the planted network of the synthetic store
or an external reference (``reference_edges``: a regulator -> target edge file, e.g. omnipath; see
:mod:`scgpt.tasks.grn_reference`: the ``network_genes`` most detected reference genes of the data, the
regulators the reference's sources among them).

The planted network is read from the store's ``uns/regulatory_network`` (regulator -> target edges the
generator planted: ``scgpt-data synth`` / ``data.synthetic`` with ``n_regulators > 0``), else from
``uns/gene_programs`` (the first gene of each program as regulator of the others). Three networks are
ranked over all ordered pairs of measured genes (self pairs excluded), each with AUPRC and early precision
(precision in the top |E| pairs) against random (the edge density):

- ``grn_*``: cosine similarity of the two genes' input embeddings (symmetric);
- ``attn/grn_*``: attention of encoder layer ``attention_layer`` for a cell state (``state_key`` =
  ``state_value``, or all validation cells): the pair regulator -> target scores how much the target's
  token attends to the regulator's token, averaged over heads and over the cells where both genes are
  expressed, each query row scaled by its cell's token count (uniform attention = 1). Inputs are the
  cells' true values (no masking), as in scGPT's attention-based GRN;
- ``coexpr/grn_*``: |Pearson correlation| of binned expression in the validation cells, the baseline (an
  activating and a repressing edge both co-vary).

- ``knockout/grn_from_regulators_*``: in-silico knockout of each planted regulator (grn_knockout.py): the
  change in the predicted expression of hidden genes when the regulator's token is removed.

Each network is also scored over the pairs whose regulator is one of the planted regulators
(``*grn_from_regulators_*``): the usual protocol when the candidate regulators (transcription factors) are
known, as in BEELINE; it leaves out target-target pairs, which co-vary without an edge between them.
"""

from __future__ import annotations


from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from data_modules.collate import CellBatch
from scgpt.errors import ConfigError
from scgpt.metrics import edge_recovery
from scgpt.model.attention_maps import attention_maps
from scgpt.tasks.finetune import FinetuneTask
from scgpt.tasks.grn_knockout import KnockoutNetwork
from scgpt.tasks.grn_reference import cells_per_gene, read_reference_edges, reference_network, truth_matrix
from scgpt.io import rank_zero_logger

log = rank_zero_logger(__name__)


def planted_network(store_path, vocab) -> tuple[np.ndarray, set[tuple[int, int]]] | None:
    """(vocabulary ids of the network's genes, {(regulator id, target id)}) of a synthetic store, or None."""
    import anndata as ad
    import zarr

    group = zarr.open_group(str(store_path), mode="r")
    uns = group["uns"] if "uns" in group else {}
    if "regulatory_network" in uns:
        network = ad.io.read_elem(uns["regulatory_network"])
        pairs = zip(map(str, network["regulator"]), map(str, network["target"]))
        edges = {(vocab[a], vocab[b]) for a, b in pairs if a in vocab and b in vocab and a != b}
    elif "gene_programs" in uns:
        edges = set()
        for genes in ad.io.read_elem(uns["gene_programs"]).values():
            ids = [vocab[str(g)] for g in genes if str(g) in vocab]
            edges.update((ids[0], t) for t in ids[1:] if t != ids[0])
    else:
        return None
    genes = np.array(sorted({g for e in edges for g in e}), dtype=np.int64)
    return genes, edges


class AttentionNetwork:
    """Sums of scaled attention (query gene, key gene) and their counts over cells, on vocabulary ids; with
    ``tracked`` (vocabulary ids) only among those genes (the sums are (tracked, tracked), not (vocab, vocab))."""

    def __init__(self, n_genes: int, tracked: np.ndarray | None = None) -> None:
        tracked = np.arange(n_genes) if tracked is None else np.asarray(tracked, dtype=np.int64)
        self.local = torch.full((n_genes,), -1, dtype=torch.long)  # vocabulary id -> tracked index, -1: not
        self.local[torch.as_tensor(tracked)] = torch.arange(len(tracked))
        self.n_genes = n = len(tracked)
        self.total = torch.zeros(n * n, dtype=torch.float64)
        self.count = torch.zeros(n * n, dtype=torch.float64)

    def add(self, gene_ids: Tensor, probs: Tensor, real: Tensor) -> None:
        """gene_ids (B, L), probs (B, L, L), real (B, L) bool: the gene tokens (no <cls>, no padding)."""
        scaled = probs * real.sum(dim=1, dtype=probs.dtype)[:, None, None]  # uniform attention -> 1
        local = self.local.to(gene_ids.device)[gene_ids]  # (B, L)
        kept = real & (local >= 0)
        pair = kept[:, :, None] & kept[:, None, :]  # (B, L, L)
        flat = (local[:, :, None] * self.n_genes + local[:, None, :])[pair].cpu()  # query * G + key
        self.total.index_add_(0, flat, scaled[pair].double().cpu())
        self.count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def mean(self, genes: np.ndarray) -> np.ndarray:
        """(G', G') mean scaled attention of query genes[i] to key genes[j]; 0 where never seen together or
        not tracked."""
        local = self.local.numpy()[genes]
        total = np.zeros((len(genes), len(genes)))
        count = np.zeros_like(total)
        ok = np.flatnonzero(local >= 0)
        view = np.ix_(local[ok], local[ok])
        total[np.ix_(ok, ok)] = self.total.view(self.n_genes, self.n_genes).numpy()[view]
        count[np.ix_(ok, ok)] = self.count.view(self.n_genes, self.n_genes).numpy()[view]
        return np.divide(total, count, out=np.zeros_like(total), where=count > 0)



class GrnTask(FinetuneTask):
    """Trains like pretraining (gep + mvc); validation adds the network recovery metrics."""

    max_attention_genes = 8192  # dense (G, G) attention sums above this vocabulary size are skipped

    def __init__(self, *args, attention_layer: int = -1, state_key: str | None = None,
                 state_value: str | None = None, knockout_max_regulators: int = 64,
                 reference_edges: str | None = None, reference_columns: Sequence[str] = ("source", "target"),
                 reference_where: dict | None = None, network_genes: int = 1000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = None
        if reference_edges:  # read now: a bad file stops the run before training
            self.reference = read_reference_edges(reference_edges, list(reference_columns), reference_where)
            log.info("grn: %d reference edges from %s", len(self.reference), reference_edges)
        self.network_genes = int(network_genes)
        self.attention_layer, self.state_key, self.state_value = attention_layer, state_key, state_value
        self.knockout_max_regulators = knockout_max_regulators
        self.attention: AttentionNetwork | None = None
        self.knockout: KnockoutNetwork | None = None
        self._state_code: int | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.planted = None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.sources and self.reference is not None:
            detected = cells_per_gene(datamodule.sources[0], datamodule.vocab)
            self.planted = reference_network(self.reference, datamodule.vocab, detected, self.network_genes)
            log.info("grn: reference restricted to %d detected genes, %d edges, %d regulators",
                     len(self.planted[0]), len(self.planted[1]), len({a for a, _ in self.planted[1]}))
        elif datamodule is not None and datamodule.sources:
            self.planted = planted_network(datamodule.sources[0].path, datamodule.vocab)
            if self.planted is None:
                log.warning("grn: %s has no uns/regulatory_network or uns/gene_programs; network metrics skipped",
                            datamodule.sources[0].path)
        self._state_code = self._resolve_state()

    def _resolve_state(self) -> int | None:
        if self.state_key is None:
            return None
        names = self.label_names.get(self.state_key)
        if names is None:
            raise ConfigError(f"task.state_key={self.state_key!r}: not a label of the data; add it to data.label_keys "
                              f"(labels: {', '.join(self.label_names) or 'none'})")
        if str(self.state_value) not in names:
            raise ConfigError(f"task.state_value={self.state_value!r}: no such {self.state_key}; choose one of "
                              f"{', '.join(names)}")
        return names.index(str(self.state_value))

    def on_validation_epoch_start(self) -> None:
        n_genes = self.model_cfg.vocab_size
        planted = getattr(self, "planted", None)
        tracked = planted[0] if self.reference is not None and planted else None  # the reference's scored genes
        small = n_genes <= self.max_attention_genes or (tracked is not None and len(tracked) <= self.max_attention_genes)
        self.attention = AttentionNetwork(n_genes, tracked) if small else None
        self.knockout = None
        if planted and self.knockout_max_regulators > 0:
            regulators = knockout_regulators(planted[1], self.knockout_max_regulators, self.reference is not None)
            if regulators is None:
                log.warning("grn: more regulators than task.knockout_max_regulators=%d; knockout network skipped",
                            self.knockout_max_regulators)
            else:
                self.knockout = KnockoutNetwork(regulators, n_genes)

    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch.padding_mask is None:
            return
        if self.knockout is not None:
            self.knockout.add(self.model, batch, batch.labels.get(self.batch_key))
        if self.attention is None:
            return
        cells = torch.ones_like(batch.generative) if self._state_code is None else \
            batch.labels[self.state_key] == self._state_code  # (B,)
        if not bool(cells.any()):
            return
        gene_ids, values, padding = batch.gene_ids[cells], batch.target_values[cells], batch.padding_mask[cells]
        batch_labels = batch.labels.get(self.batch_key)
        probs = attention_maps(self.model, gene_ids, values, padding, self.attention_layer,
                               batch_labels=None if batch_labels is None else batch_labels[cells],
                               modality_ids=None if batch.modality_ids is None else batch.modality_ids[cells])
        real = ~padding
        real[:, 0] = False  # <cls>
        self.attention.add(gene_ids, probs.float(), real)

    def evaluate(self, arrays):
        if not getattr(self, "planted", None) or "expression" not in arrays:
            return {}
        expression = arrays["expression"].tocsc()
        measured = np.flatnonzero(np.diff(expression.indptr) > 1)  # vocabulary ids seen in >= 2 cells
        genes, edges = self.planted
        if self.reference is not None:  # the reference's scored genes only
            measured = np.intersect1d(measured, genes)
        truth = truth_matrix(measured, edges)  # (regulator, target)
        networks = {"": self._embedding_network(measured),
                    "coexpr/": np.abs(np.nan_to_num(np.corrcoef(expression[:, measured].toarray(), rowvar=False)))}
        if self.attention is not None and self.attention.count.sum() > 0:
            networks["attn/"] = self.attention.mean(measured).T  # [regulator, target] = target attends to regulator
        if self.knockout is not None and self.knockout.count.sum() > 0:
            networks["knockout/"] = self.knockout.scores(measured)  # regulators' rows only
        off_diagonal = ~np.eye(len(measured), dtype=bool)
        regulators = np.isin(measured, sorted({a for a, _ in edges}))  # rows of the known regulators
        candidates = {"": off_diagonal, "_from_regulators": off_diagonal & regulators[:, None]}
        if "knockout/" in networks and not np.isin(measured[regulators], self.knockout.regulators.numpy()).all():
            knocked = np.isin(measured, self.knockout.regulators.numpy())  # a subset of the regulators
            candidates["_from_knocked_out"] = off_diagonal & knocked[:, None]
        out = {}
        for prefix, scores in networks.items():
            for suffix, pairs in candidates.items():
                if prefix == "knockout/" and suffix != list(candidates)[-1]:
                    continue  # defined for the knocked-out regulators only
                metrics = edge_recovery(scores[pairs], truth[pairs])
                name = f"{prefix}grn{suffix}"
                out.update({f"{name}_{k}": v for k, v in metrics.items() if not (prefix and k.endswith("random"))})
                out[f"{name}_auprc_over_random"] = out[f"{name}_auprc"] / max(out[f"grn{suffix}_auprc_random"], 1e-12)
        return out

    def _embedding_network(self, measured: np.ndarray) -> np.ndarray:  # (G', G') cosine of input embeddings
        with torch.no_grad():
            emb = self.model.embedding.encoder(torch.as_tensor(measured, device=self.device)).float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            return (emb @ emb.T).cpu().numpy()


def knockout_regulators(edges: set[tuple[int, int]], most: int, reference: bool) -> np.ndarray | None:
    """Vocabulary ids of the regulators to knock out: all when at most ``most``; else, for a reference
    network, the ``most`` with the most targets (ties by id); None (skip) for a planted one."""
    degree: dict[int, int] = {}
    for a, _ in edges:
        degree[a] = degree.get(a, 0) + 1
    if len(degree) <= most:
        return np.array(sorted(degree), dtype=np.int64)
    if not reference:
        return None
    return np.array(sorted(sorted(degree, key=lambda r: (-degree[r], r))[:most]), dtype=np.int64)
