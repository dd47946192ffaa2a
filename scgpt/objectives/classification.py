"""Cell classification: cross-entropy of the classifier head against a per-cell label."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from scgpt.errors import ConfigError
from scgpt.objectives.base import Objective

CLASS_WEIGHTINGS = ("balanced",)


class CellClassification(Objective):
    """CLS: cross-entropy of ``out.cls_logits`` against ``batch.labels[label_key]``; cells whose label is
    missing (-1) are ignored. ``class_weights``: null (uniform), ``balanced`` (n / (k * count), set from the
    training labels by the task through :meth:`set_class_counts`) or one weight per class."""

    name = "cls"

    def __init__(self, weight: float, label_key: str = "cell_type",
                 class_weights: str | Sequence[float] | None = None) -> None:
        super().__init__(weight)
        if isinstance(class_weights, str) and class_weights not in CLASS_WEIGHTINGS:
            raise ConfigError(f"task.objective_options.cls.class_weights: unknown weighting {class_weights!r}; "
                              "use null, balanced or a list with one weight per class")
        self.label_key = label_key
        self.class_weights = class_weights
        self._weight_tensor = None if class_weights is None or isinstance(class_weights, str) else \
            torch.as_tensor(list(class_weights), dtype=torch.float32)

    @property
    def wants_class_counts(self) -> bool:
        return self.class_weights == "balanced"

    def set_class_counts(self, counts: Sequence[int]) -> None:
        """Balanced weights n / (k * count_c) from the training label counts (absent classes get 0)."""
        counts = torch.as_tensor(list(counts), dtype=torch.float32)
        present = counts > 0
        weights = torch.zeros_like(counts)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        self._weight_tensor = weights

    def check(self, model_cfg):
        if not model_cfg.n_cls_classes:
            return "needs a classifier head (model.n_cls_classes > 0, or task.model_heads.n_cls_classes: auto)"
        if self._weight_tensor is not None and self._weight_tensor.numel() != model_cfg.n_cls_classes:
            return (f"class_weights has {self._weight_tensor.numel()} weights for {model_cfg.n_cls_classes} "
                    "classes; give one per class")
        return None

    def __call__(self, out, batch, ctx):
        if self.label_key not in batch.labels:
            raise ConfigError(f"task.objective_options.cls.label_key: {self.label_key!r} is not a label of the "
                              f"batch ({', '.join(batch.labels)}); add it to data.label_keys")
        labels = batch.labels[self.label_key]  # (B,)
        logits = out.cls_logits.float()  # (B, C)
        if not bool((labels >= 0).any()):  # no labelled cell: a zero that keeps the graph
            return {self.name: logits.sum() * 0.0}
        weight = None if self._weight_tensor is None else self._weight_tensor.to(logits.device)
        return {self.name: F.cross_entropy(logits, labels, weight=weight, ignore_index=-1)}
