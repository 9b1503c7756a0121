"""``pyro-ldvae map``: a query .h5ad mapped onto a saved reference."""

from __future__ import annotations

import anndata
import numpy as np
import torch

from pyro_ldvae import LinearSCVI
from pyro_ldvae.api.cli import main

from .test_query import N_LATENT, _query, _split


def _saved_reference(tmp_path):
    """A small reference, trained and saved to ``tmp_path / 'ref'``, and the query cells."""
    torch.set_num_threads(1)
    ref_adata, query_adata = _split(n_cells=300)
    LinearSCVI.setup_anndata(ref_adata, batch_key="batch")
    reference = LinearSCVI(ref_adata, n_latent=N_LATENT, n_hidden=8)
    reference.train(max_epochs=2, progress_bar=False, batch_size=64)
    reference.save(tmp_path / "ref")
    return reference, query_adata


def test_map_writes_query_results(tmp_path, capsys):
    reference, query_adata = _saved_reference(tmp_path)
    query = _query(query_adata)[:, ::-1].copy()
    query.obs["sample"] = query.obs.pop("batch")
    query.write_h5ad(tmp_path / "query.h5ad")
    argv = ["map", str(tmp_path / "ref"), str(tmp_path / "query.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    argv += ["--batch-key", "sample", "--max-epochs", "2", "--batch-size", "64", "--save-model", str(tmp_path / "q")]
    assert main(argv) == 0, capsys.readouterr().err
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_ldvae"].shape == (query.n_obs, N_LATENT)
    assert list(out.var_names) == list(reference.var_names)
    np.testing.assert_array_equal(out.varm["ldvae_loadings"], reference.get_loadings().to_numpy())
    loaded = LinearSCVI.load(tmp_path / "q", out)
    assert loaded.registry.batch_categories == ["batch_0", "batch_1", "batch_2", "batch_3"]


def test_map_reports_a_missing_reference(tmp_path, capsys):
    assert main(["map", str(tmp_path / "nope"), str(tmp_path / "q.h5ad"), "-o", str(tmp_path / "o.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_map_with_new_factors_writes_novelty(tmp_path, capsys):
    reference, query_adata = _saved_reference(tmp_path)
    _query(query_adata).write_h5ad(tmp_path / "query.h5ad")
    argv = ["map", str(tmp_path / "ref"), str(tmp_path / "query.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    argv += ["--n-new-factors", "2", "--max-epochs", "2", "--batch-size", "64", "--save-model", str(tmp_path / "q")]
    argv += ["--seed", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_ldvae"].shape == (query_adata.n_obs, N_LATENT + 2)
    assert out.varm["ldvae_loadings"].shape == (out.n_vars, N_LATENT + 2)
    np.testing.assert_array_equal(out.varm["ldvae_loadings"][:, :N_LATENT], reference.get_loadings().to_numpy())
    assert (out.obs["novelty"] >= 0).all()
    loaded = LinearSCVI.load(tmp_path / "q", out)
    assert loaded.seed == 3
    np.testing.assert_array_equal(loaded.get_novelty(), out.obs["novelty"].to_numpy())
