"""The table of NB log-likelihoods of many cells under many draws, against the elementwise density."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_ldvae.kernels.count_terms import log_nb
from pyro_ldvae.kernels.nb_table import chebyshev_interpolate, chebyshev_nodes, nb_log_likelihood_table, nodes_for


def reference(rho, theta, x):
    library = x.sum(1)
    return torch.stack([log_nb(x[a], library[a] * rho, theta).sum(-1) for a in range(len(x))], 1)


@pytest.mark.parametrize("log_range", [(5.0, 5.0), (4.0, 10.0), (2.0, 12.0)])
def test_table_equals_elementwise_density(log_range):
    g = torch.Generator().manual_seed(0)
    n_draws, n_cells, n_genes = 30, 25, 400
    rho = torch.softmax(2 * torch.randn(n_draws, n_genes, generator=g, dtype=torch.float64), -1)
    theta = torch.exp(torch.randn(n_genes, generator=g, dtype=torch.float64))
    low, high = log_range
    library = torch.exp(low + (high - low) * torch.rand(n_cells, 1, generator=g, dtype=torch.float64))
    x = torch.poisson(library * rho[:1].expand(n_cells, -1), generator=g)
    x[3] = 0  # an empty cell
    x_csr = x.float().to_sparse_csr()
    table = nb_log_likelihood_table(
        rho.float(), theta.float(), x_csr.crow_indices(), x_csr.col_indices(), x_csr.values()
    )
    expected = reference(rho, theta, x)
    # float32 arithmetic on sums of up to 1e5 nats: the dense float32 density is off by as much (1e-6 relative)
    assert torch.allclose(table, expected, rtol=1e-5, atol=1e-2)
    assert table.shape == (n_draws, n_cells)


def test_chebyshev_interpolation_of_a_softplus_sum_reaches_its_tolerance():
    low, high = 3.0, 11.0
    nodes = chebyshev_nodes(low, high, nodes_for(high - low))
    shifts = torch.linspace(-12, -2, 50, dtype=torch.float64)
    f = lambda u: torch.nn.functional.softplus(u[:, None] + shifts).sum(-1)  # noqa: E731
    at = torch.linspace(low, high, 101, dtype=torch.float64)
    interpolated = chebyshev_interpolate(f(nodes)[None], low, high, at)[0]
    assert torch.allclose(interpolated, f(at), rtol=1e-8, atol=1e-8)
    assert nodes_for(2.0) < nodes_for(8.0) <= 64 and math.isfinite(nodes_for(0.0))
