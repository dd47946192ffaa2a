"""Domain-specific batch normalisation (DSBN): one BatchNorm per domain (batch label) over the feature
dimension, as used by scGPT's integration (Chang et al. 2019, "Domain-Specific Batch Normalization").

Each domain has its own affine weight and bias and its own running mean and variance. In training the
tokens of each domain present in the batch are normalised with that domain's batch statistics, computed
over real tokens only (padding never enters them), and the domain's running statistics are updated; in
evaluation every token is normalised with its domain's running statistics. These are an exponential moving
average with ``momentum``, except that a domain's first batches are averaged equally (the weight of the
n-th update is ``max(momentum, 1 / n)``), so that they hold no trace of their initial values even after a
short finetuning (the bias a plain BatchNorm has for its first ~1/momentum batches). A batch may hold several
domains (each is normalised on its own); the domain sampler of :mod:`data_modules.stream` makes
batches of one domain, which is what the original trains with. Statistics are per process, like
``nn.BatchNorm1d`` (not synchronised across ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DomainSpecificBatchNorm(nn.Module):
    """(N, D) tokens with a domain id each -> the same shape, normalised per domain."""

    def __init__(self, n_features: int, n_domains: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.n_domains, self.eps, self.momentum = n_domains, eps, momentum
        self.weight = nn.Parameter(torch.ones(n_domains, n_features))
        self.bias = nn.Parameter(torch.zeros(n_domains, n_features))
        self.register_buffer("running_mean", torch.zeros(n_domains, n_features))
        self.register_buffer("running_var", torch.ones(n_domains, n_features))
        self.register_buffer("num_batches_tracked", torch.zeros(n_domains, dtype=torch.long))

    def forward(self, x: Tensor, domains: Tensor, real: Tensor) -> Tensor:
        """``x`` (..., D); ``domains`` (...) long, the domain of each token; ``real`` (...) bool, False at
        padding. Tokens of a domain without real tokens in the batch use its running statistics."""
        if self.training:
            mean, var = self._batch_statistics(x, domains, real)  # (K, D) each
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)  # (K, D)
        shift = self.bias - mean * scale
        return x * scale[domains].to(x.dtype) + shift[domains].to(x.dtype)

    def _batch_statistics(self, x: Tensor, domains: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """Per-domain mean and (biased) variance of the real tokens; running statistics for absent domains."""
        tokens = x[real].float()  # (T, D)
        onehot = nn.functional.one_hot(domains[real], self.n_domains).to(tokens.dtype)  # (T, K)
        counts = onehot.sum(0)  # (K,)
        present = counts > 0
        mean = (onehot.T @ tokens) / counts.clamp_min(1)[:, None]  # (K, D)
        centred = tokens - mean[domains[real]]  # (T, D)
        var = (onehot.T @ centred.square()) / counts.clamp_min(1)[:, None]  # (K, D)
        self._update_running(mean.detach(), var.detach(), counts, present)
        mean = torch.where(present[:, None], mean, self.running_mean)
        var = torch.where(present[:, None], var, self.running_var)
        return mean, var

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, counts: Tensor, present: Tensor) -> None:
        unbiased = var * (counts / (counts - 1).clamp_min(1))[:, None]  # like BatchNorm's running_var
        n = (self.num_batches_tracked + 1).to(mean.dtype)  # (K,) this update's number, per domain
        m = (torch.clamp(1.0 / n, min=self.momentum) * present.to(mean.dtype))[:, None]  # (K, 1); absent: 0
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * unbiased)
        self.num_batches_tracked.add_(present.long())
