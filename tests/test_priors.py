"""Priors on the loadings and on z (pyro_ldvae/priors.py and their use in LDVAE / LinearSCVI).

The statistical tests fit small simulated data sets (a few thousand cells, 200 genes) without
KL warm-up and with a larger learning rate than scvi-tools' default, so that they converge in
about a thousand steps; the factor-selection test trains with the defaults a user gets. All runs
are seeded.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro_ldvae.priors import (
    ARD,
    GaussianMixture,
    Horseshoe,
    LearnedScaleNormal,
    NormalLoadings,
    resolve_loadings_prior,
)
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from pyro_ldvae import LDVAE, LinearSCVI, Minibatch, simulate

FAST = dict(n_epochs_kl_warmup=None, lr=3e-2)


def fit(adata, max_epochs: int, n_latent: int = 10, batch_size: int = 128, **model_kwargs) -> LinearSCVI:
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=n_latent, **model_kwargs)
    model.train(max_epochs=max_epochs, batch_size=batch_size, train_size=1.0, progress_bar=False, plan_kwargs=FAST)
    return model


def active_factors(loadings: np.ndarray) -> int:
    """Factors whose loadings norm exceeds 10% of the largest."""
    norms = np.linalg.norm(loadings, axis=0)
    return int((norms > 0.1 * norms.max()).sum())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties averaged."""
    ranks = rankdata(scores)
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def matched(loadings: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The fitted factors matched one-to-one to the true ones by |correlation|, ``(genes, n_true)``."""
    k = loadings.shape[1]
    corr = np.nan_to_num(np.abs(np.corrcoef(loadings.T, truth.T)[:k, k:]))
    rows, cols = linear_sum_assignment(-corr)
    out = np.zeros_like(truth)
    out[:, cols] = loadings[:, rows]
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models step fastest on one thread, and do not slow down when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# Fits shared by several tests
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_data():
    """5 factors, each touching 5% of 200 genes."""
    return simulate(n_cells=2000, n_genes=200, n_latent=5, seed=1, loadings_density=0.05, loadings_scale=1.0)


@pytest.fixture(scope="module")
def horseshoe_fit(sparse_data):
    return fit(sparse_data, 60, loadings_prior="horseshoe")


# ------------------------------------------------------------------------------------------
# What the priors must show
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_horseshoe_selects_factors_and_finds_sparse_loadings(horseshoe_fit, sparse_data):
    mean, std = horseshoe_fit.get_loadings(return_std=True)
    # principal axes of the factor logits: a column-by-column norm counts a signal split over two columns twice
    assert abs(len(horseshoe_fit.get_active_factors()) - 5) <= 1
    assert (std.values > 0).all()
    truth = sparse_data.varm["true_loadings"]
    score = auroc(truth.ravel() != 0, np.abs(matched(mean.values, truth)).ravel())
    default = fit(sparse_data, 60)  # point-estimate loadings, batch norm: scvi-tools' LDVAE
    score_default = auroc(truth.ravel() != 0, np.abs(matched(default.get_loadings().values, truth)).ravel())
    print(f"sparsity AUROC: horseshoe {score:.3f}, point estimate {score_default:.3f}")
    assert score >= 0.9
    assert score > score_default


@pytest.mark.slow
def test_ard_selects_factors():
    adata = simulate(n_cells=2000, n_genes=200, n_latent=5, seed=1)
    model = fit(adata, 100, loadings_prior="ard")
    norms = np.linalg.norm(model.get_loadings().values, axis=0)
    print("ARD relative factor norms:", np.round(norms / norms.max(), 3))
    assert active_factors(model.get_loadings().values) <= 6


@pytest.mark.slow
def test_normal_prior_intervals_are_calibrated():
    # Few cells: posterior std (~0.07) well above the bias left by a short amortised fit (~0.05).
    adata = simulate(n_cells=150, n_genes=200, n_latent=5, seed=2, loadings_scale=0.5)
    model = fit(adata, 600, n_latent=5, batch_size=50, loadings_prior="normal", loadings_prior_scale=0.5)
    mean, std = model.module.get_loadings(return_std=True)
    coverage = interval_coverage(mean, std, adata.varm["true_loadings"])
    print(f"coverage of the 90% posterior intervals: {coverage:.3f}")
    assert 0.75 <= coverage <= 0.98


def interval_coverage(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, z: float = 1.6449) -> float:
    """Fraction of true loadings inside the central 90% Normal posterior interval, after alignment.

    The likelihood identifies W only up to a rotation (z ~ N(0, I) is rotation invariant) and a
    per-factor constant added to every gene (softmax is shift invariant), so both sides are centred
    over genes and the estimate is rotated onto the truth (orthogonal Procrustes) first; the
    posterior std is rotated with it (entries independent under the mean-field guide).
    """
    mean_c, truth_c = mean - mean.mean(0), truth - truth.mean(0)
    rotation, _ = orthogonal_procrustes(mean_c, truth_c)
    aligned = mean_c @ rotation
    aligned_std = np.sqrt(std**2 @ rotation**2)
    return float((np.abs(truth_c - aligned) <= z * aligned_std).mean())


# ------------------------------------------------------------------------------------------
# The extension points and the plumbing
# ------------------------------------------------------------------------------------------
def small_module(**kwargs) -> LDVAE:
    return LDVAE(
        50, n_latent=3, n_hidden=16, library_log_means=np.array([5.0]), library_log_vars=np.array([0.2]), **kwargs
    )


def small_minibatch(n_cells: int = 8, n_genes: int = 50) -> Minibatch:
    x = torch.poisson(torch.full((n_cells, n_genes), 3.0))
    batch = torch.zeros(n_cells, dtype=torch.long)
    return Minibatch(x=x, batch=batch, labels=batch, idx=torch.arange(n_cells))


def test_custom_student_t_prior_trains_and_its_sites_are_in_the_trace():
    def student_t(n_genes, n_latent):
        df = pyro.sample("loadings_df", dist.Gamma(2.0, 0.5))
        return pyro.sample("loadings", dist.StudentT(df, 0.0, 0.3).expand([n_genes, n_latent]).to_event(2))

    adata = simulate(n_cells=300, n_genes=50, n_latent=3, seed=3)
    model = fit(adata, 5, n_latent=3, loadings_prior=student_t)
    assert np.isfinite(model.history["elbo_train"].values).all()
    mb = small_minibatch(n_genes=50)
    model_trace = poutine.trace(model.module.model).get_trace(mb)
    guide_trace = poutine.trace(model.module.guide).get_trace(mb)
    for name in ("loadings_df", "loadings"):
        assert name in model_trace.nodes and name in guide_trace.nodes
    assert isinstance(model_trace.nodes["loadings"]["fn"].base_dist, dist.StudentT)
    names = [n for n, _ in model.module.named_parameters()]
    assert any("loadings_df" in n for n in names)  # the guide's params are the module's nn.Parameters
    mean, std = model.get_loadings(return_std=True)
    assert mean.shape == (50, 3) and np.isfinite(std.values).all()


def test_global_terms_are_unscaled_and_local_terms_scaled_in_the_minibatch_elbo():
    module = small_module(loadings_prior="normal")
    mb = small_minibatch(n_cells=8)
    guide_trace = poutine.trace(module.guide).get_trace(mb, 800)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(mb, 800)
    assert model_trace.nodes["loadings"]["scale"] == 1.0
    assert model_trace.nodes["z"]["scale"] == pytest.approx(100.0)
    assert model_trace.nodes["x"]["scale"] == pytest.approx(100.0)
    # the ELBO is the data term scaled by n_obs / cells minus the unscaled KL of W
    torch.manual_seed(0)
    elbo, per_cell = module.elbo(mb, n_obs=800)
    torch.manual_seed(0)
    elbo_full_batch, _ = module.elbo(mb, n_obs=8)
    w_kl = elbo_full_batch - per_cell.sum()
    assert elbo.item() == pytest.approx((100 * per_cell.sum() + w_kl).item(), rel=1e-4)


def test_default_model_is_unchanged_and_priors_disable_batch_norm():
    default = small_module()
    assert default.global_guide is None and default.loadings_prior is None
    assert default.use_batch_norm and default.decoder.factor_regressor.batch_norm is not None
    names = [n for n, _ in default.named_parameters()]
    assert not any("global_guide" in n for n in names)
    trace = poutine.trace(default.model).get_trace(small_minibatch())
    assert "decoder.factor_regressor.linear.weight" in trace.nodes  # W is a param, not a sample site
    assert "loadings" not in trace.nodes

    bayes = small_module(loadings_prior="horseshoe")
    assert not bayes.use_batch_norm and bayes.decoder.factor_regressor.linear.bias is not None
    with pytest.raises(ValueError, match="use_batch_norm"):
        small_module(loadings_prior="ard", use_batch_norm=True)
    with pytest.raises(ValueError, match="no posterior std"):
        default.get_loadings(return_std=True)


def test_named_priors_resolve_with_their_arguments():
    assert isinstance(resolve_loadings_prior("normal", 0.3), NormalLoadings)
    assert resolve_loadings_prior("normal", 0.3).scale == 0.3
    assert resolve_loadings_prior("horseshoe", 2.0).slab_scale == 2.0
    assert resolve_loadings_prior("horseshoe", global_scale=0.05).global_scale == 0.05
    assert isinstance(resolve_loadings_prior("ard"), ARD)
    assert resolve_loadings_prior(None) is None
    with pytest.raises(ValueError, match="loadings_prior must be"):
        resolve_loadings_prior("spike-and-slab")
    with pytest.raises(ValueError, match="without a loadings_prior"):
        resolve_loadings_prior(None, 1.0)
    with pytest.raises(ValueError, match="global_scale"):
        Horseshoe(global_scale=0.0)


@pytest.mark.parametrize("name", ["normal", "laplace", "horseshoe", "ard"])
def test_each_named_prior_draws_loadings_of_the_right_shape(name):
    loadings = resolve_loadings_prior(name)(40, 4)
    assert loadings.shape == (40, 4) and torch.isfinite(loadings).all()


def test_horseshoe_is_finite_when_local_scales_overflow():
    prior = Horseshoe()
    data = {"loadings_local_scale": torch.full((5, 2), float("inf")), "loadings_raw": torch.ones(5, 2)}
    loadings = poutine.condition(prior, data=data)(5, 2)
    assert torch.isfinite(loadings).all()


@pytest.mark.parametrize("z_prior_cls", [LearnedScaleNormal, GaussianMixture])
def test_z_prior_extension_point(z_prior_cls):
    module = small_module(z_prior=z_prior_cls(3))
    names = [n for n, _ in module.named_parameters()]
    assert any(n.startswith("z_prior.") for n in names)  # learnable, trained with the rest
    mb = small_minibatch()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in module.z_prior.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        elbo, per_cell = module.elbo(mb)
        (-elbo).backward()
        optimizer.step()
    assert torch.isfinite(per_cell).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.z_prior.parameters()))
    trace = poutine.trace(module.model).get_trace(mb)
    assert trace.nodes["z"]["value"].shape == (8, 3)


def test_linear_scvi_passes_the_prior_through():
    adata = simulate(n_cells=200, n_genes=30, n_latent=2, seed=4)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, loadings_prior="laplace", loadings_prior_scale=0.2)
    assert model.module.loadings_prior.scale == 0.2
    model.train(max_epochs=2, progress_bar=False)
    mean, std = model.get_loadings(return_std=True)
    assert list(mean.columns) == ["Z_0", "Z_1"] and list(std.index) == list(adata.var_names)


def test_prior_model_loadings_are_reproducible_and_survive_save_load(tmp_path):
    """The posterior-mean loadings are a Monte Carlo summary with a fixed seed: same model, same numbers."""
    adata = simulate(n_cells=200, n_genes=30, n_latent=2, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, loadings_prior="horseshoe")
    model.train(max_epochs=2, progress_bar=False)
    first = model.get_loadings().to_numpy()
    torch.manual_seed(123)  # the caller's random state does not matter ...
    np.testing.assert_array_equal(model.get_loadings().to_numpy(), first)
    model.save(tmp_path / "model")
    loaded = LinearSCVI.load(tmp_path / "model", adata=adata)
    np.testing.assert_array_equal(loaded.get_loadings().to_numpy(), first)


def student_t_loadings(n_genes: int, n_latent: int) -> torch.Tensor:
    """A user's prior: Student-t loadings with a learned degrees-of-freedom."""
    df = pyro.sample("loadings_df", dist.Gamma(2.0, 0.5))
    return pyro.sample("loadings", dist.StudentT(df, 0.0, 0.3).expand([n_genes, n_latent]).to_event(2))


def test_a_model_with_custom_priors_saves_and_loads_with_the_same_code(tmp_path):
    """Code is not saved: load names the saved prior and asks for it; given again, every weight
    (the guide's for W and the mixture prior's) comes back."""
    adata = simulate(n_cells=200, n_genes=30, n_latent=3, seed=5)
    model = fit(adata, 3, n_latent=3, loadings_prior=student_t_loadings, z_prior=GaussianMixture(3))
    model.save(tmp_path / "custom")
    with pytest.raises(ValueError, match=r"custom loadings_prior \(tests\.test_priors\.student_t_loadings\)"):
        LinearSCVI.load(tmp_path / "custom", adata)
    with pytest.raises(ValueError, match=r"custom z_prior \(pyro_ldvae\.models\.priors\.GaussianMixture\)"):
        LinearSCVI.load(tmp_path / "custom", adata, loadings_prior=student_t_loadings)
    loaded = LinearSCVI.load(tmp_path / "custom", adata, loadings_prior=student_t_loadings, z_prior=GaussianMixture(3))
    saved_state, loaded_state = model.module.state_dict(), loaded.module.state_dict()
    assert saved_state.keys() == loaded_state.keys() and any(k.startswith("z_prior.") for k in saved_state)
    for key, value in saved_state.items():
        assert torch.equal(value.cpu(), loaded_state[key].cpu()), key
    np.testing.assert_array_equal(loaded.get_loadings().to_numpy(), model.get_loadings().to_numpy())
    assert np.isfinite(loaded.get_latent_representation()).all()


def test_loading_with_a_prior_the_model_was_not_saved_with_is_an_error(tmp_path):
    adata = simulate(n_cells=150, n_genes=20, n_latent=2, seed=6)
    model = fit(adata, 1, n_latent=2, loadings_prior="laplace")
    model.save(tmp_path / "named")
    with pytest.raises(ValueError, match="saved with loadings_prior='laplace', not with a custom one"):
        LinearSCVI.load(tmp_path / "named", adata, loadings_prior=student_t_loadings)
    assert LinearSCVI.load(tmp_path / "named", adata).init_params_["loadings_prior"] == "laplace"


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["horseshoe", "ard"])
@pytest.mark.parametrize(("n_true", "seed"), [(3, 0), (5, 1)])
def test_shrinkage_selects_the_true_number_of_factors_with_default_training(prior, n_true, seed):
    adata = simulate(n_cells=600, n_genes=150, n_latent=n_true, seed=seed)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=20, loadings_prior=prior, seed=seed)
    model.train(max_epochs=200, progress_bar=False)  # default plan: no plan_kwargs
    active = model.get_active_factors()  # default rule
    print(f"{prior}, {n_true} true factors, seed {seed}: {len(active)} active")
    assert abs(len(active) - n_true) <= 1
