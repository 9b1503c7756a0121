"""Small real datasets that ship with installed dependencies (no download).

``pbmc68k_counts`` recovers the raw UMI counts of scanpy's bundled ``pbmc68k_reduced``: its
``raw.X`` holds ``log1p(counts / n_counts * 1e4)``, so ``expm1(raw.X) * n_counts / 1e4`` is an
integer to within 0.1 and rounding gives the counts back. The 765 genes are the subset scanpy
stores in ``raw``, so library sizes are those of that subset.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def pbmc68k_counts() -> AnnData:
    """700 PBMCs x 765 genes of raw counts (CSR float32), cell types in ``obs['bulk_labels']``.

    Source: scanpy's ``scanpy.datasets.pbmc68k_reduced()`` (10x Genomics Fresh 68k PBMCs,
    Zheng et al. 2017), counts recovered as described in the module docstring. ``obsm`` keeps
    scanpy's PCA and UMAP for comparison.
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    normalised = reduced.raw.X.toarray() if sp.issparse(reduced.raw.X) else np.asarray(reduced.raw.X)
    scale = reduced.obs["n_counts"].to_numpy(dtype=np.float64)[:, None] / 1e4
    counts = np.rint(np.expm1(normalised.astype(np.float64)) * scale).astype(np.float32)
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=reduced.obs.copy(),
        var=reduced.raw.var.copy(),
        obsm={k: np.asarray(v) for k, v in reduced.obsm.items()},
    )
    adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced(), raw counts recovered from raw.X and obs['n_counts']"
    return adata
