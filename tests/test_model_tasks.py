"""The scVI tasks on LinearSCVI: normalized expression, batch correction, posterior predictive,
likelihood parameters, library size, reconstruction error, marginal likelihood, factors."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp

import pyro_ldvae

from .shared_models import pancreas_model, pbmc4k_model, shared_data


@pytest.fixture(scope="module")
def data():
    adata = pyro_ldvae.simulate(n_cells=500, n_genes=60, n_latent=3, n_batch=2, gene_likelihood="zinb", seed=0)
    rng = np.random.default_rng(0)
    adata.obs["site"] = rng.choice(["s1", "s2", "s3"], size=adata.n_obs)
    adata.obs["age"] = rng.normal(size=adata.n_obs).astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def model(data):
    adata = data[:400].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(
        adata, batch_key="batch", categorical_covariate_keys=["site"], continuous_covariate_keys=["age"]
    )
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=32, gene_likelihood="zinb", seed=0)
    model.train(max_epochs=15, batch_size=64, progress_bar=False, plan_kwargs={"lr": 5e-3})
    return model


def test_covariates_enter_decoder_but_not_loadings(model):
    head = model.module.decoder.factor_regressor.linear
    assert head.weight.shape == (60, 3 + 2 + 3 + 1)  # factors, batch, site, age
    loadings = model.get_loadings()
    assert list(loadings.columns) == ["Z_0", "Z_1", "Z_2"] and loadings.shape == (60, 3)
    # the continuous covariate changes the decoded expression
    other = model.adata.copy()
    other.obs["age"] = other.obs["age"] + 3.0
    pyro.set_rng_seed(0)
    base = model.get_normalized_expression(return_numpy=True)
    pyro.set_rng_seed(0)
    shifted = model.get_normalized_expression(other, return_numpy=True)
    assert not np.allclose(base, shifted)


def test_normalized_expression_shapes_and_scaling(model):
    frame = model.get_normalized_expression()
    assert isinstance(frame, pd.DataFrame) and frame.shape == (400, 60)
    assert list(frame.index) == list(model.adata.obs_names) and list(frame.columns) == list(model.var_names)
    assert np.allclose(frame.sum(1), 1.0, atol=1e-4)  # rho sums to one per cell
    pyro.set_rng_seed(1)
    scaled = model.get_normalized_expression(library_size=1e4, return_numpy=True, indices=[0, 5])
    pyro.set_rng_seed(1)
    unit = model.get_normalized_expression(return_numpy=True, indices=[0, 5])
    assert np.allclose(scaled, 1e4 * unit, rtol=1e-5)
    genes = ["gene_3", "gene_1"]
    subset = model.get_normalized_expression(gene_list=genes, indices=np.arange(7))
    assert subset.shape == (7, 2) and set(subset.columns) == set(genes)
    samples = model.get_normalized_expression(n_samples=4, return_mean=False, indices=np.arange(7))
    assert isinstance(samples, np.ndarray) and samples.shape == (4, 7, 60)
    overall = model.get_normalized_expression(n_samples_overall=50, indices=np.arange(7))
    assert overall.shape == (50, 60)
    with pytest.raises(ValueError, match="gene_list"):
        model.get_normalized_expression(gene_list=["nope"])


def test_latent_library_size_expression_matches_likelihood_mean(model):
    store_before = set(pyro.get_param_store().keys())
    pyro.set_rng_seed(2)
    expected = model.get_normalized_expression(library_size="latent", return_numpy=True, indices=np.arange(20))
    pyro.set_rng_seed(2)
    params = model.get_likelihood_parameters(indices=np.arange(20))
    assert np.allclose(expected, params["mean"], rtol=1e-5)
    assert set(params) == {"mean", "dispersions", "dropout"}
    assert params["dispersions"].shape == (20, 60) and (params["dispersions"] > 0).all()
    assert ((params["dropout"] > 0) & (params["dropout"] < 1)).all()
    many = model.get_likelihood_parameters(indices=np.arange(20), n_samples=3)
    assert many["mean"].shape == (3, 20, 60)
    assert set(pyro.get_param_store().keys()) == store_before  # the ZINB gate's params stay module-local


def test_transform_batch(model):
    codes = model.get_cells().batch
    own = np.flatnonzero(codes == 0)[:30]
    pyro.set_rng_seed(3)
    observed = model.get_normalized_expression(indices=own, return_numpy=True)
    pyro.set_rng_seed(3)
    into_own = model.get_normalized_expression(indices=own, transform_batch="batch_0", return_numpy=True)
    assert np.allclose(observed, into_own)  # decoding into a cell's own batch changes nothing
    pyro.set_rng_seed(3)
    into_other = model.get_normalized_expression(indices=own, transform_batch="batch_1", return_numpy=True)
    assert not np.allclose(observed, into_other, atol=1e-4)
    # several categories are averaged: compare with the mean of the two, on many samples
    kwargs = dict(indices=own[:5], n_samples=400, return_numpy=True)
    both = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"], **kwargs)
    mean = 0.5 * (
        model.get_normalized_expression(transform_batch="batch_0", **kwargs)
        + model.get_normalized_expression(transform_batch="batch_1", **kwargs)
    )
    assert np.abs(both - mean).max() < 0.1 * np.abs(mean).max()
    with pytest.raises(ValueError, match="transform_batch"):
        model.get_normalized_expression(transform_batch="batch_9")


def test_posterior_predictive_sample_is_counts(model):
    one = model.posterior_predictive_sample(indices=np.arange(10)).todense()
    assert one.shape == (10, 60) and (one >= 0).all() and np.allclose(one, np.round(one))
    many = model.posterior_predictive_sample(indices=np.arange(10), n_samples=3, gene_list=["gene_0", "gene_2"])
    assert many.shape == (10, 2, 3)
    moved = model.posterior_predictive_sample(indices=np.arange(10), transform_batch="batch_1").todense()
    assert moved.shape == (10, 60) and (moved >= 0).all()
    with pytest.raises(ValueError, match="transform_batch"):
        model.posterior_predictive_sample(transform_batch=["batch_0", "batch_9"])


def test_posterior_predictive_check_on_held_out_cells():
    """Posterior predictive draws for cells the model never saw reproduce per-gene means and
    zero fractions. (Observed library size: in a fit this short the latent library of LDVAE,
    ours and scvi-tools' alike, is still far from the observed totals.)"""
    data = pyro_ldvae.simulate(n_cells=500, n_genes=60, n_latent=3, n_batch=2, seed=0)
    train, held_out = data[:400].copy(), data[400:].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(train, batch_key="batch")
    model = pyro_ldvae.LinearSCVI(train, n_latent=3, n_hidden=32, use_observed_lib_size=True)
    # Enough Adam steps (lr x steps) for the per-gene decoder offsets to reach their values.
    model.train(max_epochs=30, batch_size=32, progress_bar=False, plan_kwargs={"lr": 2e-2})
    pyro.set_rng_seed(4)
    draws = model.posterior_predictive_sample(held_out, n_samples=5).todense()  # (cells, genes, samples)
    observed = held_out.X.toarray() if sp.issparse(held_out.X) else held_out.X
    log_mean_corr = np.corrcoef(np.log1p(observed.mean(0)), np.log1p(draws.mean((0, 2))))[0, 1]
    zero_corr = np.corrcoef((observed == 0).mean(0), (draws == 0).mean((0, 2)))[0, 1]
    assert log_mean_corr > 0.95 and zero_corr > 0.9, (log_mean_corr, zero_corr)


def test_library_reconstruction_and_marginal_likelihood(model):
    library = model.get_latent_library_size(indices=np.arange(50))
    assert library.shape == (50, 1) and (library > 0).all()
    observed = np.asarray(model.adata.X[:50].sum(1)).ravel()
    assert np.corrcoef(np.log(library.ravel()), np.log(observed))[0, 1] > 0.5
    error = model.get_reconstruction_error()
    assert set(error) == {"reconstruction_loss"} and error["reconstruction_loss"] > 0
    per_cell = model.get_reconstruction_error(indices=np.arange(9), return_mean=False)["reconstruction_loss"]
    assert per_cell.shape == (9,)
    pyro.set_rng_seed(5)
    elbo = model.get_elbo(indices=np.arange(100))
    marginal = model.get_marginal_ll(indices=np.arange(100), n_mc_samples=200)
    assert marginal > elbo  # importance sampling tightens the ELBO bound
    per_cell_ll = model.get_marginal_ll(indices=np.arange(4), n_mc_samples=50, return_mean=False)
    assert per_cell_ll.shape == (4,) and np.isfinite(per_cell_ll).all()


def test_ln_latent_give_mean_is_on_simplex(data):
    adata = data[:200].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=16, latent_distribution="ln")
    model.train(max_epochs=2, progress_bar=False)
    z = model.get_latent_representation(mc_samples=200)
    assert np.allclose(z.sum(1), 1.0, atol=1e-5) and (z > 0).all()


def test_factor_variance_explained_and_top_genes(model):
    frame = model.get_factor_variance_explained()
    assert list(frame.index) == ["Z_0", "Z_1", "Z_2"]
    assert ((frame["fraction"] > 0) & (frame["fraction"] <= 1)).all()
    ordered = model.get_factor_variance_explained(sort=True)
    assert list(ordered["rank"]) == [1, 2, 3] and ordered["variance"].is_monotonic_decreasing
    top = model.get_top_genes(n_top=4)
    assert list(top.columns) == ["factor", "direction", "rank", "gene", "loading"] and len(top) == 3 * 2 * 4
    loadings = model.get_loadings()
    for factor in loadings.columns:
        pos = top[(top.factor == factor) & (top.direction == "positive")].sort_values("rank")
        assert list(pos.gene) == list(loadings[factor].nlargest(4).index)
        neg = top[(top.factor == factor) & (top.direction == "negative")].sort_values("rank")
        assert list(neg.gene) == list(loadings[factor].nsmallest(4).index)
    by_variance = model.get_top_genes(n_top=1, order_by_variance=True)
    assert list(by_variance.factor.unique()) == list(ordered.index)


def test_factor_variance_known_answer(model):
    """A factor whose decoder column is zeroed explains nothing; the others are unchanged."""
    import copy

    clone = copy.copy(model)
    clone.module = copy.deepcopy(model.module)
    with np.errstate(all="ignore"):
        clone.module.decoder.factor_regressor.linear.weight.data[:, 1] = 0.0
    before, after = model.get_factor_variance_explained(), clone.get_factor_variance_explained()
    assert after.loc["Z_1", "variance"] == 0.0
    assert np.allclose(after.loc[["Z_0", "Z_2"], "variance"], before.loc[["Z_0", "Z_2"], "variance"], rtol=1e-5)


def test_running_moments_equal_variance_of_all_rows():
    """Variances merged block by block (no (cells, genes) matrix held) equal torch.var of all rows."""
    import torch

    from pyro_ldvae.tasks.posterior import RunningMoments

    rows = torch.randn(1000, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 100
    moments = RunningMoments()
    for block in torch.split(rows, [1, 400, 0, 255, 344]):
        moments.update(block)
    assert moments.count == 1000
    torch.testing.assert_close(moments.variance(), rows.var(0, unbiased=False), rtol=1e-12, atol=0)
    assert torch.isnan(RunningMoments().variance())


def test_to_adata_is_h5ad_writable_and_scanpy_ready(model, tmp_path):
    adata = model.to_adata()
    assert adata.obsm["X_ldvae"].shape == (400, 3) and adata.varm["ldvae_loadings"].shape == (60, 3)
    uns = adata.uns["ldvae"]
    assert len(uns["variance_explained"]) == 3 and len(uns["history"]["elbo_train"]) == 15
    path = tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert np.allclose(back.obsm["X_ldvae"], adata.obsm["X_ldvae"])
    assert back.uns["ldvae"]["params"]["n_latent"] == 3
    # what sc.pp.neighbors(adata, use_rep="X_ldvae") needs: a float (cells, n_latent) array
    assert back.obsm["X_ldvae"].dtype == np.float32 and back.obsm["X_ldvae"].shape == (400, 3)


def test_tl_ldvae_fits_and_stores(data):
    adata = data[:200].copy()
    model = pyro_ldvae.tl.ldvae(adata, n_latent=2, n_hidden=16, max_epochs=2, batch_key="batch", return_model=True)
    assert isinstance(model, pyro_ldvae.LinearSCVI)
    assert adata.obsm["X_ldvae"].shape == (200, 2) and "ldvae" in adata.uns
    copy = pyro_ldvae.tl.ldvae(data[:200].copy(), n_latent=2, n_hidden=16, max_epochs=1, copy=True, key_added="lv")
    assert copy.obsm["X_lv"].shape == (200, 2) and copy.varm["lv_loadings"].shape == (60, 2)


# ----------------------------------------------------------------------------------------
# Real data (../shared/data)
# ----------------------------------------------------------------------------------------
def _same_donor_fraction(expression: np.ndarray, donors: np.ndarray, k: int = 15) -> float:
    """kNN donor-mixing score: the mean share of a cell's k nearest neighbours (PCA of log
    expression) from its own donor; lower means better mixed."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    logs = np.log(expression + 1e-4)
    pcs = PCA(n_components=20, random_state=0).fit_transform(logs - logs.mean(0))
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(pcs).kneighbors(pcs, return_distance=False)[:, 1:]
    return float((donors[neighbours] == donors[:, None]).mean())


@shared_data
def test_pancreas_batch_correction_mixes_donors():
    model = pancreas_model()
    donors = model.adata.obs["donor"].to_numpy()
    pyro.set_rng_seed(0)
    uncorrected = model.get_normalized_expression(return_numpy=True)
    corrected = model.get_normalized_expression(transform_batch=model.registry.batch_categories, return_numpy=True)
    before, after = _same_donor_fraction(uncorrected, donors), _same_donor_fraction(corrected, donors)
    assert after < before - 0.1, (before, after)


@shared_data
def test_pbmc4k_posterior_predictive_check_on_held_out_cells():
    model, held_out = pbmc4k_model()
    pyro.set_rng_seed(0)
    draws = model.posterior_predictive_sample(held_out, n_samples=3).todense()  # (cells, genes, samples)
    observed = held_out.X.toarray()
    log_mean_corr = np.corrcoef(np.log1p(observed.mean(0)), np.log1p(draws.mean((0, 2))))[0, 1]
    zero_corr = np.corrcoef((observed == 0).mean(0), (draws == 0).mean((0, 2)))[0, 1]
    assert log_mean_corr > 0.95 and zero_corr > 0.95, (log_mean_corr, zero_corr)
