"""Attention backends agree with the reference, padded and unpadded, with and without the generative mask."""

from __future__ import annotations

import pytest
import torch

from scgpt.model.attention import ReferenceAttention, SdpaAttention, VarlenAttention, torch_varlen_kernel
from scgpt.model.attention_backends import (GPU_BACKENDS, build_attention_backend, cudnn_unavailable,
                                            fa4_unavailable, flash_attn_available, flex_unavailable)
from scgpt.model.flex_attention import FlexAttention
from scgpt.model.layout import pack_padded
from scgpt.model.varlen_kernels import fold_lse_gradient, reference_flash_kernel
from scgpt.errors import ConfigError

from conftest import random_tokens

BACKENDS = {
    "reference": ReferenceAttention(),
    "sdpa": SdpaAttention(),
    # flash-attn's unpadded varlen path with a plain-torch kernel in place of the CUDA one
    "varlen": VarlenAttention(torch_varlen_kernel, "torch_varlen"),
}


def _qkv(lengths, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(lengths), heads, max(lengths), dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    _, _, padding, gen = random_tokens(lengths, seed=seed)
    return q, k, v, padding, gen


def _packed(t, padding):  # (B, H, L, Dh) -> (T, H, Dh)
    return pack_padded(t.transpose(1, 2), padding)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("generative", [False, True])
def test_backend_matches_reference_padded_and_packed(name, generative):
    q, k, v, padding, gen = _qkv([7, 3, 12, 1])
    gen = gen if generative else None
    expected = ReferenceAttention().padded(q, k, v, padding, gen)  # (B, H, L, Dh)
    backend = BACKENDS[name]
    padded = backend.padded(q, k, v, padding, gen)
    torch.testing.assert_close(padded.transpose(1, 2)[~padding], expected.transpose(1, 2)[~padding])
    (pq, layout), (pk, _), (pv, _) = (_packed(t, padding) for t in (q, k, v))
    packed_gen = None if gen is None else gen[~padding]
    packed = backend.packed(pq, pk, pv, layout.cu_seqlens, layout.max_seqlen, packed_gen)
    torch.testing.assert_close(packed, expected.transpose(1, 2)[~padding])


@pytest.mark.parametrize("name", BACKENDS)
def test_generative_mask_hides_generated_keys_from_other_queries(name):
    q, k, v, padding, gen = _qkv([10, 10], seed=1)
    base = BACKENDS[name].padded(q, k, v, padding, gen)
    k2, v2 = k.clone(), v.clone()
    k2.transpose(1, 2)[gen] += 5.0  # (B, L, H, Dh) view: change every generated token's key and value
    v2.transpose(1, 2)[gen] += 3.0
    changed = BACKENDS[name].padded(q, k2, v2, padding, gen)
    known = ~gen & ~padding
    torch.testing.assert_close(changed.transpose(1, 2)[known], base.transpose(1, 2)[known])
    assert not torch.allclose(changed.transpose(1, 2)[gen], base.transpose(1, 2)[gen])  # each sees itself


def test_padding_keys_are_ignored():
    q, k, v, padding, _ = _qkv([9, 4])
    k2, v2 = k.clone(), v.clone()
    k2.transpose(1, 2)[padding] = 100.0
    v2.transpose(1, 2)[padding] = -100.0
    for backend in BACKENDS.values():
        a, b = backend.padded(q, k, v, padding, None), backend.padded(q, k2, v2, padding, None)
        torch.testing.assert_close(a.transpose(1, 2)[~padding], b.transpose(1, 2)[~padding])


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention_backend"):
        build_attention_backend("xformers")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn with CUDA is available here")
def test_flash_attn_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="flash_attn needs CUDA"):
        build_attention_backend("flash_attn")


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch's FlexAttention refuses backward on CPU at its entry (a device check only); its eager path is
    plain autograd math, so lifting the check tests our block mask's gradients here. Training on CPU
    stays refused (build_attention_backend)."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


@pytest.mark.parametrize("generative", [False, True])
def test_flex_attention_matches_reference_padded_and_packed(generative):
    q, k, v, padding, gen = _qkv([70, 3, 129, 1, 40], seed=7)  # ragged, over one 128-token block
    gen = gen if generative else None
    expected = ReferenceAttention().padded(q, k, v, padding, gen).transpose(1, 2)[~padding]  # (T, H, Dh)
    backend = FlexAttention(compiled=False)
    padded = backend.padded(q, k, v, padding, gen)
    torch.testing.assert_close(padded.transpose(1, 2)[~padding], expected)
    (pq, layout), (pk, _), (pv, _) = (_packed(t, padding) for t in (q, k, v))
    packed_gen = None if gen is None else gen[~padding]
    plan = backend.plan(layout.cu_seqlens, layout.max_seqlen, packed_gen)
    for _ in range(2):  # one block mask for every layer of a forward
        torch.testing.assert_close(backend.packed(pq, pk, pv, layout.cu_seqlens, layout.max_seqlen, packed_gen, plan),
                                   expected)


def test_flex_attention_gradients_match_reference_on_packed_generated_tokens(flex_backward_on_cpu):
    q, k, v, padding, gen = _qkv([70, 3, 129, 1, 40], seed=8)
    (pq, layout), (pk, _), (pv, _) = (_packed(t, padding) for t in (q, k, v))
    weights = torch.randn(pq.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for backend in (ReferenceAttention(), FlexAttention(compiled=False)):
        leaves = [t.clone().requires_grad_() for t in (pq, pk, pv)]
        out = backend.packed(*leaves, layout.cu_seqlens, layout.max_seqlen, gen[~padding])
        (out * weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_kernels_without_cuda_are_one_config_error_naming_the_fix(name):
    with pytest.raises(ConfigError) as error:
        build_attention_backend(name)
    assert str(error.value) == (f"model.attention_backend: {name} needs a CUDA GPU"
                                + (" (torch's FlexAttention has no backward on CPU)" if name.startswith("flex") else "")
                                + "; use model.attention_backend=sdpa on this machine")


def _gpu_unavailable(name: str) -> str | None:
    return {"flash_attn4": fa4_unavailable, "cudnn": cudnn_unavailable, "flex": flex_unavailable,
            "flex_flash": lambda: flex_unavailable(flash=True)}[name]()


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("generative", [False, True])
def test_gpu_kernels_match_reference_forward_and_backward_on_gpu(name, generative):
    if _gpu_unavailable(name):
        pytest.skip(f"{name} {_gpu_unavailable(name)}")
    q, k, v, padding, gen = (t.cuda() for t in _qkv([70, 33, 300, 5], heads=4, dim=64))
    gen = gen if generative else None
    (pq, layout), (pk, _), (pv, _) = (_packed(t, padding) for t in (q, k, v))
    packed_gen = None if gen is None else gen[~padding]
    weights = torch.randn_like(pq)
    results = []
    for backend, dtype in ((ReferenceAttention(), torch.float32), (build_attention_backend(name), torch.bfloat16)):
        leaves = [t.to(dtype).requires_grad_() for t in (pq, pk, pv)]
        out = backend.packed(*leaves, layout.cu_seqlens, layout.max_seqlen, packed_gen)
        (out.float() * weights).sum().backward()
        results.append([out.float()] + [t.grad.float() for t in leaves])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("generative", [False, True])
def test_flash_attn_matches_reference_on_gpu(generative):
    q, k, v, padding, gen = (t.cuda() for t in _qkv([70, 33, 128, 5], heads=4, dim=32))
    gen = gen if generative else None
    expected = ReferenceAttention().padded(q.float(), k.float(), v.float(), padding, gen)
    out = build_attention_backend("flash_attn").padded(q.bfloat16(), k.bfloat16(), v.bfloat16(), padding, gen)
    torch.testing.assert_close(out.float().transpose(1, 2)[~padding], expected.transpose(1, 2)[~padding],
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend_cls", [ReferenceAttention, SdpaAttention])
@pytest.mark.parametrize("tolerance", [-1.0, 0.5, 1e9])
@pytest.mark.parametrize("generative", [False, True])
def test_packed_cells_grouped_by_length_match_reference(backend_cls, tolerance, generative):
    q, k, v, padding, gen = _qkv([9, 9, 8, 3, 12, 2, 3], seed=5)
    gen = gen if generative else None
    expected = ReferenceAttention().padded(q, k, v, padding, gen).transpose(1, 2)[~padding]
    backend = backend_cls()
    backend.group_tolerance = tolerance
    (pq, layout), (pk, _), (pv, _) = (_packed(t, padding) for t in (q, k, v))
    packed_gen = None if gen is None else gen[~padding]
    plan = backend.plan(layout.cu_seqlens, layout.max_seqlen, packed_gen)
    for _ in range(2):  # the plan is reused, as by every layer of one forward
        out = backend.packed(pq, pk, pv, layout.cu_seqlens, layout.max_seqlen, packed_gen, plan)
        torch.testing.assert_close(out, expected)


def test_flash_backward_with_folded_lse_gradient_matches_autograd():
    """A FlashAttention-style backward handed out' = out - g_lse / |dO|^2 dO also applies lse's gradient."""
    g = torch.Generator().manual_seed(3)
    cu_q, cu_k = torch.tensor([0, 4, 9, 10]), torch.tensor([0, 6, 8, 13])
    q, k, v = (torch.randn(n, 2, 8, generator=g) for n in (10, 13, 13))
    w_out, w_lse = torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, generator=g)
    grads = []
    for kernel in (torch_varlen_kernel, reference_flash_kernel):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = kernel(*leaves, cu_q, cu_k, 5, 6)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads.append([t.grad for t in leaves])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_folding_skips_rows_without_output_gradient():
    out, grad_out = torch.ones(3, 1, 4), torch.zeros(3, 1, 4)
    grad_out[0] = 2.0
    folded = fold_lse_gradient(out, grad_out, torch.tensor([[1.0, 1.0, 1.0]]))  # (H, Tq)
    assert torch.isfinite(folded).all()
    torch.testing.assert_close(folded[1:], out[1:])
    torch.testing.assert_close((grad_out[0] * folded[0]).sum(), (grad_out[0] * out[0]).sum() - 1.0)
