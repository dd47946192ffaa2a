"""task=multiomic end to end on synthetic RNA + ADT + ATAC data, the batch operations behind modality
dropout and single-modality embeddings, init_from with new feature tokens, and the error on RNA-only data."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_modules.collate import CellCollator, CollatorConfig
from data_modules.modality import ADT, ATAC, RNA, SPECIAL
from scgpt.errors import DataError
from scgpt.seeding import make_generator
from data_modules.modality_batch import drop_modalities, select_tokens
from scgpt.train import train

from conftest import SMALL_DATA, compose_config, tiny_config

BASE = [*SMALL_DATA, "model.max_seq_len=128", "logger=none", "data.val_fraction=0.25"]
MULTIOME = ["+data.synthetic.n_proteins=16", "+data.synthetic.n_peaks=60"]
DEBUG = [*BASE, "trainer=debug", "trainer.limit_val_batches=1.0"]


def test_multiomic_trains_and_reports_joint_and_single_modality_knn_accuracy(tmp_path):
    summary = train(compose_config(tmp_path, *DEBUG, *MULTIOME, "task=multiomic"))
    val = summary["val"]
    assert summary["task"] == "multiomic" and summary["global_step"] == 4 and "gep" in val
    for name in ("knn_accuracy", "knn_accuracy/rna_only", "knn_accuracy/adt_only", "knn_accuracy/atac_only"):
        assert 0.0 <= val[name] <= 1.0 and 0.0 <= val[f"pca/{name}"] <= 1.0, name
    assert val["pca/knn_accuracy/adt_only"] > 0.5  # the proteins carry the cell type (chance: 1/5)
    assert (tmp_path / "plots" / "embedding.png").is_file()


def test_init_from_an_rna_checkpoint_adds_feature_tokens_and_a_new_modality_embedding(tmp_path):
    pretrained = train(compose_config(tmp_path / "pre", *BASE, "trainer=debug", "trainer.max_steps=2"))["checkpoint"]
    summary = train(compose_config(tmp_path / "mo", *DEBUG, *MULTIOME, "task=multiomic", f"init_from={pretrained}",
                                   "trainer.max_steps=2"))
    report = json.loads((tmp_path / "mo" / "init_report.json").read_text())
    assert report["skipped_prefixes"] == ["embedding.modality_encoder."] and report["missing"] == []
    before = torch.load(pretrained, weights_only=True)["state_dict"]["model.embedding.encoder.embedding.weight"]
    after = torch.load(summary["checkpoint"], weights_only=True)
    assert after["state_dict"]["model.embedding.encoder.embedding.weight"].shape[0] == before.shape[0] + 16 + 60
    vocab = after["scgpt"]["vocab"]
    assert vocab["ADT_PROT000"] >= before.shape[0] and vocab["SYN00000"] == 0  # RNA ids unchanged
    assert "knn_accuracy/adt_only" in summary["val"]


def test_rna_only_data_is_a_one_line_error_naming_the_column_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"no var column 'feature_type'; task=multiomic needs RNA plus .*"
                                        r"\+data.synthetic.n_proteins"):
        train(compose_config(tmp_path, *DEBUG, "task=multiomic"))
    done = subprocess.run([sys.executable, "-m", "scgpt.train", f"run_dir={tmp_path / 'cli'}", *DEBUG,
                           "task=multiomic"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "feature_type" in done.stderr


# ---- batch operations ----------------------------------------------------------------------------
CFG = tiny_config()
TABLE = np.full(120, SPECIAL)
TABLE[3:60], TABLE[60:80], TABLE[80:120] = RNA, ADT, ATAC


def _batch(layout: str, seed: int = 0, generative_fraction: float = 0.0):
    rng = np.random.default_rng(seed)
    cells = []
    for n_rna, n_adt, n_atac in [(10, 5, 0), (3, 0, 6), (20, 8, 9), (0, 4, 0)]:
        ids = np.concatenate([rng.choice(np.arange(3, 60), n_rna, replace=False),
                              rng.choice(np.arange(60, 80), n_adt, replace=False),
                              rng.choice(np.arange(80, 120), n_atac, replace=False)])
        cells.append({"gene_ids": ids, "counts": rng.integers(1, 20, ids.size).astype(np.float32)})
    collator = CellCollator(CollatorConfig(pad_token_id=CFG.pad_token_id, cls_token_id=1, max_seq_len=64,
                                           generative_fraction=generative_fraction, layout=layout),
                            gene_modality=TABLE)
    return collator(cells, make_generator(seed))


def _tokens_per_cell(batch):
    """[(gene ids, values, modality ids) of each cell], layout-independent."""
    if batch.padding_mask is not None:
        real = ~batch.padding_mask
        return [(batch.gene_ids[i][real[i]].tolist(), batch.values[i][real[i]].tolist(),
                 batch.modality_ids[i][real[i]].tolist()) for i in range(batch.n_cells)]
    bounds = batch.cu_seqlens.tolist()
    return [(batch.gene_ids[a:b].tolist(), batch.values[a:b].tolist(), batch.modality_ids[a:b].tolist())
            for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_select_tokens_keeps_cls_and_the_chosen_modality_in_order(layout):
    batch = _batch(layout)
    kept = select_tokens(batch, batch.modality_ids == ADT, CFG.pad_token_id, CFG.pad_value)
    before, after = _tokens_per_cell(batch), _tokens_per_cell(kept)
    for (ids, values, mods), (new_ids, new_values, new_mods) in zip(before, after):
        expect = [i for i, (g, m) in enumerate(zip(ids, mods)) if m in (ADT, SPECIAL)]
        assert new_ids == [ids[i] for i in expect] and new_values == [values[i] for i in expect]
        assert new_ids[0] == 1 and new_mods[0] == SPECIAL and set(new_mods[1:]) <= {ADT}
    if layout == "padded":
        assert kept.gene_ids.shape[1] == 9 and kept.max_seqlen == 9  # <cls> + the 8 proteins of cell 2
        assert (kept.gene_ids[kept.padding_mask] == CFG.pad_token_id).all()
        assert (kept.values[kept.padding_mask] == CFG.pad_value).all()
        assert (kept.modality_ids[kept.padding_mask] == SPECIAL).all()
    else:
        assert kept.cu_seqlens.tolist() == [0, 6, 7, 16, 21]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_modality_dropout_removes_one_whole_modality_of_multimodal_cells(layout):
    batch = _batch(layout, seed=1)
    dropped = drop_modalities(batch, 0.99, make_generator(3), CFG.pad_token_id, CFG.pad_value)
    before, after = _tokens_per_cell(batch), _tokens_per_cell(dropped)
    for i, ((_, _, mods), (_, _, new_mods)) in enumerate(zip(before, after)):
        had = set(mods) - {SPECIAL}
        left = set(new_mods) - {SPECIAL}
        if len(had) >= 2:
            assert len(left) == len(had) - 1 and left < had  # exactly one modality gone, entirely
            assert all(mods.count(m) == new_mods.count(m) for m in left)
        else:
            assert new_mods == mods  # a single-modality cell keeps everything
    assert drop_modalities(batch, 0.0, make_generator(3), CFG.pad_token_id, CFG.pad_value) is batch


def _known_first_order(packed):
    """(T,) the packed token at each known-first position."""
    from scgpt.model.attention import GenerativeSplit

    return GenerativeSplit.from_mask(packed.cu_seqlens, packed.gen_mask).order


def test_select_tokens_modality_dropout_and_cross_modal_loss_on_known_first_tokens_match_packed():
    """data.layout=packed_known_first: the same kept tokens in known-first order, the same cell lengths, and
    the same cross-modal contrastive loss as on packed tokens."""
    from scgpt.model.scgpt import ScGPTModel
    from scgpt.objectives import ObjectiveContext
    from scgpt.objectives.multimodal import CrossModalContrastive

    packed, first = (_batch(layout, generative_fraction=1.0) for layout in ("packed", "packed_known_first"))
    assert first.cu_known is not None and bool(first.gen_mask.any())
    keep = packed.modality_ids == ADT
    pairs = [(select_tokens(packed, keep, CFG.pad_token_id, CFG.pad_value),
              select_tokens(first, keep[_known_first_order(packed)], CFG.pad_token_id, CFG.pad_value))]
    pairs.append(tuple(drop_modalities(b, 0.99, make_generator(3), CFG.pad_token_id, CFG.pad_value)
                       for b in (packed, first)))
    for ours, theirs in pairs:
        order = _known_first_order(ours)
        for name in ("gene_ids", "values", "modality_ids", "gen_mask", "hidden_mask"):
            assert torch.equal(getattr(theirs, name), getattr(ours, name)[order]), name
        assert torch.equal(theirs.layout.lengths, ours.layout.lengths)
        assert theirs.max_seqlen == ours.max_seqlen
    cfg = tiny_config(n_modalities=4)
    model = ScGPTModel(cfg)

    def forward(b):
        return model(b.gene_ids, b.values, b.layout, modality_ids=b.modality_ids)

    objective = CrossModalContrastive(1.0, temperature=0.2)
    losses = [objective(forward(b), b, ObjectiveContext(forward=forward))["cmc"] for b in (packed, first)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cross_modal_contrastive_pairs_each_cells_rna_view_with_its_other_view(layout):
    from scgpt.model.scgpt import ScGPTModel
    from scgpt.objectives import ObjectiveContext
    from scgpt.objectives.multimodal import CrossModalContrastive

    cfg = tiny_config(n_modalities=4)
    model = ScGPTModel(cfg)
    forward = lambda b: model(b.gene_ids, b.values, b.layout, modality_ids=b.modality_ids)  # noqa: E731
    objective = CrossModalContrastive(1.0, temperature=0.2)
    assert objective.check(cfg) is None and "n_modalities" in objective.check(tiny_config())
    objective.check(cfg)
    batch = _batch(layout)
    loss = objective(forward(batch), batch, ObjectiveContext(forward=forward))["cmc"]
    # cells 0-2 have RNA and ADT/ATAC, cell 3 only ADT: InfoNCE over 3 cells is about log(3) untrained
    assert 0.3 < float(loss) < 3.0
    loss.backward()
    assert model.embedding.modality_encoder.weight.grad.abs().sum() > 0
    plain = dataclasses.replace(batch, modality_ids=None)
    assert float(objective(forward(plain), plain, ObjectiveContext(forward=forward))["cmc"]) == 0.0
