"""Masking hides the requested share of gene values and never <cls> or padding."""

from __future__ import annotations

import torch

from data_modules.collate import CellCollator, CollatorConfig
from scgpt.seeding import make_generator
from scgpt.tokenizer.masking import draw_mask_ratios, random_mask


def _cells(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"gene_ids": torch.randperm(500, generator=g)[:n] + 10, "counts": torch.randint(1, 30, (n,), generator=g)}
            for n in lengths]


def test_random_mask_hits_ratio_exactly_and_stays_inside_maskable():
    maskable = torch.zeros(3, 50, dtype=torch.bool)
    maskable[0, 1:41] = True
    maskable[1, 1:11] = True
    maskable[2, 1:50] = True
    hidden = random_mask(maskable, torch.tensor([0.25, 0.5, 0.75]), make_generator(0))
    assert hidden.sum(dim=1).tolist() == [10, 5, 37]  # round(ratio * n)
    assert not (hidden & ~maskable).any()


def test_ratios_are_drawn_from_the_list():
    ratios = draw_mask_ratios(1000, [0.25, 0.5, 0.75], make_generator(0))
    assert set(ratios.tolist()) == {0.25, 0.5, 0.75}


def test_collator_never_masks_cls_or_padding_and_hits_ratio():
    collator = CellCollator(CollatorConfig(pad_token_id=0, cls_token_id=1, max_seq_len=64, mask_ratios=(0.5,)))
    batch = collator(_cells([5, 20, 63, 100]), make_generator(0))
    assert not batch.hidden_mask[:, 0].any()
    assert not (batch.hidden_mask & batch.padding_mask).any()
    genes_per_cell = (~batch.padding_mask).sum(dim=1) - 1
    assert batch.hidden_mask.sum(dim=1).tolist() == torch.round(genes_per_cell * 0.5).long().tolist()
    assert (batch.values[batch.hidden_mask] == -1).all()
    assert (batch.values[:, 0] == -2).all() and (batch.values[batch.padding_mask] == -2).all()
