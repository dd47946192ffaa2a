"""Padded, packed (unpadded), packed known-first and grouped-packed computations give the same losses and gradients; speed
options (activation checkpointing) keep them; GPU-only paths skip cleanly without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.collate import CellCollator, CollatorConfig
from scgpt.model import ScGPTModel
from scgpt.model.attention import ReferenceAttention, SdpaAttention, VarlenAttention, length_groups, torch_varlen_kernel
from scgpt.model.attention_backends import flash_attn_available
from scgpt.model.varlen_kernels import reference_flash_kernel
from scgpt.objectives import ObjectiveContext, build_objectives

from conftest import PAD, VOCAB, tiny_config

WEIGHTS = {"gep": 1.0, "gen": 1.0, "mvc": 1.0}
LAYOUTS = ("padded", "packed", "packed_known_first")  # known-first: tests/model/test_known_first_layout.py


def _grouped(tolerance):
    backend = SdpaAttention()
    backend.group_tolerance = tolerance
    return backend


def _kernel_dropping_lse_gradient(*args):
    """torch_varlen_kernel with a detached log-sum-exp, as FlashAttention kernels' backward passes drop it."""
    out, lse = torch_varlen_kernel(*args)
    return out, lse.detach()


BACKENDS = {"reference": ReferenceAttention, "sdpa": SdpaAttention,
            "torch_varlen": lambda: VarlenAttention(torch_varlen_kernel, "torch_varlen"),
            "varlen_without_lse_gradient": lambda: VarlenAttention(_kernel_dropping_lse_gradient, "flash-like"),
            # FlashAttention's backward semantics with the lse gradient folded into its `out` (one call fewer)
            "flash_semantics_lse_folded": lambda: VarlenAttention(reference_flash_kernel, "flash-semantics"),
            "sdpa_grouped": lambda: _grouped(1.0), "sdpa_all_in_one_group": lambda: _grouped(1e9)}


def _batches(n_cells=7, seed=0, generative_fraction=0.5):
    rng = np.random.default_rng(seed)
    cells = []
    for n in rng.integers(3, 40, size=n_cells):
        cells.append({"gene_ids": rng.choice(np.arange(3, VOCAB), size=n, replace=False),
                      "counts": rng.geometric(0.3, size=n).astype(np.float32)})
    out = {}
    for layout in LAYOUTS:
        collator = CellCollator(CollatorConfig(pad_token_id=PAD, cls_token_id=1, max_seq_len=32,
                                               generative_fraction=generative_fraction, layout=layout))
        out[layout] = collator(cells, torch.Generator().manual_seed(seed))
    assert bool(out["packed"].generative.any()) or generative_fraction == 0
    return out


def _loss_and_grads(backend, batch, checkpointing=False, device="cpu", autocast_dtype=None, compile=False):
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0)
    model = ScGPTModel(cfg, backend).to(device).train()
    model.transformer_encoder.activation_checkpointing = checkpointing
    if compile:
        model.transformer_encoder.compile_token_ops()
    gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask)
        terms = {}
        for objective in build_objectives(WEIGHTS, None, cfg):
            terms.update(objective(out, batch, ObjectiveContext()))
    loss = sum(terms.values())
    loss.backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("generative_fraction", [0.0, 0.5])
def test_padded_and_packed_give_the_same_losses_and_gradients(name, generative_fraction):
    batches = _batches(generative_fraction=generative_fraction)
    ref_terms, ref_grads = _loss_and_grads(ReferenceAttention(), batches["padded"])
    for layout in LAYOUTS:
        terms, grads = _loss_and_grads(BACKENDS[name](), batches[layout])
        assert terms.keys() == ref_terms.keys()
        for key in terms:
            torch.testing.assert_close(terms[key], ref_terms[key], atol=1e-5, rtol=1e-5, msg=f"{layout} {key}")
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=f"{layout} {key}")


def test_flex_attention_gives_the_reference_losses_and_gradients(monkeypatch):
    """One FlexAttention call per layer (document + generative block mask) on packed and padded cells.
    torch refuses FlexAttention's backward on CPU by a device check only; lifted here, its eager autograd
    math runs (model.attention_backend=flex itself stays CUDA-only)."""
    import torch.nn.attention.flex_attention as flex_module

    from scgpt.model.flex_attention import FlexAttention

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    batches = _batches(generative_fraction=0.5)
    ref_terms, ref_grads = _loss_and_grads(ReferenceAttention(), batches["padded"])
    for layout in LAYOUTS:
        terms, grads = _loss_and_grads(FlexAttention(compiled=False), batches[layout])
        for key in ref_terms:
            torch.testing.assert_close(terms[key], ref_terms[key], atol=1e-5, rtol=1e-5, msg=f"{layout} {key}")
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=f"{layout} {key}")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_activation_checkpointing_keeps_losses_and_gradients(layout):
    batch = _batches()[layout]
    terms, grads = _loss_and_grads(SdpaAttention(), batch)
    ck_terms, ck_grads = _loss_and_grads(SdpaAttention(), batch, checkpointing=True)
    for key in terms:
        torch.testing.assert_close(ck_terms[key], terms[key])
    for key in grads:
        torch.testing.assert_close(ck_grads[key], grads[key])


@pytest.mark.slow
def test_compiled_token_ops_and_generative_mixing_keep_losses_and_gradients():
    """PretrainTask(compile=True) on the flash-like varlen path (lse gradient rebuilt by the compiled mix)."""
    batch = _batches()["packed"]
    ref_terms, ref_grads = _loss_and_grads(ReferenceAttention(), _batches()["padded"])
    backend = VarlenAttention(_kernel_dropping_lse_gradient, "flash-like")
    terms, grads = _loss_and_grads(backend, batch, compile=True)
    assert backend.mix is not None and getattr(backend.mix, "__wrapped__", None) is not None  # compiled
    for key in terms:
        torch.testing.assert_close(terms[key], ref_terms[key], atol=1e-5, rtol=1e-5, msg=key)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_length_groups_bound_the_padding_work():
    lengths = [10, 10, 9, 3, 3, 1, 50]
    assert length_groups(lengths, -1) == [[6], [0], [1], [2], [3], [4], [5]]
    assert length_groups(lengths, 0.0) == [[6], [0, 1], [2], [3, 4], [5]]
    for tolerance in (0.0, 0.15, 1.0):
        for group in length_groups(lengths, tolerance):
            longest = max(lengths[i] for i in group)
            assert len(group) * longest ** 2 <= (1 + tolerance) * sum(lengths[i] ** 2 for i in group)
    assert sorted(i for g in length_groups(lengths, 1e9) for i in g) == list(range(len(lengths)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sdpa", "flash_attn", "flash_attn4", "cudnn", "flex", "flex_flash"])
@pytest.mark.parametrize("generative_fraction", [0.0, 0.5])
def test_packed_matches_padded_on_gpu(name, generative_fraction):
    """bf16 autocast on CUDA (FlashAttention kernels take bf16 only): losses and gradients against the
    fp32 reference attention on padded cells, within bf16 tolerance."""
    if name == "flash_attn" and not flash_attn_available():
        pytest.skip("needs a FlashAttention varlen kernel (flash-attn or torch >= 2.10)")
    from scgpt.model.attention_backends import build_attention_backend, cudnn_unavailable, fa4_unavailable, flex_unavailable

    reason = {"flash_attn4": fa4_unavailable, "cudnn": cudnn_unavailable, "flex": flex_unavailable,
              "flex_flash": lambda: flex_unavailable(flash=True)}.get(name, lambda: None)()
    if reason:
        pytest.skip(f"{name} {reason}")

    batches = {k: _to_cuda(v) for k, v in _batches(generative_fraction=generative_fraction).items()}
    ref_terms, ref_grads = _loss_and_grads(ReferenceAttention(), batches["padded"], device="cuda")
    for layout in LAYOUTS:
        terms, grads = _loss_and_grads(build_attention_backend(name), batches[layout], device="cuda",
                                       autocast_dtype=torch.bfloat16)
        for key in terms:
            torch.testing.assert_close(terms[key].float(), ref_terms[key], atol=0.05, rtol=0.03, msg=f"{layout} {key}")
        for key in ref_grads:
            scale = ref_grads[key].abs().max().clamp_min(1e-6)
            error = (grads[key].float() - ref_grads[key]).abs().max() / scale
            assert error < 0.05, f"{layout} {key}: max gradient error {error:.3f} of the largest entry"


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs CUDA and a FlashAttention varlen kernel")
def test_compiled_flash_attn_packed_matches_reference_on_gpu():
    from scgpt.model.attention_backends import build_attention_backend

    batches = {k: _to_cuda(v) for k, v in _batches().items()}
    ref_terms, ref_grads = _loss_and_grads(ReferenceAttention(), batches["padded"], device="cuda")
    terms, grads = _loss_and_grads(build_attention_backend("flash_attn"), batches["packed"], device="cuda",
                                   autocast_dtype=torch.bfloat16, compile=True)
    for key in terms:
        torch.testing.assert_close(terms[key].float(), ref_terms[key], atol=0.05, rtol=0.03, msg=key)
    for key in ref_grads:
        error = (grads[key].float() - ref_grads[key]).abs().max() / ref_grads[key].abs().max().clamp_min(1e-6)
        assert error < 0.05, f"{key}: max gradient error {error:.3f} of the largest entry"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_step_on_gpu():
    param = torch.nn.Parameter(torch.ones(4, device="cuda"))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.sum().backward()
    optimizer.step()
    assert torch.all(param < 1)


def _to_cuda(batch):
    from dataclasses import fields

    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    values = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return type(batch)(**values)
