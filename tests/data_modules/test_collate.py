"""The collator: gene sampling, zero genes, <cls> first, padded and packed layouts, seeded randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.collate import CellCollator, CollatorConfig, pack_batch
from scgpt.errors import ConfigError
from scgpt.seeding import make_generator

PAD, CLS = 0, 1


def _cells(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"gene_ids": rng.choice(np.arange(10, 1010), size=n, replace=False),
             "counts": rng.integers(1, 50, size=n).astype(np.float32), "cell_type": i % 3}
            for i, n in enumerate(lengths)]


def _collate(cells, seed=0, **options):
    options = {"pad_token_id": PAD, "cls_token_id": CLS, "max_seq_len": 32, **options}
    universe = options.pop("universe", None)
    return CellCollator(CollatorConfig(**options), gene_universe=universe)(cells, make_generator(seed))


def test_cls_first_and_padding_after_real_tokens():
    batch = _collate(_cells([3, 10]))
    assert (batch.gene_ids[:, 0] == CLS).all()
    assert batch.gene_ids.shape == (2, 11)
    assert batch.padding_mask[0].tolist() == [False] * 4 + [True] * 7
    assert (batch.gene_ids[batch.padding_mask] == PAD).all()
    assert batch.labels["cell_type"].tolist() == [0, 1]


def test_long_cells_are_sampled_to_max_seq_len_from_their_own_genes():
    cells = _cells([200, 5])
    batch = _collate(cells, max_seq_len=32)
    assert batch.gene_ids.shape == (2, 32)
    chosen = batch.gene_ids[0, 1:].numpy()
    assert len(set(chosen)) == 31 and set(chosen) <= set(cells[0]["gene_ids"])
    assert not np.array_equal(chosen, cells[0]["gene_ids"][:31])  # a random sample, not a truncation


def test_sampling_is_seeded():
    cells = _cells([200, 50])
    a, b, c = _collate(cells, seed=1), _collate(cells, seed=1), _collate(cells, seed=2)
    assert torch.equal(a.gene_ids, b.gene_ids) and torch.equal(a.hidden_mask, b.hidden_mask)
    assert not torch.equal(a.gene_ids, c.gene_ids)


def test_binning_uses_all_expressed_genes_before_sampling():
    cell = {"gene_ids": np.arange(10, 110), "counts": np.arange(1, 101, dtype=np.float32)}
    batch = _collate([cell], max_seq_len=11, n_bins=11, mask_ratios=(0.0,))
    # over all 100 values 1..100 the edges are 1, 12, 23, ..., 100, so v sits in bin (v - 1) // 11 + 1,
    # whichever 10 genes are kept (binning only the kept 10 would spread them over all bins)
    counts = batch.gene_ids[0, 1:] - 9
    assert torch.equal(batch.target_values[0, 1:], ((counts - 1) // 11 + 1).float())


def test_include_zero_genes_adds_unexpressed_genes_with_value_zero():
    universe = np.arange(10, 60)
    cells = [{"gene_ids": np.array([12, 20]), "counts": np.array([3.0, 9.0])}]
    batch = _collate(cells, max_seq_len=64, include_zero_genes=True, universe=universe, mask_ratios=(0.0,))
    assert batch.gene_ids.shape == (1, 51)
    assert set(batch.gene_ids[0, 1:].tolist()) == set(universe.tolist())
    expressed = torch.isin(batch.gene_ids[0], torch.tensor([12, 20]))
    assert (batch.target_values[0][expressed] > 0).all()
    assert (batch.target_values[0, 1:][~expressed[1:]] == 0).all()


def test_packed_layout_holds_the_same_tokens_as_padded():
    cells = _cells([3, 31, 12])
    padded, packed = _collate(cells, seed=5), _collate(cells, seed=5, layout="packed")
    real = ~padded.padding_mask
    for name in ("gene_ids", "values", "target_values", "hidden_mask", "gen_mask"):
        assert torch.equal(getattr(padded, name)[real], getattr(packed, name)), name
    assert packed.cu_seqlens.tolist() == [0, 4, 36, 49]
    assert packed.max_seqlen == 32 and packed.n_tokens == padded.n_tokens == 49
    assert torch.equal(pack_batch(padded).cu_seqlens, packed.cu_seqlens)


def test_generative_cells_hide_values_under_the_generative_mask():
    batch = _collate(_cells([20] * 64), generative_fraction=0.5)
    assert 0 < batch.generative.sum() < 64
    assert torch.equal(batch.gen_mask, batch.hidden_mask & batch.generative[:, None])


@pytest.mark.parametrize("options, key", [
    ({"max_seq_len": 1}, "data.max_seq_len"),
    ({"mask_ratios": (1.5,)}, "data.mask_ratios"),
    ({"layout": "ragged"}, "data.layout"),
    ({"generative_fraction": 2.0}, "data.generative_fraction"),
])
def test_bad_collator_settings_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        CollatorConfig(pad_token_id=PAD, cls_token_id=CLS, **options)


def test_a_batch_of_cells_without_expressed_genes_is_just_cls():
    cells = [{"gene_ids": np.array([], dtype=np.int64), "counts": np.array([], dtype=np.float32)}] * 2
    batch = _collate(cells)
    assert batch.gene_ids.tolist() == [[CLS], [CLS]] and not batch.hidden_mask.any()
