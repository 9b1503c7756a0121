"""Count likelihoods in (mean, inverse dispersion) form, as used by scVI and LDVAE.

All three distributions take the mean ``mu`` of shape ``(cells, genes)``. The inverse dispersion
``theta`` may stay at shape ``(genes,)``: it is never expanded to ``(cells, genes)`` before the
terms that only depend on it are computed. Their log-densities are the formulas of
:mod:`pyro_ldvae.kernels.count_terms` (scvi-tools' to the bit); for sparse counts, the kernels of
:mod:`pyro_ldvae.kernels.sparse_density`.

The model observes a cell's counts as one event through :class:`CellCounts`, whose ``kernel``
the caller names (:func:`count_kernel` picks the fastest one that the counts and ``theta`` allow).
"""

from __future__ import annotations

from typing import Literal

import torch
from pyro.distributions import Independent, TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

from ..kernels.count_terms import (
    MAX_RATE,
    log_nb,
    log_poisson,
    log_zinb,
    log_zinb_at_zero,
    poisson_zero_term,
)
from ..kernels.nb_sampling import sample_nb
from ..kernels.sparse import SparseCounts, is_sparse_counts
from ..kernels.sparse_density import (
    per_gene,
    per_gene_theta_terms,
    sparse_log_prob,
    sparse_nb_cell_log_prob,
    sparse_nb_log_prob,
)

GeneLikelihood = Literal["nb", "zinb", "poisson", "normal"]
# How a cell's log-density is computed: the elementwise densities of dense counts summed over genes,
# those of sparse counts (zero term everywhere, count term at the non-zeros) summed, or, for an NB with
# one theta per gene, each cell's sum directly without the (cells, genes) array of densities.
Kernel = Literal["dense", "sparse", "sparse_nb_per_cell"]


def _broadcastable(param: torch.Tensor, batch_shape) -> torch.Tensor:
    """``param`` unchanged, after checking that it broadcasts to ``batch_shape``."""
    if torch.broadcast_shapes(param.shape, torch.Size(batch_shape)) != torch.Size(batch_shape):
        raise ValueError(f"Cannot expand a parameter of shape {tuple(param.shape)} to {tuple(batch_shape)}.")
    return param


def _sample_nb(mu: torch.Tensor, theta: torch.Tensor, sample_shape: torch.Size) -> torch.Tensor:
    mu, theta = broadcast_all(mu, theta)
    return sample_nb(mu.expand(sample_shape + mu.shape), theta)


class _CountDistribution(TorchDistribution):
    """Elementwise count law: ``log_prob`` reads dense or sparse counts (``sparse_log_prob``)."""

    support = constraints.nonnegative_integer
    has_rsample = False

    def log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        return self.sparse_log_prob(value) if is_sparse_counts(value) else self.dense_log_prob(value)

    def dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sparse_log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        raise NotImplementedError


class _MeanAndScale(_CountDistribution):
    """A law of a mean ``mu`` ``(cells, genes)`` and a second parameter ``theta`` that keeps its own shape."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = None):
        self.mu, self.theta = mu, theta
        super().__init__(torch.broadcast_shapes(mu.shape, theta.shape), validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu.expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        # theta keeps its own shape (broadcasting): Pyro's plates expand every site, and a (genes,)
        # theta expanded to (cells, genes) would make the per-gene terms cost cells x genes.
        new.mu, new.theta = self.mu.expand(batch_shape), _broadcastable(self.theta, batch_shape)
        super(_MeanAndScale, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


class NegativeBinomial(_MeanAndScale):
    """NB with mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2 / theta``)."""

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}

    @property
    def variance(self) -> torch.Tensor:
        """Variance of the distribution, ``(cells, genes)``."""
        return (self.mu + self.mu**2 / self.theta).expand(self.batch_shape)

    def dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of dense counts, ``(cells, genes)``."""
        return log_nb(value, self.mu, self.theta)

    def sparse_log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        """Log-density summed per cell, computed on the non-zeros of the counts."""
        return sparse_nb_log_prob(value, self.mu, self.theta)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts drawn from the distribution, without gradient."""
        with torch.no_grad():
            return _sample_nb(self.mu, self.theta, torch.Size(sample_shape))


class ZeroInflatedNegativeBinomial(_CountDistribution):
    """NB(mu, theta) mixed with a point mass at zero of probability ``sigmoid(gate_logits)``."""

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive, "gate_logits": constraints.real}

    def __init__(
        self, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor, validate_args: bool | None = None
    ):
        self.mu, self.theta, self.gate_logits = mu, theta, gate_logits
        batch_shape = torch.broadcast_shapes(mu.shape, theta.shape, gate_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the distribution, ``(cells, genes)``."""
        return ((1 - torch.sigmoid(self.gate_logits)) * self.mu).expand(self.batch_shape)

    def dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of dense counts, ``(cells, genes)``."""
        return log_zinb(value, self.mu, self.theta, self.gate_logits)

    def sparse_log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        """Log-density summed per cell, computed on the non-zeros of the counts."""

        def at_non_zeros(x, at):
            terms = per_gene_theta_terms(self.theta, at)
            return log_zinb(x, at(self.mu), at(self.theta), at(self.gate_logits), **terms)

        zero_case = log_zinb_at_zero(self.mu, self.theta, self.gate_logits)
        return sparse_log_prob(value, self.mu, at_non_zeros, zero_case)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts drawn from the distribution, without gradient."""
        with torch.no_grad():
            counts = _sample_nb(self.mu, self.theta, torch.Size(sample_shape))
            dropout = torch.bernoulli(torch.sigmoid(self.gate_logits).expand(counts.shape))
            return counts * (1 - dropout)

    def expand(self, batch_shape, _instance=None):
        """The distribution with its parameters broadcast to ``batch_shape``."""
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        new.mu = self.mu.expand(batch_shape)
        new.theta = _broadcastable(self.theta, batch_shape)  # as in NegativeBinomial.expand
        new.gate_logits = self.gate_logits.expand(batch_shape)
        super(ZeroInflatedNegativeBinomial, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


class Poisson(_CountDistribution):
    """Poisson with rate ``mu``."""

    arg_constraints = {"mu": constraints.nonnegative}

    def __init__(self, mu: torch.Tensor, validate_args: bool | None = None):
        self.mu = mu
        super().__init__(mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the distribution, ``(cells, genes)``."""
        return self.mu

    def dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of dense counts, ``(cells, genes)``."""
        return log_poisson(value, self.mu)

    def sparse_log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        """Log-density summed per cell, computed on the non-zeros of the counts."""
        return sparse_log_prob(value, self.mu, lambda x, at: log_poisson(x, at(self.mu)), poisson_zero_term(self.mu))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Counts drawn from the distribution, without gradient."""
        with torch.no_grad():
            return torch.poisson(self.mu.clamp(max=MAX_RATE).expand(torch.Size(sample_shape) + self.mu.shape))

    def expand(self, batch_shape, _instance=None):
        """The distribution with its parameters broadcast to ``batch_shape``."""
        new = self._get_checked_instance(Poisson, _instance)
        new.mu = self.mu.expand(batch_shape)
        super(Poisson, new).__init__(torch.Size(batch_shape), validate_args=False)
        return new


class Normal(_MeanAndScale):
    """Normal with mean ``mu`` and standard deviation ``theta``, for non-integer data.

    This is scvi-tools' ``gene_likelihood='normal'``: ``Normal(exp(l) rho, exp(px_r))``, the scale learned per
    gene, per batch, per label or per cell as ``dispersion`` says. Sparse values are densified.
    """

    arg_constraints = {"mu": constraints.real, "theta": constraints.positive}
    support = constraints.real
    has_rsample = True

    @property
    def variance(self) -> torch.Tensor:
        """Variance of the distribution, ``(cells, genes)``."""
        return (self.theta**2).expand(self.batch_shape)

    def dense_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of dense values, ``(cells, genes)``."""
        return torch.distributions.Normal(self.mu, self.theta, validate_args=False).log_prob(value)

    def sparse_log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        """Log-density summed per cell (values are densified)."""
        return self.dense_log_prob(value.to_dense())

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Values drawn by reparameterisation."""
        mu, theta = broadcast_all(self.mu, self.theta)
        return mu + theta * torch.randn(torch.Size(sample_shape) + mu.shape, dtype=mu.dtype, device=mu.device)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Values drawn from the distribution, without gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape)


def count_likelihood(
    gene_likelihood: GeneLikelihood, mu: torch.Tensor, theta: torch.Tensor | None, gate_logits: torch.Tensor | None
) -> NegativeBinomial | ZeroInflatedNegativeBinomial | Poisson | Normal:
    """The elementwise observation distribution named by ``gene_likelihood``, ``(cells, genes)``.

    For 'normal', ``theta`` is the standard deviation.
    """
    # No argument validation: mu = exp(l) softmax(.) >= 0 and theta > 0 hold by construction, and
    # checking them costs a full pass over (cells, genes) every step.
    if gene_likelihood == "nb":
        return NegativeBinomial(mu, theta, validate_args=False)
    if gene_likelihood == "zinb":
        return ZeroInflatedNegativeBinomial(mu, theta, gate_logits, validate_args=False)
    if gene_likelihood == "poisson":
        return Poisson(mu, validate_args=False)
    if gene_likelihood == "normal":
        return Normal(mu, theta, validate_args=False)
    raise ValueError(f"gene_likelihood must be 'nb', 'zinb', 'poisson' or 'normal', got {gene_likelihood!r}.")


def count_kernel(counts: torch.Tensor | SparseCounts, likelihood: _CountDistribution) -> Kernel:
    """The fastest kernel for ``counts``.

    Per cell for sparse counts under an NB with one theta per gene, elementwise sparse for other sparse counts, dense
    otherwise.
    """
    if not is_sparse_counts(counts):
        return "dense"
    nb = isinstance(likelihood, NegativeBinomial)
    if nb and likelihood.mu.dim() == 2 and per_gene(likelihood.theta) is not None:
        return "sparse_nb_per_cell"
    return "sparse"


class CellCounts(Independent):
    """A cell's counts ``(genes,)`` as one event of an elementwise count law, with a named kernel.

    ``kernel`` must suit the values scored: 'dense' reads dense counts, the others sparse ones,
    and 'sparse_nb_per_cell' needs a :class:`NegativeBinomial` with one ``theta`` per gene.
    """

    def __init__(self, base: _CountDistribution, kernel: Kernel = "dense", validate_args: bool | None = None):
        super().__init__(base, 1, validate_args=validate_args)
        self.kernel = kernel

    def log_prob(self, value: torch.Tensor | SparseCounts) -> torch.Tensor:
        """Log-density of each cell's counts, ``(cells,)``, with the kernel chosen at construction."""
        base = self.base_dist
        if self.kernel == "sparse_nb_per_cell":
            return sparse_nb_cell_log_prob(value, base.mu, base.theta)
        if self.kernel == "sparse":
            return base.sparse_log_prob(value).sum(-1)
        return base.dense_log_prob(value).sum(-1)

    def expand(self, batch_shape, _instance=None):
        """The distribution with its base broadcast to ``batch_shape``."""
        new = super().expand(batch_shape, _instance=self._get_checked_instance(CellCounts, _instance))
        new.kernel = self.kernel
        return new
