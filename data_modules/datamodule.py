"""The LightningDataModule: cell stores (or the built-in synthetic one) -> vocabulary, train / validation
rows, and the sharded, seeded, exactly resumable batch streams of :mod:`data_modules.stream`."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from data_modules.collate import CellCollator, CollatorConfig
from data_modules.modality import vocab_modalities
from data_modules.splits import ObsSplit, RowSubset, assign_rows
from data_modules.store import CellStore, open_dataset
from data_modules.stream import CellBatchStream, StreamPlan, fitted_plan
from data_modules.synthetic import ensure_synthetic_store
from scgpt.config_checks import DEFAULT_PER_DEVICE_BATCH
from scgpt.errors import ConfigError, DataError
from scgpt.io import rank_zero_logger
from scgpt.tokenizer.vocab import GeneVocab

STATE_VERSION = 1
log = rank_zero_logger()


class CellDataModule(L.LightningDataModule):
    """Streams cells from stores. Stores are shuffled once when written, so the first ``val_fraction``
    rows of each store are a random validation sample and the rest are for training. ``val_split`` /
    ``test_split`` (``{key: <obs column>, values: [...]}``) hold out the cells with those obs values instead
    (see :mod:`data_modules.splits`); a test split is evaluated after training."""

    def __init__(self, paths: str | Sequence[str] | None = None, synthetic: dict[str, Any] | None = None,
                 vocab_path: str | None = None, label_keys: Sequence[str] = (), val_fraction: float = 0.05,
                 block_size: int = 1024, buffer_blocks: int = 8, per_device_batch_size: int | None = None,
                 global_batch_size: int | None = None, num_workers: int = 0, max_seq_len: int = 1200,
                 n_bins: int = 51, mask_ratios: Sequence[float] = (0.25, 0.5, 0.75), mask_value: float = -1.0,
                 pad_value: float = -2.0, include_zero_genes: bool = False, generative_fraction: float = 0.5,
                 layout: str = "padded", min_vocab_overlap: float = 0.5, seed: int = 0,
                 cache_dir: str | None = None, val_split: dict[str, Any] | None = None,
                 test_split: dict[str, Any] | None = None, domain_key: str | None = None) -> None:
        super().__init__()
        if (paths is None) == (synthetic is None):
            raise ConfigError("data: set exactly one of data.paths (store paths or a manifest) or data.synthetic")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: {val_fraction} must be between 0 and 1")
        if per_device_batch_size is None:  # scgpt-train derives it from the world size before building this
            per_device_batch_size = global_batch_size or DEFAULT_PER_DEVICE_BATCH
        for key, value in (("per_device_batch_size", per_device_batch_size), ("block_size", block_size),
                           ("buffer_blocks", buffer_blocks)):
            if value < 1:
                raise ConfigError(f"data.{key}: {value} must be positive")
        self.paths, self.synthetic, self.vocab_path = paths, synthetic, vocab_path
        self.label_keys, self.val_fraction, self.seed = list(label_keys), val_fraction, seed
        self.block_size, self.buffer_blocks = block_size, buffer_blocks
        self.per_device_batch_size, self.num_workers = per_device_batch_size, num_workers
        self.global_batch_size = global_batch_size or per_device_batch_size  # checked by train()
        self.min_vocab_overlap, self.cache_dir = min_vocab_overlap, cache_dir
        self.collator_options = dict(max_seq_len=max_seq_len, n_bins=n_bins, mask_ratios=tuple(mask_ratios),
                                     mask_value=mask_value, pad_value=pad_value, include_zero_genes=include_zero_genes,
                                     generative_fraction=generative_fraction, layout=layout)
        self.val_split = ObsSplit.parse("data.val_split", val_split)
        self.test_split = ObsSplit.parse("data.test_split", test_split)
        if domain_key is not None and domain_key not in self.label_keys:
            raise ConfigError(f"data.domain_key: {domain_key!r} is not in data.label_keys {self.label_keys}; add it")
        self.domain_key = domain_key  # training batches of one value of this label (the domain sampler)
        self._split_rows: list[dict[str, np.ndarray]] | None = None
        self._sources: list[CellStore] | None = None
        self._streams: dict[str, CellBatchStream] = {}
        self._epoch, self._skip, self.batches_done = 0, 0, 0

    # ---- the dataset ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic store once (rank 0) so that other ranks only read it."""
        if self.synthetic is not None:
            ensure_synthetic_store(self.cache_dir, **self.synthetic)

    def _load(self) -> None:
        if self._sources is not None:
            return
        paths = self.paths if self.paths is not None else ensure_synthetic_store(self.cache_dir, **self.synthetic)
        sources = open_dataset(paths if isinstance(paths, (str, os.PathLike)) else list(paths))
        self._vocab = self._make_vocab(sources)
        self.label_names, self.label_maps = self._label_codes(sources)
        self.fingerprint = hashlib.sha256("|".join(s.fingerprint for s in sources).encode()).hexdigest()
        for split in (self.val_split, self.test_split):
            if split is not None:
                split.check(sources)
        self._sources = sources

    @property
    def sources(self) -> list[CellStore]:
        self._load()
        return self._sources

    @property
    def vocab(self) -> GeneVocab:
        self._load()
        return self._vocab

    def _make_vocab(self, sources: list[CellStore]) -> GeneVocab:
        if self.vocab_path:
            vocab = GeneVocab.load(self.vocab_path)
        elif len(sources) == 1:
            vocab = sources[0].vocab()
        else:
            vocab = GeneVocab.from_genes(dict.fromkeys(g for s in sources for g in s.var_names))
        for store in sources:
            known = (vocab.encode(list(store.var_names)) >= 0).mean()
            if known < self.min_vocab_overlap:
                raise DataError(f"{store.path}: only {known:.0%} of its genes are in the vocabulary "
                                f"{self.vocab_path or ''}; use a vocabulary built from these stores (scgpt-data vocab)")
        return vocab

    def _label_codes(self, sources: list[CellStore]) -> tuple[dict[str, list[str]], dict[str, list]]:
        """Dataset-wide category names per label, and each store's code -> dataset code map."""
        names, maps = {}, {}
        for key in self.label_keys:
            union: dict[str, int] = {}
            per_store = []
            for store in sources:
                if key not in store.obs_columns:
                    raise DataError(f"{store.path}: obs has no column {key!r} (data.label_keys); "
                                    f"available: {', '.join(store.obs_columns)}")
                categories = store.label_categories(key)
                per_store.append(np.array([union.setdefault(c, len(union)) for c in categories], dtype=np.int64))
            names[key], maps[key] = list(union), per_store
        return names, maps

    def use_vocab(self, vocab: GeneVocab) -> None:
        """Tokenize with ``vocab`` (a pretrained model's, for ``init_from=``) instead of the data's own; genes
        it lacks are dropped. Call before ``setup``."""
        if self._streams:
            raise RuntimeError("use_vocab must be called before setup()")
        self._load()
        self._vocab = vocab

    def label_counts(self, label_key: str, split: str = "train") -> np.ndarray:
        """Cells per dataset-wide class of ``label_key`` among the ``split`` rows (missing labels not counted)."""
        counts = np.zeros(self.n_classes(label_key), dtype=np.int64)
        sources, ranges = self.split_sources(split)
        for source, codes_map, (start, stop) in zip(sources, self.label_maps[label_key], ranges):
            codes = source.read_obs(label_key, start, stop)
            counts += np.bincount(codes_map[codes[codes >= 0]], minlength=counts.size)
        return counts

    def n_classes(self, label_key: str) -> int:
        self._load()
        return len(self.label_names[label_key])

    def row_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Per store: validation rows [0, n_val) and training rows [n_val, n) (without obs splits; with them,
        each split's rows numbered within its :class:`RowSubset`, see :meth:`split_sources`)."""
        if self.has_obs_splits:
            return {split: self.split_sources(split)[1] for split in self.splits}
        ranges: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
        for store in self.sources:
            n_val = max(1, round(store.n_cells * self.val_fraction))
            ranges["val"].append((0, n_val))
            ranges["train"].append((n_val, store.n_cells))
        return ranges

    @property
    def has_obs_splits(self) -> bool:
        return self.val_split is not None or self.test_split is not None

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.test_split is not None else ("train", "val")

    @property
    def has_test(self) -> bool:
        return self.test_split is not None

    def split_rows(self) -> list[dict[str, np.ndarray]]:
        """Per store, the ascending rows of each split (obs splits only); read once from the obs column."""
        if self._split_rows is None:
            self._split_rows = [assign_rows(store, self.val_fraction, self.val_split, self.test_split)
                                for store in self.sources]
            for split in self.splits:
                if not sum(rows[split].size for rows in self._split_rows):
                    option = {"test": "data.test_split", "val": "data.val_split"}.get(split, "data.val_split / data.test_split")
                    raise ConfigError(f"{option}: leaves no {split} cells; hold out fewer values")
        return self._split_rows

    def split_sources(self, split: str) -> tuple[list, list[tuple[int, int]]]:
        """What the ``split`` stream reads: one source per store (a :class:`RowSubset` with obs splits) and
        its [start, stop) range of rows."""
        if not self.has_obs_splits:
            return self.sources, self.row_ranges()[split]
        subsets = [RowSubset(store, rows[split]) for store, rows in zip(self.sources, self.split_rows())]
        return subsets, [(0, s.n_cells) for s in subsets]

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._streams:
            return
        vocab = self.vocab
        universe = vocab.encode(list(dict.fromkeys(g for s in self.sources for g in s.var_names)))
        collator = CellCollator(CollatorConfig(pad_token_id=vocab.pad_id, cls_token_id=vocab.cls_id,
                                               **self.collator_options), gene_universe=universe[universe >= 0],
                                gene_modality=vocab_modalities(self.sources, vocab))  # None for RNA-only data
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        adapted = []
        for split in self.splits:
            sources, ranges = self.split_sources(split)
            domain_key = self.domain_key if split == "train" else None
            codes = self._domain_codes(sources, ranges) if domain_key else None
            plan, block_size = self._plan(split, ranges, self.per_device_batch_size, world, codes, domain_key)
            if (block_size, plan.num_workers) != (self.block_size, max(1, self.num_workers)):
                adapted.append(f"{split} {block_size}-cell blocks x {plan.num_workers} workers")
            self._streams[split] = CellBatchStream(sources, self.label_keys, self.label_maps, vocab, plan,
                                                   collator, rank)
        if adapted:  # small stores: said once
            log.info("data: %s (data.block_size=%d x data.num_workers=%d leave some of the %d ranks' workers without "
                     "a batch of this store)", ", ".join(adapted), self.block_size, self.num_workers, world)
        self._apply_position()

    def _plan(self, split: str, ranges, batch_size: int, world: int, codes=None, domain_key=None) -> tuple[StreamPlan, int]:
        """The split's plan with the configured blocks and workers, adapted to small stores (smaller blocks,
        then fewer workers; :func:`fitted_plan`). Too few cells for a batch per rank: a ConfigError naming a
        smaller per-device batch size that does fit, or what else to change."""
        def fit(size: int):
            return fitted_plan(ranges, self.block_size, size, self.buffer_blocks, self.seed, split == "train",
                               world, max(1, self.num_workers), codes, domain_key)
        found = fit(batch_size)
        if found is not None:
            return found
        cells = sum(stop - start for start, stop in ranges)
        smaller = next((b for b in range(batch_size - 1, 0, -1) if not batch_size % b and fit(b)), None)
        if smaller is not None:
            raise ConfigError(f"data.per_device_batch_size: the {split} split's {cells} cells leave some of the {world} "
                              f"ranks without a batch of {batch_size}; set data.per_device_batch_size={smaller}")
        fix = "raise data.val_fraction" if split == "val" else "use fewer devices or a larger store"
        raise ConfigError(f"data: the {split} split has {cells} cells, too few for a batch on each of {world} ranks; {fix}")

    def _domain_codes(self, sources, ranges) -> list[np.ndarray]:
        """Dataset-wide ``domain_key`` code of every row in each source's range (for the domain sampler)."""
        out = []
        for source, codes_map, (start, stop) in zip(sources, self.label_maps[self.domain_key], ranges):
            codes = source.read_obs(self.domain_key, start, stop)
            if (codes < 0).any():
                raise DataError(f"{getattr(source, 'path', 'store')}: {(codes < 0).sum()} training cells have no "
                                f"{self.domain_key!r} (data.domain_key); the domain sampler needs one for every cell")
            out.append(codes_map[codes])
        return out

    def _apply_position(self) -> None:
        if "train" in self._streams:
            self._streams["train"].epoch, self._streams["train"].skip = self._epoch, self._skip

    def start_epoch(self, epoch: int) -> None:
        """A new training epoch begins: its own (seed, epoch) order, from its first batch."""
        self._epoch, self._skip, self.batches_done = epoch, 0, 0
        self._apply_position()

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        stream = self._streams[split]  # its plan's workers: fewer than data.num_workers on a small store
        return DataLoader(stream, batch_size=None, num_workers=stream.plan.num_workers if self.num_workers else 0,
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise ConfigError("data.test_split: not set; hold out test cells with "
                              "data.test_split={key: <obs column>, values: [<value>]}")
        return self._loader("test")

    # ---- exact resume ---------------------------------------------------------------------------
    def _layout(self) -> tuple[int, int]:
        world = self.trainer.world_size if self.trainer else 1
        self.setup()
        return world, self._streams["train"].plan.num_workers  # the data order depends on both

    def state_dict(self) -> dict[str, Any]:
        world, workers = self._layout()
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "seed": self.seed, "epoch": self._epoch,
                "batches_done": self._skip + self.batches_done, "world_size": world, "num_workers": workers,
                "splits": self._split_state(), "domain_key": self.domain_key}

    def _split_state(self) -> list | None:
        """The obs splits, which decide the training cells (None without them)."""
        if not self.has_obs_splits:
            return None
        return [None if s is None else [s.key, list(s.values)] for s in (self.val_split, self.test_split)]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint stopped; refuse what would change the data order."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"checkpoint data state has version {state.get('version')}; this scgpt reads {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise DataError("checkpoint was trained on other data (store fingerprint differs); resume with the same "
                            "data.paths, or start a new run with init_from= instead of ckpt_path=")
        if state["seed"] != self.seed:
            raise ConfigError(f"seed: the checkpoint used seed {state['seed']}; resume with seed={state['seed']}")
        if state.get("splits") != self._split_state():
            raise ConfigError(f"data.val_split / data.test_split: the checkpoint was trained with splits "
                              f"{state.get('splits')} ([val, test] as [key, values]), now {self._split_state()}; "
                              "resume with the same splits")
        if state.get("domain_key") != self.domain_key:
            raise ConfigError(f"data.domain_key: the checkpoint was trained with domain_key={state.get('domain_key')}, "
                              f"now {self.domain_key}; resume with the same (it decides the data order)")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done and (state["world_size"], state["num_workers"]) != self._layout():
            raise ConfigError(f"trainer.devices / data.num_workers: the checkpoint stopped mid-epoch with "
                              f"{state['world_size']} ranks x {state['num_workers']} workers, and the data order depends "
                              "on them; resume with the same numbers")
        self.setup()
        if done >= self._streams["train"].plan.batches_per_rank(epoch):  # saved at the end of an epoch
            epoch, done = epoch + 1, 0
        self._epoch, self._skip, self.batches_done = epoch, done, 0
        self._apply_position()


class DataProgress(L.Callback):
    """Keeps the data module's position: the epoch that starts, and the batches consumed within it (any data
    module with ``start_epoch`` and ``batches_done``: the cell stream, the paired perturbation data)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(trainer.datamodule, "start_epoch"):
            trainer.datamodule.start_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if hasattr(trainer.datamodule, "batches_done"):
            trainer.datamodule.batches_done += 1
