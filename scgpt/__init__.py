"""scgpt: pretrain, finetune, export and reuse scGPT-style single-cell foundation models.

``scgpt.load(path)`` returns ``(model, tokenizer)`` of a native export, a Lightning checkpoint or an
original scGPT model directory; ``scgpt.embed(adata, model_dir)`` returns L2-normalised cell embeddings.
Both import their dependencies on first use, so ``import scgpt`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "embed"]


def load(path, vocab=None, attention_backend="sdpa"):
    """-> (eval-mode ScGPTModel, CellTokenizer); see :func:`scgpt.embed.load`."""
    from scgpt.embed import load as _load

    return _load(path, vocab=vocab, attention_backend=attention_backend)


def __getattr__(name: str) -> Any:
    # ``scgpt.embed`` is the module scgpt/embed.py, which is callable: ``scgpt.embed(adata, model_dir, ...)``
    # runs :func:`scgpt.embed.embed`. A plain function here would be replaced by the submodule on import.
    if name == "embed":
        return importlib.import_module("scgpt.embed")
    raise AttributeError(f"module 'scgpt' has no attribute {name!r}")
