"""Denoised expression ``rho`` per cell, or samples of it for a group of cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from ..data.cells import CellData
from ..models.ldvae import LDVAE
from .importance import importance_resample
from .posterior import normalized_expression

Weights = Literal["uniform", "importance"]
IMPORTANCE_OPTIONS = ("max_cells", "truncation", "n_mc_samples", "n_mc_samples_per_pass")


def check_weights(weights: Weights | None, importance_weighting_kwargs: dict | None) -> Weights:
    """``weights`` ('uniform', 'importance'; None means 'uniform'), checked with its options."""
    weights = "uniform" if weights is None else weights
    if weights not in ("uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}.")
    unknown = sorted(set(importance_weighting_kwargs or {}) - set(IMPORTANCE_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown importance_weighting_kwargs {unknown}; the options are {list(IMPORTANCE_OPTIONS)}.")
    if importance_weighting_kwargs and weights != "importance":
        raise ValueError("importance_weighting_kwargs apply only with weights='importance'.")
    return weights


def gene_mask(var_names: pd.Index, gene_list: Sequence[str] | None) -> np.ndarray | slice:
    """The model's genes that are in ``gene_list``, as a mask ``(genes,)``; all genes for None."""
    if gene_list is None:
        return slice(None)
    missing = sorted(set(gene_list) - set(var_names))
    if missing:
        raise ValueError(f"gene_list has genes the model does not know: {missing[:10]}.")
    return np.asarray(var_names.isin(gene_list))


def expression_samples(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    batch_codes: Sequence[int | None] = (None,),
    mask: np.ndarray | slice = slice(None),
    library_size: float | Literal["latent"] = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    weights: Weights | None = None,
    batch_size: int = 128,
    importance_weighting_kwargs: dict | None = None,
    return_mean: bool = False,
) -> np.ndarray:
    """Normalized expression ``rho`` of the cells ``indices`` times ``library_size``.

    Parameters
    ----------
    module, cells, indices
        The model, the registered cells and the positions of those to use.
    batch_codes
        Decode every cell as if from each of these batch codes and average (None: each cell's
        own batch); see ``Registry.batch_codes``.
    mask
        Genes to keep, a mask ``(genes,)`` or a slice.
    library_size
        Scale to this library size; ``'latent'`` returns the expected counts ``exp(l) rho``.
    n_samples
        Posterior draws per cell.
    n_samples_overall
        Instead of per-cell draws, this many draws ``(n_samples_overall, genes)`` of the group
        of cells (what differential expression uses).
    weights
        How the ``n_samples_overall`` draws are picked: 'uniform' (default; None means the
        same) or 'importance', in proportion to their importance weights
        (:func:`pyro_ldvae.tasks.importance.importance_resample`; one batch code at most).
    batch_size
        Cells per forward pass.
    importance_weighting_kwargs
        Options of the importance weights: ``max_cells``, ``truncation``, ``n_mc_samples``,
        ``n_mc_samples_per_pass``.
    return_mean
        Average the ``n_samples`` draws as they are made: ``(1, cells, genes_selected)``, without
        holding the draws (ignored with ``n_samples_overall``).

    Returns
    -------
    ``(n_samples, cells, genes_selected)``, or ``(n_samples_overall, genes_selected)``.
    """
    if library_size != "latent" and not isinstance(library_size, (int, float, np.number)):
        raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}.")
    weights = check_weights(weights, importance_weighting_kwargs)
    if n_samples_overall is not None:
        n_samples = n_samples_overall // len(indices) + 1
    if weights == "importance":
        if n_samples_overall is None:
            raise ValueError(
                "weights='importance' picks the n_samples_overall samples of a group of cells; pass n_samples_overall."
            )
        if library_size == "latent":
            raise ValueError("weights='importance' samples rho; use a numeric library_size, not 'latent'.")
        if len(batch_codes) != 1:
            raise ValueError(
                "Importance weights cannot be computed for expression averaged over several transform_batch "
                "categories; pass one category."
            )
        rng = np.random.default_rng(np.random.randint(2**31))
        rho = importance_resample(
            module, cells, indices, n_samples, n_samples_overall, rng, batch_codes[0], batch_size,
            **(importance_weighting_kwargs or {}),
        )  # fmt: skip
        return rho[:, mask] * float(library_size)
    exprs = normalized_expression(
        module, cells, indices, batch_codes, mask, library_size, n_samples, batch_size,
        return_mean=return_mean and n_samples_overall is None,
    )  # (n_samples, cells, genes), or (1, cells, genes) with return_mean  # fmt: skip
    if n_samples_overall is None:
        return exprs
    flat = exprs.reshape(-1, exprs.shape[-1])
    return flat[np.random.choice(len(flat), n_samples_overall, replace=True)]


def feature_correlation(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    batch_codes: Sequence[int | None] = (None,),
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: float = 1000,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
) -> np.ndarray:
    """Gene-gene correlation of posterior samples of ``rna_size_factor * rho``, ``(genes, genes)``.

    For each batch code, ``n_samples`` draws per cell of the normalized expression are stacked
    into ``(n_samples * cells, genes)`` and correlated across rows ('spearman' ranks first,
    'pearson' does not); the matrices of several codes are averaged. A gene whose samples are
    constant has NaN correlations, as in scvi-tools.
    """
    if correlation_type not in ("spearman", "pearson"):
        raise ValueError(f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}.")
    from scipy.stats import spearmanr

    matrices = []
    for code in batch_codes:
        draws = normalized_expression(
            module, cells, indices, [code], slice(None), rna_size_factor, n_samples, batch_size
        )
        flat = draws.reshape(-1, draws.shape[-1])  # (n_samples * cells, genes)
        if correlation_type == "pearson":
            matrices.append(np.corrcoef(flat, rowvar=False))
        else:
            matrices.append(np.atleast_2d(spearmanr(flat).statistic))
    return np.mean(np.stack(matrices), axis=0)
