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
