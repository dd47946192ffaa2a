"""Domain-specific batch norm: per-domain statistics of real tokens, running statistics in evaluation,
in the model at both places, and through export (native keeps it, the original format refuses it)."""

from __future__ import annotations

import pytest
import torch

from scgpt.errors import CheckpointError, ConfigError
from scgpt.export import export
from scgpt.checkpoints import load_pretrained
from scgpt.model import ScGPTModel, TokenLayout
from scgpt.model.dsbn import DomainSpecificBatchNorm
from scgpt.model.layout import pack_padded
from scgpt.tokenizer.vocab import GeneVocab

from conftest import random_tokens, tiny_config


def _two_domains(n=64, d=8, seed=0):
    """Tokens (2, n, D): domain 0 around +5 with std 1, domain 1 around -3 with std 4; padding huge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g)
    x[0], x[1] = x[0] + 5.0, 4.0 * x[1] - 3.0
    real = torch.ones(2, n, dtype=torch.bool)
    real[:, n // 2:] = False  # the second half of each row is padding ...
    x[~real] = 1e4  # ... with values that would wreck the statistics if they entered them
    domains = torch.tensor([0, 1])[:, None].expand(2, n)
    return x, domains, real


def test_each_domain_is_normalised_with_its_own_statistics_of_real_tokens():
    x, domains, real = _two_domains()
    norm = DomainSpecificBatchNorm(8, 3).train()
    y = norm(x, domains, real)
    for d in (0, 1):
        out = y[d][real[d]]  # (n/2, D)
        assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
        assert torch.allclose(out.var(0, unbiased=False), torch.ones(8), atol=1e-3)
    # each domain's first update sets its own running statistics; the absent third keeps its initial ones
    assert torch.allclose(norm.running_mean[0], x[0][real[0]].mean(0), atol=1e-5)
    assert torch.allclose(norm.running_mean[1], x[1][real[1]].mean(0), atol=1e-5)
    assert norm.running_mean[0].mean() > 3 and norm.running_mean[1].mean() < -2
    assert torch.equal(norm.running_mean[2], torch.zeros(8)) and torch.equal(norm.running_var[2], torch.ones(8))
    assert norm.num_batches_tracked.tolist() == [1, 1, 0]
    # one shared BatchNorm would leave the domains apart; DSBN maps both onto the same standard scale
    shared = torch.nn.functional.batch_norm(x[real], None, None, training=True)
    assert (shared[: x.shape[1] // 2].mean() - shared[x.shape[1] // 2:].mean()).abs() > 1.0


def test_running_statistics_average_the_first_batches_then_move_with_momentum():
    norm = DomainSpecificBatchNorm(4, 1, momentum=0.1).train()
    means = [float(v) for v in range(1, 16)]
    for mean in means:  # batches of constant tokens: the batch mean is exactly `mean`
        norm(torch.full((1, 6, 4), mean) + torch.tensor([1.0, -1.0] * 3)[None, :, None], torch.zeros(1, 6).long(),
             torch.ones(1, 6, dtype=torch.bool))
    expected = sum(means[:10]) / 10  # updates 1..10 weigh 1/n (>= 0.1): the plain average of the first ten
    for mean in means[10:]:
        expected = 0.9 * expected + 0.1 * mean  # then an exponential moving average with momentum 0.1
    assert torch.allclose(norm.running_mean[0], torch.full((4,), expected), atol=1e-4)
    assert norm.num_batches_tracked.tolist() == [15]


def test_evaluation_uses_running_statistics_per_domain():
    x, domains, real = _two_domains()
    norm = DomainSpecificBatchNorm(8, 2).train()  # one update: running = this batch's statistics
    with torch.no_grad():
        norm.weight.mul_(2.0)
        norm.bias.add_(0.5)
    trained = norm(x, domains, real)
    norm.eval()
    cell = x[1:, :5]  # one cell of domain 1 alone: its output does not depend on the rest of the batch
    alone = norm(cell, domains[1:, :5], real[1:, :5])
    mean, var = norm.running_mean[1], norm.running_var[1]
    expected = (cell - mean) / torch.sqrt(var + norm.eps) * norm.weight[1] + norm.bias[1]
    assert torch.allclose(alone, expected, atol=1e-5)
    assert torch.allclose(mean, x[1][real[1]].mean(0), atol=1e-5)
    assert torch.allclose(var, x[1][real[1]].var(0, unbiased=True), atol=1e-4)  # running var is unbiased
    assert torch.allclose(alone, trained[1:, :5], rtol=0.05, atol=0.05)  # ~ training output (biased var there)


@pytest.mark.parametrize("place", ["input", "output", "cell"])
def test_model_dsbn_padded_equals_packed_and_domains_differ(place):
    torch.manual_seed(0)
    model = ScGPTModel(tiny_config(n_batch_labels=2, dsbn=place)).train()
    gene_ids, values, padding, _ = random_tokens([9, 4, 6, 7])
    labels = torch.tensor([0, 1, 0, 1])
    padded = model(gene_ids, values, TokenLayout(padding_mask=padding), batch_labels=labels)
    ids_packed, layout = pack_padded(gene_ids, padding)
    packed = model(ids_packed, values[~padding], layout, batch_labels=labels)
    tol = 1e-3 if place == "cell" else 1e-5  # "cell": two cells per domain, float noise divided by a small std
    assert torch.allclose(padded.cell_emb, packed.cell_emb, atol=tol)
    assert torch.allclose(padded.token_states[~padding], packed.token_states, atol=1e-5)
    model.eval()
    with torch.no_grad():  # the same cells under the other label get the other domain's running statistics
        a = model(gene_ids, values, TokenLayout(padding_mask=padding), batch_labels=labels).cell_emb
        b = model(gene_ids, values, TokenLayout(padding_mask=padding), batch_labels=1 - labels).cell_emb
    assert not torch.allclose(a, b, atol=1e-4)
    assert model.dsbn.num_batches_tracked.tolist() == [2, 2]


def test_model_dsbn_needs_batch_labels_and_a_valid_config():
    model = ScGPTModel(tiny_config(n_batch_labels=2, dsbn=True))
    assert model.cfg.dsbn == "input"
    gene_ids, values, padding, _ = random_tokens([5, 3])
    with pytest.raises(ValueError, match="pass batch_labels"):
        model.encode(gene_ids, values, TokenLayout(padding_mask=padding))
    with pytest.raises(ConfigError, match="model.dsbn: needs model.n_batch_labels"):
        tiny_config(dsbn="input")
    with pytest.raises(ConfigError, match="model.dsbn: unknown value 'middle'"):
        tiny_config(n_batch_labels=2, dsbn="middle")
    assert tiny_config(n_batch_labels=2, dsbn=False).dsbn == "off"


def test_dsbn_model_exports_natively_with_running_statistics_and_refuses_the_original_format(tmp_path):
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(120)])  # random_tokens draws ids < 120
    torch.manual_seed(0)
    model = ScGPTModel(tiny_config(vocab_size=vocab.size, pad_token_id=vocab.pad_id, n_batch_labels=2,
                                   dsbn="output"))
    with torch.no_grad():
        model.dsbn.running_mean.normal_()
        model.dsbn.running_var.uniform_(0.5, 2.0)
    model.eval()
    tokenizer = {"n_bins": 51, "max_seq_len": 64, "pad_value": -2.0, "mask_value": -1.0, "include_zero_genes": False}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
                "hyper_parameters": {"model": model.cfg.to_dict()},
                "scgpt": {"vocab": vocab.token_to_id, "tokenizer": tokenizer}}, checkpoint)
    export(checkpoint, tmp_path / "native")
    loaded = load_pretrained(tmp_path / "native")[0].eval()
    assert loaded.cfg.dsbn == "output" and torch.equal(loaded.dsbn.running_var, model.dsbn.running_var)
    gene_ids, values, padding, _ = random_tokens([6, 4])
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        a = model(gene_ids, values, TokenLayout(padding_mask=padding), batch_labels=labels).cell_emb
        b = loaded(gene_ids, values, TokenLayout(padding_mask=padding), batch_labels=labels).cell_emb
    assert torch.equal(a, b)
    from scgpt.embed import load

    with pytest.raises(CheckpointError, match="model.dsbn=output: .* scgpt-embed has no batch labels"):
        load(tmp_path / "native")
    with pytest.raises(CheckpointError, match="model.dsbn=output: domain-specific batch norm is not exported"):
        export(checkpoint, tmp_path / "orig", fmt="scgpt")
    assert not (tmp_path / "orig").exists()
