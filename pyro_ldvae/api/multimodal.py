"""MuData: set up, train on and write results into the RNA modality of a multimodal object.

``mudata`` is optional: nothing here imports it; a MuData is recognised by its type's name and
its ``mod`` mapping. The setup is the RNA modality's own (``setup_anndata``), plus the name of
that modality in ``mdata.uns['_pyro_ldvae_mudata']``, so every model method that takes an
AnnData also takes the MuData.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from mudata import MuData

MUDATA_KEY = "_pyro_ldvae_mudata"
SETUP_ARGS = ("rna_layer", "batch_key", "labels_key", "categorical_covariate_keys", "continuous_covariate_keys")


def is_mudata(data: Any) -> bool:
    """Whether ``data`` is a MuData (checked without importing ``mudata``)."""
    return type(data).__name__ == "MuData" and hasattr(data, "mod")


def split(data: AnnData | MuData | None) -> tuple[MuData | None, AnnData | None]:
    """``(mdata, its RNA modality)`` for a set-up MuData; ``(None, data)`` for an AnnData or None."""
    if not is_mudata(data):
        return None, data
    setup = data.uns.get(MUDATA_KEY)
    if setup is None or setup.get("rna_mod") not in data.mod:
        raise ValueError(
            "This MuData is not set up for pyro_ldvae; call "
            "LinearSCVI.setup_mudata(mdata, modalities={'rna_layer': '<RNA modality>'}) first."
        )
    return data, data.mod[setup["rna_mod"]]


def _copy_column(mdata: MuData, rna: AnnData, key: str, modality: str | None) -> None:
    """Put ``key`` from ``mdata.obs`` (``modality`` None) or ``mdata.mod[modality].obs`` into ``rna.obs``."""
    source = mdata.obs if modality is None else mdata.mod[modality].obs
    where = "mdata.obs" if modality is None else f"mdata.mod[{modality!r}].obs"
    if key not in source.columns:
        raise ValueError(f"{key!r} is not a column of {where}; the modalities argument names where each key lives.")
    missing = ~rna.obs_names.isin(source.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} cells of the RNA modality are not in {where}, so {key!r} is unknown there."
        )
    rna.obs[key] = source[key].reindex(rna.obs_names).to_numpy()


def setup_mudata(
    cls,
    mdata: MuData,
    rna_layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    modalities: dict[str, str] | None = None,
    check_counts: bool = True,
) -> None:
    """Register the RNA modality of ``mdata`` (scvi-tools' ``setup_mudata`` arguments); the model trains on it.

    Parameters
    ----------
    mdata
        A MuData whose RNA modality holds raw counts.
    rna_layer
        Layer of the RNA modality holding the counts; ``None`` uses its ``X``.
    batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
        ``obs`` columns, as in :meth:`~pyro_ldvae.LinearSCVI.setup_anndata`.
    modalities
        Maps each argument name to the modality whose ``obs`` holds it, as scvi-tools does:
        ``{"rna_layer": "rna", "batch_key": "rna"}``. ``rna_layer`` must be given; a key without
        a modality is read from ``mdata.obs``. Keys found outside the RNA modality are copied
        into its ``obs`` (aligned by cell name), since the model reads them there.
    check_counts
        Refuse non-integer counts; see :func:`pyro_ldvae.data.registry.register`.

    Examples
    --------
    >>> LinearSCVI.setup_mudata(mdata, batch_key="donor", modalities={"rna_layer": "rna"})
    >>> model = LinearSCVI(mdata, n_latent=10)
    >>> model.train()
    >>> model.to_adata(mdata)  # mdata.mod['rna'].obsm['X_ldvae'], varm, uns; mdata.obsm['X_ldvae']
    """
    if modalities is None:
        raise ValueError("Modalities cannot be None; name the RNA modality, e.g. modalities={'rna_layer': 'rna'}.")
    extra = set(modalities) - set(SETUP_ARGS)
    if extra:
        raise ValueError(f"Extraneous modality mapping(s) detected: {sorted(extra)}; allowed: {list(SETUP_ARGS)}.")
    rna_mod = modalities.get("rna_layer")
    if rna_mod not in mdata.mod:
        raise ValueError(f"modalities['rna_layer'] must name a modality of mdata ({list(mdata.mod)}), got {rna_mod!r}.")
    rna = mdata.mod[rna_mod]
    given = {
        "batch_key": [batch_key],
        "labels_key": [labels_key],
        "categorical_covariate_keys": categorical_covariate_keys or [],
        "continuous_covariate_keys": continuous_covariate_keys or [],
    }
    for arg, keys in given.items():
        modality = modalities.get(arg)
        for key in keys:
            if key is not None and modality != rna_mod:
                _copy_column(mdata, rna, key, modality)
    cls.setup_anndata(
        rna, batch_key, labels_key, rna_layer, categorical_covariate_keys, continuous_covariate_keys, check_counts
    )
    mdata.uns[MUDATA_KEY] = {"rna_mod": rna_mod, "modalities": json.dumps(dict(modalities))}


def write_back(mdata: MuData | None, adata: AnnData, key: str) -> AnnData | MuData:
    """After results went into the RNA modality ``adata``.

    Also ``mdata.obsm['X_<key>']`` (NaN for cells without RNA), and return ``mdata``; without a MuData return ``adata``.
    """
    if mdata is None:
        return adata
    rep = f"X_{key}"
    latent = pd.DataFrame(np.asarray(adata.obsm[rep]), index=adata.obs_names)
    mdata.obsm[rep] = latent.reindex(mdata.obs_names).to_numpy(dtype=np.float32)
    return mdata
