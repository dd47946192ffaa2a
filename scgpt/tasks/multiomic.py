"""Multi-omic finetuning (``task=multiomic``): RNA plus protein (ADT) and/or chromatin (ATAC) features as
tokens of one sequence, each token with a modality embedding (``model.n_modalities: 4``: RNA, ADT, ATAC,
<cls>/pad; see :mod:`data_modules.modality`), trained with masked expression objectives over all
modalities (gep, mvc) and a cross-modal contrastive term (cmc, :mod:`scgpt.objectives.multimodal`: a
cell's RNA-only and ADT/ATAC-only embeddings must find each other in the batch). The cell embedding is the
joint embedding of all modalities.

Validation metrics (``summary.json`` ``val``): cross-validated cell-type kNN accuracy of the joint
embedding (``knn_accuracy``) and of the embedding of the same cells with only one modality's tokens kept
(``knn_accuracy/rna_only``, ``knn_accuracy/adt_only``, ``knn_accuracy/atac_only``: a cell measured by
one assay only), each next to a PCA baseline on the same binned values (``pca/...``).

``modality_dropout``: the share of training cells that lose one of their modalities (chosen uniformly
among those present), so that the model learns to embed cells with a modality missing.

With ``init_from=`` a checkpoint pretrained on RNA, the data's ADT / ATAC features that the checkpoint's
vocabulary lacks become new tokens (``task.new_feature_tokens``; their gene embeddings start from
N(0, 1), as nn.Embedding's), and the modality embedding is new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_modules.collate import CellBatch
from data_modules.modality import MODALITY_NAMES, N_MODALITY_IDS, RNA, SPECIAL, store_modalities, vocab_modalities
from data_modules.modality_batch import drop_modalities, select_tokens, unmasked
from scgpt.errors import CheckpointError, ConfigError, DataError
from scgpt.seeding import make_generator
from scgpt.tasks.finetune import FinetuneTask, binned_expression

MODALITY_DROPOUT_STREAM = 13  # seed coordinate of the modality-dropout generator
NEW_TOKEN_STREAM = 17  # seed coordinate of the new feature tokens' initial embeddings
EMBEDDING_KEY = "embedding.encoder.embedding.weight"


class MultiomicTask(FinetuneTask):
    def __init__(self, *args, modality_dropout: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= modality_dropout < 1.0:
            raise ConfigError(f"task.modality_dropout: {modality_dropout} must be in [0, 1)")
        if self.model_cfg.n_modalities < N_MODALITY_IDS:
            raise ConfigError(f"task.model_heads.n_modalities: is {self.model_cfg.n_modalities}; task=multiomic needs "
                              f"{N_MODALITY_IDS} (RNA, ADT, ATAC, <cls>/pad)")
        self.modality_dropout = modality_dropout
        self.modality_table: np.ndarray | None = None  # vocabulary id -> modality id
        self.modalities: list[int] = []  # modality ids present in the data
        self._train_step = 0

    # ---- data ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.modality_table, self.modalities = check_multiomic_data(datamodule.sources, datamodule.vocab)

    # ---- training: masked expression over all modalities, with modality dropout ------------------
    def on_train_batch_start(self, batch: CellBatch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._train_step = batch_idx

    def losses(self, batch: CellBatch):
        if self.training and self.modality_dropout > 0 and batch.modality_ids is not None:
            generator = make_generator(self.seed, MODALITY_DROPOUT_STREAM, self.current_epoch, self._train_step,
                                       self.global_rank)
            batch = drop_modalities(batch, self.modality_dropout, generator, self.model_cfg.pad_token_id,
                                    self.model_cfg.pad_value)
        return super().losses(batch)

    # ---- validation: joint and single-modality embeddings --------------------------------------
    def collect(self, batch: CellBatch, out) -> None:
        """Per cell: the joint embedding and the embedding with one modality only (unmasked input)."""
        c = self._collected
        clean = unmasked(batch)
        c["emb"].append(self._embed(clean))
        if batch.modality_ids is not None:
            for m in self.modalities:
                keep = (batch.modality_ids == m) | (batch.modality_ids == SPECIAL)
                only = select_tokens(clean, keep, self.model_cfg.pad_token_id, self.model_cfg.pad_value)
                c[f"emb/{MODALITY_NAMES[m]}_only"].append(self._embed(only))
        for key, codes in batch.labels.items():
            c[f"label/{key}"].append(codes.cpu().numpy())
        c["expression"].append(binned_expression(batch, self.model_cfg.vocab_size))

    @torch.no_grad()
    def _embed(self, batch: CellBatch) -> np.ndarray:
        emb = self(batch).cell_emb.float()  # (B, D)
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    def evaluate(self, arrays):
        from scgpt.metrics import knn_accuracy, pca_embedding

        truth = self.labels_of(arrays, self.label_key)
        if truth is None:
            return {}
        out = {"knn_accuracy": knn_accuracy(arrays["emb"], truth, seed=self.seed)}
        expression = arrays.get("expression")
        if expression is not None:
            out["pca/knn_accuracy"] = knn_accuracy(pca_embedding(expression, 50, self.seed), truth, seed=self.seed)
        for m in self.modalities:
            name = f"{MODALITY_NAMES[m]}_only"
            if f"emb/{name}" in arrays:
                out[f"knn_accuracy/{name}"] = knn_accuracy(arrays[f"emb/{name}"], truth, seed=self.seed)
            if expression is not None and self.modality_table is not None:
                columns = np.flatnonzero(self.modality_table[:expression.shape[1]] == m)
                pca = pca_embedding(expression[:, columns], 50, self.seed)
                out[f"pca/knn_accuracy/{name}"] = knn_accuracy(pca, truth, seed=self.seed)
        return out

    def plot(self, arrays, directory: Path):
        from scgpt.metrics import plot_embedding

        codes = self.labels_of(arrays, self.label_key)
        if codes is None:
            return []
        names = self.label_names.get(self.label_key) or [str(i) for i in range(codes.max() + 1)]
        return [plot_embedding(arrays["emb"], {self.label_key: (codes, names)}, directory / "embedding.png", self.seed)]


# ---- checks ----------------------------------------------------------------------------------------
def check_multiomic_data(sources, vocab) -> tuple[np.ndarray, list[int]]:
    """The vocabulary's modality table and the modalities present; a DataError without a second modality."""
    table = vocab_modalities(sources, vocab)
    present = [] if table is None else sorted(int(m) for m in np.unique(table) if m != SPECIAL)
    if len(present) < 2:
        paths = ", ".join(str(s.path) for s in sources)
        found = "no var column 'feature_type'" if table is None else f"only {MODALITY_NAMES[present[0]].upper()} " \
            "features in var column 'feature_type'" if present else "no features"
        raise DataError(f"{paths}: {found}; task=multiomic needs RNA plus 'Antibody Capture' (ADT) and/or 'Peaks' "
                        "(ATAC) features: convert a CITE-seq / multiome file whose var has feature_type, or use "
                        "+data.synthetic.n_proteins=30 and/or +data.synthetic.n_peaks=500")
    return table, present


def modality_embedding_size(datamodule) -> int:
    """``model_heads.n_modalities: auto``: the modality ids' count, once the data is checked to have two."""
    check_multiomic_data(datamodule.sources, datamodule.vocab)
    return N_MODALITY_IDS


# ---- init_from: new tokens for the features of new modalities ---------------------------------------
def add_feature_tokens(contents, datamodule, seed: int, min_overlap: float) -> list[str]:
    """Give the data's ADT / ATAC features that ``contents.vocab`` lacks new ids after its last one, and the
    checkpoint's gene embedding matching new rows (seeded N(0, 1)); returns the new features. RNA genes are
    never added: they must match the pretrained vocabulary (checked against ``min_overlap``)."""
    vocab = contents.vocab
    rna, new = [], []
    for store in datamodule.sources:
        modality = store_modalities(store)
        for name, m in zip(store.var_names, modality if modality is not None else [RNA] * len(store.var_names)):
            (rna if m == RNA else new).append(name)
    rna_known = np.mean([g in vocab for g in rna]) if rna else 1.0
    if rna_known < min_overlap:
        raise CheckpointError(f"init_from: only {rna_known:.1%} of the data's RNA genes are in the checkpoint's "
                              f"vocabulary (data.min_vocab_overlap={min_overlap}); pick a checkpoint for these genes")
    new = [g for g in dict.fromkeys(new) if g not in vocab]
    if not new:
        return []
    weight = contents.state_dict[EMBEDDING_KEY]  # (V, D)
    start = max(vocab.size, weight.shape[0])
    extra = torch.randn(start + len(new) - weight.shape[0], weight.shape[1],
                        generator=make_generator(seed, NEW_TOKEN_STREAM)).to(weight.dtype)
    contents.state_dict[EMBEDDING_KEY] = torch.cat([weight, extra])
    contents.vocab = type(vocab)({**vocab.token_to_id, **{g: start + i for i, g in enumerate(new)}})
    contents.metadata["new_feature_tokens"] = len(new)
    return new
