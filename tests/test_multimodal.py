"""MuData: setup_mudata registers the RNA modality; training, to_adata and save/load go through it."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

import pyro_ldvae
from pyro_ldvae.api import multimodal

from .conftest import shared_dataset

mudata = pytest.importorskip("mudata")


def _mdata(rna: anndata.AnnData, protein: np.ndarray) -> mudata.MuData:
    prot = anndata.AnnData(
        np.asarray(protein, dtype=np.float32),
        obs=pd.DataFrame(index=rna.obs_names),
        var=pd.DataFrame(index=[f"ADT_{i}" for i in range(protein.shape[1])]),
    )
    return mudata.MuData({"rna": rna, "prot": prot})


@pytest.fixture()
def simulated():
    rna = pyro_ldvae.simulate(n_cells=120, n_genes=25, n_latent=2, n_batch=2, seed=1)
    rna.layers["counts"] = rna.X.copy()
    rng = np.random.default_rng(0)
    mdata = _mdata(rna, rng.poisson(5.0, size=(rna.n_obs, 4)))
    mdata.obs["donor"] = np.where(np.arange(rna.n_obs) % 2 == 0, "a", "b")  # a MuData-level column
    return mdata


def test_setup_train_to_adata_on_simulated_mudata(simulated):
    mdata = simulated
    pyro_ldvae.LinearSCVI.setup_mudata(
        mdata,
        rna_layer="counts",
        batch_key="batch",
        labels_key="donor",
        modalities={"rna_layer": "rna", "batch_key": "rna"},
    )
    rna = mdata.mod["rna"]
    assert list(rna.obs["donor"]) == list(mdata.obs["donor"])  # copied from mdata.obs into the modality
    model = pyro_ldvae.LinearSCVI(mdata, n_latent=2, n_hidden=8, dispersion="gene-label")
    assert model.adata is rna and model.registry.n_batch == 2 and model.registry.n_labels == 2
    model.train(max_epochs=2, batch_size=32, progress_bar=False)
    out = model.to_adata(mdata)
    assert out is mdata
    assert rna.obsm["X_ldvae"].shape == (120, 2) and rna.varm["ldvae_loadings"].shape == (25, 2)
    assert "ldvae" in rna.uns and "X_ldvae" not in mdata.mod["prot"].obsm
    np.testing.assert_allclose(mdata.obsm["X_ldvae"], rna.obsm["X_ldvae"])
    np.testing.assert_allclose(model.get_latent_representation(mdata), model.get_latent_representation(rna))


def test_setup_mudata_checks_modalities(simulated):
    setup = pyro_ldvae.LinearSCVI.setup_mudata
    with pytest.raises(ValueError, match="Modalities cannot be None"):
        setup(simulated)
    with pytest.raises(ValueError, match="Extraneous"):
        setup(simulated, modalities={"rna_layer": "rna", "protein_layer": "prot"})
    with pytest.raises(ValueError, match="must name a modality"):
        setup(simulated, modalities={"rna_layer": "atac"})
    with pytest.raises(ValueError, match="not a column of mdata.mod\\['prot'\\].obs"):
        setup(simulated, batch_key="batch", modalities={"rna_layer": "rna", "batch_key": "prot"})
    with pytest.raises(ValueError, match="not set up"):
        pyro_ldvae.LinearSCVI(simulated)
    assert multimodal.split(None) == (None, None)


@pytest.mark.shared_data
def test_cbmc_citeseq_mudata_round_trip(tmp_path):
    """CBMC CITE-seq: RNA counts plus the file's 10 antibody-derived tags (obsm['ADT'], normalized values)."""
    full = anndata.read_h5ad(shared_dataset("cbmc_citeseq_8617.h5ad"))
    full = full[:1500].copy()  # a slice keeps the test short
    full = full[:, np.asarray(full.X.sum(0)).ravel() > 0].copy()
    protein = full.obsm.pop("ADT")
    mdata = _mdata(full, protein)
    mdata.obs["cell_type"] = full.obs["label"].astype(str).to_numpy()
    pyro_ldvae.LinearSCVI.setup_mudata(mdata, labels_key="cell_type", modalities={"rna_layer": "rna"})
    model = pyro_ldvae.LinearSCVI(mdata, n_latent=5, n_hidden=32)
    model.train(max_epochs=2, batch_size=256, progress_bar=False)
    model.to_adata(mdata)
    rna = mdata.mod["rna"]
    assert rna.obsm["X_ldvae"].shape == (1500, 5) and np.isfinite(rna.obsm["X_ldvae"]).all()
    assert mdata.obsm["X_ldvae"].shape == (1500, 5)

    model.save(tmp_path / "model")
    loaded = pyro_ldvae.LinearSCVI.load(tmp_path / "model", adata=mdata)
    assert loaded.adata is rna and loaded.registry.labels_key == "cell_type"
    np.testing.assert_allclose(loaded.get_loadings(), model.get_loadings())
    np.testing.assert_allclose(
        loaded.get_latent_representation(mdata), model.get_latent_representation(mdata), atol=1e-6
    )

    path = tmp_path / "cbmc.h5mu"
    mdata.write(path)
    back = mudata.read_h5mu(path)
    assert back.uns[multimodal.MUDATA_KEY]["rna_mod"] == "rna"
    np.testing.assert_allclose(back.mod["rna"].obsm["X_ldvae"], rna.obsm["X_ldvae"])
