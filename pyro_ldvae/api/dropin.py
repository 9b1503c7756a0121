"""``LinearSCVI`` methods that exist for scvi-tools compatibility, with scvi-tools' return types.

Each function takes the model as its first argument; ``LinearSCVI`` binds them as methods, so
``model.get_elbo()`` here is ``get_elbo(model)``. (``model`` is not annotated: importing
``LinearSCVI`` here would be an import circle.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data import minified
from ..data.registry import SETUP_KEY
from ..infer.evaluate import evaluate_elbo
from ..kernels.compressed import CompressedBlocks
from ..tasks import posterior as tasks
from ..tasks.expression import feature_correlation, gene_mask
from . import io
from .results import check_genes

logger = logging.getLogger(__name__)


def _indices(cells, indices: Sequence[int] | None) -> np.ndarray:
    return np.arange(cells.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)


# Setup and data ------------------------------------------------------------------------------
def refuse_size_factor(size_factor_key: str | None) -> None:
    """Refuse ``size_factor_key`` of ``setup_anndata``, with the reason and what to use.

    scvi-tools' ``LinearSCVI.setup_anndata`` refuses it too (a ``TypeError`` from its
    ``register_fields``): LDVAE has no size-factor path.

    Raises
    ------
    ValueError
        Whenever ``size_factor_key`` is given.
    """
    if size_factor_key is not None:
        raise ValueError(
            f"size_factor_key={size_factor_key!r} is not supported: LinearSCVI's library size is latent, or the "
            "observed total count with LinearSCVI(..., use_observed_lib_size=True) (scvi-tools' LinearSCVI refuses "
            "the key too). Leave it out."
        )


def view_setup_args(dir_path: str, prefix: str | None = None) -> dict:
    """The setup arguments a saved model was registered with, read from its ``model.json``.

    Parameters
    ----------
    dir_path
        Directory written by :meth:`LinearSCVI.save`.
    prefix
        Prefix of the saved file names.

    Returns
    -------
    dict of ``setup_anndata``'s arguments (``batch_key``, ``labels_key``, ``layer``,
    ``categorical_covariate_keys``, ``continuous_covariate_keys``, ``check_counts``). It is
    logged and returned rather than printed (scvi-tools prints it and returns None).
    """
    registry = io.read_metadata(dir_path, prefix)["registry"]
    names = ("batch_key", "labels_key", "layer", "categorical_covariate_keys", "continuous_covariate_keys")
    args = {name: registry.get(name) for name in names}
    args["check_counts"] = registry.get("check_counts", True)
    logger.info("setup_anndata arguments of %s: %s", dir_path, args)
    return args


def view_anndata_setup(model, adata: AnnData | None = None, hide_state_registries: bool = False) -> dict:
    """The setup the model reads ``adata`` (default: the model's AnnData) with.

    Checks that ``adata`` fits the model (genes, registered columns, categories) and returns the
    registry as a dict: keys, layer and, unless ``hide_state_registries``, the category orders
    (``batch_categories``, ``label_categories``, ``covariate_categories``) and the sizes.
    """
    model.get_cells(adata)  # raises ValueError when adata does not fit the model
    registry = dict(model.registry.__dict__)
    if hide_state_registries:
        for key in ("batch_categories", "label_categories", "covariate_categories"):
            registry.pop(key)
    else:
        registry.update(n_batch=model.registry.n_batch, n_labels=model.registry.n_labels)
    registry.update(n_obs=(model.adata if adata is None else adata).n_obs, n_vars=len(model.var_names))
    return registry


def set_adata(model, adata: AnnData) -> None:
    """Attach ``adata`` to the model (the setter of ``model.adata``).

    ``adata`` must hold the model's genes in the model's order (``ValueError`` otherwise) and
    the registered ``obs`` columns with known categories. An AnnData not set up yet receives the
    model's setup.
    """
    if not isinstance(adata, AnnData):
        raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
    check_genes(adata, model.var_names)
    if SETUP_KEY not in adata.uns:
        adata.uns[SETUP_KEY] = model.registry.to_json()
    model.get_cells(adata)  # validates the registered columns against the model's categories
    model._adata = adata


def minify_adata(
    model,
    minified_data_type: Literal[
        "latent_posterior_parameters", "latent_posterior_parameters_with_counts"
    ] = minified.LATENT_POSTERIOR,
    use_latent_qzm_key: str = "X_latent_qzm",
    use_latent_qzv_key: str = "X_latent_qzv",
) -> None:
    """Replace the model's AnnData by a minified copy: the latent posterior kept, the counts dropped.

    As scvi-tools' ``minify_adata``: the copy holds ``adata.obsm[use_latent_qzm_key]`` and
    ``[use_latent_qzv_key]`` (the posterior mean and variance of z, from
    ``model.get_latent_representation(return_dist=True)``) under ``obsm['_scvi_latent_qzm']`` and
    ``['_scvi_latent_qzv']``, the total counts under ``obs['_scvi_observed_lib_size']``, and, for
    'latent_posterior_parameters', all-zero sparse ``X`` and layers and no ``raw``. The user's
    AnnData is left as it was. On the minified AnnData, ``get_latent_representation``,
    ``get_normalized_expression``, ``posterior_predictive_sample``, ``differential_expression``,
    ``get_likelihood_parameters`` and ``get_latent_library_size`` work from the stored posterior;
    ``save`` and ``load`` keep it. Training, the ELBO and importance weights need the counts.

    Parameters
    ----------
    minified_data_type
        'latent_posterior_parameters' drops the counts; 'latent_posterior_parameters_with_counts'
        keeps them (the stored posterior is still used).
    use_latent_qzm_key, use_latent_qzv_key
        ``obsm`` keys of the posterior mean and variance of z.

    Raises
    ------
    ValueError
        The model's library size is latent (``use_observed_lib_size=False``: as in scvi-tools, the
        stored library is the observed one), the AnnData is minified already, or the ``obsm`` keys
        are missing or of the wrong shape.
    """
    if not model.module.use_observed_lib_size:
        raise ValueError(
            "minify_adata needs a model with use_observed_lib_size=True (as in scvi-tools): the minified data "
            "keeps the observed library size, not the posterior of a latent one."
        )
    adata = model.adata
    if minified.minify_type(adata) is not None:
        raise ValueError("The model's AnnData is minified already.")
    for key in (use_latent_qzm_key, use_latent_qzv_key):
        if key not in adata.obsm:
            raise ValueError(
                f"adata.obsm has no {key!r}. Store the latent posterior first: qzm, qzv = "
                f"model.get_latent_representation(return_dist=True); model.adata.obsm[{use_latent_qzm_key!r}] = qzm; "
                f"model.adata.obsm[{use_latent_qzv_key!r}] = qzv."
            )
    qzm, qzv = np.asarray(adata.obsm[use_latent_qzm_key]), np.asarray(adata.obsm[use_latent_qzv_key])
    if qzm.shape != (adata.n_obs, model.n_latent) or qzv.shape != qzm.shape:
        raise ValueError(
            f"obsm[{use_latent_qzm_key!r}] and obsm[{use_latent_qzv_key!r}] must both be (cells, n_latent) = "
            f"({adata.n_obs}, {model.n_latent}); got {qzm.shape} and {qzv.shape}."
        )
    model._adata = minified.minified_copy(adata, model.registry.layer, qzm, qzv, minified_data_type)


def minified_data_type(model) -> str | None:
    """The kind of minified data the model's AnnData holds ('latent_posterior_parameters', ...), or None."""
    return minified.minify_type(model.adata)


# Evaluation, with scvi-tools' return types --------------------------------------------------
@torch.no_grad()
def get_elbo(
    model, adata: AnnData | None = None, indices: Sequence[int] | None = None,
    batch_size: int | None = None, return_mean: bool = True,
) -> torch.Tensor:  # fmt: skip
    """ELBO per cell, higher is better (scvi-tools' ``get_elbo``).

    Returns
    -------
    A 0-dim ``torch.Tensor``, the mean over cells, or with ``return_mean=False`` a tensor
    ``(cells,)``; on the CPU.
    """
    cells = model.get_cells(adata)
    minified.require_counts(cells, "get_elbo")
    per_cell = evaluate_elbo(model.module, cells, _indices(cells, indices), batch_size or 1024).detach().cpu()
    return per_cell.mean() if return_mean else per_cell


def get_marginal_ll(
    model, adata: AnnData | None = None, indices: Sequence[int] | None = None,
    n_mc_samples: int = 1000, batch_size: int | None = None, return_mean: bool = True,
) -> float | torch.Tensor:  # fmt: skip
    """Importance-sampled ``log p(x)`` with the guide as proposal; higher is better.

    Returns
    -------
    The mean over cells as a ``numpy.float64`` (a ``float`` with ``ndim`` 0), or with
    ``return_mean=False`` a ``torch.Tensor`` ``(cells,)``: scvi-tools' types.
    """
    cells = model.get_cells(adata)
    minified.require_counts(cells, "get_marginal_ll")
    ll = tasks.marginal_ll(model.module, cells, _indices(cells, indices), n_mc_samples, batch_size or 128)
    return np.float64(np.mean(ll)) if return_mean else torch.from_numpy(np.asarray(ll))


def get_reconstruction_error(
    model, adata: AnnData | None = None, indices: Sequence[int] | None = None,
    batch_size: int | None = None, return_mean: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{'reconstruction_loss': -log p(x | z, l)}`` at a posterior draw; lower is better.

    Returns
    -------
    dict whose value is a 0-dim ``torch.Tensor`` (the mean over cells) or, with
    ``return_mean=False``, a tensor ``(cells,)``: scvi-tools' types.
    """
    cells = model.get_cells(adata)
    minified.require_counts(cells, "get_reconstruction_error")
    nll = torch.from_numpy(
        np.asarray(tasks.reconstruction_nll(model.module, cells, _indices(cells, indices), batch_size or 128))
    )
    return {"reconstruction_loss": nll.mean() if return_mean else nll}


# Sampling ------------------------------------------------------------------------------------
def posterior_predictive_sample(
    model, adata: AnnData | None = None, indices: Sequence[int] | None = None,
    transform_batch: str | int | Sequence[str | int] | None = None, n_samples: int = 1,
    gene_list: Sequence[str] | None = None, batch_size: int | None = None, silent: bool = True,
):  # fmt: skip
    """Counts drawn from the posterior predictive ``p(x_new | x)`` (scvi-tools' arguments, in its order).

    z and l come from the guide, then the model's ``'x'`` site is sampled instead of observed.
    ``transform_batch`` decodes every cell as if from that batch category; with several
    categories the draws are averaged over them (no longer integers), as in scvi-tools.
    ``silent`` is accepted for scvi-tools' sake: nothing is printed here.

    Returns
    -------
    ``sparse.GCXS`` (scvi-tools' type; the ``sparse`` package is a dependency of scvi-tools)
    of shape ``(cells, genes)``, or ``(cells, genes, n_samples)`` when ``n_samples > 1``. When
    ``sparse`` is not installed, the same values as a dense numpy array.
    """
    cells = model.get_cells(adata)
    codes = model.registry.batch_codes(transform_batch)
    idx, mask = _indices(cells, indices), gene_mask(model.var_names, gene_list)
    blocks = tasks.posterior_predictive_blocks(model.module, cells, idx, n_samples, mask, batch_size or 128, codes)
    shape = (len(idx), len(model.var_names[mask])) + ((n_samples,) if n_samples > 1 else ())
    try:
        import sparse
    except ImportError:  # pragma: no cover - sparse comes with scvi-tools
        return np.concatenate([block.reshape(-1, *shape[1:]).numpy() for block in blocks])
    built = CompressedBlocks(shape)  # scvi-tools' GCXS, built block by block instead of from a dense array
    for block in blocks:
        built.add(block.reshape(-1, *shape[1:]))
    data, indices, indptr, axis = built.arrays()
    return sparse.GCXS((data, indices, indptr), shape=shape, compressed_axes=(axis,))


def get_feature_correlation_matrix(
    model, adata: AnnData | None = None, indices: Sequence[int] | None = None, n_samples: int = 10,
    batch_size: int = 64, rna_size_factor: int = 1000, transform_batch: Sequence[str | int] | None = None,
    correlation_type: Literal["spearman", "pearson"] = "spearman", silent: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Gene-gene correlation of posterior samples of the normalized expression (scvi-tools' arguments).

    ``n_samples`` draws per cell of ``rna_size_factor * rho`` are correlated across cells and
    draws; with several ``transform_batch`` categories, the matrices of each are averaged
    (``silent``: accepted, nothing is printed). See
    :func:`pyro_ldvae.tasks.expression.feature_correlation`.

    Returns
    -------
    DataFrame ``(genes, genes)`` indexed and labelled by the model's genes.
    """
    cells = model.get_cells(adata)
    codes = model.registry.batch_codes(transform_batch)
    matrix = feature_correlation(
        model.module, cells, _indices(cells, indices), codes, n_samples, batch_size, rna_size_factor, correlation_type
    )
    return pd.DataFrame(matrix, index=model.var_names, columns=model.var_names)
