"""The tasks' fast path (one encoder pass per cell, folded decoder, sparse likelihood) against the traced path."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

import pyro_ldvae
from pyro_ldvae.tasks import draws as draws_module
from pyro_ldvae.tasks import importance, posterior


def small_model(gene_likelihood: str = "nb", observed: bool = False):
    adata = pyro_ldvae.simulate(n_cells=50, n_genes=30, n_batch=2, gene_likelihood=gene_likelihood, seed=1)
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=16, seed=0, use_observed_lib_size=observed)
    model.train(max_epochs=2, batch_size=25, progress_bar=False)
    return model


def both_paths(monkeypatch, run):
    """``run()`` on the fast path and on the traced path, each from the same RNG state."""
    pyro.set_rng_seed(3)
    fast = run()
    monkeypatch.setattr(posterior, "has_fast_path", lambda module: False)
    monkeypatch.setattr(importance, "has_fast_path", lambda module: False)
    pyro.set_rng_seed(3)
    traced = run()
    monkeypatch.undo()
    return fast, traced


@pytest.mark.parametrize("gene_likelihood, observed", [("nb", False), ("zinb", True)])
def test_fast_draws_equal_traced_draws(monkeypatch, gene_likelihood, observed):
    model = small_model(gene_likelihood, observed)
    module, cells = model.module, model.get_cells()
    idx = np.arange(cells.n_obs)
    assert draws_module.has_fast_path(module)
    # Six samples of 50 cells x 30 genes fit one pass: both paths draw the same z and l.
    for library_size in (1.0, "latent"):
        fast, traced = both_paths(
            monkeypatch,
            lambda size=library_size: posterior.normalized_expression(
                module, cells, idx, [None, 1], library_size=size, n_samples=6
            ),
        )
        np.testing.assert_allclose(fast, traced, rtol=1e-4, atol=1e-7)
    fast, traced = both_paths(monkeypatch, lambda: posterior.marginal_ll(module, cells, idx, n_mc_samples=6))
    np.testing.assert_allclose(fast, traced, rtol=1e-5, atol=1e-3)
    fast, traced = both_paths(monkeypatch, lambda: importance.group_draws(module, cells, idx[:20], 4, batch_code=0))
    np.testing.assert_allclose(fast.rho.numpy(), traced.rho.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast.log_prior_z.numpy(), traced.log_prior_z.numpy(), rtol=1e-5)
    # Predictive draws are random counts: compare their means over many draws.
    pyro.set_rng_seed(0)
    draws = torch.cat(list(posterior.posterior_predictive_blocks(module, cells, idx, n_samples=200)))
    counts = draws.mean((0, 2)).numpy()  # over cells and samples
    expected = posterior.normalized_expression(module, cells, idx, library_size="latent", n_samples=200).mean((0, 1))
    if gene_likelihood == "zinb":
        expected = None  # the gate lowers the mean; checked for NB only
    if expected is not None:
        np.testing.assert_allclose(counts, expected, rtol=0.15, atol=0.05)


def test_mean_of_samples_is_summed_pass_by_pass(monkeypatch):
    model = small_model()
    module, cells = model.module, model.get_cells()
    idx = np.arange(cells.n_obs)
    monkeypatch.setattr(posterior, "MAX_ELEMENTS", 50 * 30 * 2)  # two samples per pass, several passes
    pyro.set_rng_seed(5)
    draws = posterior.normalized_expression(module, cells, idx, library_size=1e4, n_samples=7)
    pyro.set_rng_seed(5)
    mean = posterior.normalized_expression(module, cells, idx, library_size=1e4, n_samples=7, return_mean=True)
    assert draws.shape == (7, 50, 30) and mean.shape == (1, 50, 30)
    np.testing.assert_allclose(mean[0], draws.mean(0), rtol=1e-5)
    frame = model.get_normalized_expression(n_samples=7, library_size=1e4)
    assert frame.shape == (50, 30) and np.allclose(frame.sum(1), 1e4, rtol=1e-3)


def test_importance_weights_table_equals_elementwise_likelihoods():
    model = small_model()
    module, cells = model.module, model.get_cells()
    idx = np.arange(20)
    pyro.set_rng_seed(0)
    group = importance.group_draws(module, cells, idx, 5)
    x = cells.rows_tensor(idx, sparse=True)
    table = importance.nb_log_likelihood_table(group.rho, group.theta, x.crow_indices(), x.col_indices(), x.values())
    elementwise = importance.count_log_likelihoods(module, group, cells.rows_tensor(idx))
    np.testing.assert_allclose(table.numpy(), elementwise.double().numpy(), rtol=1e-5, atol=2e-3)
