"""Input checks: every bad input is rejected before any training time is spent.

Each check raises a ``ValueError`` whose message names the offending thing (the matrix, the
``obs`` column, the argument) and says how to fix it. The checks on the count matrix are cheap:
for sparse matrices they read only the stored values (``.data``), and dense matrices are
scanned in row chunks so that no temporary of the full matrix's size is made.

Where the checks run:

- ``LinearSCVI.setup_anndata`` (``data.register``): keys, layers, covariate columns, count values,
  empty AnnData, cells with zero total count (refused), genes that are zero everywhere (warned);
- ``LinearSCVI(...)``: :func:`check_model_args` before any data work, then the count values
  again on the matrix that is actually trained on (``data.CellData``);
- ``LinearSCVI.train``: :func:`check_train_args` and :func:`check_split`;
- inference on new data (``LinearSCVI._cells``): :func:`align_genes` and the count values.

Cells whose total count is zero are **refused**, not dropped: dropping would silently change
the cell order of ``obsm`` results, and their log library size (``log 0``) is undefined. The
message says how many there are and how to remove them.
"""

from __future__ import annotations

import logging
import numbers
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)

# Values examined per chunk of a dense matrix or of a sparse matrix's stored values.
CHUNK_VALUES = 1 << 22

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LIKELIHOODS = ("nb", "zinb", "poisson", "normal")
LATENT_DISTRIBUTIONS = ("normal", "ln")

FILTER_HINT = "scanpy.pp.filter_cells(adata, min_counts=1)"


def matrix_name(layer: str | None) -> str:
    """How messages refer to the registered count matrix."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _value_chunks(matrix):
    """The values of ``matrix`` as a sequence of 1-d numpy arrays (stored values for sparse)."""
    if sp.issparse(matrix):
        if not hasattr(matrix, "data") or matrix.format not in ("csr", "csc", "coo", "bsr"):
            matrix = matrix.tocsr()
        values = np.asarray(matrix.data)
        for start in range(0, values.size, CHUNK_VALUES):
            yield values[start : start + CHUNK_VALUES]
        return
    if not hasattr(matrix, "shape") or not hasattr(matrix, "dtype"):
        matrix = np.asarray(matrix)
    if len(matrix.shape) != 2:
        raise ValueError(f"the count matrix must be 2-d (cells x genes), got shape {matrix.shape}.")
    rows = max(1, CHUNK_VALUES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows]  # an on-disk (backed) sparse matrix gives a sparse block
        yield block.data if sp.issparse(block) else np.asarray(block).ravel()


def check_count_values(matrix, name: str = "adata.X", integers: bool = True) -> None:
    """Reject NaN/inf, negative and (unless ``integers=False``) non-integer values.

    Parameters
    ----------
    matrix
        Cells x genes counts: numpy array, scipy sparse matrix (any format) or array-like.
    name
        How the message names the matrix, e.g. ``"adata.layers['counts']"``.
    integers
        Also require whole numbers (raw counts). ``False`` is the opt-out for users who know
        their values are meant to be non-integer (e.g. ambient-corrected counts).

    Raises
    ------
    ValueError
        Naming the matrix, the problem, an example value and the fix.
    """
    dtype = np.dtype(getattr(matrix, "dtype", np.float64))
    if dtype.kind == "b":
        return
    if dtype.kind not in "iuf":
        raise ValueError(f"{name} has dtype {dtype}; counts must be numeric (integers or floats).")
    is_float = dtype.kind == "f"
    n_nonfinite = n_negative = n_fractional = 0
    example_negative = example_fraction = None
    for values in _value_chunks(matrix):
        if values.size == 0:
            continue
        if is_float:
            finite = np.isfinite(values)
            if not finite.all():
                n_nonfinite += int(values.size - finite.sum())
                continue
        if dtype.kind != "u" and values.min() < 0:
            negative = values < 0
            n_negative += int(negative.sum())
            example_negative = values[negative][0] if example_negative is None else example_negative
        if integers and is_float:
            fractional = values != np.rint(values)
            if fractional.any():
                n_fractional += int(fractional.sum())
                example_fraction = values[fractional][0] if example_fraction is None else example_fraction
    if n_nonfinite:
        raise ValueError(
            f"{name} has {n_nonfinite} NaN or infinite value(s); LDVAE needs finite raw counts. "
            "Remove the affected cells or genes, or register a layer of raw counts with layer=."
        )
    if n_negative:
        raise ValueError(
            f"{name} has {n_negative} negative value(s) (e.g. {example_negative:g}); counts cannot be negative. "
            "It looks scaled or centred (e.g. by scanpy.pp.scale): register the raw counts instead, "
            "with setup_anndata(adata, layer='counts') if they are in a layer."
        )
    if n_fractional:
        raise ValueError(
            f"{name} has {n_fractional} non-integer value(s) (e.g. {example_fraction:g}); LDVAE models raw counts "
            "and this looks normalized or log-transformed (e.g. by scanpy.pp.normalize_total / log1p). "
            "Point setup_anndata at raw counts with layer= (e.g. layer='counts'), or pass check_counts=False (--no-check-counts) "
            "if your values are meant to be non-integer (e.g. with gene_likelihood='normal')."
        )


def totals(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Total count per cell ``(cells,)`` and per gene ``(genes,)``, computed without densifying."""
    if sp.issparse(matrix):
        return np.asarray(matrix.sum(axis=1)).ravel(), np.asarray(matrix.sum(axis=0)).ravel()
    per_cell = np.zeros(matrix.shape[0])
    per_gene = np.zeros(matrix.shape[1])
    rows = max(1, CHUNK_VALUES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows]
        block = block.astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        per_cell[start : start + rows] = np.asarray(block.sum(axis=1)).ravel()
        per_gene += np.asarray(block.sum(axis=0)).ravel()
    return per_cell, per_gene


def check_shape(adata: AnnData) -> None:
    """Reject an AnnData with zero cells or zero genes."""
    if adata.n_obs == 0:
        raise ValueError(
            "adata has 0 cells (n_obs == 0); an empty AnnData, often from a filter or subset that matched nothing. "
            "Check the subset (e.g. adata[mask]) before setup_anndata."
        )
    if adata.n_vars == 0:
        raise ValueError(
            "adata has 0 genes (n_vars == 0); an empty AnnData, often from a gene filter that matched nothing. "
            "Check the gene subset before setup_anndata."
        )


def check_totals(
    matrix, obs_names: pd.Index | None = None, var_names: pd.Index | None = None, warn_genes: bool = True
) -> None:
    """Refuse cells with zero total count; warn about genes that are zero in every cell."""
    per_cell, per_gene = totals(matrix)
    empty = np.flatnonzero(per_cell == 0)
    if empty.size:
        names = list(obs_names[empty[:3]]) if obs_names is not None else list(empty[:3])
        raise ValueError(
            f"{empty.size} cell(s) have a total count of zero (e.g. {names}); their log library size is undefined "
            f"and they carry no information. Remove them first: {FILTER_HINT}."
        )
    silent = np.flatnonzero(per_gene == 0)
    if silent.size and warn_genes:
        names = list(var_names[silent[:3]]) if var_names is not None else list(silent[:3])
        warnings.warn(
            f"{silent.size} gene(s) are zero in every cell (e.g. {names}); they only cost time. "
            "Consider scanpy.pp.filter_genes(adata, min_cells=1).",
            UserWarning,
            stacklevel=3,
        )


def check_anndata(adata: AnnData, layer: str | None, check_counts: bool = True) -> None:
    """All checks on the registered matrix of a training AnnData (``setup_anndata``)."""
    if not isinstance(adata, AnnData):
        raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
    check_shape(adata)
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError(f"{matrix_name(layer)} is None; store the raw counts there or pass layer=.")
    check_count_values(matrix, matrix_name(layer), integers=check_counts)
    check_totals(matrix, adata.obs_names, adata.var_names)


def continuous_covariates(obs: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """The columns ``keys`` of ``obs`` as ``(cells, len(keys))`` float32, checked: present, numeric, finite."""
    for key in keys:
        if key not in obs.columns:
            raise ValueError(f"continuous covariate {key!r} is not a column of adata.obs; add it or set up without it.")
        column = obs[key]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise ValueError(
                f"continuous covariate obs[{key!r}] is not numeric (dtype {column.dtype}); "
                "convert it (e.g. pd.to_numeric) or register it as a categorical covariate."
            )
        if not np.isfinite(column.to_numpy(dtype=float)).all():
            raise ValueError(f"continuous covariate obs[{key!r}] has NaN or infinite values; fill or drop them.")
    return obs[keys].to_numpy(dtype=np.float32)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_model_args(
    n_hidden,
    n_latent,
    n_layers,
    dropout_rate,
    dispersion,
    gene_likelihood,
    latent_distribution,
) -> None:
    """Reject model arguments that would fail later or silently train a wrong model."""
    for name, value in (("n_latent", n_latent), ("n_hidden", n_hidden), ("n_layers", n_layers)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(dropout_rate, numbers.Real) or isinstance(dropout_rate, bool) or not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}.")
    for name, value, allowed in (
        ("dispersion", dispersion, DISPERSIONS),
        ("gene_likelihood", gene_likelihood, LIKELIHOODS),
        ("latent_distribution", latent_distribution, LATENT_DISTRIBUTIONS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def check_labels_for_dispersion(dispersion: str, labels_key: str | None) -> None:
    """'gene-label' dispersion needs labels registered by ``setup_anndata``."""
    if dispersion == "gene-label" and labels_key is None:
        raise ValueError(
            "dispersion='gene-label' needs labels, but setup_anndata was called without labels_key; "
            "call LinearSCVI.setup_anndata(adata, labels_key=...) or use dispersion='gene'."
        )


def check_train_args(
    max_epochs, batch_size, train_size=None, validation_size=None, gradient_clip_val=None, checkpoint_every=1
) -> None:
    """Reject training arguments that are out of range."""
    if not _is_int(max_epochs) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive integer, got {max_epochs!r}.")
    if not _is_int(batch_size) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer of at least 2 (batch norm needs 2 cells), got {batch_size!r}.")
    for name, value in (("train_size", train_size), ("validation_size", validation_size)):
        if value is not None and (not isinstance(value, numbers.Real) or not 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1] or None, got {value!r}.")
    if gradient_clip_val is not None and (not isinstance(gradient_clip_val, numbers.Real) or not gradient_clip_val > 0):
        raise ValueError(f"gradient_clip_val must be a positive number or None, got {gradient_clip_val!r}.")
    if not _is_int(checkpoint_every) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer (epochs), got {checkpoint_every!r}.")


def check_split(n_obs: int, train_idx: np.ndarray, batch_size: int) -> None:
    """Refuse a split whose training set cannot fill one minibatch of 2 cells (batch norm's minimum)."""
    if len(train_idx) < 2:
        fix = f"pass train_size=1.0 to train on all {n_obs}" if n_obs >= 2 else "use more cells"
        raise ValueError(
            f"Only {len(train_idx)} of {n_obs} cell(s) are left for training (batch norm needs at least 2 per "
            f"minibatch; a last minibatch of 1-2 cells moves to validation): {fix}."
        )


def align_genes(adata: AnnData, var_names: pd.Index) -> AnnData:
    """``adata`` with its genes in the model's order: reordered (as a view) when every gene is present.

    Extra genes are dropped, reordered genes are put in order; missing genes are an error that
    names some of them.
    """
    if adata.n_vars == len(var_names) and (adata.var_names == var_names).all():
        return adata
    if not adata.var_names.is_unique:
        duplicated = list(adata.var_names[adata.var_names.duplicated()][:5])
        raise ValueError(
            f"adata.var_names has duplicates (e.g. {duplicated}); make them unique (adata.var_names_make_unique()) "
            "so genes can be matched to the model's."
        )
    missing = var_names.difference(adata.var_names, sort=False)
    if len(missing):
        raise ValueError(
            f"{len(missing)} of the model's {len(var_names)} genes are missing from adata.var_names "
            f"(e.g. {list(missing[:5])}); the model needs every gene it was trained on, in any order."
        )
    extra = adata.n_vars - len(var_names)
    logger.info("Matching genes to the model: %d extra gene(s) dropped, order aligned.", extra)
    return adata[:, var_names]
