"""How many factors a fit uses: the principal axes of its fitted factor logits.

For cell n the factor part of the decoder logits is ``W z_n`` ``(genes,)``. Two fits that agree
on the logits agree on the data, whatever their columns: the same signal can sit in one column,
be rotated among several, or be split over two columns whose z are strongly correlated. The
number of factors a fit uses is therefore read off the logits themselves: the principal axes of
``Z W^T`` across cells, with each gene-column of ``W`` centred over genes first, because the
softmax over genes ignores a shift shared by all genes (that part of ``W`` is not identified).

The covariance of the logits across cells is ``W_c C W_c^T`` with ``C = Cov_n(z_n)``
``(n_latent, n_latent)`` and ``W_c`` the gene-centred loadings; its non-zero eigenvalues are
those of ``C^(1/2) W_c^T W_c C^(1/2)``, an ``(n_latent, n_latent)`` matrix, so no
``(cells, genes)`` array is formed.
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData


def principal_logit_spread(latent: np.ndarray, loadings: np.ndarray) -> np.ndarray:
    """Spread (standard deviation across cells) of the fitted factor logits along their principal axes.

    Parameters
    ----------
    latent
        Posterior means of the factors, ``(cells, n_latent)`` (what the decoder sees of z).
    loadings
        Loadings ``W``, ``(genes, n_latent)``.

    Returns
    -------
    np.ndarray
        ``(n_latent,)``, largest first: the square roots of the variances of ``Z W_c^T`` along its
        principal axes, summed over genes.
    """
    latent = np.asarray(latent, dtype=np.float64)
    loadings = np.asarray(loadings, dtype=np.float64)
    if latent.ndim != 2 or loadings.ndim != 2 or latent.shape[1] != loadings.shape[1]:
        raise ValueError(
            f"latent (cells, n_latent) and loadings (genes, n_latent) must share n_latent; got shapes "
            f"{latent.shape} and {loadings.shape}."
        )
    centred = loadings - loadings.mean(axis=0)  # the softmax ignores a shift shared by all genes
    covariance = np.atleast_2d(np.cov(latent, rowvar=False))  # (n_latent, n_latent)
    values, vectors = np.linalg.eigh(covariance)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # C^(1/2)
    variances = np.linalg.eigvalsh(root @ centred.T @ centred @ root)[::-1]
    return np.sqrt(np.clip(variances, 0.0, None))


def count_active(spread: np.ndarray, threshold: float) -> int:
    """Count the principal axes whose spread is at least ``threshold`` times the largest.

    Parameters
    ----------
    spread
        Spreads along the principal axes, as returned by :func:`principal_logit_spread`.
    threshold
        Relative spread in ``(0, 1]`` below which an axis is not counted.

    Returns
    -------
    int
        The number of active factors (0 when every spread is 0).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    spread = np.asarray(spread, dtype=np.float64)
    if spread.size == 0 or spread.max() <= 0:
        return 0
    return int((spread >= threshold * spread.max()).sum())


def get_active_factors(self, threshold: float = 0.3, adata: AnnData | None = None) -> list[str]:
    """Return the factors the fit uses, strongest first (by :meth:`get_factor_variance_explained`).

    ``LinearSCVI.get_active_factors``; ``self`` is the model.

    Their number is that of the principal axes of the fitted factor logits whose spread is at
    least ``threshold`` (in ``(0, 1]``) times the strongest's, on ``adata`` (default: the training
    data): a signal rotated or split over columns counts once (``pyro_ldvae.api.factor_selection``).
    """
    spread = principal_logit_spread(self.get_latent_representation(adata), self.get_loadings())
    frame = self.get_factor_variance_explained(adata, sort=True)
    return list(frame.index[: count_active(spread, threshold)])
