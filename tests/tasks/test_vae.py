"""The VAE baseline (model=vae): unit checks of the model and loss, and a tiny run through train(cfg)."""

from __future__ import annotations

import math

import pytest
import torch

from scgpt.errors import ConfigError
from scgpt.model.layout import TokenLayout
from scgpt.model.vae import VAE, dense_expression, kl_divergence, reconstruction_loss
from scgpt.train import train

from conftest import SMALL_DATA, compose_config


def test_encoder_decoder_shapes_and_eval_uses_the_mean():
    torch.manual_seed(0)
    model = VAE(n_genes=30, latent_dim=4, hidden_dims=(16, 8), dropout=0.0)
    x = torch.rand(5, 30)
    out = model(x)
    assert out.x_hat.shape == (5, 30) and out.z_mu.shape == out.z_logvar.shape == out.z.shape == (5, 4)
    assert not torch.equal(out.z, out.z_mu)  # training: reparameterised sample
    model.eval()
    out = model(x)
    assert torch.equal(out.z, out.z_mu) and torch.equal(model.embed(x), out.z_mu)


def test_kl_matches_the_closed_form_and_torch_distributions():
    mu, logvar = torch.tensor([[0.0, 0.0], [1.0, -2.0]]), torch.tensor([[0.0, 0.0], [math.log(4.0), 0.5]])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(-1).mean()
    assert torch.allclose(kl_divergence(mu, logvar), expected)
    # by hand for the second cell: 0.5 * sum(sigma^2 + mu^2 - 1 - log sigma^2)
    by_hand = 0.5 * ((4.0 + 1.0 - 1.0 - math.log(4.0)) + (math.exp(0.5) + 4.0 - 1.0 - 0.5))
    assert torch.isclose(kl_divergence(mu[1:], logvar[1:]), torch.tensor(by_hand))
    assert kl_divergence(torch.zeros(3, 2), torch.zeros(3, 2)) == 0.0
    assert torch.isclose(reconstruction_loss(torch.zeros(2, 3), torch.ones(2, 3)), torch.tensor(1.5))
    logvar_x = torch.full((3,), math.log(4.0))  # 0.5 * (1 / 4 + log 4) per gene
    assert torch.isclose(reconstruction_loss(torch.zeros(2, 3), torch.ones(2, 3), logvar_x),
                         torch.tensor(1.5 * (0.25 + math.log(4.0))))


def test_dense_expression_scatters_tokens_and_skips_cls_and_padding():
    gene_ids = torch.tensor([[1, 5, 7, 0], [1, 6, 0, 0]])  # 1 = <cls>, 0 = <pad>
    values = torch.tensor([[-2.0, 10.0, 50.0, -2.0], [-2.0, 25.0, -2.0, -2.0]])
    padding = torch.tensor([[False, False, False, True], [False, False, True, True]])
    x = dense_expression(gene_ids, values, 8, TokenLayout(padding_mask=padding), scale=50.0)
    expected = torch.zeros(2, 8)
    expected[0, 5], expected[0, 7], expected[1, 6] = 0.2, 1.0, 0.5
    assert torch.equal(x, expected)
    packed = dense_expression(torch.tensor([1, 5, 7, 1, 6]), torch.tensor([-2.0, 10.0, 50.0, -2.0, 25.0]), 8,
                              TokenLayout(cu_seqlens=torch.tensor([0, 3, 5])), scale=50.0)
    assert torch.equal(packed, expected)
    # known-first: the known tokens of both cells (<cls> 5 | <cls>), then the generated ones (7 | 6)
    known_first = TokenLayout(cu_known=torch.tensor([0, 2, 3]), cu_gen=torch.tensor([0, 1, 2]))
    x = dense_expression(torch.tensor([1, 5, 1, 7, 6]), torch.tensor([-2.0, 10.0, -2.0, 50.0, 25.0]), 8, known_first,
                         scale=50.0)
    assert torch.equal(x, expected)


BASE = [*SMALL_DATA, "model=vae", "model.max_seq_len=200", "logger=none", "data.val_fraction=0.25",
        "trainer=debug", "trainer.limit_val_batches=1.0"]


def test_vae_trains_through_train_and_reports_embedding_metrics(tmp_path):
    summary = train(compose_config(tmp_path, *BASE, "trainer.max_steps=60", "trainer.val_check_interval=60",
                                   "model.dropout=0.0"))
    assert summary["task"] == "vae" and summary["global_step"] == 60
    assert summary["train_loss_last"] < summary["train_loss_first"]
    val = summary["val"]
    assert math.isfinite(val["recon"]) and val["kl"] > 0 and math.isclose(val["loss"], val["recon"] + val["kl"], rel_tol=1e-4)
    for key in ("knn_accuracy", "celltype_asw", "batch_asw", "batch_mixing", "nmi", "ari"):
        assert 0.0 <= val[key] <= 1.0 and 0.0 <= val[f"pca/{key}"] <= 1.0
    assert "celltype_asw_kept" in val and "batch_mixing_gain" in val and 0.0 <= val["logreg_accuracy"] <= 1.0
    assert val["knn_accuracy"] > 0.25  # 6 synthetic cell types: chance is 1/6 (a 60-step run; PCA gets ~0.8)
    assert (tmp_path / "plots" / "embedding.png").is_file()
    metrics = (tmp_path / "checkpoints" / "last.ckpt")
    state = torch.load(metrics, weights_only=True)
    assert state["scgpt"]["model_kind"] == "vae" and any(k.startswith("model.encoder.") for k in state["state_dict"])


def test_train_logs_the_kl_and_reconstruction_terms(tmp_path):
    task_logs = {}
    from scgpt.tasks.vae import VAETask

    original = VAETask.training_step

    def spy(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        task_logs.update({k: float(v) for k, v in self.trainer.callback_metrics.items()})
        return loss

    VAETask.training_step = spy
    try:
        train(compose_config(tmp_path, *BASE, "task.objectives.kl=0.5"))
    finally:
        VAETask.training_step = original
    assert {"train/recon", "train/kl", "train/loss"} <= set(task_logs)
    assert math.isclose(task_logs["train/loss"], task_logs["train/recon"] + 0.5 * task_logs["train/kl"], rel_tol=1e-4)


@pytest.mark.parametrize("overrides, match", [
    (["task=annotation"], "model=vae with task=annotation"),
    (["model=tiny", "task=vae"], "task=vae"),
    (["+task.objectives.mse=1.0"], "task.objectives.mse"),
])
def test_mismatched_settings_fail_with_the_key(tmp_path, overrides, match):
    with pytest.raises(Exception, match=match) as error:  # Hydra wraps errors raised in the task's __init__
        try:
            train(compose_config(tmp_path, *BASE, *overrides))
        except Exception as exc:
            assert isinstance(exc, ConfigError) or isinstance(exc.__cause__, ConfigError)
            raise
    assert error.value is not None



def test_held_out_batch_gets_test_metrics_and_transfer_accuracies(tmp_path):
    """data.test_split: the annotation table's protocol. The held-out batch is never trained or validated on;
    logistic regression on z_mu fitted on the validation cells must transfer to it well above chance (1/6)."""
    summary = train(compose_config(tmp_path, *BASE, "data.synthetic.n_batches=2", "data.val_fraction=0.3",
                                   "data.test_split={key:batch,values:[batch_1]}", "trainer.max_steps=200",
                                   "trainer.val_check_interval=200", "model.dropout=0.0", "task.objectives.kl=0.1"))
    test = summary["test"]
    for key in ("loss", "recon", "kl", "knn_accuracy", "celltype_asw", "nmi", "ari", "logreg_accuracy",
                "pca/knn_accuracy", "logreg_transfer_accuracy", "pca_logreg_transfer_accuracy"):
        assert key in test, key
    assert "batch_mixing" not in test  # one batch only: batch metrics are undefined (NaN, not logged)
    # 1.0 here; 60 steps at kl 1 give 0.35 (z_mu still shifted by batch), so this can fail
    assert test["logreg_transfer_accuracy"] > 0.8 and test["pca_logreg_transfer_accuracy"] > 0.8
    assert (tmp_path / "plots" / "test" / "embedding.png").is_file()
