"""Gene programs: input forms (data/programs.py), the prior (models/program_prior.py), the
program methods of LinearSCVI (api/programs.py, tasks/programs.py), simulation and the CLI flag.

The statistical tests share one fit of a simulation with four programs behind noisy annotations
(20% of listed members false, 20% of true members missing) plus one annotated program with no
signal at all.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pyro import poutine
from sklearn.metrics import average_precision_score

import pyro_ldvae
from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.api.cli import main
from pyro_ldvae.data.programs import program_mask
from pyro_ldvae.models import capture
from pyro_ldvae.models.program_prior import ProgramPrior

GENES = [f"g{i}" for i in range(12)]


@pytest.fixture
def adata():
    from anndata import AnnData

    return AnnData(np.ones((3, len(GENES)), dtype=np.float32), var=pd.DataFrame(index=GENES))


# --------------------------------------------------------------------------------------------
# Input forms and their errors
# --------------------------------------------------------------------------------------------
def expected(mask: pd.DataFrame) -> dict[str, list[str]]:
    return {name: list(mask.index[mask[name]]) for name in mask.columns}


def test_every_input_form_gives_the_same_mask(adata, tmp_path):
    sets = {"A": ["g0", "g1", "g2"], "B": ["g3", "g4", "g5", "g0"]}
    from_dict = program_mask(sets, adata, min_genes=2)
    assert expected(from_dict) == {"A": ["g0", "g1", "g2"], "B": ["g0", "g3", "g4", "g5"]}
    assert list(from_dict.index) == GENES and from_dict.dtypes.eq(bool).all()

    long = pd.DataFrame(
        [(s, g, 1.0) for s, genes in sets.items() for g in genes], columns=["source", "target", "weight"]
    )
    pd.testing.assert_frame_equal(program_mask(long, adata, min_genes=2), from_dict)

    wide = from_dict.iloc[::-1]  # genes in another order, and as 0/1
    pd.testing.assert_frame_equal(program_mask(wide.astype(int), adata, min_genes=2), from_dict)

    gmt = tmp_path / "sets.gmt"
    gmt.write_text("A\tdescription\tg0\tg1\tg2\n\nB\thttp://x\tg3\tg4\tg5\tg0\t\n")
    assert pyro_ldvae.read_gmt(gmt) == sets
    pd.testing.assert_frame_equal(program_mask(gmt, adata, min_genes=2), from_dict)
    pd.testing.assert_frame_equal(program_mask(str(gmt), adata, min_genes=2), from_dict)

    adata.varm["I"] = from_dict.to_numpy().astype(np.float32)  # expiMap's layout
    adata.uns["terms"] = ["A", "B"]
    pd.testing.assert_frame_equal(program_mask("I", adata, min_genes=2), from_dict)


def test_absent_genes_are_counted_and_small_programs_named(adata, caplog):
    sets = {"big": ["g0", "g1", "g2", "nope1", "nope2"], "small": ["g3", "nope3"]}
    with caplog.at_level(logging.INFO, logger="pyro_ldvae.data.programs"):
        with pytest.warns(UserWarning, match="small"):
            mask = program_mask(sets, adata, min_genes=2)
    assert "3 of 7 listed genes are not in adata.var_names" in caplog.text
    assert list(mask.columns) == ["big"] and mask["big"].sum() == 3


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (42, TypeError, "gene_programs must be"),
        ({"A": "g0"}, TypeError, "list of gene names"),
        (pd.DataFrame({"A": [0.5] * 12}, index=GENES), TypeError, "booleans"),
        ("no_such_key_or_file", ValueError, "neither a key of adata.varm"),
        ({"A": ["x", "y", "z"]}, ValueError, "No gene program has at least"),
    ],
)
def test_bad_specs_raise_clear_errors(adata, spec, error, match):
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty case also warns about each dropped program
        program_mask(spec, adata, min_genes=2)


def test_varm_mask_needs_its_terms_and_gmt_lines_need_tabs(adata, tmp_path):
    adata.varm["I"] = np.ones((len(GENES), 2), dtype=bool)
    with pytest.raises(ValueError, match="uns\\['terms'\\]"):
        program_mask("I", adata)
    bad = tmp_path / "bad.gmt"
    bad.write_text("A g0 g1 g2\n")
    with pytest.raises(ValueError, match="line 1"):
        pyro_ldvae.read_gmt(bad)


# --------------------------------------------------------------------------------------------
# The prior
# --------------------------------------------------------------------------------------------
def test_prior_local_scales_follow_the_mask_and_confidence():
    mask = np.zeros((6, 2), dtype=bool)
    mask[:3, 0] = mask[3:, 1] = True
    prior = ProgramPrior(mask, n_unannotated=1, confidence=0.9)
    trace = poutine.trace(prior).get_trace(6, 3)
    scale = trace.nodes["loadings_local_scale"]["fn"].base_dist.scale  # HalfCauchy's scale s_gk
    expected_scale = np.hstack([np.where(mask, 1.0, 0.1), np.ones((6, 1))])
    np.testing.assert_allclose(scale.numpy(), expected_scale, rtol=1e-6)
    assert trace.nodes["loadings"]["value"].shape == (6, 3)
    global_scale = trace.nodes["loadings_global_scale"]["fn"].base_dist.scale  # free factors: 0.1 x the programs'
    np.testing.assert_allclose(global_scale.numpy(), [0.1, 0.1, 0.01], rtol=1e-6)
    assert capture.capturable(prior)
    with pytest.raises(ValueError, match="unannotated_scale"):
        ProgramPrior(mask, n_unannotated=1, unannotated_scale=0.0)
    with pytest.raises(ValueError, match="\\(6, 3\\)"):
        prior(6, 4)
    for confidence in (1.0, -0.1):
        with pytest.raises(ValueError, match="program_confidence"):
            ProgramPrior(mask, confidence=confidence)


def test_model_options_are_checked():
    adata = simulate(n_cells=50, n_genes=40, n_latent=2, programs=2, program_size=8, seed=0)
    LinearSCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="n_latent=7 differs"):
        LinearSCVI(adata, gene_programs="programs", n_unannotated=1, n_latent=7)
    with pytest.raises(ValueError, match="do not pass loadings_prior"):
        LinearSCVI(adata, gene_programs="programs", loadings_prior="horseshoe")
    with pytest.raises(ValueError, match="only apply with gene_programs"):
        LinearSCVI(adata, n_unannotated=2)
    with pytest.raises(ValueError, match="has no gene programs"):
        LinearSCVI(adata, n_latent=2).get_program_membership()
    model = LinearSCVI(adata, gene_programs="programs", n_unannotated=1)
    assert model.module.n_latent == 3 and list(model.get_loadings().columns) == [
        "program_0",
        "program_1",
        "unannotated_0",
    ]


def test_simulated_annotations_have_the_asked_noise():
    adata = simulate(n_cells=20, n_genes=400, n_latent=3, programs=2, program_size=50, seed=1)
    truth, noisy = adata.varm["true_programs"], adata.varm["programs"]
    assert truth.sum(0).tolist() == [50, 50] and list(adata.uns["terms"]) == ["program_0", "program_1"]
    listed_true = (truth & noisy).sum(0)
    assert listed_true.tolist() == [40, 40]  # 20% of true members missing
    assert ((noisy & ~truth).sum(0) / noisy.sum(0)).tolist() == [0.2, 0.2]  # 20% of listed members false
    loadings = adata.varm["true_loadings"]
    assert (loadings[:, :2][truth] > 0).all() and (loadings[:, :2][~truth] == 0).all()


# --------------------------------------------------------------------------------------------
# A fitted program model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    adata = simulate(n_cells=1000, n_genes=200, n_latent=5, programs=4, program_size=25, loadings_density=0.2, seed=0)
    rng = np.random.default_rng(5)
    annotation = pd.DataFrame(adata.varm["programs"], index=adata.var_names, columns=list(adata.uns["terms"]))
    annotation["unsupported"] = False
    annotation.iloc[rng.choice(adata.n_vars, 20, replace=False), -1] = True
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, gene_programs=annotation, n_unannotated=1)
    model.train(max_epochs=40, train_size=1.0, progress_bar=False, plan_kwargs=dict(lr=3e-2))
    return model, adata, annotation


@pytest.mark.slow
def test_membership_corrects_the_noisy_annotation(fitted):
    model, adata, annotation = fitted
    membership = model.get_program_membership(num_samples=200)
    assert list(membership.columns) == list(annotation.columns) and membership.index.equals(adata.var_names)
    truth = adata.varm["true_programs"]
    refined = [average_precision_score(truth[:, k], membership.iloc[:, k]) for k in range(4)]
    noisy = [average_precision_score(truth[:, k], annotation.iloc[:, k]) for k in range(4)]
    assert np.mean(refined) > np.mean(noisy) + 0.05, (refined, noisy)


@pytest.mark.slow
def test_activity_follows_the_true_factors_and_the_unsupported_program_switches_off(fitted):
    model, adata, annotation = fitted
    activity = model.get_program_activity()
    assert activity.shape == (adata.n_obs, 5) and activity.index.equals(adata.obs_names)
    correlations = [np.corrcoef(activity.iloc[:, k], adata.obsm["true_z"][:, k])[0, 1] for k in range(4)]
    assert min(correlations) > 0.8, correlations  # oriented: positive, not only large in size
    variance = model.get_factor_variance_explained()
    assert (
        variance.loc["unsupported", "fraction"]
        < 0.01
        < variance.loc[[f"program_{k}" for k in range(4)], "fraction"].min()
    )
    membership = model.get_program_membership(num_samples=100)["unsupported"]
    assert membership.sum() < 0.25 * annotation["unsupported"].sum()  # at most a few genes stay with it


@pytest.mark.slow
def test_differential_activity_calls_the_shifted_program_only(fitted):
    model, adata, _ = fitted
    rng = np.random.default_rng(0)
    adata.obs["null_split"] = rng.choice(["a", "b"], adata.n_obs)
    null = model.differential_program_activity("null_split", "a", "b")
    assert not null["is_de_fdr_0.05"].any(), null
    adata.obs["level"] = np.where(adata.obsm["true_z"][:, 2] > 0, "high", "low")
    state = torch.random.get_rng_state()
    shifted = model.differential_program_activity("level", "high")
    assert torch.equal(state, torch.random.get_rng_state())
    assert shifted.index[0] == "program_2" and shifted.loc["program_2", "is_de_fdr_0.05"]
    assert shifted.loc["program_2", "effect_size"] > 1.0 and shifted.loc["program_2", "bayes_factor"] > 3
    # other activities pick up a little of z_2 (their correlation with it is not exactly 0): far smaller changes
    others = shifted.drop(index="program_2")
    assert (others["effect_size"].abs() < 0.3 * shifted.loc["program_2", "effect_size"]).all(), shifted
    assert not shifted.loc["unsupported", "is_de_fdr_0.05"]
    with pytest.raises(ValueError, match="needs at least 2"):
        model.differential_program_activity("level", "nothing")


@pytest.mark.slow
def test_results_carry_the_names_and_save_load_keeps_the_programs(fitted, tmp_path):
    model, adata, annotation = fitted
    names = list(annotation.columns) + ["unannotated_0"]
    mean, std = model.get_loadings(return_std=True)
    assert list(mean.columns) == names and list(std.columns) == names and (std.to_numpy() > 0).all()
    out = model.to_adata(adata.copy())
    assert list(out.uns["ldvae"]["programs"]) == list(annotation.columns)
    assert list(out.uns["ldvae"]["factor_names"]) == names
    model.save(tmp_path / "m")
    loaded = LinearSCVI.load(tmp_path / "m", adata=adata)
    pd.testing.assert_frame_equal(loaded.get_loadings(), model.get_loadings())
    pd.testing.assert_frame_equal(loaded.get_program_activity(), model.get_program_activity())
    pd.testing.assert_frame_equal(
        loaded.get_program_membership(num_samples=50), model.get_program_membership(num_samples=50)
    )


def test_cli_fits_programs_from_a_gmt(tmp_path, capsys):
    adata = simulate(n_cells=200, n_genes=60, n_latent=3, programs=2, program_size=10, seed=2)
    members = adata.varm["programs"]
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(
        "".join(
            f"{name}\tna\t" + "\t".join(adata.var_names[members[:, k]]) + "\n"
            for k, name in enumerate(adata.uns["terms"])
        )
    )
    counts, out = tmp_path / "counts.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(counts)
    argv = ["fit", str(counts), "-o", str(out), "--max-epochs", "2", "--n-hidden", "16", "--accelerator", "cpu"]
    assert main([*argv, "--gene-programs", str(gmt), "--n-unannotated", "1", "--program-confidence", "0.9"]) == 0
    import anndata

    written = anndata.read_h5ad(out)
    assert list(written.uns["ldvae"]["factor_names"]) == ["program_0", "program_1", "unannotated_0"]
    assert "program_0" in capsys.readouterr().out
    assert main([*argv, "--overwrite", "--n-unannotated", "1"]) == 2
    assert "need --gene-programs" in capsys.readouterr().err


@pytest.mark.slow
def test_program_plots_return_their_axes(fitted):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, adata, annotation = fitted
    adata.obsm["X_umap"] = adata.obsm["true_z"][:, :2]
    fig, (left, right) = plt.subplots(1, 2)
    assert pyro_ldvae.pl.program_activity(model, "program_0", ax=left) is left
    assert pyro_ldvae.pl.program_members(model, "program_0", n_top=15, ax=right) is right
    bars = right.patches
    assert 0 < len(bars) <= 15 and all(0.0 <= bar.get_height() <= 1.0 for bar in bars)
    labels = {t.get_text() for t in right.get_xticklabels()}
    assert labels <= set(adata.var_names)
    with pytest.raises(ValueError, match="Unknown program"):
        pyro_ldvae.pl.program_members(model, "nope")
    plt.close("all")
