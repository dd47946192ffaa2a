"""Modalities through the data path: feature_type in the store, vocabulary ids -> modality ids, and the
collator's per-token modality ids, per-modality binning and per-modality sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.collate import CellCollator, CollatorConfig
from data_modules.modality import (ADT, ATAC, RNA, SPECIAL, modality_codes, store_modalities, token_quota,
                                   vocab_modalities)
from data_modules.convert import write_store
from data_modules.store import CellStore
from data_modules.synthetic import make_synthetic_adata
from scgpt.errors import DataError
from scgpt.seeding import make_generator

PAD, CLS = 0, 1
RNA_IDS, ADT_IDS, ATAC_IDS = np.arange(10, 310), np.arange(310, 320), np.arange(320, 420)
TABLE = np.full(430, SPECIAL)
TABLE[RNA_IDS], TABLE[ADT_IDS], TABLE[ATAC_IDS] = RNA, ADT, ATAC


def _collate(cells, seed=0, modality=TABLE, **options):
    options = {"pad_token_id": PAD, "cls_token_id": CLS, "max_seq_len": 32, "mask_ratios": (0.0,), **options}
    universe = options.pop("universe", None)
    collator = CellCollator(CollatorConfig(**options), gene_universe=universe, gene_modality=modality)
    return collator(cells, make_generator(seed))


def _cell(rna=0, adt=0, atac=0, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.choice(RNA_IDS, rna, replace=False), rng.choice(ADT_IDS, adt, replace=False),
                          rng.choice(ATAC_IDS, atac, replace=False)])
    counts = np.concatenate([rng.integers(1, 30, rna), rng.integers(200, 2000, adt), rng.integers(1, 3, atac)])
    return {"gene_ids": ids, "counts": counts.astype(np.float32), "cell_type": seed % 2}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_every_token_carries_its_features_modality(layout):
    cells = [_cell(rna=5, adt=3, seed=0), _cell(rna=20, adt=10, atac=4, seed=1), _cell(adt=2, seed=2)]
    batch = _collate(cells, layout=layout, max_seq_len=64)
    assert batch.modality_ids.shape == batch.gene_ids.shape and batch.modality_ids.dtype == torch.long
    is_cls = batch.gene_ids == CLS
    assert (batch.modality_ids[is_cls] == SPECIAL).all()
    features = (batch.gene_ids != CLS) & (batch.gene_ids != PAD)
    assert torch.equal(batch.modality_ids[features], torch.from_numpy(TABLE)[batch.gene_ids[features]])
    if layout == "padded":
        assert (batch.modality_ids[batch.padding_mask] == SPECIAL).all()
        assert batch.modality_ids[2, 1:3].tolist() == [ADT, ADT] and (batch.modality_ids[2, 3:] == SPECIAL).all()
    else:
        assert batch.padding_mask is None and batch.cu_seqlens.tolist() == [0, 9, 44, 47]


def test_packed_and_padded_carry_the_same_modality_ids():
    cells = [_cell(rna=50, adt=10, atac=30, seed=3), _cell(rna=7, adt=4, seed=4)]
    padded, packed = _collate(cells, seed=2), _collate(cells, seed=2, layout="packed")
    assert torch.equal(padded.modality_ids[~padded.padding_mask], packed.modality_ids)
    assert torch.equal(padded.gene_ids[~padded.padding_mask], packed.gene_ids)


def test_each_modality_is_binned_on_its_own_values():
    rna_counts, adt_counts = np.arange(1, 41, dtype=np.float32), np.arange(1000, 1010, dtype=np.float32)
    cell = {"gene_ids": np.concatenate([RNA_IDS[:40], ADT_IDS]), "counts": np.concatenate([rna_counts, adt_counts])}
    joint = _collate([cell], n_bins=11, max_seq_len=64)
    rna_only = _collate([{"gene_ids": RNA_IDS[:40], "counts": rna_counts}], n_bins=11, max_seq_len=64)
    mods, bins = joint.modality_ids[0], joint.target_values[0]
    adt_bins = bins[mods == ADT]
    assert adt_bins.min() == 1 and adt_bins.max() == 10  # spread over all bins, not all in the top one
    order = torch.argsort(joint.gene_ids[0][mods == RNA])
    alone = rna_only.target_values[0, 1:][torch.argsort(rna_only.gene_ids[0, 1:])]
    assert torch.equal(bins[mods == RNA][order], alone)  # RNA bins as if ADT were absent
    plain = _collate([cell], n_bins=11, max_seq_len=64, modality=None)  # one binning over everything
    assert plain.modality_ids is None and (plain.target_values[0][plain.gene_ids[0] >= 310] >= 8).all()  # top bins only


def test_sampling_keeps_a_small_modality_whole_and_shares_the_rest():
    batch = _collate([_cell(rna=200, adt=10, seed=5), _cell(rna=200, atac=100, seed=6),
                      _cell(rna=12, adt=10, atac=100, seed=7)], max_seq_len=32)
    counts = [{m: int((batch.modality_ids[i] == m).sum()) for m in (RNA, ADT, ATAC)} for i in range(3)]
    assert counts[0] == {RNA: 21, ADT: 10, ATAC: 0}  # all 10 proteins, RNA gets the rest of the 31
    assert counts[1] == {RNA: 16, ADT: 0, ATAC: 15}  # equal shares (31 = 15 + 16)
    assert counts[2] == {RNA: 10, ADT: 10, ATAC: 11}
    assert len(set(batch.gene_ids[1, 1:].tolist())) == 31  # distinct features, a sample of the cell's own


def test_token_quota_water_fills():
    counts = np.array([[200, 10, 0], [200, 0, 100], [5, 5, 5], [3, 40, 40]])
    assert token_quota(counts, 31).tolist() == [[21, 10, 0], [16, 0, 15], [5, 5, 5], [3, 14, 14]]


def test_include_zero_genes_gets_modalities_from_the_universe():
    universe = np.concatenate([RNA_IDS[:20], ADT_IDS[:5]])
    cell = {"gene_ids": np.array([RNA_IDS[0], ADT_IDS[1]]), "counts": np.array([3.0, 500.0], np.float32)}
    batch = _collate([cell], include_zero_genes=True, universe=universe, max_seq_len=64)
    mods = batch.modality_ids[0, 1:]
    assert int((mods == ADT).sum()) == 5 and int((mods == RNA).sum()) == 20
    assert torch.equal(mods, torch.from_numpy(TABLE)[batch.gene_ids[0, 1:]])


# ---- the store and the vocabulary ------------------------------------------------------------------
@pytest.fixture(scope="module")
def multiome_store(tmp_path_factory):
    adata = make_synthetic_adata(n_cells=120, n_genes=60, n_cell_types=3, seed=2, n_proteins=8, n_peaks=20)
    path = tmp_path_factory.mktemp("mo") / "multiome.zarr"
    write_store(adata, path, obs_keys=["cell_type"])
    return adata, CellStore(path)


def test_store_keeps_feature_type_and_the_vocabulary_maps_feature_names(multiome_store):
    adata, store = multiome_store
    assert store.var["feature_type"].astype(str).tolist() == adata.var["feature_type"].tolist()
    assert store.var_names == list(adata.var_names)
    vocab = store.vocab()
    assert (vocab.encode(["ADT_PROT000", "ATAC_PEAK00000", "SYN00000"]) >= 0).all()
    codes = store_modalities(store)
    assert codes.tolist() == [RNA] * 60 + [ADT] * 8 + [ATAC] * 20
    table = vocab_modalities([store], vocab)
    assert table[vocab.encode(["ADT_PROT003"])[0]] == ADT and table[vocab.cls_id] == SPECIAL
    assert table[vocab.encode(["ATAC_PEAK00019"])[0]] == ATAC and table[vocab.encode(["SYN00059"])[0]] == RNA


def test_rna_only_store_has_no_feature_type_and_no_modality_table(tmp_path):
    path = tmp_path / "rna.zarr"
    write_store(make_synthetic_adata(n_cells=50, n_genes=30, seed=1), path, obs_keys=["cell_type"])
    store = CellStore(path)
    assert "feature_type" not in store.var.columns
    assert store_modalities(store) is None and vocab_modalities([store], store.vocab()) is None


def test_converted_10x_style_h5ad_keeps_feature_types(tmp_path):
    from data_modules.convert import convert_to_store

    adata = make_synthetic_adata(n_cells=40, n_genes=20, seed=0, n_proteins=3)
    adata.var = adata.var.rename(columns={"feature_type": "feature_types"})  # scanpy's read_10x_h5 name
    adata.write_h5ad(tmp_path / "cite.h5ad")
    convert_to_store([tmp_path / "cite.h5ad"], tmp_path / "cite.zarr")
    assert CellStore(tmp_path / "cite.zarr").var["feature_type"].astype(str).tolist()[-4:] == \
        ["Gene Expression"] + ["Antibody Capture"] * 3


def test_unknown_feature_type_names_the_column_and_the_fix():
    with pytest.raises(DataError, match=r"cells.zarr: var column 'feature_type' has 'CRISPR Guide Capture'"):
        modality_codes(["Gene Expression", "CRISPR Guide Capture"], "cells.zarr")
