"""Pure-torch model code: no Lightning, DeepSpeed, Hydra or vocabulary objects."""

from scgpt.model.attention_backends import build_attention_backend
from scgpt.model.layout import TokenLayout
from scgpt.model.scgpt import ScGPTModel, ScGPTOutput

__all__ = ["ScGPTModel", "ScGPTOutput", "TokenLayout", "build_attention_backend"]
