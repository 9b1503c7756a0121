"""The setup registry: which layer, which obs keys and which category orders a model was set up with.

It is stored as a JSON string in ``adata.uns['_pyro_ldvae_setup']`` so that it survives ``write_h5ad``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData

from . import validate

SETUP_KEY = "_pyro_ldvae_setup"


@dataclass
class Registry:
    """What ``setup_anndata`` registered: keys, category orders and sizes."""

    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    label_categories: list[str] = field(default_factory=lambda: ["0"])
    covariate_categories: dict[str, list[str]] = field(default_factory=dict)
    check_counts: bool = True  # False: non-integer values allowed (setup_anndata's opt-out)

    @property
    def n_batch(self) -> int:
        """Number of batch categories (1 without a batch key)."""
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """Number of label categories (1 without a labels key)."""
        return len(self.label_categories)

    @property
    def n_cats_per_cov(self) -> list[int]:
        """Number of categories of each categorical covariate, in key order."""
        return [len(self.covariate_categories[k]) for k in self.categorical_covariate_keys]

    def batch_codes(self, transform_batch: str | int | Sequence[str | int] | None) -> list[int | None]:
        """Batch codes to decode into: ``[None]`` (each cell's own batch), or one code per category.

        A value is a batch category's name, or its position among ``batch_categories``.
        """
        if transform_batch is None:
            return [None]
        single = isinstance(transform_batch, (str, int, np.integer))
        values = [transform_batch] if single else list(transform_batch)
        codes = []
        for value in values:
            if str(value) in self.batch_categories:
                codes.append(self.batch_categories.index(str(value)))
            elif isinstance(value, (int, np.integer)) and 0 <= value < self.n_batch:
                codes.append(int(value))
            else:
                raise ValueError(
                    f"transform_batch {value!r} is not a batch category; the model knows {self.batch_categories}."
                )
        return codes

    def to_json(self) -> str:
        """The registry as JSON, as stored in ``adata.uns``."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Registry:
        """A registry from :meth:`to_json`'s text."""
        return cls(**json.loads(text))


def _categories(column: pd.Series, key: str) -> list[str]:
    if column.isna().any():
        raise ValueError(
            f"obs[{key!r}] has {int(column.isna().sum())} missing values; fill them (for example with "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)) or drop those cells before setup_anndata."
        )
    strings, value_codes = _string_codes(column)
    occurs = np.zeros(len(strings), dtype=bool)
    occurs[value_codes] = True
    present = set(strings[occurs])
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted(present)


def _string_codes(column: pd.Series) -> tuple[pd.Index, np.ndarray]:
    """``column``'s distinct values as strings, and each cell's position among them ``(cells,)``.

    The same strings as ``column.astype(str)``, made once per distinct value rather than once per
    cell: a column of numbers would otherwise become a Python string per cell (about 60 bytes
    each), and any column an object array of 8 bytes per cell. ``column`` has no missing values
    (checked before).
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.categories.astype(str), column.cat.codes.to_numpy()
    value_codes, distinct = pd.factorize(column)
    return pd.Index(distinct).astype(str), value_codes


def _obs_column(adata: AnnData, key: str, role: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise ValueError(f"{role} {key!r} is not a column of adata.obs; available columns: {list(adata.obs.columns)}.")
    return adata.obs[key]


def register(
    adata: AnnData,
    batch_key: str | None = None,
    labels_key: str | None = None,
    layer: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    check_counts: bool = True,
) -> Registry:
    """Register which layer holds raw counts and which ``obs`` columns are batch, labels, covariates.

    The arguments come in scvi-tools' ``setup_anndata`` order, so positional calls written for
    scvi-tools register the same columns. The keys and the counts are checked
    (``validate.check_anndata``), the category orders recorded, and the registry written into
    ``adata.uns``.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw counts in ``X`` or in ``layer``.
    batch_key, labels_key
        ``obs`` columns of batches (enter the decoder, library prior, 'gene-batch') and labels.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``.
    categorical_covariate_keys, continuous_covariate_keys
        Extra ``obs`` columns that enter the linear decoder beside the batch.
    check_counts
        Refuse non-integer values (the usual sign of normalized or log-transformed data);
        ``False`` accepts them. NaN, infinite and negative values are always refused, and so
        are cells with a total count of zero (remove them with
        ``scanpy.pp.filter_cells(adata, min_counts=1)``).

    Returns
    -------
    The registry, also stored in ``adata.uns``.

    Raises
    ------
    ValueError
        For a missing layer or key, missing values in a batch/label column, a non-numeric
        continuous covariate, an empty AnnData, or counts that are not raw counts.
    """
    if not isinstance(adata, AnnData):
        raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}; wrap it: anndata.AnnData(X).")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer {layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}.")
    for name, keys in (
        ("categorical_covariate_keys", categorical_covariate_keys),
        ("continuous_covariate_keys", continuous_covariate_keys),
    ):
        if isinstance(keys, str):
            raise ValueError(f"{name} must be a list of obs columns, got the string {keys!r}; pass [{keys!r}].")
    registry = Registry(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        categorical_covariate_keys=list(categorical_covariate_keys or []),
        continuous_covariate_keys=list(continuous_covariate_keys or []),
        check_counts=bool(check_counts),
    )
    if batch_key is not None:
        registry.batch_categories = _categories(_obs_column(adata, batch_key, "batch_key"), batch_key)
    if labels_key is not None:
        registry.label_categories = _categories(_obs_column(adata, labels_key, "labels_key"), labels_key)
    for key in registry.categorical_covariate_keys:
        registry.covariate_categories[key] = _categories(_obs_column(adata, key, "categorical covariate"), key)
    validate.continuous_covariates(adata.obs, registry.continuous_covariate_keys)  # present, numeric, finite
    validate.check_anndata(adata, layer, check_counts)
    adata.uns[SETUP_KEY] = registry.to_json()
    return registry


def get_registry(adata: AnnData) -> Registry:
    """The registry ``setup_anndata`` stored in ``adata``; a clear error when there is none."""
    if SETUP_KEY not in adata.uns:
        raise ValueError("This AnnData is not set up: call LinearSCVI.setup_anndata(adata, ...) first.")
    return Registry.from_json(adata.uns[SETUP_KEY])


def get_counts(adata: AnnData, layer: str | None):
    """The registered count matrix (X or a layer), as stored: sparse stays sparse."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"layer {layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}.")
    return adata.layers[layer]


def code_dtype(n_categories: int) -> np.dtype:
    """The smallest signed integer dtype for codes ``0 .. n_categories - 1`` (and -1 for unseen).

    Codes are kept per cell for the whole training, so their width is memory per cell: int8
    instead of int64 saves 7 bytes per cell and key (7 MB per million cells). Minibatches widen
    them to int64.
    """
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def index_dtype(n: int) -> np.dtype:
    """int32 for positions ``0 .. n - 1`` that fit it, else int64 (half the memory per cell)."""
    return np.dtype(np.int32 if n <= np.iinfo(np.int32).max else np.int64)


def category_codes(adata: AnnData, key: str | None, categories: list[str], role: str) -> np.ndarray:
    """Codes ``(cells,)`` of ``obs[key]`` in ``categories``' order, in :func:`code_dtype`."""
    if key is None:
        return np.zeros(adata.n_obs, dtype=code_dtype(1))
    column = _obs_column(adata, key, role)
    if column.isna().any():
        raise ValueError(f"obs[{key!r}] has missing values; fill or drop those cells.")
    strings, value_codes = _string_codes(column)
    # (distinct values,) code of each distinct value, -1 where the model never saw it
    lookup = pd.Index(categories).get_indexer(strings).astype(code_dtype(len(categories)))
    codes = lookup[value_codes]
    if (codes < 0).any():
        unseen = sorted(set(strings[np.unique(value_codes[codes < 0])]))
        raise ValueError(
            f"obs[{key!r}] has categories the model never saw: {unseen[:5]}; the model knows {categories[:10]}."
        )
    return codes
