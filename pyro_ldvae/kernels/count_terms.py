"""The count log-densities as named terms, one formula each (pure torch, no Pyro).

Every density splits into a *zero term*, its value at x = 0, and a *count term*, which vanishes at
x = 0 (``lgamma(0 + theta) - lgamma(theta) = 0``, ``0 * log(.) = 0``, ``lgamma(1) = 0``). The dense
densities below are the zero term plus the count term; the sparse kernels
(:mod:`pyro_ldvae.kernels.sparse_nb`, and the elementwise sparse path of the likelihoods) evaluate
the zero term over all ``(cells, genes)`` entries and the count term at the stored non-zeros only,
with these same functions. The formulas and ``eps = 1e-8`` are scvi-tools' (``log_nb_positive``,
``log_zinb_positive``), in their order of operations, so that the values agree bit for bit:

    log NB(x | mu, theta) = theta (log(theta + eps) - log D)                       zero term
                          + x (log(mu + eps) - log D)
                          + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)      count term
    with D = theta + mu + eps;

    log ZINB(x | mu, theta, pi) = softplus(-pi + nb_zero) - softplus(-pi)          at x = 0
                                = -softplus(-pi) - pi + nb_zero + nb_count         at x > 0;

    log Poisson(x | mu) = -mu + xlogy(x, max(mu, eps)) - lgamma(x + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8
# theta is clamped to [THETA_MIN, THETA_MAX] before any term: theta = 0 (exp underflow) gives
# lgamma(0) - lgamma(0) = inf - inf and theta = inf gives inf * 0, both NaN. Fitted values lie far
# inside (about 1e-2 to 1e3), where the clamp changes nothing.
THETA_MIN, THETA_MAX = 1e-8, 1e8
# The Gamma-Poisson sampler and the Poisson rate are clamped here: a rate of 1e8 is already far
# beyond any real UMI count and keeps torch.poisson finite.
MAX_RATE = 1e8


def clamp_theta(theta: torch.Tensor) -> torch.Tensor:
    """``theta`` bounded to ``[THETA_MIN, THETA_MAX]``, the one place the densities bound it."""
    return theta.clamp(THETA_MIN, THETA_MAX)


# ---------------------------------------------------------------------------------------------
# Named terms
# ---------------------------------------------------------------------------------------------
def nb_zero_term(theta: torch.Tensor, log_theta_eps: torch.Tensor, log_denom: torch.Tensor) -> torch.Tensor:
    """``theta (log(theta + eps) - log D)``: the NB log-density at x = 0."""
    return theta * (log_theta_eps - log_denom)


def nb_count_term(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    log_denom: torch.Tensor,
    lgamma_theta: torch.Tensor,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (log(mu + eps) - log D) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, zero at x = 0.

    ``start`` (a zero term) is added first, so that zero term + count term is summed in
    scvi-tools' order and the dense density stays bit-identical to theirs.
    """
    first = x * (torch.log(mu + EPS) - log_denom)
    if start is not None:
        first = start + first
    return first + torch.lgamma(x + theta) - lgamma_theta - torch.lgamma(x + 1)


def zinb_zero_and_offset(gate_logits: torch.Tensor, nb_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ZINB log-density at x = 0, and the ZINB part of the log-density at x > 0.

    The second is ``-softplus(-pi) - pi + nb_zero``, which plus the NB count term is the log-density at x > 0
    (``log sigmoid(-pi) = -softplus(pi)``, as scvi-tools writes it).
    """
    softplus_neg_pi = F.softplus(-gate_logits)
    pi_theta_log = -gate_logits + nb_zero
    return F.softplus(pi_theta_log) - softplus_neg_pi, -softplus_neg_pi + pi_theta_log


def poisson_zero_term(rate: torch.Tensor) -> torch.Tensor:
    """``-rate``: the Poisson log-density at x = 0."""
    return -rate


def poisson_count_term(x: torch.Tensor, rate: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``xlogy(x, max(rate, eps)) - lgamma(x + 1)``, zero at x = 0; ``start`` is added first.

    ``xlogy`` keeps ``x = 0, rate = 0`` finite, and the floor ``eps`` keeps ``x > 0, rate = 0``
    finite (as the NB's ``log(mu + eps)``).
    """
    first = torch.xlogy(x, rate.clamp_min(EPS))
    if start is not None:
        first = start + first
    return first - torch.lgamma(x + 1)


# ---------------------------------------------------------------------------------------------
# Gradients of the NB terms, for the hand-written backward passes (D = theta + mu + eps)
# ---------------------------------------------------------------------------------------------
def nb_zero_dtheta_per_gene(theta: torch.Tensor, log_theta_eps: torch.Tensor) -> torch.Tensor:
    """``log(theta + eps) + theta / (theta + eps)``.

    The part of d(zero term)/dtheta free of ``mu`` (the rest is ``-log D - theta / D``).
    """
    return log_theta_eps + theta / (theta + EPS)


def nb_count_dmu(upstream: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``upstream * d(count term)/dmu = upstream x (1 / (mu + eps) - 1 / D)``."""
    return upstream * x * (1 / (mu + EPS) - 1 / denom)


def nb_count_dtheta(
    upstream: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, digamma_theta: torch.Tensor, denom: torch.Tensor
) -> torch.Tensor:
    """``upstream * d(count term)/dtheta = upstream (psi(x + theta) - psi(theta) - x / D)``."""
    return upstream * (torch.digamma(x + theta) - digamma_theta - x / denom)


# ---------------------------------------------------------------------------------------------
# The dense densities, elementwise: the reference that the sparse kernels are tested against
# ---------------------------------------------------------------------------------------------
def log_nb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    log_theta_eps: torch.Tensor | None = None,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """NB log-density, elementwise.

    ``(cells, genes)`` for ``mu`` of ``(cells, genes)`` and ``theta`` of ``(genes,)`` (kept at that shape: the per-gene
    terms are not broadcast before they are computed).

    ``log_theta_eps = log(theta + eps)`` and ``lgamma_theta = lgamma(theta)`` may be passed in when
    they were computed once per gene and gathered (the sparse path does that).
    """
    theta = clamp_theta(theta)
    log_denom = torch.log(theta + mu + EPS)
    log_theta_eps = torch.log(theta + EPS) if log_theta_eps is None else log_theta_eps
    lgamma_theta = torch.lgamma(theta) if lgamma_theta is None else lgamma_theta
    zero = nb_zero_term(theta, log_theta_eps, log_denom)
    return nb_count_term(x, mu, theta, log_denom, lgamma_theta, start=zero)


def log_zinb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    log_theta_eps: torch.Tensor | None = None,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-inflated NB log-density with dropout gate logits ``gate_logits`` (logit of P(dropout))."""
    theta = clamp_theta(theta)
    log_denom = torch.log(theta + mu + EPS)
    log_theta_eps = torch.log(theta + EPS) if log_theta_eps is None else log_theta_eps
    lgamma_theta = torch.lgamma(theta) if lgamma_theta is None else lgamma_theta
    case_zero, offset = zinb_zero_and_offset(gate_logits, nb_zero_term(theta, log_theta_eps, log_denom))
    case_non_zero = nb_count_term(x, mu, theta, log_denom, lgamma_theta, start=offset)
    return torch.where(x < EPS, case_zero, case_non_zero)


def log_zinb_at_zero(mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """The ZINB log-density at x = 0, ``log_zinb(0, ...)`` without the count term."""
    theta = clamp_theta(theta)
    nb_zero = nb_zero_term(theta, torch.log(theta + EPS), torch.log(theta + mu + EPS))
    return zinb_zero_and_offset(gate_logits, nb_zero)[0]


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Poisson log-density, elementwise."""
    return poisson_count_term(x, rate, start=poisson_zero_term(rate))
