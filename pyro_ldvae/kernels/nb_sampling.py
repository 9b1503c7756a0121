"""Negative binomial draws: by inverse CDF where the law's tail is short, by gamma-Poisson elsewhere (pure torch).

``NB(mu, theta)`` has ``P(0) = (theta / (theta + mu))^theta`` and
``P(k + 1) = P(k) (k + theta) / (k + 1) q`` with ``q = mu / (theta + mu)``. Where ``q <= 1/2``
and ``mu <= 16`` (most entries of single-cell data: small means) the draw is the first ``k`` whose CDF reaches a
uniform ``u``: one ``log1p`` and one ``exp`` per entry, and a short walk up the CDF for the few
entries that are not zero, since the probabilities fall at least geometrically (ratio ``q``).
Elsewhere the draw is a Poisson of a gamma, as in ``torch.distributions`` (a gamma draw costs
several times an inverse-CDF step). Both are exact laws of NB; float64 carries the CDF.
"""

from __future__ import annotations

import torch

from .count_terms import EPS, MAX_RATE

SHORT_TAIL = 0.5  # q at or below which a non-zero draw walks the CDF: P(X > k) <= q^k
WALK_MEAN = 16.0  # and mu at most this: the walk is short, and P(0) >= exp(-mu) stays far from underflow
MAX_STEPS = 2000  # the CDF walk's bound; at q <= 1/2 the probabilities underflow long before


def sample_nb(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One draw of ``NB(mu, theta)`` per entry of ``broadcast(mu, theta)``, as floats (no gradient).

    Every entry is 0 when a uniform ``u <= P(0)``; the others, usually few, are drawn from NB given
    ``X >= 1``: up the CDF from ``u`` where ``q <= 1/2``, as the first non-zero of gamma-Poisson
    tries elsewhere.
    """
    mu, theta = (t.detach().contiguous() for t in torch.broadcast_tensors(mu, theta))
    u = torch.rand(mu.shape, dtype=mu.dtype, device=mu.device)
    zero = torch.exp(-theta * torch.log1p(mu / theta.clamp_min(EPS)))  # P(0)
    out = torch.zeros_like(mu)
    at = torch.nonzero((u > zero).view(-1)).squeeze(1)  # the entries whose draw is not 0
    mu_at, theta_at, u_at = mu.view(-1)[at], theta.view(-1)[at], u.view(-1)[at].double()
    counts = torch.zeros_like(mu_at)
    is_short = (mu_at <= theta_at * (SHORT_TAIL / (1.0 - SHORT_TAIL))) & (mu_at <= WALK_MEAN)
    short = torch.nonzero(is_short).squeeze(1)
    counts[short] = _walk_cdf(u_at[short], mu_at[short].double(), theta_at[short].double()).to(mu.dtype)
    long = torch.cat([torch.nonzero(~is_short).squeeze(1), short[counts[short] < 1]])  # walks past MAX_STEPS too
    counts[long] = _not_zero(mu_at[long], theta_at[long])
    out.view(-1)[at] = counts
    return out


def _walk_cdf(u: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, max_steps: int = MAX_STEPS) -> torch.Tensor:
    """The first ``k >= 1`` whose CDF reaches ``u`` (float64, 1-D, ``P(0) < u < 1``); -1 past ``max_steps``."""
    q = mu / (mu + theta)
    pmf = torch.exp(-theta * torch.log1p(mu / theta.clamp_min(EPS)))
    cdf = pmf.clone()
    counts = torch.full_like(mu, -1.0)
    left = torch.arange(len(mu), device=mu.device)
    for k in range(1, max_steps + 1):
        if not left.numel():
            break
        pmf = pmf * ((k - 1 + theta) / k) * q
        cdf = cdf + pmf
        done = (u <= cdf) | (pmf == 0)  # pmf 0: the CDF stopped short of u by rounding
        counts[left[done]] = k
        keep = torch.nonzero(~done).squeeze(1)
        left, u, pmf, cdf, theta, q = (t[keep] for t in (left, u, pmf, cdf, theta, q))
    return counts


def _not_zero(mu: torch.Tensor, theta: torch.Tensor, max_tries: int = 64) -> torch.Tensor:
    """Draws of NB given ``X >= 1`` (1-D): the first non-zero of gamma-Poisson tries.

    Each entry gets about ``1 / P(X >= 1)`` tries at once (one expected success), so a few rounds
    suffice; over all entries that is as many gamma draws as one per entry would cost.
    """
    counts = torch.zeros_like(mu)
    left = torch.arange(len(mu), device=mu.device)
    while left.numel():
        m, t = mu[left], theta[left]
        not_zero = -torch.expm1(-t * torch.log1p(m / t.clamp_min(EPS)))  # P(X >= 1)
        tries = torch.ceil(1.0 / not_zero.clamp_min(1.0 / max_tries)).long()
        owner = torch.repeat_interleave(torch.arange(len(left), device=mu.device), tries)
        rate = torch._standard_gamma(t[owner]) * (m[owner] / t[owner])
        draw = torch.poisson(rate.clamp(max=MAX_RATE))
        hit = torch.nonzero(draw > 0).squeeze(1)  # tries in order, so per owner the first is the smallest
        first = torch.full((len(left),), len(draw), dtype=torch.long, device=mu.device)
        first.scatter_reduce_(0, owner[hit], hit, reduce="amin")
        found = first < len(draw)
        counts[left[found]] = draw[first[found]]
        left = left[~found]
    return counts
