"""Sparse-aware count likelihoods equal the dense formulas, values and gradients."""

from __future__ import annotations

import pytest
import torch

from pyro_ldvae.distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    csr_entries,
    total_counts,
)


def _counts(cells: int = 40, genes: int = 60, density: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(cells, genes, generator=g) < density
    return mask * torch.randint(1, 50, (cells, genes), generator=g).float()  # (cells, genes)


def _params(cells: int, genes: int, theta_shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(1)
    mu = (torch.rand(cells, genes, generator=g) * 8).requires_grad_()
    mu.data[0, :5] = 0.0  # a zero mean must stay finite, as with eps in the dense formula
    theta = (torch.rand(theta_shape, generator=g) * 3 + 0.05).requires_grad_()
    gate = torch.randn(cells, genes, generator=g).requires_grad_()
    return mu, theta, gate


LIKELIHOODS = {
    "nb": lambda mu, theta, gate: NegativeBinomial(mu, theta),
    "zinb": lambda mu, theta, gate: ZeroInflatedNegativeBinomial(mu, theta, gate),
    "poisson": lambda mu, theta, gate: Poisson(mu),
}


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("theta_shape", [(60,), (40, 60), (1, 60)], ids=["gene", "cell-gene", "row"])
def test_sparse_log_prob_equals_dense(name, theta_shape):
    x = _counts()
    mu, theta, gate = _params(40, 60, theta_shape)
    if name == "poisson":  # no eps in the Poisson rate: d/dmu xlogy(0, mu) is 0/0 = nan in the dense formula at mu = 0
        mu.data[0, :5] = 0.5
    d = LIKELIHOODS[name](mu, theta, gate)
    dense, sparse = d.log_prob(x), d.log_prob(x.to_sparse_csr())
    assert sparse.shape == dense.shape == (40, 60)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sparse.sum(), dense.sum(), rtol=1e-6, atol=0)
    params = [p for p in (mu, theta, gate) if p.requires_grad]
    g_dense = torch.autograd.grad(dense.sum(), params, allow_unused=True)
    g_sparse = torch.autograd.grad(sparse.sum(), params, allow_unused=True)
    for a, b in zip(g_dense, g_sparse):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_explicit_zeros_in_csr_are_zeros():
    """A stored zero is the zero case (ZINB's dropout branch), not a non-zero count."""
    x = _counts()
    crow, col, vals = x.to_sparse_csr().crow_indices(), x.to_sparse_csr().col_indices(), x.to_sparse_csr().values()
    vals = vals.clone()
    vals[::3] = 0.0
    with_zeros = torch.sparse_csr_tensor(crow, col, vals, size=x.shape)
    mu, theta, gate = _params(40, 60, (60,))
    for make in LIKELIHOODS.values():
        d = make(mu, theta, gate)
        torch.testing.assert_close(d.log_prob(with_zeros), d.log_prob(with_zeros.to_dense()), rtol=1e-6, atol=1e-5)


def test_csr_entries_and_total_counts():
    x = _counts(density=0.3)
    rows, cols, vals = csr_entries(x.to_sparse_csr())
    assert torch.equal(x[rows, cols], vals)
    assert int((x != 0).sum()) == len(vals)
    torch.testing.assert_close(total_counts(x.to_sparse_csr()), x.sum(-1))
    torch.testing.assert_close(total_counts(x), x.sum(-1))
