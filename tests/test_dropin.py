"""scvi-tools drop-in surface of LinearSCVI: extra methods, return types, module keyword arguments,
and the Normal likelihood for non-integer data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_ldvae
from pyro_ldvae.tasks import posterior
from pyro_ldvae.tasks.expression import gene_mask


@pytest.fixture(scope="module")
def data():
    return pyro_ldvae.simulate(n_cells=200, n_genes=30, n_latent=2, n_batch=2, seed=1)


@pytest.fixture(scope="module")
def model(data):
    adata = data.copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = pyro_ldvae.LinearSCVI(adata, n_latent=2, n_hidden=16, seed=0)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    return model


# 1. Methods and attributes ---------------------------------------------------------------------
def test_view_setup_args_reads_saved_model(model, tmp_path):
    model.save(tmp_path / "m", prefix="p_")
    args = pyro_ldvae.LinearSCVI.view_setup_args(tmp_path / "m", prefix="p_")
    assert args["batch_key"] == "batch" and args["labels_key"] is None and args["layer"] is None
    assert args["categorical_covariate_keys"] == [] and args["check_counts"] is True


def test_view_anndata_setup(model, data):
    setup = model.view_anndata_setup()
    assert setup["batch_key"] == "batch" and setup["batch_categories"] == ["batch_0", "batch_1"]
    assert setup["n_vars"] == 30 and setup["n_obs"] == 200
    short = model.view_anndata_setup(data.copy(), hide_state_registries=True)
    assert "batch_categories" not in short
    unknown = data.copy()
    unknown.obs["batch"] = "batch_7"
    with pytest.raises(ValueError):
        model.view_anndata_setup(unknown)


def test_adata_setter_validates_genes(model, data):
    original = model.adata
    try:
        same = data.copy()
        model.adata = same
        assert model.adata is same and "_pyro_ldvae_setup" in same.uns
        assert np.isfinite(float(model.get_elbo()))
        with pytest.raises(ValueError, match="genes"):
            model.adata = data[:, ::-1].copy()
        with pytest.raises(ValueError, match="genes"):
            model.adata = data[:, :10].copy()
        with pytest.raises(ValueError):
            model.adata = None
        assert model.adata is same  # a refused AnnData leaves the model as it was
    finally:
        model.adata = original


@pytest.mark.parametrize("correlation_type", ["spearman", "pearson"])
def test_feature_correlation_matrix(model, correlation_type):
    torch.manual_seed(0)
    corr = model.get_feature_correlation_matrix(
        indices=np.arange(40), n_samples=3, correlation_type=correlation_type, transform_batch=["batch_0", "batch_1"]
    )
    assert isinstance(corr, pd.DataFrame) and corr.shape == (30, 30)
    assert list(corr.index) == list(model.var_names) == list(corr.columns)
    assert np.allclose(np.diag(corr), 1.0) and np.allclose(corr, corr.T)
    # the correlation of the samples themselves, computed directly
    draws = model.get_normalized_expression(indices=np.arange(40), n_samples=3, return_mean=False, library_size=1000)
    assert draws.shape == (3, 40, 30)
    with pytest.raises(ValueError, match="correlation_type"):
        model.get_feature_correlation_matrix(correlation_type="kendall")


def test_feature_correlation_pearson_matches_numpy(model):
    """One batch code: the matrix is np.corrcoef of the stacked normalized-expression draws."""
    torch.manual_seed(3)
    corr = model.get_feature_correlation_matrix(indices=np.arange(30), n_samples=2, correlation_type="pearson")
    torch.manual_seed(3)
    draws = model.get_normalized_expression(
        indices=np.arange(30), n_samples=2, return_mean=False, library_size=1000, batch_size=64
    )
    expected = np.corrcoef(draws.reshape(-1, 30), rowvar=False)
    np.testing.assert_allclose(corr.to_numpy(), expected, rtol=1e-4, atol=1e-5)


# 2. Return types --------------------------------------------------------------------------------
def test_evaluation_return_types_match_scvi(model):
    elbo = model.get_elbo()
    assert isinstance(elbo, torch.Tensor) and elbo.dim() == 0
    per_cell = model.get_elbo(indices=np.arange(7), return_mean=False)
    assert isinstance(per_cell, torch.Tensor) and per_cell.shape == (7,)
    ll = model.get_marginal_ll(indices=np.arange(5), n_mc_samples=20)
    assert isinstance(ll, float) and ll.ndim == 0  # numpy.float64, as scvi-tools returns
    ll_cells = model.get_marginal_ll(indices=np.arange(5), n_mc_samples=20, return_mean=False)
    assert isinstance(ll_cells, torch.Tensor) and ll_cells.shape == (5,)
    error = model.get_reconstruction_error(indices=np.arange(6))
    assert set(error) == {"reconstruction_loss"}
    assert isinstance(error["reconstruction_loss"], torch.Tensor) and error["reconstruction_loss"].dim() == 0
    cells = model.get_reconstruction_error(indices=np.arange(6), return_mean=False)["reconstruction_loss"]
    assert isinstance(cells, torch.Tensor) and cells.shape == (6,)


def test_posterior_predictive_sample_type_and_several_batches(model):
    sparse = pytest.importorskip("sparse")
    one = model.posterior_predictive_sample(indices=np.arange(8))
    assert isinstance(one, sparse.GCXS) and one.shape == (8, 30)
    dense = one.todense()
    assert np.allclose(dense, np.round(dense))
    # scvi-tools' positional order: adata, indices, transform_batch, n_samples
    many = model.posterior_predictive_sample(None, np.arange(8), None, 4)
    assert many.shape == (8, 30, 4)
    torch.manual_seed(0)
    both = model.posterior_predictive_sample(indices=np.arange(8), transform_batch=["batch_0", "batch_1"], n_samples=2)
    assert both.shape == (8, 30, 2)
    values = both.todense()
    assert (values >= 0).all() and not np.allclose(values, np.round(values))  # averaged over the two batches


@pytest.mark.parametrize(
    ("indices", "n_samples", "gene_list"),
    [
        (np.arange(150), 4, None),  # samples are the shortest axis; three blocks of 64 cells
        (np.arange(150), 1, None),  # (cells, genes): genes the shortest
        (np.arange(3), 5, None),  # cells the shortest
        (np.arange(140), 50, ["gene_1", "gene_4"]),  # genes the shortest of three
    ],
)
def test_posterior_predictive_sample_equals_gcxs_of_the_dense_draws(model, indices, n_samples, gene_list):
    sparse = pytest.importorskip("sparse")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        built = model.posterior_predictive_sample(
            indices=indices, n_samples=n_samples, gene_list=gene_list, batch_size=64
        )
        torch.manual_seed(3)
        cells, mask = model.get_cells(None), gene_mask(model.var_names, gene_list)
        blocks = posterior.posterior_predictive_blocks(model.module, cells, indices, n_samples, mask, 64)
        dense = torch.cat(list(blocks)).numpy()  # (cells, genes, n_samples)
    dense = dense[..., 0] if n_samples == 1 else dense
    reference = sparse.GCXS.from_numpy(np.ascontiguousarray(dense))
    assert built.shape == reference.shape and built.compressed_axes == reference.compressed_axes
    assert built.nnz == reference.nnz > 0
    for mine, theirs in zip(
        (built.data, built.indices, built.indptr), (reference.data, reference.indices, reference.indptr)
    ):
        np.testing.assert_array_equal(mine, theirs)


# 3. Module keyword arguments of scvi-tools' LDVAE / VAE -----------------------------------------
@pytest.fixture(scope="module")
def small(data):
    adata = data[:80].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    return adata


def test_batch_norm_places(small):
    both = pyro_ldvae.LinearSCVI(small, n_latent=2, n_hidden=8, use_batch_norm="both")
    assert both.module.decoder.factor_regressor.batch_norm is not None
    encoder_only = pyro_ldvae.LinearSCVI(small, n_latent=2, n_hidden=8, use_batch_norm="encoder")
    assert encoder_only.module.decoder.factor_regressor.batch_norm is None
    for place in ("decoder", "none"):
        with pytest.raises(ValueError, match="encoders' batch norm"):
            pyro_ldvae.LinearSCVI(small, n_latent=2, use_batch_norm=place)
    with pytest.raises(ValueError, match="use_batch_norm"):
        pyro_ldvae.LinearSCVI(small, n_latent=2, use_batch_norm="sometimes")


def test_accepted_scvi_module_kwargs_train_and_save(small, tmp_path):
    model = pyro_ldvae.LinearSCVI(
        small, n_latent=2, n_hidden=8, use_layer_norm="none", var_activation=torch.exp, encode_covariates=False,
        deeply_inject_covariates=False, extra_encoder_kwargs={}, extra_decoder_kwargs=None,
        use_size_factor_key=False, use_batch_norm="encoder",
    )  # fmt: skip
    model.train(max_epochs=1, batch_size=40, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = pyro_ldvae.LinearSCVI.load(tmp_path / "m", adata=small.copy(), accelerator="cpu")
    assert loaded.module.decoder.factor_regressor.batch_norm is None
    np.testing.assert_allclose(loaded.get_loadings().to_numpy(), model.get_loadings().to_numpy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_layer_norm": "both"}, "use_layer_norm"),
        ({"var_activation": torch.nn.functional.softplus}, "var_activation"),
        ({"encode_covariates": True}, "encode_covariates"),
        ({"deeply_inject_covariates": "yes"}, "deeply_inject_covariates"),
        ({"extra_encoder_kwargs": {"var_eps": 1e-3}}, "extra_encoder_kwargs"),
        ({"extra_decoder_kwargs": {"scale_activation": "softplus"}}, "extra_decoder_kwargs"),
        ({"use_size_factor_key": True}, "use_observed_lib_size=True"),
        ({"not_an_option": 1}, "unknown keyword"),
    ],
)
def test_refused_scvi_module_kwargs_raise_value_error(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyro_ldvae.LinearSCVI(small, n_latent=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        pyro_ldvae.LDVAE(n_input=30, use_observed_lib_size=True, **kwargs)


def test_latent_distribution_ln_is_accepted(small):
    model = pyro_ldvae.LinearSCVI(small, n_latent=2, n_hidden=8, latent_distribution="ln")
    latent = model.get_latent_representation()
    assert np.allclose(latent.sum(1), 1.0, atol=1e-4)


# 4. gene_likelihood='normal' for non-integer data -------------------------------------------------
def test_normal_likelihood_log_prob_dense_and_sparse():
    from pyro_ldvae.kernels.sparse import SparseCounts
    from pyro_ldvae.models.likelihoods import CellCounts, Normal, count_kernel, count_likelihood

    torch.manual_seed(0)
    mu, scale = torch.rand(4, 6) * 3, torch.rand(6) + 0.5
    x = torch.rand(4, 6) * (torch.rand(4, 6) > 0.5)
    px = count_likelihood("normal", mu, scale, None)
    assert isinstance(px, Normal)
    expected = torch.distributions.Normal(mu, scale).log_prob(x)
    torch.testing.assert_close(px.log_prob(x), expected)
    sparse_x = SparseCounts.from_scipy(__import__("scipy.sparse").sparse.csr_matrix(x.numpy()))
    torch.testing.assert_close(px.log_prob(sparse_x), expected)
    cell = CellCounts(px, kernel=count_kernel(sparse_x, px))
    torch.testing.assert_close(cell.log_prob(sparse_x), expected.sum(-1))
    draws = px.sample((2000,))
    torch.testing.assert_close(draws.mean(0), mu, atol=0.15, rtol=0)


@pytest.fixture(scope="module")
def log_normalized(data):
    import scipy.sparse as sp

    adata = data.copy()
    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    adata.layers["lognorm"] = lognorm
    adata.layers["lognorm_csr"] = sp.csr_matrix(lognorm)
    return adata


def test_normal_likelihood_needs_check_counts_off_for_counts_likelihoods(log_normalized):
    adata = log_normalized.copy()
    with pytest.raises(ValueError, match="gene_likelihood='normal'"):
        pyro_ldvae.LinearSCVI.setup_anndata(adata, layer="lognorm")


@pytest.mark.parametrize("layer", ["lognorm", "lognorm_csr"])
def test_normal_likelihood_trains_on_log_normalized_data(log_normalized, layer):
    adata = log_normalized.copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch", layer=layer, check_counts=False)
    # The observed library (total of the values) keeps mu = total * rho bounded; see docs/scvi_differences.md.
    model = pyro_ldvae.LinearSCVI(
        adata, n_latent=2, n_hidden=16, gene_likelihood="normal", use_observed_lib_size=True, seed=0
    )
    torch.manual_seed(0)
    before = float(model.get_elbo())
    model.train(max_epochs=8, batch_size=50, progress_bar=False, plan_kwargs={"lr": 1e-2})
    torch.manual_seed(0)
    after = float(model.get_elbo())
    assert np.isfinite(after) and after > before + 200, (before, after)
    params = model.get_likelihood_parameters(indices=np.arange(5))
    assert set(params) == {"mean", "dispersions"} and params["mean"].shape == (5, 30)
    assert (params["dispersions"] > 0).all()
    draws = model.posterior_predictive_sample(indices=np.arange(5), n_samples=2).todense()
    assert draws.shape == (5, 30, 2) and not np.allclose(draws, np.round(draws))
    assert np.isfinite(float(model.get_reconstruction_error()["reconstruction_loss"]))


# 5. scvi-tools keywords that mean nothing here are accepted ----------------------------------------
def test_silent_is_accepted_where_scvi_tools_takes_it(model):
    assert model.get_normalized_expression(indices=[0, 1], silent=False).shape == (2, model.adata.n_vars)
    assert model.posterior_predictive_sample(indices=[0, 1], silent=False).shape == (2, model.adata.n_vars)
    assert model.get_feature_correlation_matrix(indices=[0, 1, 2], n_samples=2, silent=False).shape[0] == 30


def test_size_factor_key_is_refused_with_the_reason(data):
    adata = data.copy()
    adata.obs["sf"] = 1.0
    with pytest.raises(ValueError, match="use_observed_lib_size=True"):
        pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
