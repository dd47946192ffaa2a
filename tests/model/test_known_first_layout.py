"""``data.layout=packed_known_first`` (every cell's known tokens, then every cell's generated ones) gives
the losses, gradients and cell embeddings of ``packed`` (each cell's tokens together) on the same cells.

Why a tolerance, and how tight: the same tokens are summed in another order wherever a sum runs over
tokens (a cell's mean pool, the objectives' means, weight gradients = sums over tokens, and, for
reference/sdpa, the softmax over a cell's keys, which now come known-first). Per token, the varlen
path's attention is bit-identical: today's packed path permutes the tokens into exactly this order
before its kernels, and known-first hands the kernels the same tokens as slices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data_modules.collate import CellCollator, CollatorConfig
from scgpt.model import ScGPTModel
from scgpt.model.attention import GenerativeSplit, ReferenceAttention, SdpaAttention, VarlenAttention
from scgpt.model.varlen_kernels import torch_varlen_kernel
from scgpt.objectives import ObjectiveContext, build_objectives

from conftest import PAD, VOCAB, tiny_config

WEIGHTS = {"gep": 1.0, "gen": 1.0, "mvc": 1.0, "ecs": 1.0}
BACKENDS = {"reference": ReferenceAttention, "sdpa": SdpaAttention,
            "torch_varlen": lambda: VarlenAttention(torch_varlen_kernel, "torch_varlen")}
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 sums of the same terms in another order (seen: <= 2e-6, 1 ulp)


def _cells(n_cells=9, seed=0):
    rng = np.random.default_rng(seed)
    return [{"gene_ids": rng.choice(np.arange(3, VOCAB), size=n, replace=False),
             "counts": rng.geometric(0.3, size=n).astype(np.float32), "batch": i % 2}
            for i, n in enumerate(rng.integers(3, 40, size=n_cells))]


def _batches(generative_fraction=0.5, seed=0):
    out = {}
    for layout in ("packed", "packed_known_first"):
        collator = CellCollator(CollatorConfig(pad_token_id=PAD, cls_token_id=1, max_seq_len=32,
                                               generative_fraction=generative_fraction, layout=layout))
        out[layout] = collator(_cells(seed=seed), torch.Generator().manual_seed(seed))
    return out


def _order(packed):
    """(T,) packed token of each known-first position: the permutation today's varlen path applies."""
    return GenerativeSplit.from_mask(packed.cu_seqlens, packed.gen_mask).order


def _run(backend, batch, cfg_overrides=None):
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0, **(cfg_overrides or {}))
    model = ScGPTModel(cfg, backend).train()
    gen_mask = batch.gen_mask if bool(batch.generative.any()) else None
    out = model(batch.gene_ids, batch.values, batch.layout, gen_mask=gen_mask, batch_labels=batch.labels["batch"])
    terms = {}
    for objective in build_objectives(WEIGHTS, None, cfg):
        terms.update(objective(out, batch, ObjectiveContext()))
    sum(terms.values()).backward()
    return out, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_collator_puts_every_known_token_first_then_every_generated_one():
    batches = _batches()
    packed, first = batches["packed"], batches["packed_known_first"]
    assert first.cu_seqlens is None and bool(packed.gen_mask.any())
    order = _order(packed)
    for name in ("gene_ids", "values", "target_values", "hidden_mask", "gen_mask"):
        assert torch.equal(getattr(first, name), getattr(packed, name)[order]), name
    n_known = int(first.cu_known[-1])
    assert not first.gen_mask[:n_known].any() and first.gen_mask[n_known:].all()
    layout = first.layout
    assert torch.equal(layout.seq_ids, packed.layout.seq_ids[order])
    assert torch.equal(layout.lengths, packed.layout.lengths)
    assert torch.equal(first.gene_ids[first.cu_known[:-1].long()], torch.ones(first.n_cells, dtype=torch.long))  # <cls>
    assert layout.max_seqlen == packed.max_seqlen
    assert (layout.max_known, layout.max_gen) == (int(layout.cu_known.diff().max()), int(layout.cu_gen.diff().max()))


def test_without_generated_tokens_known_first_is_packed():
    batches = _batches(generative_fraction=0.0)
    packed, first = batches["packed"], batches["packed_known_first"]
    for f in dataclasses.fields(packed):
        a, b = getattr(packed, f.name), getattr(first, f.name)
        if f.name == "labels":
            a, b = torch.stack(list(a.values())), torch.stack(list(b.values()))
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name


CONSUMERS = {"cls": {"cell_emb_style": "cls"},  # the <cls> state: no per-cell sum
             "avg_pool_dsbn_output": {"cell_emb_style": "avg-pool", "n_batch_labels": 2, "dsbn": "output"},
             "w_pool_dsbn_input": {"cell_emb_style": "w-pool", "n_batch_labels": 2, "dsbn": "input"}}


def _assert_gradients_close(grads, ref_grads):
    """Within 1e-4 relative, or 1e-5 of the model's largest gradient entry (gradients that are zero in exact
    arithmetic, e.g. of a bias just before a normalisation, are rounding noise in both layouts)."""
    assert grads.keys() == ref_grads.keys()
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("consumers", CONSUMERS)
def test_known_first_gives_the_packed_losses_gradients_and_cell_embeddings(name, consumers):
    """Cell pooling (cls, mean, value-weighted mean), DSBN on tokens by batch label, the batch embedding
    broadcast to tokens (MVC), and every objective: as on packed tokens, within float32 rounding."""
    batches = _batches()
    ref_out, ref_terms, ref_grads = _run(BACKENDS[name](), batches["packed"], CONSUMERS[consumers])
    out, terms, grads = _run(BACKENDS[name](), batches["packed_known_first"], CONSUMERS[consumers])
    order = _order(batches["packed"])
    if name == "torch_varlen" and consumers == "cls":  # no sum over tokens before the cell embedding
        assert torch.equal(out.token_states, ref_out.token_states[order])
        assert torch.equal(out.cell_emb, ref_out.cell_emb)
    torch.testing.assert_close(out.token_states, ref_out.token_states[order], **TOL)
    torch.testing.assert_close(out.cell_emb, ref_out.cell_emb, **TOL)
    assert terms.keys() == ref_terms.keys()
    for key in terms:
        torch.testing.assert_close(terms[key], ref_terms[key], **TOL, msg=key)
    _assert_gradients_close(grads, ref_grads)


def test_varlen_attention_is_bit_identical_per_token_and_never_permutes(monkeypatch):
    """The varlen kernels get the tokens today's path permutes into, as slices: the same attention output,
    bit for bit, and no permutation at all (scgpt.model.attention.permute_tokens is never called)."""
    from scgpt.model import attention

    batches = _batches()
    packed, first = batches["packed"], batches["packed_known_first"]
    torch.manual_seed(0)
    qkv = torch.randn(3, packed.gene_ids.numel(), 4, 8)  # (3, T, H, Dh), packed order
    backend = VarlenAttention(torch_varlen_kernel, "torch_varlen")
    expected = backend.packed_layout(*qkv, backend.plan_layout(packed.layout, packed.gen_mask))
    calls = []
    monkeypatch.setattr(attention, "permute_tokens", lambda *a: calls.append(1) or a[0][a[1]])
    order = _order(packed)
    out = backend.packed_layout(*qkv[:, order], backend.plan_layout(first.layout, first.gen_mask))
    assert calls == []
    assert torch.equal(out, expected[order])


def test_known_first_without_its_generative_mask_attends_whole_cells():
    """A known-first batch run without the generative mask (e.g. unmasked for embedding) attends each cell's
    tokens, known and generated, as packed does."""
    batches = _batches()
    packed, first = batches["packed"], batches["packed_known_first"]
    torch.manual_seed(0)
    qkv = torch.randn(3, packed.gene_ids.numel(), 4, 8)
    order = _order(packed)
    for backend in (SdpaAttention(), VarlenAttention(torch_varlen_kernel, "torch_varlen")):
        expected = backend.packed_layout(*qkv, backend.plan_layout(packed.layout, None))
        out = backend.packed_layout(*qkv[:, order], backend.plan_layout(first.layout, None))
        torch.testing.assert_close(out, expected[order], **TOL)


def test_flex_attention_on_known_first_tokens(monkeypatch):
    """FlexAttention's block mask comes from each token's cell, so it needs no permutation (eager CPU math,
    its device check lifted as in test_layout_equivalence.py)."""
    import torch.nn.attention.flex_attention as flex_module

    from scgpt.model.flex_attention import FlexAttention

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    batches = _batches()
    ref_out, ref_terms, ref_grads = _run(ReferenceAttention(), batches["packed"])
    out, terms, grads = _run(FlexAttention(compiled=False), batches["packed_known_first"])
    torch.testing.assert_close(out.cell_emb, ref_out.cell_emb, **TOL)
    for key in terms:
        torch.testing.assert_close(terms[key], ref_terms[key], **TOL, msg=key)
    _assert_gradients_close(grads, ref_grads)
