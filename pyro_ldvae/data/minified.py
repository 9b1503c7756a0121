"""Minified AnnData: the latent posterior and library size stored per cell, the counts dropped.

scvi-tools' layout (``minify_adata``): ``obsm['_scvi_latent_qzm']`` and ``obsm['_scvi_latent_qzv']``
hold the posterior mean and variance of z, ``obs['_scvi_observed_lib_size']`` the total count and
``uns['_scvi_adata_minify_type']`` the kind; ``X`` and every layer become all-zero sparse matrices
of the same shape unless the counts are kept. Minibatches of such cells carry the stored posterior
and log library, which the guide and model take in place of the encoder's and the counts' sum.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from .cells import CellData
from .minibatch import Minibatch
from .registry import Registry, get_counts

MINIFY_TYPE_KEY = "_scvi_adata_minify_type"
LATENT_QZM_KEY, LATENT_QZV_KEY = "_scvi_latent_qzm", "_scvi_latent_qzv"
OBSERVED_LIB_SIZE_KEY = "_scvi_observed_lib_size"
LATENT_POSTERIOR = "latent_posterior_parameters"
LATENT_POSTERIOR_WITH_COUNTS = "latent_posterior_parameters_with_counts"
MINIFY_TYPES = (LATENT_POSTERIOR, LATENT_POSTERIOR_WITH_COUNTS)


def minify_type(adata: AnnData) -> str | None:
    """The kind of minified data ``adata`` holds, or None for an ordinary AnnData."""
    kind = adata.uns.get(MINIFY_TYPE_KEY)
    return None if kind is None else str(kind)


def minified_copy(adata: AnnData, layer: str | None, qzm: np.ndarray, qzv: np.ndarray, kind: str) -> AnnData:
    """A copy of ``adata`` with the posterior of z and the observed library size stored.

    Unless ``kind`` keeps the counts, ``X`` and the layers become all-zero sparse matrices and
    ``raw`` is dropped; ``adata`` itself is unchanged.
    """
    if kind not in MINIFY_TYPES:
        raise ValueError(f"minified_data_type must be one of {list(MINIFY_TYPES)}, got {kind!r}.")
    library = np.asarray(get_counts(adata, layer).sum(axis=1), dtype=np.float64).ravel()
    mini = adata.copy()
    if kind == LATENT_POSTERIOR:
        del mini.raw
        mini.X = sp.csr_matrix(adata.shape, dtype=np.float32)
        for name in list(mini.layers):
            mini.layers[name] = sp.csr_matrix(adata.shape, dtype=np.float32)
    mini.obsm[LATENT_QZM_KEY], mini.obsm[LATENT_QZV_KEY] = np.asarray(qzm), np.asarray(qzv)
    mini.obs[OBSERVED_LIB_SIZE_KEY] = library
    mini.uns[MINIFY_TYPE_KEY] = kind
    return mini


class MinifiedCellData(CellData):
    """Cells of a minified AnnData; minibatches carry the stored posterior of z and log library size."""

    def __init__(self, adata: AnnData, registry: Registry):
        for where, key in (("obsm", LATENT_QZM_KEY), ("obsm", LATENT_QZV_KEY), ("obs", OBSERVED_LIB_SIZE_KEY)):
            if key not in getattr(adata, where):
                raise ValueError(f"This minified AnnData has no {where}[{key!r}]; minify it with model.minify_adata().")
        super().__init__(adata, registry)
        self.counts_kept = minify_type(adata) == LATENT_POSTERIOR_WITH_COUNTS
        self.qz_loc = np.asarray(adata.obsm[LATENT_QZM_KEY], dtype=np.float32)
        self.qz_var = np.asarray(adata.obsm[LATENT_QZV_KEY], dtype=np.float32)
        self.library = np.asarray(adata.obs[OBSERVED_LIB_SIZE_KEY], dtype=np.float64)
        if self.qz_loc.shape != self.qz_var.shape or len(self.qz_loc) != self.n_obs:
            raise ValueError(
                f"The stored posterior has shapes {self.qz_loc.shape} and {self.qz_var.shape}; both must be "
                f"(cells={self.n_obs}, n_latent)."
            )
        if not (self.library > 0).all():
            raise ValueError(f"obs[{OBSERVED_LIB_SIZE_KEY!r}] must be positive for every cell (a total count).")

    def library_sizes(self) -> np.ndarray:
        """The stored total counts per cell, ``(cells,)``."""
        return self.library.copy()

    def minibatch(self, idx: np.ndarray, device: torch.device | str = "cpu", *args, **kwargs) -> Minibatch:
        """The cells ``idx`` as :meth:`CellData.minibatch` gives them, with the stored posterior and log library."""
        mb = super().minibatch(idx, device, *args, **kwargs)
        idx = np.asarray(idx)
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)  # noqa: E731
        return replace(
            mb, qz_loc=tensor(self.qz_loc), qz_var=tensor(self.qz_var), library=tensor(np.log(self.library)).float()
        )


def require_counts(cells: CellData, what: str) -> None:
    """Raise ``ValueError`` when ``cells`` are minified without their counts, which ``what`` needs."""
    if isinstance(cells, MinifiedCellData) and not cells.counts_kept:
        raise ValueError(
            f"{what} needs the counts, which minify_adata dropped from this AnnData: pass the full AnnData "
            "(adata=...) or set model.adata to it."
        )
