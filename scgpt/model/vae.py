"""The VAE baseline (pure torch): encoder e(x) -> [z_mu, log sigma_z^2], Z ~ N(z_mu, sigma_z^2 I) by
reparameterisation, decoder x_hat = d(Z). Loss: Gaussian reconstruction (learned per-gene variance, summed over genes)
plus beta * KL(N(z_mu, sigma_z^2 I) || N(0, I)), both averaged over cells. The cell embedding is z_mu.

The input is one dense vector per cell over the gene universe (see :func:`dense_expression`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from scgpt.errors import ConfigError
from scgpt.model.layout import TokenLayout


@dataclass
class VAEOutput:
    x_hat: Tensor  # (B, G) reconstruction
    z_mu: Tensor  # (B, D) posterior mean: the cell embedding
    z_logvar: Tensor  # (B, D) log sigma_z^2
    z: Tensor  # (B, D) sample (z_mu in eval mode)


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    attention_backend = "none"  # no attention; the run summary reports this field for every model

    def __init__(self, n_genes: int, latent_dim: int = 10, hidden_dims: Sequence[int] = (128,),
                 dropout: float = 0.1) -> None:
        super().__init__()
        if n_genes < 1 or latent_dim < 1 or any(h < 1 for h in hidden_dims):
            raise ConfigError(f"model: VAE sizes must be positive (genes {n_genes}, latent_dim {latent_dim}, "
                              f"hidden_dims {list(hidden_dims)})")
        hidden = [int(h) for h in hidden_dims]
        self.n_genes, self.latent_dim = int(n_genes), int(latent_dim)
        self.encoder = _mlp([self.n_genes, *hidden], dropout)
        width = hidden[-1] if hidden else self.n_genes
        self.mu = nn.Linear(width, self.latent_dim)
        self.logvar = nn.Linear(width, self.latent_dim)
        self.decoder = nn.Sequential(_mlp([self.latent_dim, *reversed(hidden)], dropout),
                                     nn.Linear(hidden[0] if hidden else self.latent_dim, self.n_genes))
        self.x_logvar = nn.Parameter(torch.zeros(self.n_genes))  # learned per-gene log sigma_x^2

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "VAE":
        """From the model settings of ``conf/model/vae.yaml`` (``vocab_size`` filled in from the data)."""
        return cls(n_genes=int(settings["vocab_size"]), latent_dim=int(settings.get("latent_dim", 10)),
                   hidden_dims=tuple(settings.get("hidden_dims", (128,))), dropout=float(settings.get("dropout", 0.1)))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-20.0, 20.0)

    def forward(self, x: Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return VAEOutput(x_hat=self.decoder(z), z_mu=mu, z_logvar=logvar, z=z)

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return self.encode(x)[0]


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, averaged over cells."""
    return (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()


def reconstruction_loss(x_hat: Tensor, x: Tensor, x_logvar: Tensor | None = None) -> Tensor:
    """Gaussian negative log-likelihood (the constant 0.5 log 2 pi dropped) summed over genes, averaged over
    cells: 0.5 * ((x - x_hat)^2 / sigma_x^2 + log sigma_x^2); unit variance (0.5 * squared error) without
    ``x_logvar``. A learned per-gene sigma_x keeps the data term from being swamped by the KL on small-valued
    inputs (posterior collapse); the loss can then be negative."""
    if x_logvar is None:
        return (0.5 * (x_hat - x).pow(2).sum(-1)).mean()
    return (0.5 * ((x_hat - x).pow(2) * torch.exp(-x_logvar) + x_logvar).sum(-1)).mean()


def dense_expression(gene_ids: Tensor, values: Tensor, n_genes: int, layout: TokenLayout,
                     scale: float = 1.0) -> Tensor:
    """(B, n_genes) float matrix of a token batch's values (binned, divided by ``scale``) at their gene ids;
    genes not among a cell's tokens (unexpressed, or sampled out beyond max_seq_len) are 0. Tokens with a
    value <= 0 (<cls> carries pad_value; padding) are skipped. Any layout (padded, or packed in any order)."""
    n_cells = layout.n_cells
    if not layout.is_packed:
        real = ~layout.padding_mask  # (B, L)
        rows = torch.arange(n_cells, device=gene_ids.device)[:, None].expand_as(real)[real]
        ids, vals = gene_ids[real], values[real]
    else:
        rows, ids, vals = layout.seq_ids, gene_ids, values  # (T,)
    keep = vals > 0
    x = torch.zeros(n_cells, n_genes, dtype=torch.float32, device=gene_ids.device)
    x[rows[keep], ids[keep]] = vals[keep].float() / scale
    return x
