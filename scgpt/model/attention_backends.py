"""Which attention backend a ``model.attention_backend`` name means, and whether it can run here.

The backends themselves live in attention.py (and flex_attention.py); this module only picks one, and
refuses a kernel this machine cannot run with one line naming the key and the fix (:class:`ConfigError`).
"""

from __future__ import annotations

import torch

from scgpt.errors import ConfigError
from scgpt.model.attention import (AttentionBackend, ReferenceAttention, SdpaAttention, VarlenAttention,
                                   flash_varlen_kernel, torch_flash_varlen_kernel)
from scgpt.model.flex_attention import FlexAttention

__all__ = ["GPU_BACKENDS", "build_attention_backend", "flash_attn_available", "fa4_unavailable",
           "cudnn_unavailable", "flex_unavailable"]


def flash_attn_package_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_flash_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_available() -> bool:
    """Whether a FlashAttention varlen kernel (flash-attn's or PyTorch's) can run here."""
    return torch.cuda.is_available() and (flash_attn_package_available() or torch_flash_varlen_available())


def _cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def fa4_unavailable() -> str | None:
    """Why FlashAttention-4 cannot run here (None when it can): a Hopper / Blackwell GPU, torch's FA4
    registry and the flash-attn-4 wheel (``flash_attn.cute``)."""
    capability = _cuda_capability()
    if capability is None:
        return "needs a CUDA GPU"
    if capability[0] not in (9, 10):
        return f"needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x, this one is {capability[0]}.x)"
    try:
        from torch.nn.attention import list_flash_attention_impls
    except ImportError:
        return f"needs torch with activate_flash_attention_impl (this is {torch.__version__})"
    if "FA4" not in list_flash_attention_impls():
        return f"needs torch with the FA4 flash attention impl (this is {torch.__version__})"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except ImportError:
        return "needs the flash-attn-4 wheel (pip install 'scgpt[fa4]')"
    return None


def cudnn_unavailable() -> str | None:
    """Why cuDNN's ragged attention cannot run here (None when it can): an Ampere or newer GPU with cuDNN."""
    capability = _cuda_capability()
    if capability is None:
        return "needs a CUDA GPU"
    if not torch.backends.cudnn.is_available():
        return "needs torch built with cuDNN"
    if capability[0] < 8:
        return "needs an Ampere or newer GPU (compute capability >= 8.0)"
    return None


def flex_unavailable(flash: bool = False) -> str | None:
    """Why FlexAttention cannot train here (None when it can): torch's FlexAttention has no CPU backward;
    its FLASH backend needs FlashAttention-4 as well."""
    if _cuda_capability() is None:
        return "needs a CUDA GPU (torch's FlexAttention has no backward on CPU)"
    return fa4_unavailable() if flash else None


def _gpu_backend(name: str) -> AttentionBackend:
    """flash_attn4, cudnn, flex, flex_flash; ConfigError naming the key and the fix where one cannot run."""
    reason = {"flash_attn4": fa4_unavailable, "cudnn": cudnn_unavailable, "flex": flex_unavailable,
              "flex_flash": lambda: flex_unavailable(flash=True)}[name]()
    if reason:
        raise ConfigError(f"model.attention_backend: {name} {reason}; use model.attention_backend=sdpa on this machine")
    if name == "flash_attn4":  # process-wide: PyTorch's aten flash ops (flash_attn(torch), sdpa) now run FA4
        from torch.nn.attention import activate_flash_attention_impl

        activate_flash_attention_impl("FA4")
        return VarlenAttention(torch_flash_varlen_kernel, "flash_attn4")
    if name == "cudnn":
        from scgpt.model.varlen_kernels import torch_cudnn_varlen_kernel

        return VarlenAttention(torch_cudnn_varlen_kernel, "cudnn")
    return FlexAttention(name, {"BACKEND": "FLASH"} if name == "flex_flash" else None)


GPU_BACKENDS = ("flash_attn4", "cudnn", "flex", "flex_flash")


def build_attention_backend(name: str) -> AttentionBackend:
    """The backend called ``name``; refuses the GPU kernels where they cannot run."""
    if name == "reference":
        return ReferenceAttention()
    if name == "sdpa":
        return SdpaAttention()
    if name == "flash_attn":
        if not flash_attn_available():
            raise ConfigError("model.attention_backend: flash_attn needs CUDA and the flash-attn package "
                              "(pip install 'scgpt[gpu]') or torch >= 2.10; use model.attention_backend=sdpa on this machine")
        if flash_attn_package_available():
            return VarlenAttention(flash_varlen_kernel, "flash_attn")
        return VarlenAttention(torch_flash_varlen_kernel, "flash_attn(torch)")
    if name in GPU_BACKENDS:
        return _gpu_backend(name)
    raise ConfigError(f"model.attention_backend: unknown backend {name!r}; choose sdpa, reference, flash_attn, "
                      f"{', '.join(GPU_BACKENDS)}")
