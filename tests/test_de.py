"""Differential expression: scvi-tools' columns and semantics, known answers, real markers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
from anndata import AnnData

import pyro_ldvae
from pyro_ldvae.tasks.de import bayes_factors, estimate_delta, fdr_de_prediction

from .shared_models import pancreas_model, pbmc4k_model, shared_data

VANILLA = [
    "proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2",
    "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2",
    "comparison", "group1", "group2",
]  # fmt: skip
CHANGE = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta", "lfc_mean",
    "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2", "non_zeros_proportion1",
    "non_zeros_proportion2", "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05",
    "comparison", "group1", "group2",
]  # fmt: skip


def two_groups(n_cells: int = 600, n_genes: int = 40, n_up: int = 5, seed: int = 0) -> AnnData:
    """NB counts of two cell groups; group 'a' has genes 0..n_up-1 at eight times the expression."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 0.5, size=n_genes)
    group = np.where(np.arange(n_cells) < n_cells // 2, "a", "b")
    rate = np.tile(base, (n_cells, 1))
    rate[group == "a", :n_up] *= 8.0
    rate *= rng.lognormal(np.log(20), 0.2, size=(n_cells, 1))
    counts = rng.poisson(rng.gamma(5.0, rate / 5.0)).astype(np.float32)
    batch = np.where(rng.random(n_cells) < 0.5, "b0", "b1")
    adata = AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame({"group": group, "batch": batch}, index=[f"c{i}" for i in range(n_cells)]),
    )
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    return adata


@pytest.fixture(scope="module")
def model():
    adata = two_groups()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    # The observed library keeps this short fit (40 epochs) well conditioned.
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=32, seed=0, use_observed_lib_size=True)
    model.train(max_epochs=40, batch_size=64, progress_bar=False, plan_kwargs={"lr": 1e-2})
    return model


def test_vanilla_finds_planted_genes_with_scvi_columns(model):
    pyro.set_rng_seed(0)
    de = model.differential_expression(groupby="group", group1="a")
    assert list(de.columns) == VANILLA
    assert set(de.index[:5]) == {f"g{i}" for i in range(5)}
    assert (de["comparison"] == "a vs Rest").all() and (de["group2"] == "Rest").all()
    assert np.allclose(de["proba_m1"] + de["proba_m2"], 1.0)
    assert (de["bayes_factor"].diff().dropna() <= 1e-12).all()  # sorted by decreasing Bayes factor
    assert (de.loc["g0", "scale1"] > 2 * de.loc["g0", "scale2"]) and de.loc["g0", "raw_mean1"] > de.loc[
        "g0", "raw_mean2"
    ]


def test_change_mode_calls_planted_genes_at_fdr(model):
    pyro.set_rng_seed(0)
    de = model.differential_expression(groupby="group", group1="a", group2="b", mode="change", delta=0.5)
    assert list(de.columns) == CHANGE
    called = set(de.index[de["is_de_fdr_0.05"]])
    assert {f"g{i}" for i in range(5)} <= called
    assert de.loc["g0", "lfc_mean"] > 1.5  # planted log2 fold change is 3
    assert (de["proba_de"].diff().dropna() <= 1e-12).all()
    assert (de["comparison"] == "a vs b").all()


def test_each_group_against_rest_and_idx_selection(model):
    pyro.set_rng_seed(0)
    de = model.differential_expression(groupby="group", n_samples_overall=500)
    assert sorted(de["comparison"].unique()) == ["a vs Rest", "b vs Rest"]
    assert len(de) == 2 * model.adata.n_vars
    mask = (model.adata.obs["group"] == "a").to_numpy()
    by_mask = model.differential_expression(idx1=mask, n_samples_overall=500)
    by_query = model.differential_expression(idx1="group == 'a'", idx2="group == 'b'", n_samples_overall=500)
    by_position = model.differential_expression(idx1=np.flatnonzero(mask), n_samples_overall=500)
    for frame in (by_mask, by_query, by_position):
        assert "comparison" not in frame.columns and len(frame) == model.adata.n_vars
        assert set(frame.index[:5]) == {f"g{i}" for i in range(5)}


def test_batch_correction_and_argument_errors(model):
    pyro.set_rng_seed(0)
    de = model.differential_expression(groupby="group", group1="a", batch_correction=True, n_samples_overall=1000)
    assert list(de.columns) == VANILLA and set(de.index[:5]) == {f"g{i}" for i in range(5)}
    with pytest.raises(ValueError, match="Unknown batch categories"):
        model.differential_expression(groupby="group", group1="a", batch_correction=True, batchid1=["zz"])
    with pytest.raises(ValueError, match="not a value"):
        model.differential_expression(groupby="group", group1="zz")
    with pytest.raises(ValueError, match="not a column"):
        model.differential_expression(groupby="nope")
    with pytest.raises(ValueError, match="mode"):
        model.differential_expression(groupby="group", mode="other")


def test_bayes_factors_known_answers():
    rng = np.random.default_rng(0)
    s2 = rng.uniform(0.01, 0.02, size=(1000, 3))
    s1 = s2 * np.array([2.0, 1.0, 0.25])  # log2 fold changes 1, 0, -2
    vanilla = bayes_factors(s1, s2, "vanilla", 0.25, 0.0)
    assert np.allclose(vanilla["proba_m1"], [1.0, 0.0, 0.0])
    change = bayes_factors(s1, s2, "change", 0.25, 0.0)
    assert np.allclose(change["lfc_mean"], [1.0, 0.0, -2.0], atol=1e-6)
    assert np.allclose(change["proba_de"], [1.0, 0.0, 1.0])
    assert np.allclose(change["proba_not_de"], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("delta", [None, 0.3])
def test_change_mode_in_gene_blocks_equals_the_whole_array(delta):
    rng = np.random.default_rng(1)
    s2 = rng.dirichlet(np.full(2500, 0.5), size=1200).astype(np.float32)  # 3 gene blocks of 873
    s1 = (s2 * rng.lognormal(0.0, 0.5, size=s2.shape)).astype(np.float32)
    got = bayes_factors(s1, s2, "change", delta, 1e-5, "two")
    lfc = np.log2(s1 + 1e-5) - np.log2(s2 + 1e-5)
    expected_delta = got["delta"][0] if delta is None else delta
    assert np.allclose(got["proba_de"], np.mean(lfc >= expected_delta, 0) + np.mean(lfc < -expected_delta, 0))
    small = np.log2(s1 + 1e-8) - np.log2(s2 + 1e-8)
    for name, statistic in (
        ("mean", np.mean),
        ("median", np.median),
        ("std", np.std),
        ("min", np.min),
        ("max", np.max),
    ):
        np.testing.assert_allclose(got[f"lfc_{name}"], statistic(small, 0), rtol=1e-5, atol=1e-5)
    if delta is None:  # estimated from the whole array's mean LFCs
        assert got["delta"][0] == pytest.approx(estimate_delta(lfc.mean(0)), rel=1e-5)
    # paired rows given as indices: the same as the paired arrays
    rows1, rows2 = rng.integers(0, 1200, 900), rng.integers(0, 1200, 900)
    for mode in ("vanilla", "change"):
        by_rows = bayes_factors(s1, s2, mode, 0.3, 1e-5, "two", pairs=(rows1, rows2))
        by_arrays = bayes_factors(s1[rows1], s2[rows2], mode, 0.3, 1e-5, "two")
        for name, values in by_arrays.items():
            np.testing.assert_array_equal(by_rows[name], values, err_msg=name)


def test_fdr_prediction_known_answer():
    probas = pd.Series([0.99, 0.5, 0.97, 0.9, 0.2], index=list("abcde"))
    # sorted 0.99, 0.97, 0.9, 0.5: expected FDR 0.01, 0.02, 0.0467, 0.16 -> the first three
    called = fdr_de_prediction(probas, fdr=0.05)
    assert list(called.index) == list("abcde")
    assert called.to_dict() == {"a": True, "b": False, "c": True, "d": True, "e": False}


def test_columns_match_scvi_tools():
    scvi = pytest.importorskip("scvi")
    adata = two_groups(n_cells=120, n_genes=20)
    scvi.model.LinearSCVI.setup_anndata(adata)
    reference = scvi.model.LinearSCVI(adata, n_latent=2)
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    ours = pyro_ldvae.LinearSCVI(adata, n_latent=2)
    for mode in ("vanilla", "change"):
        kwargs = dict(groupby="group", group1="a", mode=mode, silent=True)
        theirs = reference.differential_expression(**kwargs)
        mine = ours.differential_expression(**kwargs, n_samples_overall=300)
        assert list(mine.columns) == list(theirs.columns)


# ----------------------------------------------------------------------------------------
# Real data (../shared/data)
# ----------------------------------------------------------------------------------------
@shared_data
def test_pancreas_beta_cells_rank_ins_and_alpha_cells_gcg():
    model = pancreas_model()
    pyro.set_rng_seed(0)
    beta = model.differential_expression(groupby="cell_type1", group1="beta")
    assert "INS" in list(beta.index[:10]), list(beta.index[:10])
    alpha = model.differential_expression(groupby="cell_type1", group1="alpha", mode="change")
    assert "GCG" in list(alpha.index[:10]), list(alpha.index[:10])
    assert bool(alpha.loc["GCG", "is_de_fdr_0.05"]) and alpha.loc["GCG", "lfc_mean"] > 1


@shared_data
def test_pbmc4k_b_cells_rank_ms4a1_or_cd79a():
    model, _ = pbmc4k_model()
    pyro.set_rng_seed(0)
    de = model.differential_expression(adata=model.adata, groupby="cell_type", group1="B")
    assert {"MS4A1", "CD79A"} & set(de.index[:10]), list(de.index[:10])


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb"])
def test_importance_weights_match_scvi_tools(monkeypatch, gene_likelihood):
    """The importance weights of given posterior draws equal scvi-tools' ``get_importance_weights``.

    Both libraries get the same draws (scvi-tools' forward pass), the same weights (imported) and the
    same log p(x) of the anchor cells (a fixed stand-in for the Monte Carlo estimate, which each
    library would draw differently); every group cell is an anchor (fewer than ``max_cells``).
    """
    scvi = pytest.importorskip("scvi")
    import torch

    from pyro_ldvae.tasks import importance as tasks

    adata = pyro_ldvae.simulate(n_cells=150, n_genes=30, n_latent=3, seed=3)
    scvi.settings.seed = 0
    scvi.model.LinearSCVI.setup_anndata(adata)
    reference = scvi.model.LinearSCVI(adata, n_latent=3, n_hidden=32, gene_likelihood=gene_likelihood)
    reference.train(max_epochs=3, accelerator="cpu", enable_progress_bar=False, batch_size=64)
    model = pyro_ldvae.LinearSCVI.from_scvi(reference)
    group = np.arange(40, 100)
    reference.module.eval()
    tensors = next(iter(reference._make_data_loader(adata, indices=group, batch_size=len(group), shuffle=False)))
    torch.manual_seed(0)
    with torch.no_grad():
        inference, generative = reference.module.forward(tensors, inference_kwargs={"n_samples": 4}, compute_loss=False)
    qz, px, zs = inference["qz"], generative["px"], inference["z"]  # zs: (4, cells, 3)
    log_px = torch.from_numpy(np.random.default_rng(0).normal(-60.0, 5.0, size=len(group)).astype(np.float32))
    monkeypatch.setattr(reference, "get_marginal_ll", lambda *args, **kwargs: log_px)
    theirs = reference.get_importance_weights(adata, group, qz=qz, px=px, zs=zs)

    monkeypatch.setattr(tasks, "marginal_ll", lambda *args, **kwargs: log_px.numpy())
    n_genes = adata.n_vars
    draws = tasks.GroupDraws(
        rho=px.scale.reshape(-1, n_genes),
        z=zs.reshape(-1, 3),
        log_prior_z=torch.distributions.Normal(0.0, 1.0).log_prob(zs).sum(-1).reshape(-1),
        theta=px.theta.reshape(-1, n_genes),
        gate_logits=px.zi_logits.reshape(-1, n_genes) if gene_likelihood == "zinb" else None,
    )
    ours = tasks.importance_weights(model.module, model.get_cells(), group, draws, np.random.default_rng(0))
    assert ours.shape == theirs.shape == (4 * len(group),)
    assert abs(ours.sum() - 1.0) < 1e-9 and (ours >= 0).all()
    assert theirs.max() > 5 / len(theirs)  # the weights are far from uniform: the comparison has teeth
    np.testing.assert_allclose(ours, theirs, rtol=5e-4, atol=1e-9)  # measured: 8e-5 relative


def test_importance_weighted_de_finds_planted_genes(model):
    pyro.set_rng_seed(0)
    options = {"max_cells": 100, "n_mc_samples": 50}
    de = model.differential_expression(
        groupby="group", group1="a", weights="importance", importance_weighting_kwargs=options
    )
    assert list(de.columns) == VANILLA
    assert set(de.index[:5]) == {f"g{i}" for i in range(5)}
    assert (de["bayes_factor"].iloc[:5] > 3).all()
    change = model.differential_expression(
        groupby="group", group1="a", mode="change", weights="importance", importance_weighting_kwargs=options
    )
    assert set(change.index[change["is_de_fdr_0.05"]]) >= {f"g{i}" for i in range(5)}


def test_importance_weighted_expression_samples_the_group(model):
    pyro.set_rng_seed(0)
    cells = np.flatnonzero(model.adata.obs["group"] == "a")[:50]
    draws = model.get_normalized_expression(
        indices=cells,
        n_samples_overall=300,
        weights="importance",
        gene_list=["g0", "g7"],
        max_cells=30,
        n_mc_samples=20,
    )
    assert draws.shape == (300, 2)
    uniform = model.get_normalized_expression(indices=cells, n_samples_overall=300, gene_list=["g0", "g7"])
    assert abs(draws[:, 0].mean() - uniform[:, 0].mean()) < 0.3 * uniform[:, 0].mean()  # same group, same scale


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "gaussian"}, "weights must be 'uniform' or 'importance'"),
        ({"weights": "importance", "importance_weighting_kwargs": {"n_anchors": 5}}, "Unknown importance_weighting"),
        ({"importance_weighting_kwargs": {"max_cells": 5}}, "apply only with weights='importance'"),
    ],
)
def test_de_weights_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.differential_expression(groupby="group", group1="a", **kwargs)


def test_importance_weighted_expression_errors(model):
    with pytest.raises(ValueError, match="pass n_samples_overall"):
        model.get_normalized_expression(weights="importance")
    with pytest.raises(ValueError, match="several transform_batch"):
        model.get_normalized_expression(n_samples_overall=10, weights="importance", transform_batch=["b0", "b1"])


def test_importance_weights_warn_when_a_few_draws_take_the_weight():
    import torch

    from pyro_ldvae.tasks.importance import normalized_weights

    spread = normalized_weights(torch.zeros(500))
    np.testing.assert_allclose(spread, np.full(500, 1 / 500))
    with pytest.warns(UserWarning, match=r"concentrate on 2\.0 effective draws out of 500"):
        peaked = normalized_weights(torch.tensor([0.0, 0.0] + [-50.0] * 498))
    assert abs(peaked[:2].sum() - 1.0) < 1e-9
    with pytest.warns(UserWarning, match="concentrate on 7.9 effective draws"):  # spread, but not by much
        truncated = normalized_weights(torch.tensor([0.0, 0.0] + [-50.0] * 498), truncation=True)
    assert truncated.min() > 0.1 / 500  # every weight raised to at least the mean weight's share
