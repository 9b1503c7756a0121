"""Log-densities of sparse counts: the zero term over all entries, the count term at the non-zeros.

Single-cell counts are 90-95% zeros and every count term vanishes at x = 0, so the expensive parts
(lgamma, and digamma in the gradient) are evaluated at the stored non-zeros only. The terms are
those of :mod:`pyro_ldvae.kernels.count_terms`; the results equal the dense densities to float
rounding. The NB has hand-written backward passes (autograd through the same expressions makes
about fifteen passes over ``(cells, genes)`` plus zero-filled scatters for the gathers); they are
tested against autograd of the dense reference and by finite differences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .count_terms import (
    EPS,
    clamp_theta,
    nb_count_dmu,
    nb_count_dtheta,
    nb_count_term,
    nb_zero_dtheta_per_gene,
)
from .sparse import SparseCounts, csr_entries

Gather = Callable[[torch.Tensor], torch.Tensor]


def sparse_log_prob(
    value: torch.Tensor | SparseCounts,
    mu: torch.Tensor,
    log_density: Callable[[torch.Tensor, Gather], torch.Tensor],
    zero_case: torch.Tensor,
) -> torch.Tensor:
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


def per_gene_theta_terms(theta: torch.Tensor, at: Gather) -> dict[str, torch.Tensor]:
    """``log(theta + eps)`` and ``lgamma(theta)`` per gene, gathered at the non-zeros.

    Cheaper than per non-zero when theta is ``(genes,)``, with identical values; empty for ``(cells, genes)``.
    """
    if theta.dim() == 2 and theta.shape[0] > 1:
        return {}  # (cells, genes): gather first, compute after (log_nb does it)
    theta = clamp_theta(theta)
    return {"log_theta_eps": at(torch.log(theta + EPS)), "lgamma_theta": at(torch.lgamma(theta))}


class _SparseNBLogProb(torch.autograd.Function):
    """Elementwise NB log-density ``(cells, genes)`` of sparse counts, with a hand-written backward.

    The zero term everywhere, the count term added at the non-zeros. The derivatives are short,

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
        out = torch.sub(log_theta_eps, log_denom).mul_(theta)  # nb_zero_term, in place, everywhere
        theta_nz = theta.index_select(0, cols) if per_gene else _gather(theta, rows, cols, flat)
        lgamma_theta_nz = torch.lgamma(theta).index_select(0, cols) if per_gene else torch.lgamma(theta_nz)
        log_denom_nz = log_denom.view(-1).index_select(0, flat)
        mu_nz = _gather(mu, rows, cols, flat)
        out.view(-1).index_add_(0, flat, nb_count_term(counts, mu_nz, theta_nz, log_denom_nz, lgamma_theta_nz))
        ctx.save_for_backward(mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mu, theta, rows, cols, flat, counts, denom, log_denom, log_theta_eps = ctx.saved_tensors
        per_gene = theta.dim() == 1
        # The upstream gradient is usually one number per cell, expanded over genes (it comes from
        # a per-cell sum); then the sums over cells below are matrix-vector products.
        per_cell = grad[:, 0] if grad.stride(-1) == 0 else None
        grad_nz = per_cell.index_select(0, rows) if per_cell is not None else _gather(grad, rows, cols, flat)
        neg_theta_over_denom = theta.neg() / denom
        denom_nz = denom.view(-1).index_select(0, flat)
        grad_mu = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_mu = grad * neg_theta_over_denom
            grad_mu.view(-1).index_add_(0, flat, nb_count_dmu(grad_nz, counts, _gather(mu, rows, cols, flat), denom_nz))
        if ctx.needs_input_grad[1]:
            if per_gene:  # digamma is slow for small arguments: once per gene, then gathered
                theta_nz, digamma_theta_nz = theta.index_select(0, cols), torch.digamma(theta).index_select(0, cols)
            else:
                theta_nz = _gather(theta, rows, cols, flat)
                digamma_theta_nz = torch.digamma(theta_nz)
            count_terms = nb_count_dtheta(grad_nz, counts, theta_nz, digamma_theta_nz, denom_nz)
            per_theta = nb_zero_dtheta_per_gene(theta, log_theta_eps)
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
    """Per-cell NB log-density ``(cells,)`` of sparse counts.

    ``_SparseNBLogProb`` summed over genes, for ``theta`` of shape ``(genes,)``, without forming the ``(cells, genes)``
    array of densities.

    On CPU every fresh ``(cells, genes)`` array costs about as much as the arithmetic written into
    it. The zero term summed over genes is a matrix-vector product,

        sum_g theta_g (log(theta_g + eps) - log D_ng) = sum_g theta_g log(theta_g + eps) - (log D @ theta)_n,

    so the forward makes two arrays (``D`` and ``log D``), and the backward one (the gradient for
    ``mu``), against seven for the elementwise densities summed over genes. The per-gene sums of
    the backward are matrix-vector products too:

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
        out = torch.mv(log_denom, theta).neg_().add_(torch.dot(theta, log_theta_eps))  # zero terms, summed
        count_terms = nb_count_term(
            counts,
            mu.view(-1).index_select(0, flat),
            theta.index_select(0, cols),
            log_denom.view(-1).index_select(0, flat),
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
        grad_mu = torch.div(theta, denom).mul_(grad.neg().unsqueeze(-1))  # -g theta / D, the zero term's part
        grad_theta = None
        if ctx.needs_input_grad[1]:
            per_theta = nb_zero_dtheta_per_gene(theta, log_theta_eps)
            theta_nz = theta.index_select(0, cols)
            count_terms = nb_count_dtheta(
                grad_nz, counts, theta_nz, torch.digamma(theta).index_select(0, cols), denom_nz
            )
            grad_theta = per_theta * grad.sum() - torch.mv(log_denom.t(), grad) + grad_mu.sum(0)
            grad_theta.index_add_(0, cols, count_terms)
        mu_terms = nb_count_dmu(grad_nz, counts, mu.view(-1).index_select(0, flat), denom_nz)
        grad_mu.view(-1).index_add_(0, flat, mu_terms)
        return grad_mu, grad_theta, None, None, None


def _gather(param: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``param[rows, cols]`` for a ``(cells, genes)`` tensor; one flat gather when it is contiguous."""
    return param.view(-1).index_select(0, flat) if param.is_contiguous() else param[rows, cols]


def per_gene(theta: torch.Tensor) -> torch.Tensor | None:
    """``theta`` as ``(genes,)`` when it holds one value per gene (``(genes,)`` or ``(1, genes)``), else None."""
    if theta.dim() == 2 and theta.shape[0] == 1:
        return theta[0]
    return theta if theta.dim() == 1 else None


def sparse_nb_log_prob(value: torch.Tensor | SparseCounts, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """NB log-density ``(cells, genes)`` of sparse CSR counts; equal to ``log_nb`` of the dense counts."""
    theta = clamp_theta(theta)
    if theta.dim() == 2 and theta.shape[0] == 1:
        theta = theta[0]
    elif theta.dim() == 2 and theta.shape != mu.shape:
        theta = theta.expand(mu.shape)
    rows, cols, counts = csr_entries(value)
    return _SparseNBLogProb.apply(mu.contiguous(), theta, rows, cols, counts.to(mu.dtype))


def sparse_nb_cell_log_prob(
    value: torch.Tensor | SparseCounts, mu: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor | None:
    """NB log-density of sparse counts summed over genes, ``(cells,)``.

    None unless ``theta`` is one value per gene (``(genes,)`` or ``(1, genes)``), for which it is
    ``sparse_nb_log_prob(...).sum(-1)``.
    """
    theta = per_gene(theta)
    if theta is None or mu.dim() != 2:
        return None
    rows, cols, counts = csr_entries(value)
    return _SparseNBCellLogProb.apply(mu.contiguous(), clamp_theta(theta), rows, cols, counts.to(mu.dtype))
