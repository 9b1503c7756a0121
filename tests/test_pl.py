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
