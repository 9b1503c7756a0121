"""Simulate counts by running the LDVAE Pyro model itself, with known loadings.

The truth is set into an ``LDVAE`` (no decoder batch norm, a per-gene intercept as bias) and
``pyro.infer.Predictive`` draws z, the library and the counts from ``LDVAE.model``: the data come
from exactly the generative process that is fitted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from pyro.infer import Predictive

from ..data.minibatch import Minibatch
from ..models.ldvae import LDVAE


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_latent: int = 5,
    n_batch: int = 1,
    gene_likelihood: str = "nb",
    seed: int = 0,
    loadings_scale: float = 0.5,
    loadings_density: float = 1.0,
    batch_effect_scale: float = 0.3,
    library_log_mean: float = 7.5,
    library_log_var: float = 0.1,
    theta_median: float = 3.0,
    dropout_logit: float = -2.0,
    chunk_size: int = 10_000,
) -> AnnData:
    """Draw an AnnData of counts from the LDVAE generative model with known loadings.

    Parameters
    ----------
    n_cells, n_genes, n_latent, n_batch
        Sizes; cells are assigned to batches evenly at random.
    gene_likelihood
        'nb', 'zinb' or 'poisson'.
    seed
        Seeds the true parameters and the draws; the global torch RNG is left untouched.
    loadings_scale
        Standard deviation of the non-zero true loadings.
    loadings_density
        Fraction of genes each factor touches (1.0: dense loadings).
    batch_effect_scale
        Standard deviation of the per-batch decoder columns.
    library_log_mean, library_log_var
        Prior of the log library size (about 1,800 counts per cell by default).
    theta_median
        Median inverse dispersion; per-gene theta is log-normal around it.
    dropout_logit
        Mean logit of the zero-inflation gate ('zinb' only).

    Returns
    -------
    AnnData with counts in ``X`` (CSR float32), ``obs['batch']``, the truth in
    ``varm['true_loadings']`` ``(genes, n_latent)``, ``obsm['true_z']`` ``(cells, n_latent)``,
    ``obs['true_library']`` and ``var['true_theta']``, ``var['true_intercept']``.

    Examples
    --------
    >>> adata = simulate(n_cells=1000, n_genes=200, n_latent=3)
    >>> adata.varm["true_loadings"].shape
    (200, 3)
    """
    rng = np.random.default_rng(seed)
    loadings = rng.normal(0.0, loadings_scale, size=(n_genes, n_latent))
    if loadings_density < 1.0:
        active = np.zeros((n_genes, n_latent), dtype=bool)
        n_active = max(1, int(round(loadings_density * n_genes)))
        for k in range(n_latent):
            active[rng.choice(n_genes, n_active, replace=False), k] = True
        loadings = np.where(active, loadings, 0.0)
    batch_columns = (
        rng.normal(0.0, batch_effect_scale, size=(n_genes, n_batch)) if n_batch > 1 else np.zeros((n_genes, 0))
    )
    intercept = rng.normal(0.0, 1.0, size=n_genes)
    theta = theta_median * np.exp(rng.normal(0.0, 0.5, size=n_genes))
    batch = rng.integers(0, n_batch, size=n_cells)

    module = LDVAE(
        n_genes,
        n_batch=n_batch,
        n_latent=n_latent,
        gene_likelihood=gene_likelihood,
        use_batch_norm=False,
        bias=True,
        library_log_means=np.full(max(n_batch, 1), library_log_mean),
        library_log_vars=np.full(max(n_batch, 1), library_log_var),
    ).eval()
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        module.decoder.factor_regressor.linear.weight.copy_(as_tensor(np.hstack([loadings, batch_columns])))
        module.decoder.factor_regressor.linear.bias.copy_(as_tensor(intercept))
        module.theta_unconstrained.copy_(as_tensor(np.log(theta)))
        if gene_likelihood == "zinb":
            gate = module.decoder.px_dropout_decoder.linear
            gate.weight.copy_(as_tensor(rng.normal(0.0, 0.1, size=gate.weight.shape)))
            gate.bias.copy_(as_tensor(rng.normal(dropout_logit, 0.5, size=n_genes)))

    predictive = Predictive(module.model, num_samples=1, return_sites=["x", "z", "library"])
    counts, z, library = [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n_cells, chunk_size):
            b = torch.as_tensor(batch[start : start + chunk_size])
            draw = predictive(Minibatch(x=None, batch=b, labels=torch.zeros_like(b)))
            counts.append(sp.csr_matrix(draw["x"][0].numpy().astype(np.float32)))
            z.append(draw["z"][0].numpy())
            library.append(draw["library"][0].numpy())

    adata = AnnData(
        X=sp.vstack(counts).tocsr(),
        obs=pd.DataFrame(
            {"batch": pd.Categorical([f"batch_{b}" for b in batch]), "true_library": np.concatenate(library)},
            index=[f"cell_{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(
            {"true_theta": theta, "true_intercept": intercept}, index=[f"gene_{g}" for g in range(n_genes)]
        ),
    )
    adata.varm["true_loadings"] = loadings
    adata.obsm["true_z"] = np.concatenate(z)
    adata.uns["simulation"] = {
        "gene_likelihood": gene_likelihood,
        "seed": seed,
        "loadings_scale": loadings_scale,
        "loadings_density": loadings_density,
    }
    return adata
