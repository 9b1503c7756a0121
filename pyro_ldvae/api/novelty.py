"""Reading a query model's new factors: which switched on, and which cells they describe.

A query model with ``n_new_factors=K`` (see :func:`pyro_ldvae.api.query.load_query_data`)
explains a cell's log expression as the reference's factors plus ``W_new z_new``. The query's
batch columns hold its per-gene offset, so they also take a program's average over the query's
cells: a cell that lacks the program then has ``z_new`` below the query's average, not 0. Each new
factor is therefore read against a baseline: oriented so that its strongest gene goes up
(``s_k``, the sign of its largest loading), with the query's least-expressing cells (the
``BASELINE_QUANTILE`` quantile of ``s_k z_nk``, on the cells the model was trained on) as zero.
What the new factors add to cell n is then ``d_n = sum_k W_k s_k max(0, s_k z_nk - b_k)``
``(genes,)`` (natural-log units, at the posterior means); its spread over genes, ``std_g(d_ng)``,
is the cell's novelty: about 0 for a cell like the query's baseline, and ``s`` for a cell whose
expression the new programs change by about a factor ``exp(s)`` per gene. The spread is taken
over genes because the decoder's softmax ignores a shift shared by all genes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from . import programs

CHUNK = 4096  # cells per block of the (cells, genes) contribution
BASELINE_QUANTILE = 0.05  # of the oriented z_new on the training query: the cells taken as lacking the program


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


def _oriented_excess(model, z_new: np.ndarray, w_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max(0, s_k z_nk - b_k), s_k)``: each new factor's activity above the training query's baseline."""
    sign = np.sign(w_new[np.abs(w_new).argmax(axis=0), np.arange(w_new.shape[1])])  # (K,)
    sign[sign == 0] = 1.0
    n_ref = model.n_latent - w_new.shape[1]
    trained = model.get_latent_representation()[:, n_ref:]  # the query the model was trained on
    baseline = np.quantile(trained * sign, BASELINE_QUANTILE, axis=0)  # (K,)
    return np.maximum(z_new * sign - baseline, 0.0), sign


def get_novelty(
    self, adata: AnnData | None = None, indices: Sequence[int] | None = None, per_factor: bool = False
) -> np.ndarray | pd.DataFrame:
    """Per-cell novelty: how much the new factors change the cell's expression profile.

    The score of cell n is ``std_g(sum_k W_new_gk s_k a_nk)``, the spread over genes of the new
    factors' contribution to the cell's log expression (posterior means; natural-log units), with
    ``a_nk = max(0, s_k z_nk - b_k)`` factor k's activity above the query's baseline (see the
    module docstring: ``s_k`` orients the factor so that its strongest gene goes up, ``b_k`` is
    the 5% quantile of ``s_k z_nk`` on the query the model was trained on). It is about 0 for a
    cell like the query's least-expressing cells and grows with the strength of a program the
    reference lacks. A program that every query cell expresses equally cannot be told from the
    query's batch effect and scores 0.

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
    activity, sign = _oriented_excess(self, z_new, w_new)
    if per_factor:
        scores = activity * w_new.std(axis=0)  # std_g(W_gk s_k a_nk) = a_nk std_g(W_gk)
        index = (adata if adata is not None else self.adata).obs_names
        index = index if indices is None else index[np.asarray(indices)]
        return pd.DataFrame(scores, index=index, columns=[f"new_{k}" for k in range(w_new.shape[1])])
    oriented = (w_new * sign).T.astype(np.float64)  # (K, genes)
    scores = np.empty(len(z_new), dtype=np.float64)
    for start in range(0, len(z_new), CHUNK):
        contribution = activity[start : start + CHUNK].astype(np.float64) @ oriented  # (cells, genes)
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
