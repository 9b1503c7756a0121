"""Small models on ../shared/data, trained once per test session and shared by test files.

Genes are subset to the most variable ones (variance of log-normalized expression, always
keeping the marker genes the tests look for) and training is short, so each model trains in
seconds on two cores.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
PANCREAS = DATA / "pancreas_baron_human_2142.h5ad"
PBMC4K = DATA / "pbmc4k_2170.h5ad"

shared_data = pytest.mark.shared_data


def require(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (tests on ../shared/data run from a checkout next to it)")


def variable_genes(adata, n_top: int, keep: list[str]) -> list[str]:
    """The ``n_top`` genes of largest variance of log1p(counts / size * 1e4), plus ``keep``."""
    counts = sp.csr_matrix(adata.X)
    size = np.asarray(counts.sum(1)).ravel()
    norm = sp.diags(1e4 / np.maximum(size, 1)) @ counts
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    genes = list(adata.var_names[np.argsort(-var)[:n_top]])
    return genes + [g for g in keep if g not in genes]


@functools.cache
def pancreas_model():
    """Pancreas (4 donors), 400 genes, batch_key='donor', 12 epochs."""
    import anndata

    import pyro_ldvae

    require(PANCREAS)
    adata = anndata.read_h5ad(PANCREAS)
    adata = adata[:, variable_genes(adata, 400, ["INS", "GCG", "SST", "PPY"])].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="donor", labels_key="cell_type1")
    model = pyro_ldvae.LinearSCVI(adata, n_latent=10, seed=0)
    model.train(max_epochs=12, progress_bar=False, plan_kwargs={"lr": 3e-3})
    return model


@functools.cache
def pbmc4k_model():
    """PBMC 4k, 400 genes, observed library size, trained on 1800 cells; returns (model, held-out AnnData of 370 cells)."""
    import anndata

    import pyro_ldvae

    require(PBMC4K)
    adata = anndata.read_h5ad(PBMC4K)
    adata = adata[:, variable_genes(adata, 400, ["MS4A1", "CD79A", "CD3E", "LYZ"])].copy()
    order = np.random.RandomState(0).permutation(adata.n_obs)
    train, held_out = adata[np.sort(order[:1800])].copy(), adata[np.sort(order[1800:])].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(train)
    # The latent library is weakly identified in short fits (scvi-tools' too); the observed one is not.
    model = pyro_ldvae.LinearSCVI(train, n_latent=10, seed=0, use_observed_lib_size=True)
    model.train(max_epochs=25, batch_size=64, progress_bar=False, plan_kwargs={"lr": 2e-2})
    return model, held_out
