"""Shared test helpers: a tiny model config and random padded batches."""

from __future__ import annotations

import pytest
import torch

from scgpt.config import ModelConfig

VOCAB, PAD = 120, 0


def tiny_config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=VOCAB, pad_token_id=PAD, d_model=32, n_heads=4, n_layers=2, d_hid=64, dropout=0.0,
                    max_seq_len=64)
    return ModelConfig(**{**settings, **overrides})


def random_tokens(lengths, seed=0, gen_share=0.3):
    """Padded gene ids, values, padding mask and a generative mask for cells of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    gene_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    values = torch.randint(0, 51, (batch, length), generator=g).float()
    padding = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    gene_ids = gene_ids.masked_fill(padding, PAD)
    values = values.masked_fill(padding, -2.0)
    gen = (torch.rand(batch, length, generator=g) < gen_share) & ~padding
    gen[:, 0] = False  # <cls> is always known
    return gene_ids, values, padding, gen


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(autouse=True, scope="session")
def _synthetic_cache(tmp_path_factory):
    """Synthetic datasets are cached once per test session, never in the user's cache."""
    import os

    os.environ["SCGPT_CACHE"] = str(tmp_path_factory.mktemp("scgpt-cache"))
    yield


SMALL_DATA = ["data.synthetic.n_cells=400", "data.synthetic.n_genes=200", "data.per_device_batch_size=16",
              "data.global_batch_size=16", "model.max_seq_len=64"]


def compose_config(run_dir, *overrides):
    """The Hydra config scgpt-train would build, with ``run_dir`` set (tests call train(cfg) directly)."""
    from hydra import compose, initialize_config_dir

    from scgpt.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=[f"run_dir={run_dir}", *overrides])
