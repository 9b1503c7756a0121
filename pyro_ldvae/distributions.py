"""Count likelihoods in (mean, inverse dispersion) form, as used by scVI and LDVAE.

All three distributions take the mean ``mu`` of shape ``(cells, genes)``. The inverse
dispersion ``theta`` may stay at shape ``(genes,)``: it is never expanded to
``(cells, genes)`` before the terms that only depend on it (``lgamma(theta)``,
``theta * log(theta)``) are computed, which saves work in the hot path.

The log-densities follow scvi-tools' ``log_nb_positive`` / ``log_zinb_positive`` exactly
(including ``eps = 1e-8`` inside the logs), so that our ELBO agrees with theirs to float
precision:

    log NB(x | mu, theta) = theta (log(theta + eps) - log(theta + mu + eps))
                          + x (log(mu + eps) - log(theta + mu + eps))
                          + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

EPS = 1e-8
# The Gamma-Poisson sampler and the Poisson rate are clamped here: a rate of 1e8 is already far
# beyond any real UMI count and keeps torch.poisson finite.
MAX_RATE = 1e8
# theta is clamped to [THETA_MIN, THETA_MAX] inside the log-densities: theta = 0 (exp underflow)
# gives lgamma(0) - lgamma(0) = inf - inf and theta = inf gives inf * 0, both NaN. Fitted values lie
# far inside (about 1e-2 to 1e3), where the clamp changes nothing.
THETA_MIN, THETA_MAX = 1e-8, 1e8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Negative binomial log-density, elementwise; ``(cells, genes)`` for ``theta`` of ``(genes,)``."""
    theta = theta.clamp(THETA_MIN, THETA_MAX)
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """Zero-inflated NB log-density with dropout gate logits ``gate_logits`` (logit of P(dropout))."""
    # log sigmoid(-pi) = -softplus(pi); written as scvi-tools does to agree bit for bit.
    theta = theta.clamp(THETA_MIN, THETA_MAX)
    softplus_neg_pi = F.softplus(-gate_logits)
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -gate_logits + theta * (torch.log(theta + eps) - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_neg_pi
    case_non_zero = (
        -softplus_neg_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < eps, case_zero, case_non_zero)


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Poisson log-density; ``xlogy`` keeps ``x = 0, rate = 0`` finite, and a rate below ``EPS`` counts
    as ``EPS`` in the log so that ``x > 0, rate = 0`` is finite too (as in the NB's ``log(mu + eps)``)."""
    return torch.xlogy(x, rate.clamp_min(EPS)) - rate - torch.lgamma(x + 1)


def _sample_gamma_poisson(mu: torch.Tensor, theta: torch.Tensor, sample_shape: torch.Size) -> torch.Tensor:
    mu, theta = broadcast_all(mu, theta)
    shape = sample_shape + mu.shape
    gamma = torch.distributions.Gamma(theta, theta / mu.clamp_min(EPS)).sample(sample_shape)
    return torch.poisson(gamma.clamp(max=MAX_RATE)).reshape(shape)


class NegativeBinomial(TorchDistribution):
    """NB with mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2 / theta``)."""

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = None):
        self.mu, self.theta = mu, theta
        batch_shape = torch.broadcast_shapes(mu.shape, theta.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu.expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        return (self.mu + self.mu**2 / self.theta).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_nb(value, self.mu, self.theta)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return _sample_gamma_poisson(self.mu, self.theta, torch.Size(sample_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial, _instance)
        new.mu, new.theta = self.mu.expand(batch_shape), self.theta.expand(batch_shape)
        super(NegativeBinomial, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


class ZeroInflatedNegativeBinomial(TorchDistribution):
    """NB(mu, theta) mixed with a point mass at zero of probability ``sigmoid(gate_logits)``."""

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "gate_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor,
        theta: torch.Tensor,
        gate_logits: torch.Tensor,
        validate_args: bool | None = None,
    ):
        self.mu, self.theta, self.gate_logits = mu, theta, gate_logits
        batch_shape = torch.broadcast_shapes(mu.shape, theta.shape, gate_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return ((1 - torch.sigmoid(self.gate_logits)) * self.mu).expand(self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_zinb(value, self.mu, self.theta, self.gate_logits)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            counts = _sample_gamma_poisson(self.mu, self.theta, torch.Size(sample_shape))
            dropout = torch.bernoulli(torch.sigmoid(self.gate_logits).expand(counts.shape))
            return counts * (1 - dropout)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        new.mu = self.mu.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        new.gate_logits = self.gate_logits.expand(batch_shape)
        super(ZeroInflatedNegativeBinomial, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


class Poisson(TorchDistribution):
    """Poisson with rate ``mu``; ``theta`` is accepted and ignored so all likelihoods share a signature."""

    arg_constraints = {"mu": constraints.nonnegative}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu: torch.Tensor, validate_args: bool | None = None):
        self.mu = mu
        super().__init__(mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_poisson(value, self.mu)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return torch.poisson(self.mu.clamp(max=MAX_RATE).expand(torch.Size(sample_shape) + self.mu.shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Poisson, _instance)
        new.mu = self.mu.expand(batch_shape)
        super(Poisson, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


def count_likelihood(
    gene_likelihood: str, mu: torch.Tensor, theta: torch.Tensor | None, gate_logits: torch.Tensor | None
) -> TorchDistribution:
    """The observation distribution named by ``gene_likelihood`` ('nb', 'zinb' or 'poisson')."""
    if gene_likelihood == "nb":
        return NegativeBinomial(mu, theta)
    if gene_likelihood == "zinb":
        return ZeroInflatedNegativeBinomial(mu, theta, gate_logits)
    if gene_likelihood == "poisson":
        return Poisson(mu)
    raise ValueError(f"gene_likelihood must be 'nb', 'zinb' or 'poisson', got {gene_likelihood!r}.")
