"""Reading a query model's new factors: which switched on, and which cells they describe.

A query model with ``n_new_factors=K`` (see :func:`pyro_ldvae.api.query.load_query_data`)
explains a cell's log expression as the reference's factors plus ``W_new z_new``. What the new
factors add to cell n is the profile ``d_n = W_new z_new_n`` ``(genes,)`` (natural-log units, at
the posterior means); its spread over genes, ``std_g(d_ng)``, is the cell's novelty: 0 for a cell
the reference explains, and ``s`` for a cell whose expression the new programs change by about a
factor ``exp(s)`` per gene. The spread is taken over genes because the softmax of the decoder
ignores a shift shared by all genes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from . import programs

CHUNK = 4096  # cells per block of the (cells, genes) contribution


def factor_names(n_latent: int, settings: dict) -> list[str]:
    """Factor names: the reference's (``Z_k``, or programs then ``unannotated_k``), then a query's ``new_k``."""
    n_new = (settings.get("new_factors") or {}).get("n_new_factors", 0)
    return programs.factor_names(settings)[: n_latent - n_new] + [f"new_{j}" for j in range(n_new)]


def _new_parts(model, adata: AnnData | None, indices: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, int]:
    spec = model.init_params_.get("new_factors")
    if not spec:
        raise ValueError(
            "This model has no new factors; build the query model with "
            "LinearSCVI.load_query_data(adata, reference, n_new_factors=K) to score novelty."
        )
    n_ref = model.n_latent - spec["n_new_factors"]
    latent = model.get_latent_representation(adata, indices=indices)  # (cells, n_ref + K)
    loadings = model.module.get_loadings()  # (genes, n_ref + K)
    return latent, loadings, n_ref


def get_novelty(
    self, adata: AnnData | None = None, indices: Sequence[int] | None = None, per_factor: bool = False
) -> np.ndarray | pd.DataFrame:
    """Per-cell novelty: how much the new factors change the cell's expression profile.

    The score of cell n is ``std_g(sum_k W_new_gk z_nk)``, the spread over genes of the new
    factors' contribution to the cell's log expression (posterior means; natural-log units). It
    is 0 where the reference's factors explain the cell and grows with the strength of a program
    the reference lacks.

    Parameters
    ----------
    adata
        Cells to score (default: the query the model was built on).
    indices
        Positions of the cells to score (default: all).
    per_factor
        Return each new factor's own score, a DataFrame ``(cells, K)`` with columns ``new_k``.

    Returns
    -------
    ``(cells,)`` scores, or the per-factor DataFrame.

    Examples
    --------
    >>> query_model = LinearSCVI.load_query_data(query, reference, n_new_factors=3)
    >>> query_model.train(max_epochs=100)
    >>> query.obs["novelty"] = query_model.get_novelty()
    """
    latent, loadings, n_ref = _new_parts(self, adata, indices)
    z_new, w_new = latent[:, n_ref:], loadings[:, n_ref:]  # (cells, K), (genes, K)
    if per_factor:
        scores = np.abs(z_new) * w_new.std(axis=0)  # std_g(W_gk z_nk) = |z_nk| std_g(W_gk)
        index = (adata if adata is not None else self.adata).obs_names
        index = index if indices is None else index[np.asarray(indices)]
        return pd.DataFrame(scores, index=index, columns=[f"new_{k}" for k in range(w_new.shape[1])])
    scores = np.empty(len(z_new), dtype=np.float64)
    for start in range(0, len(z_new), CHUNK):
        contribution = z_new[start : start + CHUNK].astype(np.float64) @ w_new.T  # (cells, genes)
        scores[start : start + CHUNK] = contribution.std(axis=1)
    return scores


def get_new_factor_activity(self, adata: AnnData | None = None, threshold: float = 0.1) -> pd.DataFrame:
    """Which new factors switched on, measured against the reference's factors on the same cells.

    A factor's strength is the root mean square over cells of its contribution's spread over
    genes, ``std_g(W_gk) * sqrt(mean_n z_nk^2)`` (natural-log units). A new factor is ``active``
    when its strength exceeds ``threshold`` times the strongest reference factor's.

    Parameters
    ----------
    adata
        Cells to measure on (default: the query the model was built on).
    threshold
        The smallest strength, relative to the strongest reference factor, of an active factor.

    Returns
    -------
    DataFrame indexed by factor (``new_0`` ...) with ``strength``, ``relative`` and ``active``.
    """
    latent, loadings, n_ref = _new_parts(self, adata, None)
    strength = loadings.std(axis=0) * np.sqrt((latent.astype(np.float64) ** 2).mean(axis=0))  # (n_ref + K,)
    relative = strength[n_ref:] / strength[:n_ref].max()
    names = [f"new_{k}" for k in range(len(relative))]
    return pd.DataFrame(
        {"strength": strength[n_ref:], "relative": relative, "active": relative > threshold}, index=names
    )
