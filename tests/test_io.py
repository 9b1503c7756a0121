"""Save/load (atomic, safe, checked), import from scvi-tools, and parity with it."""

from __future__ import annotations

import json
import os
import pickle

import anndata
import numpy as np
import pyro
import pytest
import torch

import pyro_ldvae
from pyro_ldvae.api import io, scvi_import


def _seeded_elbo(model, adata=None, seed=0):
    pyro.set_rng_seed(seed)
    return model.get_elbo(adata)


@pytest.fixture(scope="module")
def model():
    adata = pyro_ldvae.simulate(n_cells=300, n_genes=50, n_latent=3, n_batch=2, seed=0)
    adata.obs["site"] = np.where(np.arange(adata.n_obs) % 3 == 0, "x", "y")
    adata.obs["age"] = np.linspace(-1, 1, adata.n_obs).astype(np.float32)
    pyro_ldvae.LinearSCVI.setup_anndata(
        adata, batch_key="batch", categorical_covariate_keys=["site"], continuous_covariate_keys=["age"]
    )
    model = pyro_ldvae.LinearSCVI(adata, n_latent=3, n_hidden=32, dispersion="gene-batch", gene_likelihood="zinb")
    model.train(max_epochs=3, progress_bar=False)
    return model


def test_round_trip_is_identical(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    assert sorted(os.listdir(path)) == ["model.json", "model.pt"]
    loaded = pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy(), accelerator="cpu")
    assert np.array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert loaded.get_loadings().equals(model.get_loadings())
    assert _seeded_elbo(loaded) == _seeded_elbo(model)
    assert loaded.registry == model.registry and list(loaded.var_names) == list(model.var_names)
    assert loaded.init_params_ == model.init_params_
    assert np.allclose(loaded.history["elbo_train"].to_numpy(), model.history["elbo_train"].to_numpy())
    assert np.array_equal(loaded.train_indices, model.train_indices) and loaded.is_trained
    for key, value in model.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_save_anndata_and_load_without_adata(model, tmp_path):
    model.save(tmp_path / "m", save_anndata=True)
    loaded = pyro_ldvae.LinearSCVI.load(tmp_path / "m")
    assert loaded.adata.n_obs == model.adata.n_obs
    assert np.array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    model.save(tmp_path / "n")
    with pytest.raises(ValueError, match="save_anndata=False"):
        pyro_ldvae.LinearSCVI.load(tmp_path / "n")


def test_overwrite_rules(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    stamp = (path / "model.json").read_text()
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(path)
    assert (path / "model.json").read_text() == stamp
    model.save(path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary or backup directories left


def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "model")
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_old_model(model, tmp_path, monkeypatch):
    model.save(tmp_path / "model")
    monkeypatch.setattr(io.torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model"]
    pyro_ldvae.LinearSCVI.load(tmp_path / "model", adata=model.adata.copy())


def test_truncated_and_corrupt_files_name_the_file(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    weights = path / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.pt.*(corrupt|truncated)"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    # truncated, with the checksum updated so that torch.load itself sees the damage
    meta = json.loads((path / "model.json").read_text())
    meta["weights_sha256"] = io._sha256(weights)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.pt cannot be read"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    (path / "model.json").write_text('{"format": "pyro_ld')
    with pytest.raises(ValueError, match=r"model\.json is corrupt or truncated"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    os.remove(path / "model.json")
    with pytest.raises(ValueError, match=r"model\.json is missing.*scvi-tools"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())


def test_wrong_class_and_incompatible_version(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "model_class": "SCANVI"}))
    with pytest.raises(ValueError, match=r"model\.json holds a 'SCANVI' model"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    (path / "model.json").write_text(json.dumps({**meta, "format_version": 99, "package_version": "9.0"}))
    with pytest.raises(ValueError, match=r"model\.json was written by pyro_ldvae 9\.0.*upgrade"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    (path / "model.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="not a pyro_ldvae model file"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())


class _RunsCodeOnUnpickle:
    """Unpickling this calls os.system to create a marker file (what a malicious file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_does_not_run(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    marker = tmp_path / "pwned"
    with open(path / "model.pt", "wb") as handle:
        pickle.dump({"decoder.weight": _RunsCodeOnUnpickle(marker)}, handle)
    meta = json.loads((path / "model.json").read_text())
    meta["weights_sha256"] = io._sha256(path / "model.pt")  # pass the checksum: only torch.load stands guard
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.pt cannot be read"):
        pyro_ldvae.LinearSCVI.load(path, adata=model.adata.copy())
    assert not marker.exists()
    # the same file does run code through an unguarded unpickler: the test would notice
    with open(path / "model.pt", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_genes_and_categories_checked_on_load(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    reordered = model.adata[:, model.var_names[::-1]].copy()
    loaded = pyro_ldvae.LinearSCVI.load(path, adata=reordered)
    assert list(loaded.var_names) == list(model.var_names)
    assert np.allclose(loaded.get_latent_representation(), model.get_latent_representation())
    missing = model.adata[:, model.var_names[:-2]].copy()
    with pytest.raises(ValueError, match="lacks 2 of the 50 genes"):
        pyro_ldvae.LinearSCVI.load(path, adata=missing)
    extra = anndata.concat([model.adata, model.adata[:, :3]], axis=1, merge="first")
    extra.var_names = list(model.var_names) + ["extra_1", "extra_2", "extra_3"]
    with pytest.raises(ValueError, match="3 genes that the model .* does not know"):
        pyro_ldvae.LinearSCVI.load(path, adata=extra)
    unseen = model.adata.copy()
    unseen.obs["batch"] = unseen.obs["batch"].astype(str)
    unseen.obs.iloc[0, unseen.obs.columns.get_loc("batch")] = "new_batch"
    with pytest.raises(ValueError, match="never saw"):
        pyro_ldvae.LinearSCVI.load(path, adata=unseen)


# ----------------------------------------------------------------------------------------
# scvi-tools import and parity
# ----------------------------------------------------------------------------------------
def _scvi_per_cell_elbo(scvi_model, adata, seed):
    scvi_model.module.eval()
    loader = scvi_model._make_data_loader(adata, batch_size=adata.n_obs, shuffle=False)
    tensors = next(iter(loader))
    torch.manual_seed(seed)
    with torch.no_grad():
        _, _, loss = scvi_model.module(tensors, loss_kwargs={"kl_weight": 1.0})
    kl = loss.kl_local
    return -(loss.reconstruction_loss["reconstruction_loss"] + kl["kl_divergence_z"] + kl["kl_divergence_l"])


@pytest.mark.parametrize(
    "gene_likelihood, dispersion, n_batch",
    [("nb", "gene", 1), ("zinb", "gene-batch", 2), ("poisson", "gene", 2), ("nb", "gene-batch", 3)],
)
def test_from_scvi_parity(gene_likelihood, dispersion, n_batch):
    """Imported weights give scvi-tools' latents and loadings (1e-5) and ELBO (1e-4 relative).

    The ELBO is compared on one Monte Carlo draw shared by both: both libraries draw z and then
    l by reparameterisation from the same Normal posteriors in the same order, so seeding torch
    identically gives the same draws and the comparison is exact up to float rounding.
    """
    scvi = pytest.importorskip("scvi")
    adata = pyro_ldvae.simulate(n_cells=256, n_genes=40, n_latent=3, n_batch=n_batch, seed=1)
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 2 == 0, "l0", "l1")
    scvi.settings.seed = 0
    scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch" if n_batch > 1 else None, labels_key="label")
    reference = scvi.model.LinearSCVI(
        adata, n_latent=3, n_hidden=32, gene_likelihood=gene_likelihood, dispersion=dispersion
    )
    reference.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False, batch_size=64)
    model = pyro_ldvae.LinearSCVI.from_scvi(reference)
    assert model.registry.batch_key == ("batch" if n_batch > 1 else None) and model.registry.labels_key == "label"
    assert model.registry.label_categories == ["l0", "l1"]
    latent_ref = reference.get_latent_representation()
    assert np.abs(model.get_latent_representation() - latent_ref).max() < 1e-5
    loadings_ref = reference.get_loadings()
    assert np.abs(model.get_loadings().to_numpy() - loadings_ref.to_numpy()).max() < 1e-5
    theirs = _scvi_per_cell_elbo(reference, adata, seed=7)
    cells = model.get_cells()
    torch.manual_seed(7)
    with torch.no_grad():
        _, ours = model.module.eval().elbo(cells.minibatch(np.arange(adata.n_obs)))
    assert abs(ours.mean().item() - theirs.mean().item()) < 1e-4 * abs(theirs.mean().item())
    assert torch.allclose(ours, theirs, rtol=1e-4)
    assert len(model.history["elbo_train"]) == 2  # history imported


def test_module_from_scvi_maps_every_weight():
    scvi = pytest.importorskip("scvi")
    adata = pyro_ldvae.simulate(n_cells=64, n_genes=20, n_latent=2, n_batch=3, seed=2)
    scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    reference = scvi.model.LinearSCVI(adata, n_latent=2, n_layers=2, gene_likelihood="zinb", dispersion="gene-batch")
    module = scvi_import.module_from_scvi(reference.module)
    assert isinstance(module, pyro_ldvae.LDVAE) and not module.training
    state = reference.module.state_dict()
    assert torch.equal(module.theta_unconstrained, state["px_r"].T)
    assert torch.equal(module.library_log_means, state["library_log_means"].reshape(-1))
    assert torch.equal(module.z_encoder.hidden[4].weight, state["z_encoder.encoder.fc_layers.Layer 1.0.weight"])
    assert torch.equal(
        module.decoder.px_dropout_decoder.linear.weight, state["decoder.px_dropout_decoder.fc_layers.Layer 0.0.weight"]
    )
    assert np.allclose(module.get_loadings(), reference.get_loadings().to_numpy())


def test_saves_anndata_whose_names_are_pandas_string_arrays(tmp_path):
    """pandas 3 makes names string arrays, which anndata 0.12 writes only when allowed."""
    import anndata
    import pandas as pd

    with pd.option_context("future.infer_string", True):
        adata = pyro_ldvae.simulate(n_cells=60, n_genes=12, seed=0)
        assert isinstance(adata.obs_names.array, pd.arrays.ArrowStringArray | pd.arrays.StringArray)
        with anndata.settings.override(allow_write_nullable_strings=False):  # anndata's default
            with pytest.raises(RuntimeError, match="allow_write_nullable_strings"):
                adata.write_h5ad(tmp_path / "plain.h5ad")  # what the helper gets around
            io.write_h5ad(adata, tmp_path / "cells.h5ad")
    back = anndata.read_h5ad(tmp_path / "cells.h5ad")
    assert list(back.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
