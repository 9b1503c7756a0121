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

import warnings

import torch
import torch.nn.functional as F
from pyro.distributions import Independent, TorchDistribution, constraints
from torch.autograd.function import once_differentiable
from torch.distributions.utils import broadcast_all

from ..kernels.sparse import csr_entries, is_sparse_counts

try:  # scipy's C kernels behind csr_matrix.tocsc() and row indexing; private, so the public routes are kept
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
    from scipy.sparse._sparsetools import csr_tocsc as _csr_tocsc
except ImportError:
    _csr_row_index = _csr_tocsc = None

EPS = 1e-8
# Minibatch counts travel as torch sparse CSR tensors, whose API torch still labels beta.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
# The Gamma-Poisson sampler and the Poisson rate are clamped here: a rate of 1e8 is already far
# beyond any real UMI count and keeps torch.poisson finite.
MAX_RATE = 1e8
# theta is clamped to [THETA_MIN, THETA_MAX] inside the log-densities: theta = 0 (exp underflow)
# gives lgamma(0) - lgamma(0) = inf - inf and theta = inf gives inf * 0, both NaN. Fitted values lie
# far inside (about 1e-2 to 1e3), where the clamp changes nothing.
THETA_MIN, THETA_MAX = 1e-8, 1e8


def log_nb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    eps: float = EPS,
    log_theta_eps: torch.Tensor | None = None,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative binomial log-density, elementwise; ``(cells, genes)`` for ``theta`` of ``(genes,)``.

    ``log_theta_eps = log(theta + eps)`` and ``lgamma_theta = lgamma(theta)`` may be passed in
    when they were computed once per gene and gathered (the sparse path does that).
    """
    theta = theta.clamp(THETA_MIN, THETA_MAX)
    log_theta_mu = torch.log(theta + mu + eps)
    log_theta_eps = torch.log(theta + eps) if log_theta_eps is None else log_theta_eps
    lgamma_theta = torch.lgamma(theta) if lgamma_theta is None else lgamma_theta
    return (
        theta * (log_theta_eps - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - lgamma_theta
        - torch.lgamma(x + 1)
    )


def log_zinb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    eps: float = EPS,
    log_theta_eps: torch.Tensor | None = None,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-inflated NB log-density with dropout gate logits ``gate_logits`` (logit of P(dropout))."""
    # log sigmoid(-pi) = -softplus(pi); written as scvi-tools does to agree bit for bit.
    theta = theta.clamp(THETA_MIN, THETA_MAX)
    softplus_neg_pi = F.softplus(-gate_logits)
    log_theta_mu = torch.log(theta + mu + eps)
    log_theta_eps = torch.log(theta + eps) if log_theta_eps is None else log_theta_eps
    lgamma_theta = torch.lgamma(theta) if lgamma_theta is None else lgamma_theta
    pi_theta_log = -gate_logits + theta * (log_theta_eps - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_neg_pi
    case_non_zero = (
        -softplus_neg_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - lgamma_theta
        - torch.lgamma(x + 1)
    )
    return torch.where(x < eps, case_zero, case_non_zero)


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Poisson log-density; ``xlogy`` keeps ``x = 0, rate = 0`` finite, and a rate below ``EPS`` counts
    as ``EPS`` in the log so that ``x > 0, rate = 0`` is finite too (as in the NB's ``log(mu + eps)``)."""
    return torch.xlogy(x, rate.clamp_min(EPS)) - rate - torch.lgamma(x + 1)


def sparse_log_prob(value: torch.Tensor, mu: torch.Tensor, log_density, zero_case: torch.Tensor) -> torch.Tensor:
    """Elementwise log-density ``(cells, genes)`` of sparse CSR counts ``value``.

    ``zero_case`` is the log-density at x = 0 (any shape broadcasting to ``mu``'s);
    ``log_density(x, at)`` is the full log-density at the non-zeros, where ``at(t)`` gathers
    a parameter ``t`` (``(genes,)`` or ``(cells, genes)``) at those entries.
    """
    rows, cols, vals = csr_entries(value)

    def at(param: torch.Tensor) -> torch.Tensor:
        if param.dim() == 1:
            return param[cols]
        if param.shape[0] == 1:
            return param[0, cols]
        return param[rows, cols]

    if zero_case.shape != mu.shape:
        zero_case = zero_case.expand(mu.shape).clone()
    # In place: zero_case is a fresh result that no backward formula saved.
    return zero_case.index_put_((rows, cols), log_density(vals.to(mu.dtype), at))


def _theta_terms(theta: torch.Tensor, at) -> dict[str, torch.Tensor]:
    """``log(theta + eps)`` and ``lgamma(theta)`` computed per gene, then gathered at the non-zeros
    (cheaper than per non-zero when theta is ``(genes,)``; identical values)."""
    if theta.dim() == 2 and theta.shape[0] > 1:
        return {}  # (cells, genes): gather first, compute after (log_nb does it)
    theta = theta.clamp(THETA_MIN, THETA_MAX)  # as log_nb bounds it
    return {"log_theta_eps": at(torch.log(theta + EPS)), "lgamma_theta": at(torch.lgamma(theta))}


class _SparseNBLogProb(torch.autograd.Function):
    """Elementwise NB log-density ``(cells, genes)`` of sparse counts, with a hand-written backward.

    The values are ``log_nb``'s to float rounding: its x = 0 term everywhere, plus its count
    terms added at the non-zeros.
    Autograd through those expressions makes about fifteen passes over ``(cells, genes)``, plus
    zero-filled scatters for the gathers at the non-zeros. The derivatives are short:

        d/dmu    = -theta / D                              + [x > 0] x (1 / (mu + eps) - 1 / D)
        d/dtheta = log(theta + eps) - log D + theta / (theta + eps) - theta / D
                                                           + [x > 0] (psi(x + theta) - psi(theta) - x / D)

    with ``D = theta + mu + eps``: four dense passes forward and four or five backward, and the
    count terms at the non-zeros only. ``theta`` is ``(genes,)`` or ``(cells, genes)``, already clamped.
    """

    @staticmethod
    def forward(ctx, mu, theta, rows, cols, counts):
        per_gene = theta.dim() == 1
        flat = rows * mu.shape[-1] + cols  # positions of the non-zeros in the flattened (cells, genes)
        log_theta_eps = torch.log(theta + EPS)
        denom = mu + (theta + EPS) if per_gene else theta + mu + EPS  # D, one pass when theta is (genes,)
        log_denom = torch.log(denom)
        out = torch.sub(log_theta_eps, log_denom).mul_(theta)  # the x = 0 case everywhere
        # At the non-zeros, add the count terms of log_nb to the x = 0 case already there.
        theta_nz = theta.index_select(0, cols) if per_gene else _gather(theta, rows, cols, flat)
        lgamma_theta_nz = torch.lgamma(theta).index_select(0, cols) if per_gene else torch.lgamma(theta_nz)
        log_denom_nz = log_denom.view(-1).index_select(0, flat)
        out.view(-1).index_add_(
            0, flat, _nb_count_terms(counts, _gather(mu, rows, cols, flat), log_denom_nz, theta_nz, lgamma_theta_nz)
        )
        ctx.save_for_backward(mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps = ctx.saved_tensors
        per_gene = theta.dim() == 1
        # The upstream gradient is usually one number per cell, expanded over genes (it comes from
        # the per-cell sum of Independent); then the sums over cells below are matrix-vector products.
        per_cell = grad[:, 0] if grad.stride(-1) == 0 else None
        grad_nz = per_cell.index_select(0, rows) if per_cell is not None else _gather(grad, rows, cols, flat)
        neg_theta_over_denom = theta.neg() / denom
        denom_nz = denom.view(-1).index_select(0, flat)
        grad_mu = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_mu = grad * neg_theta_over_denom
            count_terms = grad_nz * counts * (1 / (_gather(mu, rows, cols, flat) + EPS) - 1 / denom_nz)
            grad_mu.view(-1).index_add_(0, flat, count_terms)
        if ctx.needs_input_grad[1]:
            if per_gene:  # digamma is slow for small arguments: once per gene, then gathered
                theta_nz, digamma_theta_nz = theta.index_select(0, cols), torch.digamma(theta).index_select(0, cols)
            else:
                theta_nz = _gather(theta, rows, cols, flat)
                digamma_theta_nz = torch.digamma(theta_nz)
            count_terms = grad_nz * (torch.digamma(counts + theta_nz) - digamma_theta_nz - counts / denom_nz)
            per_theta = log_theta_eps + theta / (theta + EPS)
            if per_gene:
                dense_terms = log_denom - neg_theta_over_denom  # log D + theta / D
                if per_cell is not None:
                    grad_theta = per_theta * per_cell.sum() - torch.mv(dense_terms.t(), per_cell)
                else:
                    grad_theta = per_theta * grad.sum(0) - (grad * dense_terms).sum(0)
                grad_theta.index_add_(0, cols, count_terms)
            else:
                grad_theta = grad * (per_theta - log_denom + neg_theta_over_denom)
                grad_theta.view(-1).index_add_(0, flat, count_terms)
        return grad_mu, grad_theta, None, None, None


class _SparseNBCellLogProb(torch.autograd.Function):
    """Per-cell NB log-density ``(cells,)`` of sparse counts: ``_SparseNBLogProb`` summed over genes,
    for ``theta`` of shape ``(genes,)``, without forming the ``(cells, genes)`` array of densities.

    On CPU every fresh ``(cells, genes)`` array costs about as much as the arithmetic written into
    it (at 128 x 2,000, 100-250 us in a training step, against 25-50 us for the same operation on
    a buffer in cache). The x = 0 term summed over genes is a matrix-vector product,

        sum_g theta_g (log(theta_g + eps) - log D_ng) = sum_g theta_g log(theta_g + eps) - (log D @ theta)_n,

    so the forward makes two arrays (``D`` and ``log D``), and the backward one (the gradient for
    ``mu``), against seven for the elementwise densities summed by ``Independent``. The per-gene
    sums of the backward are matrix-vector products too:

        d/dtheta_g = sum_n g_n (log(theta_g + eps) + theta_g / (theta_g + eps) - log D_ng - theta_g / D_ng)
                   + count terms,

    where ``-sum_n g_n theta_g / D_ng`` is the column sum of the x = 0 part of the ``mu`` gradient.
    """

    @staticmethod
    def forward(ctx, mu, theta, rows, cols, counts):
        flat = rows * mu.shape[-1] + cols
        theta_eps = theta + EPS
        log_theta_eps = torch.log(theta_eps)
        denom = mu + theta_eps
        log_denom = torch.log(denom)
        out = torch.mv(log_denom, theta).neg_().add_(torch.dot(theta, log_theta_eps))  # the x = 0 term, summed
        count_terms = _nb_count_terms(
            counts,
            mu.view(-1).index_select(0, flat),
            log_denom.view(-1).index_select(0, flat),
            theta.index_select(0, cols),
            torch.lgamma(theta).index_select(0, cols),
        )
        out.index_add_(0, rows, count_terms)
        ctx.save_for_backward(mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps = ctx.saved_tensors
        grad_nz = grad.index_select(0, rows)
        denom_nz = denom.view(-1).index_select(0, flat)
        grad_mu = torch.div(theta, denom).mul_(grad.neg().unsqueeze(-1))  # -g theta / D, the x = 0 part
        grad_theta = None
        if ctx.needs_input_grad[1]:
            per_theta = log_theta_eps + theta / (theta + EPS)
            theta_nz = theta.index_select(0, cols)
            count_terms = grad_nz * (
                torch.digamma(counts + theta_nz) - torch.digamma(theta).index_select(0, cols) - counts / denom_nz
            )
            grad_theta = per_theta * grad.sum() - torch.mv(log_denom.t(), grad) + grad_mu.sum(0)
            grad_theta.index_add_(0, cols, count_terms)
        mu_terms = grad_nz * counts * (1 / (mu.view(-1).index_select(0, flat) + EPS) - 1 / denom_nz)
        grad_mu.view(-1).index_add_(0, flat, mu_terms)
        return grad_mu, grad_theta, None, None, None


def sparse_nb_cell_log_prob(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor | None:
    """NB log-density of sparse counts summed over genes, ``(cells,)``; None unless ``theta`` is one
    value per gene (``(genes,)`` or ``(1, genes)``), for which it is ``sparse_nb_log_prob(...).sum(-1)``."""
    if theta.dim() == 2 and theta.shape[0] == 1:
        theta = theta[0]
    if theta.dim() != 1 or mu.dim() != 2:
        return None
    rows, cols, counts = csr_entries(value)
    theta = theta.clamp(THETA_MIN, THETA_MAX)  # as log_nb bounds it
    return _SparseNBCellLogProb.apply(mu.contiguous(), theta, rows, cols, counts.to(mu.dtype))


class CellCounts(Independent):
    """The counts of a cell's genes as one event: what ``.to_event(1)`` of our count likelihoods gives.

    With sparse counts and an NB of one ``theta`` per gene, ``log_prob`` computes each cell's sum
    directly (``_SparseNBCellLogProb``); otherwise it is ``Independent``'s sum of the elementwise
    log-densities.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self.base_dist
        if self.reinterpreted_batch_ndims == 1 and isinstance(base, NegativeBinomial) and is_sparse_counts(value):
            per_cell = sparse_nb_cell_log_prob(value, base.mu, base.theta)
            if per_cell is not None:
                return per_cell
        return super().log_prob(value)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance=self._get_checked_instance(CellCounts, _instance))


def _nb_count_terms(counts, mu_nz, log_denom_nz, theta_nz, lgamma_theta_nz) -> torch.Tensor:
    """``log_nb``'s terms that vanish at x = 0, at the non-zeros: ``x (log(mu + eps) - log D)
    + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``."""
    return (
        counts * (torch.log(mu_nz + EPS) - log_denom_nz)
        + torch.lgamma(counts + theta_nz)
        - lgamma_theta_nz
        - torch.lgamma(counts + 1)
    )


def _gather(param: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``param[rows, cols]`` for a ``(cells, genes)`` tensor; one flat gather when it is contiguous."""
    return param.view(-1).index_select(0, flat) if param.is_contiguous() else param[rows, cols]


def sparse_nb_log_prob(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """NB log-density ``(cells, genes)`` of sparse CSR counts; equal to ``log_nb`` of the dense counts."""
    theta = theta.clamp(THETA_MIN, THETA_MAX)  # as log_nb bounds it
    if theta.dim() == 2 and theta.shape[0] == 1:
        theta = theta[0]
    elif theta.dim() == 2 and theta.shape != mu.shape:
        theta = theta.expand(mu.shape)
    rows, cols, counts = csr_entries(value)
    return _SparseNBLogProb.apply(mu.contiguous(), theta, rows, cols, counts.to(mu.dtype))


def _zinb_zero(d: ZeroInflatedNegativeBinomial) -> torch.Tensor:
    """ZINB log-density at x = 0, as ``log_zinb``'s zero case."""
    theta = d.theta.clamp(THETA_MIN, THETA_MAX)  # as log_zinb bounds it
    pi_theta_log = -d.gate_logits + theta * (torch.log(theta + EPS) - torch.log(theta + d.mu + EPS))
    return F.softplus(pi_theta_log) - F.softplus(-d.gate_logits)


def _broadcastable(param: torch.Tensor, batch_shape) -> torch.Tensor:
    """``param`` unchanged, after checking that it broadcasts to ``batch_shape``."""
    if torch.broadcast_shapes(param.shape, torch.Size(batch_shape)) != torch.Size(batch_shape):
        raise ValueError(f"Cannot expand a parameter of shape {tuple(param.shape)} to {tuple(batch_shape)}.")
    return param


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

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> Independent:
        """As ``TorchDistribution.to_event``, as a ``CellCounts``: per-cell sums computed directly."""
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        return CellCounts(self, reinterpreted_batch_ndims) if reinterpreted_batch_ndims else self

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if is_sparse_counts(value):
            return sparse_nb_log_prob(value, self.mu, self.theta)
        return log_nb(value, self.mu, self.theta)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return _sample_gamma_poisson(self.mu, self.theta, torch.Size(sample_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial, _instance)
        # theta keeps its own shape (broadcasting): Pyro's plates expand every site, and a (genes,)
        # theta expanded to (cells, genes) would make the per-gene terms cost cells x genes.
        new.mu, new.theta = self.mu.expand(batch_shape), _broadcastable(self.theta, batch_shape)
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
        if is_sparse_counts(value):
            return sparse_log_prob(
                value,
                self.mu,
                lambda x, at: log_zinb(
                    x, at(self.mu), at(self.theta), at(self.gate_logits), **_theta_terms(self.theta, at)
                ),
                _zinb_zero(self),
            )
        return log_zinb(value, self.mu, self.theta, self.gate_logits)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            counts = _sample_gamma_poisson(self.mu, self.theta, torch.Size(sample_shape))
            dropout = torch.bernoulli(torch.sigmoid(self.gate_logits).expand(counts.shape))
            return counts * (1 - dropout)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        new.mu = self.mu.expand(batch_shape)
        new.theta = _broadcastable(self.theta, batch_shape)  # as in NegativeBinomial.expand
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
        if is_sparse_counts(value):
            return sparse_log_prob(value, self.mu, lambda x, at: log_poisson(x, at(self.mu)), -self.mu)
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
    # No argument validation: mu = exp(l) softmax(.) >= 0 and theta > 0 hold by construction, and
    # checking them costs a full pass over (cells, genes) every step.
    if gene_likelihood == "nb":
        return NegativeBinomial(mu, theta, validate_args=False)
    if gene_likelihood == "zinb":
        return ZeroInflatedNegativeBinomial(mu, theta, gate_logits, validate_args=False)
    if gene_likelihood == "poisson":
        return Poisson(mu, validate_args=False)
    raise ValueError(f"gene_likelihood must be 'nb', 'zinb' or 'poisson', got {gene_likelihood!r}.")
