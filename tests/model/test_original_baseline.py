"""The benchmark's original-scGPT baseline (padded nn.TransformerEncoder) computes what ScGPTModel computes,
so speed ratios against it compare the same function."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scgpt.model import ScGPTModel, TokenLayout

from conftest import random_tokens, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from original_scgpt import OriginalScGPT  # noqa: E402

RENAMES = {"embedding.encoder.embedding.": "gene_embedding.", "embedding.encoder.enc_norm.": "gene_norm.",
           "embedding.value_encoder.linear1.": "value_encoder.0.", "embedding.value_encoder.linear2.": "value_encoder.2.",
           "embedding.value_encoder.norm.": "value_encoder.3.", "decoder.fc.": "decoder.",
           "mvc_decoder.gene2query.": "gene2query.", "mvc_decoder.W.": "W."}


def _original_from(model: ScGPTModel) -> OriginalScGPT:
    baseline = OriginalScGPT(model.cfg)
    state = {}
    for key, value in model.state_dict().items():
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        state[key] = value
    baseline.load_state_dict(state, strict=True)
    return baseline.eval()


def test_original_baseline_matches_our_model():
    torch.manual_seed(0)
    model = ScGPTModel(tiny_config()).eval()
    baseline = _original_from(model)
    gene_ids, values, padding, gen = random_tokens([12, 5, 9, 3], gen_share=0.4)
    ours = model(gene_ids, values, TokenLayout(padding_mask=padding), gen)
    theirs = baseline(gene_ids, values, padding, gen)
    for name in ("expr_pred", "mvc_pred"):
        torch.testing.assert_close(getattr(theirs, name)[~padding], getattr(ours, name)[~padding], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.cell_emb, ours.cell_emb, atol=1e-5, rtol=1e-5)
