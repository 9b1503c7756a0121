"""LinearSCVI end to end on simulated data: every option trains, loadings are recovered, seeding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

import pyro_ldvae
from pyro_ldvae import LinearSCVI


def mean_principal_cosine(true: np.ndarray, learned: np.ndarray) -> float:
    """Mean cosine of the principal angles between the column spaces of gene-centred loadings.

    Softmax makes each loading column identifiable only up to an added constant (hence the
    centring over genes) and the isotropic prior makes factors identifiable only up to rotation
    (hence subspace angles rather than column-by-column comparison).
    """
    angles = scipy.linalg.subspace_angles(true - true.mean(0), learned - learned.mean(0))
    return float(np.cos(angles).mean())


@pytest.fixture(scope="module")
def combo_adata():
    adata = pyro_ldvae.simulate(n_cells=130, n_genes=40, n_latent=2, n_batch=2, seed=5)
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    return adata


COMBOS = list(
    itertools.product(
        ["gene", "gene-batch", "gene-label", "gene-cell"], ["nb", "zinb", "poisson"], ["normal", "ln"], [False, True]
    )
)


@pytest.mark.parametrize("dispersion, gene_likelihood, latent_distribution, with_batches", COMBOS)
def test_every_option_trains_one_epoch(combo_adata, dispersion, gene_likelihood, latent_distribution, with_batches):
    adata = combo_adata.copy()
    LinearSCVI.setup_anndata(adata, batch_key="batch" if with_batches else None, labels_key="label")
    model = LinearSCVI(
        adata,
        n_latent=3,
        dispersion=dispersion,
        gene_likelihood=gene_likelihood,
        latent_distribution=latent_distribution,
    )
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    assert np.isfinite(model.get_elbo())
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 3)
    if latent_distribution == "ln":
        np.testing.assert_allclose(latent.sum(1), 1.0, rtol=1e-4)  # mean of softmax(z) is on the simplex
    loadings = model.get_loadings()
    assert loadings.shape == (adata.n_vars, 3)
    assert list(loadings.columns) == ["Z_0", "Z_1", "Z_2"]
    assert (loadings.index == adata.var_names).all()
    expected_columns = 3 + (2 if with_batches else 0)
    assert model.module.decoder.factor_regressor.linear.weight.shape == (adata.n_vars, expected_columns)


def test_recovers_true_loadings():
    adata = pyro_ldvae.simulate(n_cells=5000, n_genes=1000, n_latent=5, seed=1)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=5)
    # 40 epochs: at 20, some draws of the same simulation (seeds 1-4) still have two factors mixed
    model.train(max_epochs=40, plan_kwargs={"lr": 1e-2, "n_epochs_kl_warmup": 10}, progress_bar=False)
    score = mean_principal_cosine(adata.varm["true_loadings"], model.get_loadings().to_numpy())
    assert score >= 0.95, score
    # the untrained model does not: the test can fail
    untrained = LinearSCVI(adata, n_latent=5)
    assert mean_principal_cosine(adata.varm["true_loadings"], untrained.get_loadings().to_numpy()) < 0.5


def test_same_seed_same_loadings_and_history(small_adata):
    adata = small_adata.copy()
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    runs = []
    for seed in (7, 7, 8):
        model = LinearSCVI(adata, n_latent=3, seed=seed)
        model.train(max_epochs=3, progress_bar=False)
        runs.append((model.get_loadings().to_numpy(), model.history["elbo_train"].to_numpy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])


def test_history_split_and_heuristic_epochs(small_adata):
    adata = small_adata.copy()
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2)
    model.train(max_epochs=4, progress_bar=False)
    assert len(model.history["elbo_train"]) == 4 and len(model.history["elbo_validation"]) == 4
    assert model.history["kl_weight"].iloc[0].item() == 0.0
    assert model.history["kl_weight"].iloc[3].item() == pytest.approx(3 / 400)
    # 90/10 split, disjoint, covering every cell
    assert len(model.train_indices) + len(model.validation_indices) == adata.n_obs
    assert not set(model.train_indices) & set(model.validation_indices)
    assert len(model.validation_indices) == adata.n_obs - int(np.ceil(0.9 * adata.n_obs))
    # a second call continues the epoch numbering
    model.train(max_epochs=2, progress_bar=False)
    assert list(model.history["elbo_train"].index) == list(range(6))


def test_split_matches_scvi_tools(small_adata):
    scvi = pytest.importorskip("scvi")
    from scvi.dataloaders import DataSplitter

    adata = small_adata.copy()
    scvi.model.LinearSCVI.setup_anndata(adata)
    reference = scvi.model.LinearSCVI(adata)
    scvi.settings.seed = 11
    splitter = DataSplitter(reference.adata_manager, train_size=None, batch_size=128)
    splitter.setup()
    LinearSCVI.setup_anndata(adata)
    ours = LinearSCVI(adata, seed=11)
    ours.train(max_epochs=1, progress_bar=False)
    np.testing.assert_array_equal(np.sort(ours.train_indices), np.sort(splitter.train_idx))
    np.testing.assert_array_equal(np.sort(ours.validation_indices), np.sort(splitter.val_idx))


def test_gene_label_needs_only_labels_key(small_adata):
    adata = small_adata.copy()
    adata.obs["cell_type"] = np.where(np.arange(adata.n_obs) % 2 == 0, "T", "B")
    LinearSCVI.setup_anndata(adata, labels_key="cell_type")
    model = LinearSCVI(adata, dispersion="gene-label", n_latent=2)
    assert model.module.theta.shape == (2, adata.n_vars)
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.get_elbo())


def test_held_out_cells_and_early_stopping(small_adata):
    adata = small_adata.copy()
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    train, held_out = adata[:250].copy(), adata[250:].copy()
    model = LinearSCVI(train, n_latent=2)
    model.train(
        max_epochs=30, early_stopping=True, early_stopping_patience=1, early_stopping_min_delta=1e9, progress_bar=False
    )
    assert len(model.history["elbo_train"]) == 2  # stopped after one epoch without an improvement of 1e9
    latent = model.get_latent_representation(held_out)
    assert latent.shape == (50, 2)
    assert np.isfinite(model.get_elbo(held_out))
    np.testing.assert_allclose(
        model.get_latent_representation(adata, indices=np.arange(250, 300)), latent, rtol=1e-5, atol=1e-6
    )


def test_sparse_input_is_not_densified(small_adata, monkeypatch):
    from pyro_ldvae.data.cells import CellData
    from pyro_ldvae.data.registry import get_registry

    adata = small_adata.copy()
    LinearSCVI.setup_anndata(adata)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole matrix was densified")

    monkeypatch.setattr(type(adata.X), "toarray", refuse, raising=True)
    monkeypatch.setattr(type(adata.X), "todense", refuse, raising=True)
    cells = CellData(adata, get_registry(adata))
    assert cells.X is adata.X or type(cells.X) is type(adata.X)
    with pytest.raises(AssertionError, match="densified"):
        adata.X.toarray()  # the guard is active
    monkeypatch.undo()
    # minibatches are cut in C from the CSR matrix: only a minibatch is densified
    assert cells.minibatch(np.arange(10)).x.shape == (10, adata.n_vars)
    assert torch.is_tensor(cells.minibatch(np.arange(10)).x)
