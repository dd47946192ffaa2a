"""The interface every loss term implements, and shared masked-loss helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from data_modules.collate import CellBatch
from scgpt.model.scgpt import ScGPTOutput


@dataclass
class ObjectiveContext:
    """What an objective may need beyond the batch and the outputs."""

    second_view: ScGPTOutput | None = None  # a second forward pass (other dropout), for contrastive terms
    gather: Callable[[Tensor], Tensor] = lambda t: t  # (B, ...) -> (world * B, ...), gradients kept
    rank: int = 0
    forward: Callable[[CellBatch], ScGPTOutput] | None = None  # the model on another batch (e.g. one modality's tokens)


class Objective:
    """One loss term. ``__call__`` returns its named, unweighted losses; the task applies the weight."""

    name: str = "objective"
    needs_second_view: bool = False

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def __call__(self, out: ScGPTOutput, batch: CellBatch, ctx: ObjectiveContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def check(self, model_cfg) -> str | None:
        """A reason this objective cannot run with the model config, or None."""
        return None


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over masked positions; 0 (with a gradient path) when none are masked."""
    weight = mask.to(pred.dtype)
    return ((pred - target.to(pred.dtype)) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def masked_bernoulli_nll(logits: Tensor, is_nonzero: Tensor, mask: Tensor) -> Tensor:
    """Bernoulli negative log-likelihood of non-zero values over masked positions."""
    weight = mask.to(logits.dtype)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, is_nonzero.to(logits.dtype), reduction="none")
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)
