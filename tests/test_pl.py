"""Every plotting function renders to a non-empty file, from a model and from a stored AnnData."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import pyro_ldvae  # noqa: E402


@pytest.fixture(scope="module")
def model():
    adata = pyro_ldvae.simulate(n_cells=200, n_genes=30, n_latent=3, seed=0)
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=3, progress_bar=False)
    model.to_adata()
    adata.obsm["X_umap"] = adata.obsm["X_ldvae"][:, :2] * 2.0  # a stand-in 2-D embedding
    return model


def _nonempty(path) -> bool:
    return path.exists() and path.stat().st_size > 1000


def test_training_curve(model, tmp_path):
    ax = pyro_ldvae.pl.training_curve(model, save=tmp_path / "curve.png")
    assert _nonempty(tmp_path / "curve.png")
    assert len(ax.get_lines()) == 2 and len(ax.get_lines()[0].get_xdata()) == 3
    ax = pyro_ldvae.pl.training_curve(model.adata, save=tmp_path / "curve_adata.png")
    assert _nonempty(tmp_path / "curve_adata.png") and len(ax.get_lines()) == 2
    with pytest.raises(ValueError, match="history"):
        pyro_ldvae.pl.training_curve({"other": model.history["elbo_train"]})
    plt.close("all")


def test_loadings_with_top_genes(model, tmp_path):
    axes = pyro_ldvae.pl.loadings(model, factors=["Z_0", 2], n_top=3, save=tmp_path / "loadings.png")
    assert _nonempty(tmp_path / "loadings.png") and len(axes) == 2
    labels = {t.get_text() for t in axes[0].texts}
    top = model.get_loadings()["Z_0"]
    assert set(top.nlargest(3).index) | set(top.nsmallest(3).index) == labels
    axes = pyro_ldvae.pl.loadings(model.adata, save=tmp_path / "loadings_all.png")
    assert len(axes) == 3 and _nonempty(tmp_path / "loadings_all.png")
    order = list(model.adata.uns["ldvae"]["factor_order"])
    assert [ax.get_title() for ax in axes] == order  # ordered by variance explained
    with pytest.raises(ValueError, match="Unknown factors"):
        pyro_ldvae.pl.loadings(model, factors=["Z_9"])
    plt.close("all")


def test_factor_on_embedding(model, tmp_path):
    ax = pyro_ldvae.pl.factor_embedding(model.adata, "Z_1", basis="umap", save=tmp_path / "embedding.png")
    assert _nonempty(tmp_path / "embedding.png")
    colours = ax.collections[0].get_array()
    assert np.allclose(np.sort(colours), np.sort(model.adata.obsm["X_ldvae"][:, 1]))
    fig, own_ax = plt.subplots()
    assert pyro_ldvae.pl.factor_embedding(model.adata, 0, ax=own_ax) is own_ax
    with pytest.raises(ValueError, match="embedding"):
        pyro_ldvae.pl.factor_embedding(model.adata, 0, basis="tsne")
    plt.close("all")


def test_save_true_writes_into_figures(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pyro_ldvae.pl.training_curve(model, save=True)
    assert _nonempty(tmp_path / "figures" / "ldvae_training_curve.png")
    plt.close("all")


def test_variance_explained(model, tmp_path):
    ax = pyro_ldvae.pl.variance_explained(model, save=tmp_path / "variance.png")
    assert _nonempty(tmp_path / "variance.png")
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == sorted(heights, reverse=True) and len(heights) == 3
    stored = sorted(100 * model.adata.uns["ldvae"]["variance_explained_fraction"], reverse=True)
    assert np.allclose([bar.get_height() for bar in pyro_ldvae.pl.variance_explained(model.adata).patches], stored)
    with pytest.raises(ValueError, match="variance explained"):
        pyro_ldvae.pl.variance_explained(pyro_ldvae.simulate(n_cells=5, n_genes=3, n_latent=1))
    plt.close("all")


PLOTS = {
    "training_curve": lambda model, ax: pyro_ldvae.pl.training_curve(model, ax=ax),
    "loadings": lambda model, ax: pyro_ldvae.pl.loadings(model, ax=ax),
    "variance_explained": lambda model, ax: pyro_ldvae.pl.variance_explained(model, ax=ax),
    "factor_embedding": lambda model, ax: pyro_ldvae.pl.factor_embedding(model.adata, "Z_0", ax=ax),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_every_plot_draws_into_the_given_axes_and_returns_it(model, name):
    fig, ax = plt.subplots()
    assert PLOTS[name](model, ax) is ax
    assert ax.has_data()
    plt.close("all")


def test_every_public_plot_is_covered():
    import inspect

    public = {n for n, f in inspect.getmembers(pyro_ldvae.pl, inspect.isfunction) if not n.startswith("_")}
    public = {n for n in public if getattr(pyro_ldvae.pl, n).__module__ == pyro_ldvae.pl.__name__}
    program_plots = {"program_activity", "program_members"}  # need a program model: tests/test_programs.py
    assert public == set(PLOTS) | program_plots
    for name in public:
        assert "ax" in inspect.signature(getattr(pyro_ldvae.pl, name)).parameters


def test_loadings_into_several_axes(model):
    fig, axes = plt.subplots(1, 2)
    drawn = pyro_ldvae.pl.loadings(model, factors=["Z_2", "Z_0"], ax=axes)
    assert drawn == list(axes) and [a.get_title() for a in drawn] == ["Z_2", "Z_0"]
    first = model.get_factor_variance_explained(sort=True).index[0]
    fig, ax = plt.subplots()
    assert pyro_ldvae.pl.loadings(model, ax=ax).get_title() == first  # one Axes: the top factor
    with pytest.raises(ValueError, match="one Axes per factor"):
        pyro_ldvae.pl.loadings(model, factors=["Z_0", "Z_1"], ax=ax)
    with pytest.raises(ValueError, match="one Axes per factor"):
        pyro_ldvae.pl.loadings(model, factors=["Z_0", "Z_1", "Z_2"], ax=axes)
    plt.close("all")
