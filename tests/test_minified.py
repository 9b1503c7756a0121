"""Minified AnnData (``LinearSCVI.minify_adata``): the latent posterior stored, the counts dropped,
and the methods that work from the stored posterior (``pyro_ldvae.data.minified``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pyro_ldvae
from pyro_ldvae.data.minified import LATENT_QZM_KEY, LATENT_QZV_KEY, OBSERVED_LIB_SIZE_KEY


@pytest.fixture(scope="module")
def trained():
    adata = pyro_ldvae.simulate(n_cells=160, n_genes=25, n_latent=2, n_batch=2, seed=4)
    adata.obs["group"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    adata.layers["counts"] = adata.X.copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = pyro_ldvae.LinearSCVI(adata, n_latent=2, n_hidden=16, use_observed_lib_size=True, seed=0)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    return model


def _minified(trained, kind="latent_posterior_parameters"):
    """A copy of the trained model on a copy of its AnnData, minified."""
    full = trained.adata.copy()
    model = pyro_ldvae.LinearSCVI(full, n_latent=2, n_hidden=16, use_observed_lib_size=True, seed=0)
    model.module.load_state_dict(trained.module.state_dict())
    model.module.eval()
    qzm, qzv = model.get_latent_representation(return_dist=True)
    full.obsm["X_latent_qzm"], full.obsm["X_latent_qzv"] = qzm, qzv
    model.minify_adata(kind)
    return full, model


def test_minify_stores_the_posterior_and_drops_the_counts(trained):
    full, model = _minified(trained)
    mini = model.adata
    assert mini is not full and model.minified_data_type == "latent_posterior_parameters"
    assert full.X.sum() > 0 and "_scvi_adata_minify_type" not in full.uns  # the user's AnnData is untouched
    assert sp.issparse(mini.X) and mini.X.nnz == 0 and mini.layers["counts"].nnz == 0 and mini.raw is None
    np.testing.assert_array_equal(mini.obsm[LATENT_QZM_KEY], full.obsm["X_latent_qzm"])
    np.testing.assert_array_equal(mini.obsm[LATENT_QZV_KEY], full.obsm["X_latent_qzv"])
    np.testing.assert_allclose(mini.obs[OBSERVED_LIB_SIZE_KEY], np.asarray(full.X.sum(1)).ravel())
    assert trained.minified_data_type is None


def test_methods_work_from_the_stored_posterior(trained):
    full, model = _minified(trained)
    np.testing.assert_allclose(model.get_latent_representation(), full.obsm["X_latent_qzm"], rtol=1e-6)
    loc, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(var, full.obsm["X_latent_qzv"], rtol=1e-6)
    np.testing.assert_allclose(model.get_latent_library_size().ravel(), np.asarray(full.X.sum(1)).ravel(), rtol=1e-5)
    # the same draws as the full model's: the stored posterior is the encoder's
    torch.manual_seed(0)
    expr = model.get_normalized_expression(n_samples=3)
    torch.manual_seed(0)
    want = trained.get_normalized_expression(full, n_samples=3)
    np.testing.assert_allclose(expr.values, want.values, rtol=1e-5)
    sample = model.posterior_predictive_sample(n_samples=2)
    assert sample.shape == (*full.shape, 2) and sample.sum() > 0  # counts from the stored library sizes
    de = model.differential_expression(groupby="group", group1="a")
    assert set(de.index) == set(full.var_names) and np.isfinite(de["bayes_factor"]).all()


def test_what_needs_the_counts_says_so(trained):
    _, model = _minified(trained)
    for call in (model.get_elbo, model.get_reconstruction_error, lambda: model.get_marginal_ll(n_mc_samples=2)):
        with pytest.raises(ValueError, match="minify_adata dropped"):
            call()
    with pytest.raises(ValueError, match="minify_adata dropped"):
        model.get_normalized_expression(weights="importance", n_samples_overall=10)
    with pytest.raises(ValueError, match="minified"):
        model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="minified already"):
        model.minify_adata()


def test_minify_refuses_what_it_cannot_store(trained, data_with_latent_library):
    with pytest.raises(ValueError, match="use_observed_lib_size=True"):
        data_with_latent_library.minify_adata()
    model = pyro_ldvae.LinearSCVI(trained.adata.copy(), n_latent=2, n_hidden=16, use_observed_lib_size=True)
    with pytest.raises(ValueError, match="get_latent_representation\\(return_dist=True\\)"):
        model.minify_adata()
    model.adata.obsm["X_latent_qzm"] = model.adata.obsm["X_latent_qzv"] = np.zeros((model.adata.n_obs, 3))
    with pytest.raises(ValueError, match="n_latent"):
        model.minify_adata()
    with pytest.raises(ValueError, match="minified_data_type"):
        model.adata.obsm["X_latent_qzm"] = model.adata.obsm["X_latent_qzv"] = np.ones((model.adata.n_obs, 2))
        model.minify_adata("latent_posterior")


@pytest.fixture(scope="module")
def data_with_latent_library(trained):
    return pyro_ldvae.LinearSCVI(trained.adata.copy(), n_latent=2, n_hidden=16)


def test_with_counts_keeps_the_counts_and_the_elbo(trained):
    full, model = _minified(trained, "latent_posterior_parameters_with_counts")
    assert model.adata.X.sum() == full.X.sum()
    assert torch.isfinite(model.get_elbo())


def test_a_minified_model_saves_loads_and_trains_again_on_the_full_data(trained, tmp_path):
    full, model = _minified(trained)
    z = model.get_latent_representation()
    model.save(str(tmp_path / "mini"), save_anndata=True, prefix="m_")
    loaded = pyro_ldvae.LinearSCVI.load(str(tmp_path / "mini"), prefix="m_")
    assert loaded.minified_data_type == "latent_posterior_parameters" and loaded.adata.X.nnz == 0
    np.testing.assert_allclose(loaded.get_latent_representation(), z, rtol=1e-6)
    loaded.adata = full  # the full data again: training works
    loaded.train(max_epochs=1, batch_size=64, progress_bar=False)
    assert loaded.minified_data_type is None
    with pytest.raises(ValueError, match="use_observed_lib_size=True"):
        pyro_ldvae.LinearSCVI(model.adata, n_latent=2)  # a latent library cannot come from minified data
