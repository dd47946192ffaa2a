"""Each loss term: what it measures, where it looks, and the config checks around it."""

from __future__ import annotations

import pytest
import torch

from data_modules.collate import CellBatch
from scgpt.errors import ConfigError
from scgpt.model.scgpt import ScGPTOutput
from scgpt.objectives import ObjectiveContext, build_objectives
from scgpt.objectives.cell import ContrastiveCellEmbedding, ElasticCellSimilarity
from scgpt.objectives.expression import (
    GenerativeExpressionPrediction,
    MaskedExpressionPrediction,
    MaskedValueFromCell,
    ZeroProbability,
)

from conftest import tiny_config


def _batch():
    target = torch.tensor([[-2.0, 3.0, 0.0, 5.0], [-2.0, 1.0, 2.0, -2.0]])
    hidden = torch.tensor([[False, True, True, False], [False, True, False, False]])
    generative = torch.tensor([False, True])
    return CellBatch(gene_ids=torch.zeros(2, 4, dtype=torch.long), values=target.masked_fill(hidden, -1.0),
                     target_values=target, hidden_mask=hidden, gen_mask=hidden & generative[:, None],
                     generative=generative, padding_mask=torch.tensor([[False] * 4, [False] * 3 + [True]]),
                     labels={"batch": torch.tensor([0, 1])})


def _output(pred):
    return ScGPTOutput(token_states=torch.zeros(2, 4, 8), cell_emb=torch.randn(2, 8), expr_pred=pred,
                       mvc_pred=pred + 1.0, expr_zero_logit=torch.zeros(2, 4), mvc_zero_logit=None)


def test_gep_scores_hidden_values_of_non_generative_cells_only():
    pred = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 100.0, 9.0, 9.0]])
    terms = MaskedExpressionPrediction(1.0)(_output(pred), _batch(), ObjectiveContext())
    assert terms["gep"].item() == pytest.approx(((1 - 3) ** 2 + (2 - 0) ** 2) / 2)


def test_generative_term_scores_generated_values_only():
    pred = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 4.0, 9.0, 9.0]])
    terms = GenerativeExpressionPrediction(1.0)(_output(pred), _batch(), ObjectiveContext())
    assert terms["gen"].item() == pytest.approx((4 - 1) ** 2)


def test_mvc_scores_every_hidden_value():
    pred = torch.zeros(2, 4)  # mvc_pred = 1 everywhere
    terms = MaskedValueFromCell(1.0)(_output(pred), _batch(), ObjectiveContext())
    assert terms["mvc"].item() == pytest.approx(((1 - 3) ** 2 + (1 - 0) ** 2 + (1 - 1) ** 2) / 3)


def test_zero_probability_is_bernoulli_nll_of_nonzero():
    terms = ZeroProbability(1.0)(_output(torch.zeros(2, 4)), _batch(), ObjectiveContext())
    assert terms["zero_expr"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # logit 0 -> p 0.5


def test_terms_with_no_positions_are_zero_and_keep_a_gradient():
    batch = _batch()
    batch.gen_mask = torch.zeros_like(batch.gen_mask)
    pred = torch.ones(2, 4, requires_grad=True)
    loss = GenerativeExpressionPrediction(1.0)(_output(pred), batch, ObjectiveContext())["gen"]
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


def test_ecs_pushes_similarities_away_from_the_threshold():
    # scGPT's ECS, mean(1 - (cos - threshold)^2): similar pairs are pulled closer, dissimilar pushed apart
    batch, objective = _batch(), ElasticCellSimilarity(1.0, threshold=0.6)
    at = _output(torch.zeros(2, 4))
    at.cell_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosine 0.6
    far = _output(torch.zeros(2, 4))
    far.cell_emb = torch.tensor([[1.0, 0.0], [1.0, 0.01]])  # cosine ~1
    assert objective(at, batch, ObjectiveContext())["ecs"] > objective(far, batch, ObjectiveContext())["ecs"]


def test_cce_prefers_matching_views():
    batch, objective = _batch(), ContrastiveCellEmbedding(1.0, temperature=0.1)
    out = _output(torch.zeros(2, 4))
    out.cell_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same, swapped = _output(torch.zeros(2, 4)), _output(torch.zeros(2, 4))
    same.cell_emb, swapped.cell_emb = out.cell_emb.clone(), out.cell_emb.flip(0)
    low = objective(out, batch, ObjectiveContext(second_view=same))["cce"]
    high = objective(out, batch, ObjectiveContext(second_view=swapped))["cce"]
    assert low < 0.01 < high


def test_build_skips_zero_weights_and_checks_heads():
    cfg = tiny_config()
    built = build_objectives({"gep": 1.0, "gen": 0.5, "mvc": 0.0}, None, cfg)
    assert [(o.name, o.weight) for o in built] == [("gep", 1.0), ("gen", 0.5)]
    with pytest.raises(ConfigError, match="task.objectives.zero: needs model.explicit_zero_prob"):
        build_objectives({"zero": 1.0}, None, cfg)
    with pytest.raises(ConfigError, match="task.objectives.mlm: unknown objective"):
        build_objectives({"mlm": 1.0}, None, cfg)
    with pytest.raises(ConfigError, match="every weight is 0"):
        build_objectives({"gep": 0.0}, None, cfg)
