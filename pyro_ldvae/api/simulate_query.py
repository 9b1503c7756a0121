"""A reference and a query drawn from one linear model, the query optionally with a program the reference lacks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def simulate_query(
    n_reference: int = 1500,
    n_query: int = 600,
    n_genes: int = 100,
    n_latent: int = 3,
    n_reference_batches: int = 2,
    novel: bool = True,
    n_program_genes: int = 10,
    novel_fraction: float = 0.5,
    program_strength: float = 1.5,
    loadings_scale: float = 0.5,
    seed: int = 0,
) -> tuple[AnnData, AnnData]:
    """Draw a reference and a query (a batch of its own) from an LDVAE-like linear model.

    Log expression of cell n is ``W z_n + b_batch + intercept + a_n p`` with ``z_n ~ N(0, I)``,
    dense ``W ~ N(0, loadings_scale)`` ``(genes, n_latent)``, and a program ``p`` ``(genes,)``
    that is ``program_strength`` on ``n_program_genes`` random genes and 0 elsewhere; its activity
    ``a_n`` is ``Uniform(0.5, 1.5)`` in a ``novel_fraction`` of the query's cells (``novel=True``)
    and 0 in all other cells, so the reference never sees it. Counts are negative binomial with
    per-gene inverse dispersion around 3 and about 1,800 counts per cell.

    Parameters
    ----------
    n_reference, n_query
        Cells of the reference (spread over ``n_reference_batches`` batches) and of the query
        (batch ``'query'``).
    n_genes, n_latent
        Genes and shared factors.
    n_reference_batches
        Batches of the reference.
    novel
        Give the query the program; ``False`` draws a query with nothing new.
    n_program_genes, novel_fraction, program_strength
        Size of the program, the share of query cells that express it and its log fold change.
    loadings_scale
        Standard deviation of the shared loadings.
    seed
        Seeds everything; the global random state is untouched.

    Returns
    -------
    ``(reference, query)``: counts in ``X`` (CSR float32), ``obs['batch']``, ``obs['cell_type']``
    (the sign of the first factor), ``obs['novel']`` (the cell expresses the program),
    ``var['program']`` (the gene is in the program), ``varm['true_loadings']``, ``obsm['true_z']``.

    Examples
    --------
    >>> reference, query = simulate_query(seed=1)
    >>> int(query.var["program"].sum())
    10
    """
    rng = np.random.default_rng(seed)
    loadings = rng.normal(0.0, loadings_scale, size=(n_genes, n_latent))
    intercept = rng.normal(0.0, 1.0, size=n_genes)
    theta = 3.0 * np.exp(rng.normal(0.0, 0.5, size=n_genes))
    batch_effects = rng.normal(0.0, 0.3, size=(n_reference_batches + 1, n_genes))  # the query's last
    program = np.zeros(n_genes)
    program[rng.choice(n_genes, n_program_genes, replace=False)] = program_strength

    n_cells = n_reference + n_query
    batch = np.r_[rng.integers(0, n_reference_batches, size=n_reference), np.full(n_query, n_reference_batches)]
    z = rng.normal(size=(n_cells, n_latent))
    expressing = np.zeros(n_cells, dtype=bool)
    if novel:
        expressing[n_reference:] = rng.random(n_query) < novel_fraction
    activity = np.where(expressing, rng.uniform(0.5, 1.5, size=n_cells), 0.0)
    logits = z @ loadings.T + batch_effects[batch] + intercept + activity[:, None] * program  # (cells, genes)
    rho = np.exp(logits - logits.max(axis=1, keepdims=True))
    rho /= rho.sum(axis=1, keepdims=True)
    mu = np.exp(rng.normal(7.5, np.sqrt(0.1), size=n_cells))[:, None] * rho
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)  # NB as a Gamma-Poisson mixture

    names = [f"batch_{b}" for b in range(n_reference_batches)] + ["query"]
    obs = pd.DataFrame(
        {
            "batch": [names[b] for b in batch],
            "cell_type": np.where(z[:, 0] > 0, "a", "b"),
            "novel": expressing,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=obs,
        var=pd.DataFrame({"program": program != 0}, index=[f"gene_{g}" for g in range(n_genes)]),
    )
    adata.varm["true_loadings"] = loadings
    adata.obsm["true_z"] = z
    return adata[:n_reference].copy(), adata[n_reference:].copy()
