"""The LightningDataModule: a dataset (an .h5ad file, or the built-in synthetic one) -> vocabulary,
train / validation split, and sharded, seeded batch streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data_modules.cells import CellTable
from data_modules.collate import CellCollator, CollatorConfig
from data_modules.stream import CellBatchStream
from data_modules.synthetic import load_or_make_synthetic
from scgpt.errors import ConfigError, DataError
from scgpt.seeding import make_generator
from scgpt.tokenizer.vocab import GeneVocab

SPLIT_STREAM = 7_919  # seed coordinate of the train / validation split, apart from epoch orders
STATE_VERSION = 1


class CellDataModule(L.LightningDataModule):
    def __init__(self, h5ad_path: str | None = None, synthetic: dict[str, Any] | None = None,
                 vocab_path: str | None = None, label_keys: Sequence[str] = (), val_fraction: float = 0.1,
                 per_device_batch_size: int = 32, global_batch_size: int | None = None, num_workers: int = 0, max_seq_len: int = 1200, n_bins: int = 51,
                 mask_ratios: Sequence[float] = (0.25, 0.5, 0.75), mask_value: float = -1.0, pad_value: float = -2.0,
                 include_zero_genes: bool = False, generative_fraction: float = 0.5, layout: str = "padded",
                 min_vocab_overlap: float = 0.5, seed: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        if (h5ad_path is None) == (synthetic is None):
            raise ConfigError("data: set exactly one of data.h5ad_path or data.synthetic")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: {val_fraction} must be between 0 and 1")
        if per_device_batch_size < 1:
            raise ConfigError(f"data.per_device_batch_size: {per_device_batch_size} must be positive")
        self.h5ad_path, self.synthetic, self.vocab_path = h5ad_path, synthetic, vocab_path
        self.label_keys, self.val_fraction, self.seed = list(label_keys), val_fraction, seed
        self.per_device_batch_size, self.num_workers = per_device_batch_size, num_workers
        self.global_batch_size = global_batch_size or per_device_batch_size  # checked by train()
        self.min_vocab_overlap, self.cache_dir = min_vocab_overlap, cache_dir
        self.collator_options = dict(max_seq_len=max_seq_len, n_bins=n_bins, mask_ratios=tuple(mask_ratios),
                                     mask_value=mask_value, pad_value=pad_value, include_zero_genes=include_zero_genes,
                                     generative_fraction=generative_fraction, layout=layout)
        self._vocab: GeneVocab | None = None
        self._table: CellTable | None = None
        self._streams: dict[str, CellBatchStream] = {}
        self._epoch = 0

    # ---- data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Make the synthetic dataset once (rank 0) so other ranks only read it."""
        if self.synthetic is not None:
            load_or_make_synthetic(self.cache_dir, **self.synthetic)

    def _read(self) -> tuple[ad.AnnData, str]:
        if self.synthetic is not None:
            return load_or_make_synthetic(self.cache_dir, **self.synthetic), "synthetic dataset"
        path = Path(self.h5ad_path)
        if not path.is_file():
            raise DataError(f"{path}: no such file; set data.h5ad_path to an existing .h5ad")
        try:
            return ad.read_h5ad(path), str(path)
        except Exception as exc:  # h5py / anndata raise many types for a corrupt file
            raise DataError(f"{path}: cannot be read as .h5ad ({type(exc).__name__}); check the file") from exc

    @property
    def vocab(self) -> GeneVocab:
        self._load()
        return self._vocab

    @property
    def table(self) -> CellTable:
        self._load()
        return self._table

    def _load(self) -> None:
        if self._table is not None:
            return
        adata, source = self._read()
        if adata.n_obs == 0:
            raise DataError(f"{source}: has no cells")
        if self.vocab_path:
            self._vocab = GeneVocab.load(self.vocab_path)
        else:
            self._vocab = GeneVocab.from_genes(adata.var_names)
        self._table = CellTable.from_anndata(adata, self._vocab, self.label_keys, source, self.min_vocab_overlap)

    def n_classes(self, label_key: str) -> int:
        return len(self.table.label_names[label_key])

    def split_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, validation rows): a seeded, fixed split of the cells."""
        n = self.table.n_cells
        perm = torch.randperm(n, generator=make_generator(self.seed, SPLIT_STREAM)).numpy()
        n_val = max(1, int(round(n * self.val_fraction)))
        if n - n_val < self.per_device_batch_size:
            raise ConfigError(f"data.per_device_batch_size: {self.per_device_batch_size} is more than the "
                              f"{n - n_val} training cells; lower it or use a larger dataset")
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._streams:
            return
        vocab = self.vocab
        collator = CellCollator(CollatorConfig(pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id,
                                               **self.collator_options), gene_universe=self.table.gene_ids)
        train_rows, val_rows = self.split_rows()
        batch = self.per_device_batch_size
        self._streams = {
            "train": CellBatchStream(self.table, train_rows, collator, batch, self.seed, shuffle=True, drop_last=True),
            "val": CellBatchStream(self.table, val_rows, collator, batch, self.seed, shuffle=False, drop_last=False),
        }
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        for stream in self._streams.values():
            stream.set_distributed(rank, world)
        self.set_epoch(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the training order (validation is the same every time)."""
        self._epoch = epoch
        if "train" in self._streams:
            self._streams["train"].set_epoch(epoch)

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(self._streams[split], batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"checkpoint data state has version {state.get('version')}, expected {STATE_VERSION}")
        self.set_epoch(int(state["epoch"]))


class EpochSync(L.Callback):
    """Tells the data module which epoch starts, so each epoch gets its own (seed, epoch) order."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, CellDataModule):
            trainer.datamodule.set_epoch(trainer.current_epoch)
