"""Attention-based gene networks: the attention maps are the layer's real attention, the network sums them
per gene pair, and task=grn scores embedding, attention and co-expression networks against the planted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scgpt.errors import ConfigError
from scgpt.model import ScGPTModel
from scgpt.model.attention import ReferenceAttention
from scgpt.model.attention_maps import attention_maps
from scgpt.model.layout import TokenLayout
from scgpt.tasks.grn import AttentionNetwork
from scgpt.tasks.grn_knockout import KnockoutNetwork
from scgpt.train import train

from conftest import SMALL_DATA, compose_config, random_tokens, tiny_config

GRN = [*SMALL_DATA, "model.max_seq_len=128", "logger=none", "data.val_fraction=0.25", "task=grn", "trainer=debug", "trainer.limit_val_batches=1.0"]


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_maps_are_the_layers_attention(layer):
    torch.manual_seed(0)
    model = ScGPTModel(tiny_config(n_heads=1), ReferenceAttention()).eval()
    gene_ids, values, padding, _ = random_tokens([9, 5, 7])
    probs = attention_maps(model, gene_ids, values, padding, layer=layer)  # (B, L, L)
    assert torch.allclose(probs.sum(-1)[~padding], torch.ones(int((~padding).sum())))
    assert torch.all(probs[padding] == 0) and torch.all(probs.transpose(1, 2)[padding] == 0)
    # one head: the layer's attention output is probs @ V, then out_proj
    layout = TokenLayout(padding_mask=padding)
    with torch.no_grad():
        x, _ = model.embedding(gene_ids, values)
        for block in model.transformer_encoder.layers[:layer]:
            x = block(x, layout, None, model.transformer_encoder.backend)
        attn = model.transformer_encoder.layers[layer].self_attn
        expected = attn(x, layout, None, ReferenceAttention())
        v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)[2]  # (B, L, D)
        got = attn.out_proj(probs @ v)
    assert torch.allclose(got[~padding], expected[~padding], atol=1e-5)


def test_attention_network_averages_scaled_attention_per_gene_pair():
    network = AttentionNetwork(n_genes=5)
    gene_ids = torch.tensor([[0, 2, 3], [0, 3, 2]])  # token 0 is <cls> (id 0 here)
    probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.25, 0.75], [0.0, 0.5, 0.5]],
                          [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    real = torch.tensor([[False, True, True], [False, True, True]])
    network.add(gene_ids, probs, real)
    mean = network.mean(np.array([2, 3, 4]))  # query rows, key columns
    # scaled by 2 genes per cell: gene 2 -> 3 is 0.75 * 2 in cell 0 and 0 in cell 1
    assert mean[0, 1] == pytest.approx((1.5 + 0.0) / 2)
    assert mean[1, 0] == pytest.approx((1.0 + 0.0) / 2)
    assert mean[0, 0] == pytest.approx((0.5 + 2.0) / 2)
    assert np.all(mean[2] == 0) and np.all(mean[:, 2] == 0)  # gene 4 never seen


class _CountsGeneFive:
    """A stand-in model: every token's prediction is the number of visible (unpadded) tokens of gene 5."""

    def __call__(self, gene_ids, values, layout, batch_labels=None, modality_ids=None):
        from types import SimpleNamespace

        fives = ((gene_ids == 5) & ~layout.padding_mask).sum(dim=1, keepdim=True).float()  # (B, 1)
        return SimpleNamespace(expr_pred=fives.expand(gene_ids.shape))


def test_knockout_network_measures_the_prediction_change_without_the_regulator():
    from data_modules.collate import CellBatch

    gene_ids = torch.tensor([[0, 5, 2, 3], [0, 2, 3, 1], [0, 5, 3, 1]])  # <cls> first; 1 is padding here
    padding = torch.tensor([[False, False, False, False], [False, False, False, True], [False, False, False, True]])
    hidden = torch.tensor([[False, False, True, True], [False, True, False, False], [False, True, True, False]])
    batch = CellBatch(gene_ids=gene_ids, values=torch.zeros(3, 4), target_values=torch.zeros(3, 4),
                      hidden_mask=hidden, gen_mask=torch.zeros(3, 4, dtype=torch.bool),
                      generative=torch.zeros(3, dtype=torch.bool), padding_mask=padding)
    network = KnockoutNetwork(np.array([5, 7]), n_genes=8)
    network.add(_CountsGeneFive(), batch)
    scores = network.scores(np.array([2, 3, 5, 7]))  # rows and columns: genes 2, 3, 5, 7
    # cell 0: 5 visible, 2 and 3 hidden -> both change by 1; cell 2: 5 is hidden itself -> not knocked out
    assert scores[2].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert not scores[3].any()  # gene 7 never expressed
    assert not scores[:2].any()  # genes 2 and 3 are not regulators


def test_grn_task_scores_embedding_attention_and_coexpression_networks(tmp_path):
    summary = train(compose_config(tmp_path, *GRN, "++data.synthetic.n_regulators=6", "task.state_key=cell_type",
                                   "task.state_value=type_0"))
    val = summary["val"]
    for prefix in ("", "attn/", "coexpr/"):
        for name in (f"{prefix}grn", f"{prefix}grn_from_regulators"):
            assert 0.0 <= val[f"{name}_auprc"] <= 1.0 and f"{name}_auprc_over_random" in val
    assert 0.0 < val["grn_auprc_random"] < 0.1
    # only the regulators' rows: 6 regulators with 10-20 targets each among the measured genes
    assert val["grn_auprc_random"] < val["grn_from_regulators_auprc_random"] < 0.5
    assert val["coexpr/grn_auprc"] > 2 * val["grn_auprc_random"]  # the planted network is in the counts
    assert val["coexpr/grn_from_regulators_auprc"] > 2 * val["grn_from_regulators_auprc_random"]
    assert 0.0 <= val["knockout/grn_from_regulators_auprc"] <= 1.0 and "knockout/grn_auprc" not in val


def test_unknown_cell_state_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="task.state_value"):
        train(compose_config(tmp_path, *GRN, "task.state_key=cell_type", "task.state_value=type_99"))


# ---- an external reference network (task.reference_edges) -------------------------------------------------
def _synthetic_network(tmp_path):
    """The planted network of the synthetic store GRN trains on, as a reference file (tsv), plus the path."""
    import anndata as ad
    import zarr

    from data_modules.synthetic import ensure_synthetic_store

    store = ensure_synthetic_store(None, n_cells=400, n_genes=200, n_cell_types=6, n_batches=2, seed=0, n_regulators=6)
    network = ad.io.read_elem(zarr.open_group(str(store), mode="r")["uns"]["regulatory_network"])
    return [(str(a), str(b)) for a, b in zip(network["regulator"], network["target"])]


def test_reference_edge_file_replaces_the_planted_network_and_bounds_the_genes(tmp_path):
    import pandas as pd

    edges = _synthetic_network(tmp_path)
    path = tmp_path / "ref.csv"
    pd.DataFrame({"TF": [a for a, _ in edges] + ["NOT_A_GENE"], "gene": [b for _, b in edges] + ["GENE_X"],
                  "kind": ["tx"] * len(edges) + ["other"]}).to_csv(path, index=False)
    summary = train(compose_config(tmp_path / "run", *GRN, "++data.synthetic.n_regulators=6", f"task.reference_edges={path}",
                                   "task.reference_columns=[TF,gene]", "task.reference_where={kind: tx}",
                                   "task.network_genes=40", "task.knockout_max_regulators=3"))
    val = summary["val"]
    # the planted edges, as a reference file: co-expression recovers them as with the planted network
    assert val["coexpr/grn_from_regulators_auprc"] > 2 * val["grn_from_regulators_auprc_random"]
    # 40 scored genes at most: the candidate pairs from the regulators are at most 40 x 39
    assert val["grn_from_regulators_auprc_random"] > 6 / (40 * 39)
    # 3 of the 6 regulators knocked out: every network is also scored on those rows
    for prefix in ("", "coexpr/", "knockout/"):
        assert 0.0 <= val[f"{prefix}grn_from_knocked_out_auprc"] <= 1.0
    assert "knockout/grn_from_regulators_auprc" not in val


def test_attention_network_tracks_only_the_chosen_genes():
    network = AttentionNetwork(n_genes=6, tracked=np.array([2, 3]))
    gene_ids = torch.tensor([[0, 2, 3, 4]])
    probs = torch.full((1, 4, 4), 0.25)
    real = torch.tensor([[False, True, True, True]])
    network.add(gene_ids, probs, real)
    assert network.total.numel() == 4  # (2 x 2), not (6 x 6)
    mean = network.mean(np.array([2, 3, 4]))
    assert mean[0, 1] == pytest.approx(0.75) and mean[1, 0] == pytest.approx(0.75)  # 0.25 x 3 tokens
    assert not mean[2].any() and not mean[:, 2].any()  # gene 4 is not tracked


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".tsv", r"task.reference_edges: .*missing.tsv: no such file"),
    ("a\tb\nX\tY\n", ".tsv", r"task.reference_edges: .*bad.tsv has no column 'source'"),
    ("x", ".json", r"is not .parquet, .csv or .tsv"),
])
def test_bad_reference_file_is_one_line_and_exit_2(tmp_path, content, suffix, message):
    import subprocess
    import sys

    from scgpt.errors import DataError

    path = tmp_path / (("missing" if content is None else "bad") + suffix)
    if content is not None:
        path.write_text(content)
    with pytest.raises((ConfigError, DataError), match=message):
        train(compose_config(tmp_path / "api", *GRN, f"task.reference_edges={path}"))
    if suffix == ".tsv" and content:
        result = subprocess.run([sys.executable, "-m", "scgpt.train", *GRN, f"task.reference_edges={path}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "has no column 'source'" in lines[0]
