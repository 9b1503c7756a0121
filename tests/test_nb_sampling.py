"""The negative binomial sampler: the law of its draws against the NB probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_ldvae.kernels.nb_sampling import sample_nb

N = 200_000
# (mu, theta): short tails walked up the CDF (q <= 1/2), long tails by gamma-Poisson tries, the
# boundary q = 1/2, a nearly Poisson law, rare non-zeros of a heavy tail, mu = 0, and a large
# nearly Poisson mean (q < 1/2, P(0) underflows).
CASES = [
    (0.5, 1.0),
    (1.0, 1.0),
    (3.0, 100.0),
    (1e-3, 5.0),
    (0.3, 0.05),
    (5.0, 0.3),
    (60.0, 2.0),
    (0.0, 1.0),
    (3000.0, 1e4),
]


def nb_cdf(k_max: int, mu: float, theta: float) -> np.ndarray:
    k = torch.arange(k_max + 1, dtype=torch.float64)
    mu_, theta_ = torch.tensor(mu, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64)
    log_pmf = (
        torch.lgamma(k + theta_)
        - torch.lgamma(theta_)
        - torch.lgamma(k + 1)
        + theta_ * torch.log(theta_ / (theta_ + mu_))
        + torch.xlogy(k, mu_ / (theta_ + mu_))
    )
    return torch.cumsum(torch.exp(log_pmf), 0).numpy()


@pytest.mark.parametrize(("mu", "theta"), CASES)
def test_draws_follow_the_negative_binomial(mu, theta):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = sample_nb(torch.full((N // 1000, 1000), mu), torch.tensor(theta)).numpy().ravel()
    assert draws.dtype == np.float32 and (draws == np.round(draws)).all() and (draws >= 0).all()
    k_max = int(draws.max())
    empirical = np.cumsum(np.bincount(draws.astype(np.int64), minlength=k_max + 1)) / N
    distance = np.abs(empirical - nb_cdf(k_max, mu, theta)).max()
    assert distance < 1.95 / np.sqrt(N)  # Kolmogorov-Smirnov, about the 0.1% level
    if mu > 0:
        assert draws.mean() == pytest.approx(mu, rel=8 * np.sqrt((1 + mu / theta) / (mu * N)))


def test_parameters_broadcast_per_entry():
    mu = torch.tensor([[0.0, 2.0, 40.0]]).expand(50_000, 3)
    theta = torch.tensor([1.0, 0.5, 3.0])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        draws = sample_nb(mu, theta)
    assert draws.shape == (50_000, 3)
    assert (draws[:, 0] == 0).all()
    variance = mu[0] + mu[0] ** 2 / theta  # NB variance
    assert torch.allclose(draws.mean(0), mu[0], atol=0.05 * float(mu[0].max()))
    assert torch.allclose(draws.var(0)[1:], variance[1:], rtol=0.1)
