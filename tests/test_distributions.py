"""Sparse-aware count likelihoods equal the dense formulas, values and gradients."""

from __future__ import annotations

import pytest
import torch

from pyro_ldvae.kernels.sparse import csr_entries, total_counts
from pyro_ldvae.models.likelihoods import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial


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


@pytest.mark.parametrize(
    "gene_likelihood,dispersion,observed",
    [("nb", "gene", False), ("zinb", "gene-batch", False), ("poisson", "gene", True), ("nb", "gene-cell", True)],
)
def test_module_elbo_is_the_same_for_sparse_and_dense_counts(gene_likelihood, dispersion, observed):
    """The model's 'x' site takes sparse CSR counts; the ELBO and its gradients do not change."""
    import pyro

    from pyro_ldvae import simulate
    from pyro_ldvae.data.minibatch import Minibatch
    from pyro_ldvae.models.ldvae import LDVAE

    adata = simulate(n_cells=64, n_genes=50, n_batch=2, seed=0)
    x = torch.as_tensor(adata.X.toarray())
    batch = torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)
    log_lib = x.sum(1).log()
    module = LDVAE(
        50,
        n_batch=2,
        gene_likelihood=gene_likelihood,
        dispersion=dispersion,
        use_observed_lib_size=observed,
        library_log_means=[[log_lib.mean().item()] * 2],
        library_log_vars=[[log_lib.var().item()] * 2],
    )
    results = []
    for counts in (x, x.to_sparse_csr()):
        pyro.set_rng_seed(0)
        module.zero_grad()
        elbo, per_cell = module.elbo(Minibatch(x=counts, batch=batch, labels=torch.zeros_like(batch)), n_obs=500)
        elbo.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
        results.append((elbo.detach(), per_cell.detach(), grads))
    (e_dense, c_dense, g_dense), (e_sparse, c_sparse, g_sparse) = results
    torch.testing.assert_close(e_sparse, e_dense, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_sparse, c_dense, rtol=1e-5, atol=1e-3)
    assert [a is None for a in g_dense] == [b is None for b in g_sparse]  # theta unused by Poisson
    # float32 sums in a different order: the gradient vectors agree to ~1e-5 relative (a bias before
    # batch norm has a gradient of zero plus rounding noise, so entries are not compared one by one)
    flat_dense = torch.cat([a.ravel() for a in g_dense if a is not None])
    flat_sparse = torch.cat([b.ravel() for b in g_sparse if b is not None])
    assert (flat_sparse - flat_dense).norm() <= 1e-4 * flat_dense.norm()


@pytest.mark.parametrize("theta_shape", [(12,), (7, 12)], ids=["gene", "cell-gene"])
def test_sparse_nb_hand_written_gradient_passes_gradcheck(theta_shape):
    """The fused NB log-density's backward is written by hand; check it against finite differences
    in float64, with a non-uniform upstream gradient (not only the per-cell sum)."""
    from pyro_ldvae.kernels.sparse_density import sparse_nb_log_prob

    g = torch.Generator().manual_seed(3)
    x = (torch.rand(7, 12, generator=g) < 0.4) * torch.randint(1, 9, (7, 12), generator=g)
    x = x.double().to_sparse_csr()
    mu = (torch.rand(7, 12, generator=g, dtype=torch.float64) * 5 + 0.01).requires_grad_()
    theta = (torch.rand(theta_shape, generator=g, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    weights = torch.rand(7, 12, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, t: (sparse_nb_log_prob(x, m, t) * weights).sum(), (mu, theta))
    assert torch.autograd.gradcheck(lambda m, t: sparse_nb_log_prob(x, m, t).sum(-1), (mu, theta))


def test_per_cell_sparse_nb_is_the_sum_of_the_elementwise_densities():
    """CellCounts (``NegativeBinomial.to_event(1)``) sums over genes without the (cells, genes) array:
    equal to the elementwise densities' sum, with a hand-written backward checked by finite differences."""
    from pyro_ldvae.kernels.sparse_density import sparse_nb_cell_log_prob, sparse_nb_log_prob
    from pyro_ldvae.models.likelihoods import CellCounts, NegativeBinomial, count_kernel

    g = torch.Generator().manual_seed(4)
    x = (torch.rand(9, 15, generator=g) < 0.3) * torch.randint(1, 12, (9, 15), generator=g)
    x[2] = 0  # a cell without counts
    x = x.double().to_sparse_csr()
    mu = (torch.rand(9, 15, generator=g, dtype=torch.float64) * 5 + 0.01).requires_grad_()
    theta = (torch.rand(15, generator=g, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    weights = torch.rand(9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, t: sparse_nb_cell_log_prob(x, m, t) * weights, (mu, theta))
    torch.testing.assert_close(sparse_nb_cell_log_prob(x, mu, theta), sparse_nb_log_prob(x, mu, theta).sum(-1))
    nb = NegativeBinomial(mu, theta)
    assert count_kernel(x, nb) == "sparse_nb_per_cell" and count_kernel(x.to_dense(), nb) == "dense"
    per_cell = CellCounts(nb, kernel="sparse_nb_per_cell")
    assert per_cell.expand([9]).kernel == "sparse_nb_per_cell" and per_cell.event_shape == (15,)
    torch.testing.assert_close(per_cell.log_prob(x), CellCounts(nb, kernel="sparse").log_prob(x))
    torch.testing.assert_close(per_cell.log_prob(x), CellCounts(nb).log_prob(x.to_dense()))
    # theta per cell and gene has no per-cell shortcut: the elementwise path, same values
    theta_cells = theta.detach().expand(9, 15).clone()
    assert sparse_nb_cell_log_prob(x, mu, theta_cells) is None
    assert count_kernel(x, NegativeBinomial(mu, theta_cells)) == "sparse"
    torch.testing.assert_close(
        CellCounts(NegativeBinomial(mu, theta_cells), kernel="sparse").log_prob(x),
        sparse_nb_log_prob(x, mu, theta).sum(-1),
    )


def test_dense_densities_are_the_zero_term_plus_the_count_term():
    """One formula per likelihood: at x = 0 the density is its zero term, and the count term vanishes."""
    from pyro_ldvae.kernels import count_terms as terms

    x = _counts(density=0.5)
    mu, theta, gate = (t.detach() for t in _params(40, 60, (60,)))
    log_denom = torch.log(theta + mu + terms.EPS)
    zero = terms.nb_zero_term(theta, torch.log(theta + terms.EPS), log_denom)
    count = terms.nb_count_term(x, mu, theta, log_denom, torch.lgamma(theta))
    torch.testing.assert_close(terms.log_nb(x, mu, theta), zero + count)
    assert torch.equal(count[x == 0], torch.zeros(int((x == 0).sum())))
    at_zero = (x == 0).expand_as(mu)
    torch.testing.assert_close(terms.log_nb(torch.zeros_like(x), mu, theta), zero)
    torch.testing.assert_close(
        terms.log_zinb(x, mu, theta, gate)[at_zero], terms.log_zinb_at_zero(mu, theta, gate)[at_zero]
    )
    assert torch.equal(terms.log_poisson(torch.zeros_like(x), mu), terms.poisson_zero_term(mu))


@pytest.mark.parametrize("kernel", ["sparse", "sparse_nb_per_cell"])
def test_hand_written_nb_backward_equals_autograd_of_the_dense_formula(kernel):
    """The sparse NB kernels' hand-written gradients against autograd of ``log_nb``, in float64."""
    from pyro_ldvae.kernels.count_terms import log_nb
    from pyro_ldvae.models.likelihoods import CellCounts

    g = torch.Generator().manual_seed(5)
    x = ((torch.rand(11, 20, generator=g) < 0.3) * torch.randint(1, 30, (11, 20), generator=g)).double()
    mu = (torch.rand(11, 20, generator=g, dtype=torch.float64) * 6).requires_grad_()
    theta = (torch.rand(20, generator=g, dtype=torch.float64) * 4 + 0.05).requires_grad_()
    weights = torch.rand(11, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient per cell
    reference = (log_nb(x, mu, theta).sum(-1) * weights).sum()
    ours = (CellCounts(NegativeBinomial(mu, theta), kernel=kernel).log_prob(x.to_sparse_csr()) * weights).sum()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (mu, theta)), torch.autograd.grad(reference, (mu, theta))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "gene_likelihood,dispersion,sparse,kernel",
    [
        ("nb", "gene", True, "sparse_nb_per_cell"),
        ("nb", "gene-batch", True, "sparse"),
        ("zinb", "gene", True, "sparse"),
        ("poisson", "gene", True, "sparse"),
        ("nb", "gene", False, "dense"),
    ],
)
def test_the_model_names_the_kernel_at_its_x_site(gene_likelihood, dispersion, sparse, kernel):
    """The ``'x'`` site is a CellCounts whose kernel follows the counts' layout and theta's shape."""
    import numpy as np
    from pyro import poutine

    from pyro_ldvae.data.minibatch import Minibatch
    from pyro_ldvae.models.ldvae import LDVAE
    from pyro_ldvae.models.likelihoods import CellCounts

    module = LDVAE(
        60,
        n_batch=2,
        gene_likelihood=gene_likelihood,
        dispersion=dispersion,
        library_log_means=np.full(2, 3.0),
        library_log_vars=np.full(2, 0.5),
    )
    x = _counts()
    batch = torch.arange(40) % 2
    mb = Minibatch(x=x.to_sparse_csr() if sparse else x, batch=batch, labels=torch.zeros_like(batch))
    site = poutine.trace(module.model).get_trace(mb).nodes["x"]
    assert isinstance(site["fn"], CellCounts) and site["fn"].kernel == kernel
