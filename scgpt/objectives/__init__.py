"""Loss terms as small classes, chosen and weighted in config: ``objectives: {gep: 1.0, mvc: 1.0}``."""

from __future__ import annotations

from typing import Any, Mapping

from scgpt.config import ModelConfig
from scgpt.errors import ConfigError
from scgpt.objectives.base import Objective, ObjectiveContext
from scgpt.objectives.cell import AdversarialBatch, ContrastiveCellEmbedding, ElasticCellSimilarity
from scgpt.objectives.classification import CellClassification
from scgpt.objectives.expression import (
    GenerativeExpressionPrediction,
    MaskedExpressionPrediction,
    MaskedValueFromCell,
    ZeroProbability,
)
from scgpt.objectives.multimodal import CrossModalContrastive

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (MaskedExpressionPrediction, GenerativeExpressionPrediction, MaskedValueFromCell, ZeroProbability,
                ElasticCellSimilarity, ContrastiveCellEmbedding, AdversarialBatch, CellClassification,
                CrossModalContrastive)
}


def build_objectives(weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None,
                     model_cfg: ModelConfig) -> list[Objective]:
    """The objectives with a non-zero weight, checked against the model's heads."""
    options = options or {}
    for name in list(weights) + list(options):
        if name not in OBJECTIVES:
            raise ConfigError(f"task.objectives.{name}: unknown objective; choose from {', '.join(OBJECTIVES)}")
    built = []
    for name, weight in weights.items():
        if float(weight) == 0.0:
            continue
        objective = OBJECTIVES[name](weight, **dict(options.get(name, {})))
        problem = objective.check(model_cfg)
        if problem:
            raise ConfigError(f"task.objectives.{name}: {problem}")
        built.append(objective)
    if not built:
        raise ConfigError("task.objectives: every weight is 0; give at least one objective a positive weight")
    return built


__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "build_objectives"]
