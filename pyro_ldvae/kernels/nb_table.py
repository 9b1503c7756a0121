"""NB log-likelihoods of many cells under many draws of the normalized expression (pure torch).

Importance weights for differential expression need ``log NB(x_a | L_a rho_s, theta)`` for every
draw ``s`` (``S`` of them, ``rho_s`` ``(genes,)``) and every anchor cell ``a`` (counts ``x_a``,
total count ``L_a``): ``S x A x genes`` densities, about 10^11 with thousands of genes. Split as in
:mod:`.count_terms`,

    log NB(x_a | L_a rho_s) = sum_g theta_g log(theta_g + eps) - Z_s(L_a)
                            - sum_{g: x_ag > 0} x_ag log1p(theta_g / (L_a rho_sg + eps))
                            + sum_{g: x_ag > 0} lgamma(x_ag + theta_g) - lgamma(theta_g) - lgamma(x_ag + 1),

    Z_s(L) = sum_g theta_g log(theta_g + L rho_sg + eps),

(``x (log(mu + eps) - log D) = -x log1p(theta / (mu + eps))``). ``Z_s`` is a smooth function of the
scalar ``log L`` (a sum of softplus-like terms, analytic in a strip of half-width pi around the real
axis), so it is evaluated at ``n_nodes`` Chebyshev nodes spanning the anchors' log library sizes
and interpolated. The poles of softplus lie ``pi`` off the real axis, so the interpolation error
falls as ``r^-n`` with ``r = a + sqrt(a^2 + 1)``, ``a = pi / half-width`` of the range: the number of
nodes is chosen for a relative error of 1e-9, below float32 rounding (checked in
``tests/test_nb_table.py``). That makes the dense part cost ``S x genes x n_nodes`` instead of
``S x genes x A``. The count term is evaluated exactly at the anchors' non-zeros.
"""

from __future__ import annotations

import math

import torch

from .count_terms import EPS, clamp_theta

# Elements per pass of the (draws, genes) and (non-zeros, draws) temporaries: a few MB each.
PASS_ELEMENTS = 1 << 22


def chebyshev_nodes(low: float, high: float, n_nodes: int) -> torch.Tensor:
    """The ``n_nodes`` Chebyshev points of the first kind on ``[low, high]``, float64."""
    k = torch.arange(n_nodes, dtype=torch.float64)
    return (low + high) / 2 + (high - low) / 2 * torch.cos(math.pi * (k + 0.5) / n_nodes)


def nodes_for(width: float, tolerance: float = 1e-9) -> int:
    """Chebyshev nodes that interpolate ``Z_s`` over a ``log L`` range of ``width`` to ``tolerance`` (relative)."""
    a = math.pi / max(width / 2, 1e-6)
    rate = math.log(a + math.sqrt(a * a + 1))
    return int(min(64, max(6, math.ceil(-math.log(tolerance) / rate))))


def chebyshev_interpolate(values: torch.Tensor, low: float, high: float, at: torch.Tensor) -> torch.Tensor:
    """Interpolate ``values`` ``(rows, n_nodes)``, taken at :func:`chebyshev_nodes`, at points ``at``.

    ``at`` is ``(points,)`` in ``[low, high]``; the result is ``(rows, points)``, float64.
    """
    n = values.shape[-1]
    j = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * j[:, None] * (k[None, :] + 0.5) / n)  # (coefficient j, node k)
    coefficients = values.double() @ basis.T * (2.0 / n)  # (rows, n)
    coefficients[:, 0] /= 2
    t = ((2 * at.double() - (low + high)) / (high - low)).clamp(-1.0, 1.0)
    polynomials = torch.cos(j[:, None] * torch.arccos(t)[None, :])  # T_j(t), (n, points)
    return coefficients @ polynomials


def nb_log_likelihood_table(
    rho: torch.Tensor,
    theta: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    counts: torch.Tensor,
    n_nodes: int | None = None,
) -> torch.Tensor:
    """``log NB(x_a | L_a rho_s, theta)`` summed over genes, ``(S, A)`` float64.

    Parameters
    ----------
    rho
        Draws of the normalized expression ``(S, genes)``, rows summing to one.
    theta
        Inverse dispersion, one per gene ``(genes,)``.
    crow, col, counts
        The anchors' counts ``(A, genes)`` as CSR arrays; ``L_a`` is each row's sum.
    n_nodes
        Chebyshev nodes of the interpolation of the dense part over ``log L``; None picks enough
        for a relative error of 1e-9 (:func:`nodes_for`).
    """
    rho = rho.float()
    theta = clamp_theta(theta.float())
    counts = counts.float()
    n_draws, n_genes = rho.shape
    n_anchors = len(crow) - 1
    rows = torch.repeat_interleave(torch.arange(n_anchors), crow[1:] - crow[:-1])
    library = torch.zeros(n_anchors).index_add_(0, rows, counts)  # (A,)
    theta_eps = theta + EPS
    constant = torch.dot(theta, torch.log(theta_eps)).double()
    per_anchor = torch.zeros(n_anchors, dtype=torch.float64).index_add_(
        0, rows, (torch.lgamma(counts + theta[col]) - torch.lgamma(theta)[col] - torch.lgamma(counts + 1)).double()
    )
    out = (constant + per_anchor).expand(n_draws, n_anchors).clone()

    # Dense part: Z_s(L) at the Chebyshev nodes of log L, interpolated at each anchor's log L.
    positive = library > 0  # an empty cell has mu = 0 and Z_s(0) = sum_g theta_g log(theta_g + eps)
    if positive.any():
        log_library = torch.log(library[positive].double())
        low, high = float(log_library.min()), float(log_library.max())
        if high - low < 1e-3:  # one library size: a short interval around it keeps the nodes distinct
            low, high = low - 1e-3, high + 1e-3
        n_nodes = nodes_for(high - low) if n_nodes is None else n_nodes
        nodes = torch.exp(chebyshev_nodes(low, high, n_nodes)).float()
        at_nodes = torch.empty(n_draws, n_nodes)
        step = max(1, PASS_ELEMENTS // max(1, n_genes))
        for start in range(0, n_draws, step):
            block = rho[start : start + step]
            for k, size in enumerate(nodes.tolist()):
                at_nodes[start : start + step, k] = torch.log(torch.add(theta_eps, block, alpha=size)) @ theta
        out[:, positive] -= chebyshev_interpolate(at_nodes, low, high, log_library)
    out[:, ~positive] -= constant

    # Count part, exact at the non-zeros: -sum x log1p(theta / (L rho + eps)), non-zeros x draws.
    if len(col):
        theta_nz, library_nz = theta[col].unsqueeze(-1), library[rows].unsqueeze(-1)  # (nnz, 1)
        weights = torch.sparse_csr_tensor(
            crow, torch.arange(len(col)), counts, size=(n_anchors, len(col)), check_invariants=False
        )
        rho_t = rho.t().contiguous()  # (genes, S): a draw block's non-zeros are one row gather
        step = max(1, PASS_ELEMENTS // len(col))
        for start in range(0, n_draws, step):
            block = rho_t[:, start : start + step].index_select(0, col)  # (nnz, draws)
            terms = torch.div(theta_nz, block.mul_(library_nz).add_(EPS), out=block).log1p_()
            out[start : start + step] -= (weights @ terms).t().double()
    return out
