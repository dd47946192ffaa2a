"""The scGPT model: shapes, gradients, layouts, the generative mask end to end, pooling, config checks."""

from __future__ import annotations

import pytest
import torch

from scgpt.config import ModelConfig
from scgpt.errors import ConfigError
from scgpt.model import ScGPTModel, TokenLayout
from scgpt.model.attention import ReferenceAttention, SdpaAttention, VarlenAttention, torch_varlen_kernel
from scgpt.model.layout import pack_padded

from conftest import PAD, VOCAB, random_tokens, tiny_config

BACKENDS = [ReferenceAttention(), SdpaAttention(), VarlenAttention(torch_varlen_kernel, "torch_varlen")]


def _model(backend=None, **overrides):
    torch.manual_seed(0)
    return ScGPTModel(tiny_config(**overrides), backend=backend).eval()


def test_output_shapes_with_every_head():
    model = _model(n_cls_classes=5, n_batch_labels=3, batch_discriminator=True, explicit_zero_prob=True)
    gene_ids, values, padding, gen = random_tokens([9, 4, 6])
    out = model(gene_ids, values, TokenLayout(padding_mask=padding), gen, batch_labels=torch.tensor([0, 2, 1]))
    assert out.token_states.shape == (3, 9, 32)
    assert out.cell_emb.shape == (3, 32)
    for name in ("expr_pred", "expr_zero_logit", "mvc_pred", "mvc_zero_logit"):
        assert getattr(out, name).shape == (3, 9), name
    assert out.cls_logits.shape == (3, 5) and out.batch_logits.shape == (3, 3)


def test_every_parameter_gets_a_gradient():
    model = _model(n_cls_classes=5, n_batch_labels=3, batch_discriminator=True, explicit_zero_prob=True).train()
    gene_ids, values, padding, gen = random_tokens([9, 4, 6])
    out = model(gene_ids, values, TokenLayout(padding_mask=padding), gen, batch_labels=torch.tensor([0, 2, 1]))
    loss = sum(t.float().pow(2).mean() for t in (out.expr_pred, out.expr_zero_logit, out.mvc_pred,
                                                   out.mvc_zero_logit, out.cls_logits, out.batch_logits))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.embedding.encoder.embedding.weight.grad[PAD].abs().sum() == 0  # padding_idx row frozen


def test_gradient_reversal_flips_the_discriminator_gradient():
    model = _model(n_batch_labels=2, batch_discriminator=True).train()
    gene_ids, values, padding, _ = random_tokens([5, 5])
    emb = model.encode(gene_ids, values, TokenLayout(padding_mask=padding))[2].detach().requires_grad_()
    model.batch_discriminator(emb).sum().backward()
    reversed_grad = emb.grad.clone()
    emb.grad = None
    disc = model.batch_discriminator
    disc.out_layer(disc._decoder(emb)).sum().backward()
    torch.testing.assert_close(reversed_grad, -emb.grad)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_packed_and_padded_models_agree(backend):
    model = _model(backend)
    gene_ids, values, padding, gen = random_tokens([12, 5, 9, 1])
    padded = model(gene_ids, values, TokenLayout(padding_mask=padding), gen)
    (pg, layout), (pv, _), (pgen, _) = (pack_padded(t, padding) for t in (gene_ids, values, gen))
    packed = model(pg, pv, layout, pgen)
    torch.testing.assert_close(padded.expr_pred[~padding], packed.expr_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.mvc_pred[~padding], packed.mvc_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.cell_emb, packed.cell_emb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("packed", [False, True])
def test_changing_a_generated_gene_leaves_known_genes_unchanged(backend, packed):
    model = _model(backend)
    gene_ids, values, padding, gen = random_tokens([12, 8], seed=3, gen_share=0.4)
    changed_ids, changed_values = gene_ids.clone(), values.clone()
    target = gen.nonzero()[0]  # one generated token
    changed_ids[tuple(target)] = (gene_ids[tuple(target)] + 7) % VOCAB + 3
    changed_values[tuple(target)] += 11.0

    def run(ids, vals):
        if not packed:
            return model(ids, vals, TokenLayout(padding_mask=padding), gen).token_states[~padding]
        (pi, layout), (pv, _), (pgen, _) = (pack_padded(t, padding) for t in (ids, vals, gen))
        return model(pi, pv, layout, pgen).token_states

    before, after = run(gene_ids, values), run(changed_ids, changed_values)
    flat_gen = gen[~padding]
    torch.testing.assert_close(after[~flat_gen], before[~flat_gen])  # known genes (and <cls>) unchanged
    others = flat_gen.clone()
    others[gen[~padding].nonzero()[0]] = False  # other generated genes do not see it either
    torch.testing.assert_close(after[others], before[others])
    assert not torch.allclose(after[flat_gen], before[flat_gen])


def test_without_generative_mask_every_gene_sees_the_change():
    model = _model()
    gene_ids, values, padding, _ = random_tokens([10], seed=4)
    changed = values.clone()
    changed[0, 5] += 11.0
    a = model(gene_ids, values, TokenLayout(padding_mask=padding)).token_states
    b = model(gene_ids, changed, TokenLayout(padding_mask=padding)).token_states
    assert not torch.allclose(a[0, 0], b[0, 0])


@pytest.mark.parametrize("style", ["cls", "avg-pool", "w-pool"])
def test_cell_embedding_ignores_padding(style):
    model = _model(cell_emb_style=style)
    gene_ids, values, padding, _ = random_tokens([10, 4], seed=2)
    noisy_ids, noisy_values = gene_ids.clone(), values.clone()
    noisy_ids[padding] = 7
    noisy_values[padding] = 30.0
    layout = TokenLayout(padding_mask=padding)
    torch.testing.assert_close(model(gene_ids, values, layout).cell_emb, model(noisy_ids, noisy_values, layout).cell_emb)


def test_pooling_styles_differ():
    gene_ids, values, padding, _ = random_tokens([10, 4], seed=2)
    layout = TokenLayout(padding_mask=padding)
    embs = [_model(cell_emb_style=s)(gene_ids, values, layout).cell_emb for s in ("cls", "avg-pool", "w-pool")]
    assert not torch.allclose(embs[0], embs[1]) and not torch.allclose(embs[1], embs[2])
    states = _model(cell_emb_style="avg-pool").encode(gene_ids, values, layout)[0]
    torch.testing.assert_close(embs[1][1], states[1, :4].mean(0))  # mean over the 4 real tokens only


@pytest.mark.parametrize("encoding", ["continuous", "category", "scaling"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_value_encodings_and_norm_schemes_run(encoding, norm):
    model = _model(value_encoding=encoding, norm_scheme=norm)
    gene_ids, values, padding, gen = random_tokens([6, 3])
    values[0, 2] = -1.0  # a masked value
    out = model(gene_ids, values, TokenLayout(padding_mask=padding), gen)
    assert torch.isfinite(out.expr_pred).all()


def test_scaling_encoding_keeps_the_identity_of_a_masked_gene():
    """With value_encoding=scaling a hidden value (mask_value) must not erase its gene: the prediction at a
    masked position depends on which gene is masked there (scGPT multiplies the gene embedding by -1)."""
    model = _model(value_encoding="scaling")
    gene_ids, values, padding, _ = random_tokens([6])
    values[0, 2] = -1.0  # masked
    other = gene_ids.clone()
    other[0, 2] = (gene_ids[0, 2] + 1 - 3) % (VOCAB - 3) + 3  # another (non-special) gene at the masked slot
    assert other[0, 2] != gene_ids[0, 2]
    layout = TokenLayout(padding_mask=padding)
    pred = model(gene_ids, values, layout).expr_pred[0, 2]
    assert not torch.allclose(pred, model(other, values, layout).expr_pred[0, 2])


@pytest.mark.parametrize("overrides, key", [
    ({"d_model": 30, "n_heads": 4}, "model.d_model"),
    ({"max_seq_len": 1}, "model.max_seq_len"),
    ({"attention_backend": "xformers"}, "model.attention_backend"),
    ({"value_encoding": "log"}, "model.value_encoding"),
    ({"cell_emb_style": "max-pool"}, "model.cell_emb_style"),
    ({"batch_discriminator": True}, "model.batch_discriminator"),
    ({"pad_token_id": VOCAB}, "model.pad_token_id"),
])
def test_inconsistent_model_settings_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config(**overrides)


def test_unknown_model_key_is_refused():
    with pytest.raises(ConfigError, match="model.d_modle"):
        ModelConfig.from_mapping({"vocab_size": 10, "pad_token_id": 0, "d_modle": 64})
