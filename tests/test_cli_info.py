"""``pyro-ldvae info``: the summary of a result file written by ``fit`` or ``to_adata``."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

import pyro_ldvae
from pyro_ldvae.api.cli import main


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    adata = pyro_ldvae.simulate(n_cells=150, n_genes=20, n_latent=3, n_batch=2, seed=2)
    path = tmp_path_factory.mktemp("info") / "counts.h5ad"
    adata.write_h5ad(path)
    out = path.with_name("out.h5ad")
    argv = ["fit", str(path), "-o", str(out), "--batch-key", "batch", "--n-latent", "3", "--n-hidden", "8"]
    assert main([*argv, "--max-epochs", "2", "--accelerator", "cpu"]) == 0
    return out


def test_info_prints_settings_factors_and_top_genes(result_file, capsys):
    capsys.readouterr()
    assert main(["info", str(result_file), "--n-top-genes", "2"]) == 0
    text = capsys.readouterr().out
    result = anndata.read_h5ad(result_file)
    stored = result.uns["ldvae"]
    assert "150 cells x 20 genes" in text and "n_latent=3" in text and "batch_key=batch" in text
    assert "training: 2 epochs" in text and "obsm['X_ldvae'] (150, 3)" in text
    factor_lines = [line.strip() for line in text.splitlines() if line.startswith("  Z_")]
    assert [line.split()[0] for line in factor_lines] == list(stored["factor_order"])
    loadings = result.varm["ldvae_loadings"][:, list(stored["factor_names"]).index(stored["factor_order"][0])]
    top = result.var_names[np.argsort(loadings)[::-1][:2]]
    assert f"+ {top[0]}, {top[1]} |" in factor_lines[0]


def test_info_on_a_to_adata_result(tmp_path, capsys):
    adata = pyro_ldvae.simulate(n_cells=100, n_genes=15, n_latent=2, seed=4)
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=1, progress_bar=False)
    model.to_adata(adata, key="mine")
    adata.write_h5ad(tmp_path / "r.h5ad")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "r.h5ad"), "--key", "mine"]) == 0
    text = capsys.readouterr().out
    assert "obsm['X_mine'] (100, 2)" in text and text.count("\n  Z_") == 2


def test_info_refuses_files_without_results(tmp_path, capsys):
    plain = pyro_ldvae.simulate(n_cells=20, n_genes=5, n_latent=1, seed=0)
    plain.write_h5ad(tmp_path / "plain.h5ad")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "plain.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "holds no pyro_ldvae results" in err and len(err.strip().splitlines()) == 1
    assert main(["info", str(tmp_path / "absent.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err
