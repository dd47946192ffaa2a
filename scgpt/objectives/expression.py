"""Expression prediction terms: masked (GEP), generative, MVC and explicit zero probability."""

from __future__ import annotations

from scgpt.objectives.base import Objective, masked_bernoulli_nll, masked_mse


class MaskedExpressionPrediction(Objective):
    """GEP: predict hidden values of cells that see all other genes (no generative mask)."""

    name = "gep"

    def __call__(self, out, batch, ctx):
        positions = batch.hidden_mask & ~batch.gen_mask
        return {self.name: masked_mse(out.expr_pred, batch.target_values, positions)}


class GenerativeExpressionPrediction(Objective):
    """Generate the values of genes that attend only to the known genes (scGPT's generative mask)."""

    name = "gen"

    def __call__(self, out, batch, ctx):
        return {self.name: masked_mse(out.expr_pred, batch.target_values, batch.gen_mask)}


class MaskedValueFromCell(Objective):
    """MVC: predict each hidden value from the cell embedding and the gene embedding alone."""

    name = "mvc"

    def check(self, model_cfg):
        return None if model_cfg.mvc_decoder else "needs model.mvc_decoder=true"

    def __call__(self, out, batch, ctx):
        return {self.name: masked_mse(out.mvc_pred, batch.target_values, batch.hidden_mask)}


class ZeroProbability(Objective):
    """Bernoulli likelihood that a hidden value is non-zero (expression and MVC heads)."""

    name = "zero"

    def check(self, model_cfg):
        return None if model_cfg.explicit_zero_prob else "needs model.explicit_zero_prob=true"

    def __call__(self, out, batch, ctx):
        nonzero = batch.target_values > 0
        terms = {"zero_expr": masked_bernoulli_nll(out.expr_zero_logit, nonzero, batch.hidden_mask)}
        if out.mvc_zero_logit is not None:
            terms["zero_mvc"] = masked_bernoulli_nll(out.mvc_zero_logit, nonzero, batch.hidden_mask)
        return terms
