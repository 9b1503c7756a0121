"""Writing a model's results into AnnData, scanpy style."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data.registry import Registry
from .io import package_version


def _h5ad_scalar(value):
    """A value h5ad can store in ``uns``: None and other objects become strings."""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def check_genes(adata: AnnData, var_names: pd.Index) -> None:
    """Refuse an AnnData whose genes are not the model's, in the model's order."""
    if list(adata.var_names) != list(var_names):
        raise ValueError(
            "adata.var_names differ from the model's genes; subset and order them as model.var_names first."
        )


def write_results(
    adata: AnnData,
    key: str,
    latent: np.ndarray,
    loadings: pd.DataFrame,
    variance: pd.DataFrame,
    settings: dict,
    registry: Registry,
    history: dict[str, pd.DataFrame],
) -> AnnData:
    """Store a model's results in ``adata`` (scanpy style) and return it.

    Writes ``obsm['X_<key>']`` (cells, n_latent) posterior means ``latent``,
    ``varm['<key>_loadings']`` (genes, n_latent) ``loadings`` and ``uns['<key>']`` with ``params``
    (``settings``), ``registry`` (JSON), ``history`` (per-epoch arrays), ``variance_explained`` and
    ``variance_explained_fraction`` (per factor, from ``variance``), ``factor_names`` and
    ``factor_order`` (by decreasing variance), ``version``. Everything in ``uns`` is h5ad-writable.
    """
    check_genes(adata, loadings.index)
    adata.obsm[f"X_{key}"] = np.asarray(latent, dtype=np.float32)
    adata.varm[f"{key}_loadings"] = loadings.to_numpy(dtype=np.float32)
    epochs = next(iter(history.values())).index if history else []
    adata.uns[key] = {
        "params": {k: _h5ad_scalar(v) for k, v in settings.items()},
        "registry": registry.to_json(),
        "history": {name: frame.iloc[:, 0].to_numpy(dtype=np.float64) for name, frame in history.items()},
        "history_epochs": np.asarray(epochs, dtype=np.int64),
        "variance_explained": variance["variance"].to_numpy(dtype=np.float64),
        "variance_explained_fraction": variance["fraction"].to_numpy(dtype=np.float64),
        "factor_names": np.asarray(loadings.columns, dtype=str),
        "factor_order": np.asarray(variance.sort_values("variance", ascending=False).index, dtype=str),
        "version": package_version(),
    }
    return adata
