"""Reference mapping: prepare_query_anndata, load_query_data, frozen reference, save/load."""

from __future__ import annotations

import logging

import anndata
import numpy as np
import pytest
import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.infer.plan import TrainingPlan, global_rate_parameters, make_optimizer

N_LATENT = 3


def _split(seed: int = 0, n_cells: int = 900):
    adata = simulate(n_cells=n_cells, n_genes=60, n_latent=N_LATENT, n_batch=4, seed=seed)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs["cell_type"] = np.where(adata.obsm["true_z"][:, 0] > 0, "a", "b")
    is_query = adata.obs["batch"].isin(["batch_2", "batch_3"]).to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy()


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    ref_adata, query_adata = _split()
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch", labels_key="cell_type")
    model = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=32, dispersion="gene-batch")
    model.train(max_epochs=30, progress_bar=False, batch_size=64)
    return model, query_adata


def _query(query_adata):
    query = query_adata.copy()
    query.uns.pop("_pyro_ldvae_setup", None)
    return query


def test_prepare_reorders_fills_and_reports(reference, caplog):
    model, query_adata = reference
    query = _query(query_adata)[:, ::-1].copy()
    query = query[:, 5:].copy()  # 5 genes missing, the rest reversed
    with caplog.at_level(logging.INFO, logger="pyro_ldvae.api.query"):
        prepared = LinearSCVI.prepare_query_anndata(query, model, inplace=False)
    assert "lacks 5 of the reference's 60 genes" in caplog.text
    assert list(prepared.var_names) == list(model.var_names)
    missing = [g for g in model.var_names if g not in query.var_names]
    assert prepared[:, missing].X.sum() == 0
    kept = list(query.var_names)
    np.testing.assert_array_equal(prepared[:, kept].X.toarray(), query.X.toarray())
    assert query.n_vars == 55  # inplace=False leaves the input alone
    assert LinearSCVI.prepare_query_anndata(query, model) is None
    assert list(query.var_names) == list(model.var_names)
    names = LinearSCVI.prepare_query_anndata(query, model, return_reference_var_names=True)
    assert list(names) == list(model.var_names)


def test_prepare_threshold(reference):
    model, query_adata = reference
    query = _query(query_adata)[:, 20:].copy()  # a third missing
    with pytest.raises(ValueError, match="max_missing_fraction"):
        LinearSCVI.prepare_query_anndata(query, model)
    LinearSCVI.prepare_query_anndata(query, model, max_missing_fraction=0.5)
    assert query.n_vars == 60


def test_new_batch_columns_and_library_prior(reference):
    model, query_adata = reference
    query = _query(query_adata)
    qm = LinearSCVI.load_query_data(query, model)
    assert qm.registry.batch_categories == ["batch_0", "batch_1", "batch_2", "batch_3"]
    ref_w = model.module.decoder.factor_regressor.linear.weight.detach()
    w = qm.module.decoder.factor_regressor.linear.weight.detach()
    assert w.shape == (60, N_LATENT + 4)
    torch.testing.assert_close(w[:, : N_LATENT + 2], ref_w, rtol=0, atol=0)
    expected = ref_w[:, N_LATENT:].mean(1)
    torch.testing.assert_close(w[:, N_LATENT + 2], expected, rtol=0, atol=0)
    torch.testing.assert_close(w[:, N_LATENT + 3], expected, rtol=0, atol=0)
    means = qm.module.library_log_means
    torch.testing.assert_close(means[:2], model.module.library_log_means, rtol=0, atol=0)
    log_totals = np.log(np.asarray(query.X.sum(1)).ravel())
    in_b2 = (query.obs["batch"] == "batch_2").to_numpy()
    assert means[2].item() == pytest.approx(log_totals[in_b2].mean(), rel=1e-5)
    trainable = sorted(n for n, p in qm.module.named_parameters() if p.requires_grad)
    assert trainable == ["decoder.factor_regressor.linear.new", "theta_parts.new"]
    # per-gene parameters of the new batches: they learn at the plan's global_lr
    fast = {id(p) for p in global_rate_parameters(qm.module)}
    assert fast == {id(qm.module.decoder.factor_regressor.linear.new), id(qm.module.theta_parts.new)}
    groups = make_optimizer(qm.module, TrainingPlan()).param_groups
    assert [group["lr"] for group in groups if {id(p) for p in group["params"]} == fast] == [TrainingPlan().global_lr]


def test_training_keeps_reference_bit_identical(reference):
    model, query_adata = reference
    ref_state = {k: v.clone() for k, v in model.module.state_dict().items()}
    loadings, latent = model.get_loadings(), model.get_latent_representation()
    query = _query(query_adata)
    qm = LinearSCVI.load_query_data(query, model)
    before = qm.module.decoder.factor_regressor.linear.new.detach().clone()
    qm.train(max_epochs=5, progress_bar=False, batch_size=64)
    assert not torch.equal(qm.module.decoder.factor_regressor.linear.new, before)  # the new columns train
    assert qm.get_loadings().equals(loadings)
    np.testing.assert_array_equal(qm.get_latent_representation(model.adata), latent)
    theta = qm.module.theta.detach()
    torch.testing.assert_close(theta[:2], model.module.theta.detach(), rtol=0, atol=0)
    torch.testing.assert_close(qm.module.library_log_means[:2], model.module.library_log_means, rtol=0, atol=0)
    for key, value in model.module.state_dict().items():  # the reference object is untouched
        assert torch.equal(value, ref_state[key]), key


def test_query_latent_recovers_truth(reference):
    """The mapped query cells' factors explain the true factors about as well as the reference cells'."""
    model, query_adata = reference
    query = _query(query_adata)
    qm = LinearSCVI.load_query_data(query, model)
    qm.train(max_epochs=5, progress_bar=False, batch_size=64)

    def r2(latent, truth):
        design = np.c_[latent, np.ones(len(latent))]
        fit = design @ np.linalg.lstsq(design, truth, rcond=None)[0]
        return 1 - ((truth - fit) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()

    r2_query = r2(qm.get_latent_representation(), query.obsm["true_z"])
    r2_ref = r2(model.get_latent_representation(), model.adata.obsm["true_z"])
    assert r2_query > 0.5
    assert r2_query > r2_ref - 0.1


def test_save_load_round_trip(reference, tmp_path):
    model, query_adata = reference
    model.save(tmp_path / "ref", save_anndata=False)
    query = _query(query_adata)
    qm = LinearSCVI.load_query_data(query, str(tmp_path / "ref"))  # a saved reference works too
    torch.testing.assert_close(
        qm.module.decoder.factor_regressor.linear.weight[:, : N_LATENT + 2],
        model.module.decoder.factor_regressor.linear.weight,
        rtol=0,
        atol=0,
    )
    qm.train(max_epochs=2, progress_bar=False, batch_size=64)
    qm.save(tmp_path / "query")
    loaded = LinearSCVI.load(tmp_path / "query", query)
    assert loaded.registry.batch_categories == qm.registry.batch_categories
    assert loaded.get_loadings().equals(qm.get_loadings())
    for key, value in qm.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    np.testing.assert_array_equal(loaded.get_latent_representation(), qm.get_latent_representation())


def test_unfrozen_trains_everything(reference):
    model, query_adata = reference
    qm = LinearSCVI.load_query_data(_query(query_adata), model, freeze_loadings=False)
    assert all(p.requires_grad for p in qm.module.parameters())
    qm = LinearSCVI.load_query_data(_query(query_adata), model, train_encoder=True)
    assert all(p.requires_grad for p in qm.module.z_encoder.parameters())
    assert not qm.module.decoder.factor_regressor.batch_norm.weight.requires_grad


def test_query_errors(reference):
    model, query_adata = reference
    query = _query(query_adata)
    query.obs["cell_type"] = "unseen"
    with pytest.raises(ValueError, match="never saw"):
        LinearSCVI.load_query_data(query, model)
    query = _query(query_adata)
    del query.obs["batch"]
    with pytest.raises(ValueError, match="batch_key"):
        LinearSCVI.load_query_data(query, model)
    query = _query(query_adata)[:, ::-1].copy()
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        LinearSCVI.load_query_data(query, model)


def test_reference_without_batch_key_is_refused():
    ref_adata, query_adata = _split(n_cells=200)
    LinearSCVI.setup_anndata(ref_adata)
    model = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=8)
    with pytest.raises(ValueError, match="without batch_key"):
        LinearSCVI.load_query_data(_query(query_adata), model)


def test_single_batch_reference_gets_a_zero_column():
    ref_adata, query_adata = _split(n_cells=400)
    ref_adata = ref_adata[ref_adata.obs["batch"] == "batch_0"].copy()
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch")
    model = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=8)
    model.train(max_epochs=2, progress_bar=False, batch_size=64)
    qm = LinearSCVI.load_query_data(_query(query_adata), model)
    w = qm.module.decoder.factor_regressor.linear.weight.detach()
    assert w.shape == (60, N_LATENT + 3)
    assert (w[:, N_LATENT:] == 0).all()
    qm.train(max_epochs=2, progress_bar=False, batch_size=64)
    assert qm.get_loadings().equals(model.get_loadings())
    assert qm.module.decoder.factor_regressor.linear.new.shape == (60, 2)  # the reference batch's column is fixed


def test_traced_step_keeps_reference_bit_identical(reference):
    model, query_adata = reference
    qm = LinearSCVI.load_query_data(_query(query_adata), model)
    qm.train(max_epochs=2, progress_bar=False, batch_size=64, traced_step=True)
    assert qm.get_loadings().equals(model.get_loadings())
    np.testing.assert_array_equal(qm.get_latent_representation(model.adata), model.get_latent_representation())


def test_zinb_covariates_and_known_batches():
    """Every decoder head is extended before the covariate columns; a reference batch in the query keeps its own."""
    ref_adata, query_adata = _split(n_cells=400)
    query_adata = anndata.concat([query_adata, ref_adata[:30]])  # some cells of a reference batch
    for adata in (ref_adata, query_adata):
        adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch", categorical_covariate_keys=["donor"])
    model = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=8, gene_likelihood="zinb")
    model.train(max_epochs=2, progress_bar=False, batch_size=64)
    qm = LinearSCVI.load_query_data(_query(query_adata), model)
    for head in ("factor_regressor", "px_dropout_decoder"):
        ref_w = getattr(model.module.decoder, head).linear.weight.detach()  # (genes, n_latent + 2 + 2)
        w = getattr(qm.module.decoder, head).linear.weight.detach()
        assert w.shape == (60, N_LATENT + 6)
        torch.testing.assert_close(w[:, : N_LATENT + 2], ref_w[:, : N_LATENT + 2], rtol=0, atol=0)
        torch.testing.assert_close(w[:, -2:], ref_w[:, -2:], rtol=0, atol=0)  # the donor columns
    qm.train(max_epochs=2, progress_bar=False, batch_size=64)
    assert qm.get_loadings().equals(model.get_loadings())
    qm.module.train()
    assert not qm.module.z_encoder.training and not qm.module.decoder.factor_regressor.batch_norm.training


# New factors: programs the reference lacks ------------------------------------------------------
def _novel_reference(seed: int = 0):
    from pyro_ldvae.api.simulate_query import simulate_query

    ref_adata, query_adata = simulate_query(seed=seed, n_genes=80, n_reference=1000, n_query=500)
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch")
    model = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=32)
    model.train(max_epochs=40, progress_bar=False, batch_size=128)
    return model, query_adata


@pytest.fixture(scope="module")
def novel_reference():
    torch.set_num_threads(1)
    return _novel_reference()


def test_new_factors_keep_the_reference_bit_identical(novel_reference):
    model, query_adata = novel_reference
    loadings, latent = model.get_loadings(), model.get_latent_representation()
    qm = LinearSCVI.load_query_data(_query(query_adata), model, n_new_factors=2)
    qm.train(max_epochs=3, progress_bar=False, batch_size=128)
    out = qm.get_loadings()
    assert list(out.columns) == ["Z_0", "Z_1", "Z_2", "new_0", "new_1"]
    assert out.iloc[:, :N_LATENT].equals(loadings)
    np.testing.assert_array_equal(qm.get_latent_representation(model.adata)[:, :N_LATENT], latent)
    basis = torch.linalg.qr(torch.as_tensor(np.c_[loadings.to_numpy(), np.ones(80)]))[0].numpy()
    new = out[["new_0", "new_1"]].to_numpy()
    assert np.abs(basis.T @ new).max() < 1e-4 * np.abs(new).max()  # new directions only
    trainable = {n.split(".")[0] for n, p in qm.module.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "z_encoder", "l_encoder", "global_guide"}
    assert qm.get_novelty().shape == (query_adata.n_obs,)
    assert qm.get_novelty(per_factor=True).shape == (query_adata.n_obs, 2)


def test_new_factors_initial_weights_follow_the_seed_and_leave_torch_alone(novel_reference):
    model, query_adata = novel_reference

    def initial(**kwargs):
        qm = LinearSCVI.load_query_data(_query(query_adata), model, n_new_factors=2, **kwargs)
        return qm.seed, {k: v.clone() for k, v in qm.module.state_dict().items()}

    state = torch.random.get_rng_state()
    (seed, first), (_, again) = initial(), initial()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert seed == model.seed
    assert all(torch.equal(value, again[key]) for key, value in first.items())
    other_seed, other = initial(seed=model.seed + 1)
    assert other_seed == model.seed + 1
    assert any(not torch.equal(value, other[key]) for key, value in first.items())


def test_new_factors_save_load_round_trip(novel_reference, tmp_path):
    model, query_adata = novel_reference
    query = _query(query_adata)
    qm = LinearSCVI.load_query_data(query, model, n_new_factors=2, new_factor_prior="horseshoe")
    qm.train(max_epochs=2, progress_bar=False, batch_size=128)
    qm.save(tmp_path / "q")
    loaded = LinearSCVI.load(tmp_path / "q", query)
    assert loaded.get_loadings().equals(qm.get_loadings())
    np.testing.assert_array_equal(loaded.get_novelty(), qm.get_novelty())
    for key, value in qm.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_new_factors_on_a_loadings_prior_reference():
    from pyro_ldvae.api.simulate_query import simulate_query

    ref_adata, query_adata = simulate_query(seed=1, n_genes=40, n_reference=300, n_query=150)
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch")
    model = LinearSCVI(ref_adata, n_latent=2, n_hidden=8, loadings_prior="normal")
    model.train(max_epochs=2, progress_bar=False, batch_size=64)
    loadings, latent = model.get_loadings(), model.get_latent_representation()
    for k in (0, 2):
        qm = LinearSCVI.load_query_data(_query(query_adata), model, n_new_factors=k)
        qm.train(max_epochs=2, progress_bar=False, batch_size=64)
        assert qm.get_loadings().iloc[:, :2].equals(loadings)
        np.testing.assert_array_equal(qm.get_latent_representation(model.adata)[:, :2], latent)


def test_new_factor_errors(reference):
    model, query_adata = reference
    with pytest.raises(ValueError, match="freeze_loadings=True"):
        LinearSCVI.load_query_data(_query(query_adata), model, n_new_factors=2, freeze_loadings=False)
    with pytest.raises(ValueError, match="new_factor_prior"):
        LinearSCVI.load_query_data(_query(query_adata), model, n_new_factors=2, new_factor_prior="laplace")
    qm = LinearSCVI.load_query_data(_query(query_adata), model)
    with pytest.raises(ValueError, match="n_new_factors=K"):
        qm.get_novelty()
