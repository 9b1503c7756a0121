"""Simulate counts by running the LDVAE Pyro model itself, with known loadings.

The truth is set into an ``LDVAE`` (no decoder batch norm, a per-gene intercept as bias) and
``pyro.infer.Predictive`` draws z, the library and the counts from ``LDVAE.model``: the data come
from exactly the generative process that is fitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    programs: int | Mapping[str, Sequence[int | str]] | None = None,
    program_size: int = 30,
    false_member_fraction: float = 0.2,
    missing_member_fraction: float = 0.2,
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
    programs
        Gene programs behind the first factors: a number of programs of ``program_size`` random
        genes each (named ``program_0...``), or a dict of program name to member genes (indices or
        names ``gene_<i>``). A program's members load positively on its factor (size
        ``loadings_scale * (0.5 + |N(0, 1)|)``), other genes not at all; the remaining factors
        follow ``loadings_density``.
    program_size
        Genes per program when ``programs`` is a number.
    false_member_fraction, missing_member_fraction
        Noise of the annotation written beside the truth: this fraction of its listed members are
        not true members, and this fraction of the true members are not listed.

    Returns
    -------
    AnnData with counts in ``X`` (CSR float32), ``obs['batch']``, the truth in
    ``varm['true_loadings']`` ``(genes, n_latent)``, ``obsm['true_z']`` ``(cells, n_latent)``,
    ``obs['true_library']`` and ``var['true_theta']``, ``var['true_intercept']``. With
    ``programs``: the true membership in ``varm['true_programs']`` ``(genes, programs)``, the
    noisy annotation in ``varm['programs']`` with the names in ``uns['terms']`` (expiMap's
    layout, so ``LinearSCVI(adata, gene_programs='programs')`` reads it).

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
    truth = _program_members(programs, program_size, n_genes, n_latent, rng)
    if truth is not None:
        sizes = loadings_scale * (0.5 + np.abs(rng.normal(size=truth.shape)))
        loadings[:, : truth.shape[1]] = np.where(truth.to_numpy(), sizes, 0.0)
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
    if truth is not None:
        adata.varm["true_programs"] = truth.to_numpy()
        adata.varm["programs"] = noisy_annotation(truth.to_numpy(), false_member_fraction, missing_member_fraction, rng)
        adata.uns["terms"] = np.asarray(truth.columns, dtype=str)
    adata.uns["simulation"] = {
        "gene_likelihood": gene_likelihood,
        "seed": seed,
        "loadings_scale": loadings_scale,
        "loadings_density": loadings_density,
    }
    return adata


def _program_members(
    programs: int | Mapping[str, Sequence[int | str]] | None,
    program_size: int,
    n_genes: int,
    n_latent: int,
    rng: np.random.Generator,
) -> pd.DataFrame | None:
    """True membership ``(genes, programs)`` of ``simulate``'s ``programs`` argument, or None."""
    if programs is None:
        return None
    if isinstance(programs, (int, np.integer)):
        if not 0 < program_size <= n_genes:
            raise ValueError(f"program_size must be in 1..n_genes={n_genes}, got {program_size}.")
        programs = {f"program_{k}": rng.choice(n_genes, program_size, replace=False) for k in range(programs)}
    if not 0 < len(programs) <= n_latent:
        raise ValueError(f"simulate needs 1..n_latent={n_latent} programs, got {len(programs)}.")
    names = [f"gene_{g}" for g in range(n_genes)]
    truth = pd.DataFrame(False, index=names, columns=[str(name) for name in programs])
    for name, genes in programs.items():
        labels = [names[g] if isinstance(g, (int, np.integer)) else str(g) for g in genes]
        unknown = set(labels).difference(names)
        if unknown:
            raise ValueError(f"Program {name!r} lists genes the simulation does not have: {sorted(unknown)[:5]}.")
        truth.loc[labels, str(name)] = True
    return truth


def noisy_annotation(
    truth: np.ndarray, false_fraction: float, missing_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A noisy copy of a ``(genes, programs)`` membership.

    Per program, ``missing_fraction`` of the true members are left out and non-members are
    added until ``false_fraction`` of the listed members are false.
    """
    for name, value in (("false_member_fraction", false_fraction), ("missing_member_fraction", missing_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    noisy = np.zeros_like(truth, dtype=bool)
    for k in range(truth.shape[1]):
        members, others = np.flatnonzero(truth[:, k]), np.flatnonzero(~truth[:, k])
        kept = rng.choice(members, int(round((1.0 - missing_fraction) * len(members))), replace=False)
        n_false = min(len(others), int(round(false_fraction * len(kept) / (1.0 - false_fraction))))
        noisy[kept, k] = True
        noisy[rng.choice(others, n_false, replace=False), k] = True
    return noisy
