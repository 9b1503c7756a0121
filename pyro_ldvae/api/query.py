"""Reference mapping: fit a trained model's new batches on a query without changing what it learned.

:func:`prepare_query_anndata` puts a query's genes in the reference's order (genes it lacks are
filled with zeros); :func:`load_query_data` builds a model on the query whose decoder has
columns, a library prior and (for 'gene-batch') theta rows for the query's new batches, with
everything the reference learned fixed (:mod:`pyro_ldvae.models.query`). Training it with
``train()`` fits the new batches only; the loadings and the latent space stay the reference's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from ..data import validate
from ..data.registry import SETUP_KEY, Registry, _categories
from ..models.new_factors import NewFactorEncoderKind, NewFactorPrior, add_new_factors
from ..models.query import extend_state, freeze_reference
from . import io

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Reference:
    """What query mapping needs of a reference model: settings, setup, genes, weights, seed."""

    settings: dict
    registry: Registry
    var_names: pd.Index
    state: dict[str, torch.Tensor]
    seed: int = 0


def reference_var_names(reference) -> pd.Index:
    """The reference's genes: of a ``LinearSCVI``, or read from a saved model directory."""
    if isinstance(reference, (str, os.PathLike)):
        return pd.Index(io.read_metadata(reference)["var_names"])
    return pd.Index(reference.var_names)


def read_reference(reference) -> Reference:
    """A :class:`Reference` from a ``LinearSCVI`` (deep-copied tensors) or a saved model directory."""
    if isinstance(reference, (str, os.PathLike)):
        meta = io.read_metadata(reference)
        custom = [k for k in io.CODE_SETTINGS if isinstance(meta["init_params"].get(k), dict)]
        if custom:
            raise ValueError(f"{reference} was saved with a custom {custom[0]}; query mapping does not support it.")
        state = io.read_weights(Path(reference) / meta["weights_file"], meta["weights_sha256"], torch.device("cpu"))
        registry = Registry(**meta["registry"])
        return Reference(dict(meta["init_params"]), registry, pd.Index(meta["var_names"]), state, meta.get("seed", 0))
    state = {k: v.detach().cpu().clone() for k, v in reference.module.state_dict().items()}
    return Reference(
        copy.deepcopy(reference.init_params_),
        copy.deepcopy(reference.registry),
        pd.Index(reference.var_names),
        state,
        reference.seed,
    )


def prepare_query_anndata(
    adata: AnnData,
    reference,
    return_reference_var_names: bool = False,
    inplace: bool = True,
    max_missing_fraction: float = 0.2,
) -> AnnData | pd.Index | None:
    """The query's genes in the reference's order, genes it lacks filled with zeros (scvi-tools' semantics).

    Parameters
    ----------
    adata
        The query: cells x genes with raw counts (in ``X`` and any layers).
    reference
        A trained ``LinearSCVI`` or the directory it was saved to.
    return_reference_var_names
        Return only the reference's genes, a ``pd.Index``.
    inplace
        Change ``adata`` itself and return None; otherwise return a new AnnData.
    max_missing_fraction
        The largest fraction of the reference's genes the query may lack. Missing genes are
        filled with zero counts, which the model reads as "not expressed"; above this fraction
        a ``ValueError`` is raised.

    Returns
    -------
    None (``inplace``), the prepared AnnData, or the reference's genes.

    Examples
    --------
    >>> LinearSCVI.prepare_query_anndata(query, "reference_dir")
    >>> query_model = LinearSCVI.load_query_data(query, "reference_dir")
    """
    var_names = reference_var_names(reference)
    if return_reference_var_names:
        return var_names
    if not adata.var_names.is_unique:
        raise ValueError("The query's var_names have duplicates; make them unique (adata.var_names_make_unique()).")
    missing = var_names.difference(adata.var_names, sort=False)
    fraction = len(missing) / len(var_names)
    n_extra = len(adata.var_names.difference(var_names))
    logger.info(
        "Query lacks %d of the reference's %d genes (%.1f%%), filled with zeros; %d query genes not in the "
        "reference are dropped.",
        len(missing), len(var_names), 100 * fraction, n_extra,
    )  # fmt: skip
    if len(missing) == len(var_names) or fraction > max_missing_fraction:
        raise ValueError(
            f"The query lacks {len(missing)} of the reference's {len(var_names)} genes ({fraction:.1%}), more than "
            f"max_missing_fraction={max_missing_fraction}; check that both use the same gene identifiers "
            f"(e.g. {list(missing[:3])}), or raise max_missing_fraction."
        )
    out = adata
    if len(missing):
        zeros = sp.csr_matrix((adata.n_obs, len(missing)), dtype=np.float32)
        padding = AnnData(X=zeros.copy(), layers={name: zeros.copy() for name in adata.layers})
        padding.var_names, padding.obs_names = missing, adata.obs_names
        out = anndata.concat([adata, padding], axis=1, join="outer", index_unique=None, merge="unique")
        out.obs, out.uns = adata.obs.copy(), copy.deepcopy(dict(adata.uns))
        for key, value in adata.obsm.items():
            out.obsm[key] = value
    if not var_names.equals(out.var_names):
        out = out[:, var_names].copy()
    if not inplace:
        return out if out is not adata else adata.copy()
    if out is not adata:
        adata._init_as_actual(out)
    return None


def _check_query_obs(adata: AnnData, registry: Registry) -> list[str]:
    """The query's batches not in the reference; other keys' categories must be the reference's."""
    if registry.batch_key is None:
        raise ValueError(
            "The reference was set up without batch_key: query mapping fits decoder columns for the query's "
            "batches, so the reference must have been set up with one (setup_anndata(adata, batch_key=...))."
        )
    if registry.batch_key not in adata.obs.columns:
        raise ValueError(
            f"The query has no obs[{registry.batch_key!r}], the reference's batch_key; add it, naming the query's "
            "batch(es) (e.g. adata.obs[key] = 'query')."
        )
    keys = [(registry.labels_key, registry.label_categories, "labels_key")] if registry.labels_key else []
    keys += [
        (k, registry.covariate_categories[k], "categorical covariate") for k in registry.categorical_covariate_keys
    ]
    for key, known, role in keys:
        if key not in adata.obs.columns:
            raise ValueError(f"The query has no obs[{key!r}], the reference's {role}; add it.")
        unseen = [c for c in _categories(adata.obs[key], key) if c not in known]
        if unseen:
            raise ValueError(
                f"obs[{key!r}] ({role}) of the query has categories the reference never saw: {unseen[:5]}; "
                f"the reference knows {known[:10]}. Only the batch may bring new categories."
            )
    for key in registry.continuous_covariate_keys:
        if key not in adata.obs.columns:
            raise ValueError(f"The query has no obs[{key!r}], the reference's continuous covariate; add it.")
    query_batches = _categories(adata.obs[registry.batch_key], registry.batch_key)
    return [b for b in query_batches if b not in registry.batch_categories]


def load_query_data(
    cls,
    adata: AnnData,
    reference,
    freeze_loadings: bool = True,
    new_batch_init: str = "mean",
    train_encoder: bool = False,
    device: torch.device | None = None,
    n_new_factors: int = 0,
    new_factor_prior: NewFactorPrior = "ard",
    new_factor_prior_kwargs: dict | None = None,
    new_factor_encoder: NewFactorEncoderKind = "separate",
    seed: int | None = None,
):
    """A ``cls`` model on the query ``adata``, extended to its new batches, ready to ``train()``.

    Parameters
    ----------
    cls
        ``LinearSCVI`` (or a subclass).
    adata
        The query, its genes in the reference's order (see :func:`prepare_query_anndata`), its
        batches in ``obs[batch_key]`` of the reference; labels and categorical covariates, if the
        reference has them, must use the reference's categories.
    reference
        A trained ``LinearSCVI`` (not modified) or the directory it was saved to.
    freeze_loadings
        Fix everything the reference learned (loadings, reference batch columns and theta rows,
        encoders, batch-norm statistics, library prior of reference batches); only the new
        batches' decoder columns (and 'gene-batch' theta rows) train, at the plan's
        ``global_lr`` (``plan_kwargs={"global_lr": ...}``; they are per-gene parameters shared by
        a batch's cells). ``False`` trains all.
    new_batch_init
        'mean' (default): a new batch's decoder columns start at the mean of the reference's batch
        columns, which without a decoder bias hold the genes' intercepts; 'zero' starts them at 0.
    train_encoder
        With ``freeze_loadings``, also let the encoders adapt to the query (changes the latent
        space of reference cells; off by default, since the encoders take no batch input).
    device
        Where the model lives (default: CPU).
    n_new_factors
        Factors to add for programs the reference lacks (needs ``freeze_loadings=True``). Their
        loadings ``W_new`` ``(genes, n_new_factors)`` have a per-factor shrinkage prior (a
        factor the data do not support can shrink towards zero; the factors also absorb the
        misfit of a reference that has not converged, see the reference-mapping guide); they are the last columns of
        ``get_loadings()`` (``new_0``, ...), read with ``get_new_factor_activity()`` and
        ``get_novelty()``. The reference's factors stay fixed; the query model's copy of the
        library encoder trains (the library is not part of the reference's outputs; see the reference-mapping guide).
    new_factor_prior, new_factor_prior_kwargs
        The prior of ``W_new``: 'ard' (:class:`~pyro_ldvae.priors.ARD`, default) or 'horseshoe'
        (:class:`~pyro_ldvae.priors.Horseshoe`), with the class's keyword arguments.
    new_factor_encoder
        How the encoder gives the new factors: 'separate' (default: an encoder of their own,
        the reference's depth and width) or 'heads' (new output units on the reference
        encoder's fixed hidden layer). Either way the reference's encoder outputs are unchanged.
    seed
        The query model's seed: the new factors' initial weights, and by default ``train()``'s
        split and minibatch order. Default: the reference's seed. Torch's global random state
        is left as it was.

    Returns
    -------
    The query model, attached to ``adata`` (whose setup registry now lists the extended batches).

    Examples
    --------
    >>> LinearSCVI.prepare_query_anndata(query, reference)
    >>> query_model = LinearSCVI.load_query_data(query, reference)
    >>> query_model.train(max_epochs=100)
    >>> query.obsm["X_ldvae"] = query_model.get_latent_representation()
    """
    if n_new_factors and (not freeze_loadings or train_encoder):
        raise ValueError(
            "n_new_factors needs freeze_loadings=True and train_encoder=False: new factors are what is learned "
            "on top of a fixed reference."
        )
    ref = read_reference(reference)
    if ref.settings.get("z_prior") is not None:
        raise ValueError("Query mapping supports models without a z_prior.")
    if ref.settings.get("new_factors"):
        raise ValueError("The reference is a query model with new factors; map onto the original reference instead.")
    if not ref.var_names.equals(adata.var_names):
        raise ValueError(
            "The query's genes are not the reference's, in the reference's order; call "
            "LinearSCVI.prepare_query_anndata(adata, reference) first."
        )
    registry = ref.registry
    new_batches = _check_query_obs(adata, registry)
    validate.check_anndata(adata, registry.layer, registry.check_counts)
    n_ref, n_new = registry.n_batch, len(new_batches)
    logger.info("Query batches new to the reference: %d %s", n_new, new_batches[:10])
    extended = dataclasses.replace(registry, batch_categories=registry.batch_categories + new_batches)
    adata.uns[SETUP_KEY] = extended.to_json()
    model = cls(adata, seed=ref.seed if seed is None else int(seed), **ref.settings)
    library = {}
    if not ref.settings.get("use_observed_lib_size", False):  # the query's own prior for its new batches
        library = dict(
            library_log_means=model.module.library_log_means[n_ref:].cpu(),
            library_log_vars=model.module.library_log_vars[n_ref:].cpu(),
        )
    n_latent = ref.settings["n_latent"]
    state = extend_state(ref.state, n_latent, n_ref, n_new, init=new_batch_init, **library)
    model.module.load_state_dict(state, strict=True)
    if freeze_loadings:
        freeze_reference(model.module, n_ref, n_new, train_encoder)
    if n_new_factors:
        spec = dict(
            n_new_factors=int(n_new_factors), prior=new_factor_prior, prior_kwargs=dict(new_factor_prior_kwargs or {}),
            encoder=new_factor_encoder, n_reference_batch=n_ref, n_new_batch=n_new,
        )  # fmt: skip
        _add_new_factors(model, spec)
    model.module.to(device or torch.device("cpu")).eval()
    return model


def _add_new_factors(model, spec: dict) -> None:
    """Give a frozen query ``model`` the new factors described by ``spec`` (kept in its settings)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)  # the new factors' initial weights depend on the seed only
        add_new_factors(model.module, spec["n_new_factors"], spec["prior"], spec["prior_kwargs"], spec["encoder"])
    model.n_latent = model.module.n_latent
    model.init_params_["new_factors"] = spec


def restore_new_factors(model, spec: dict) -> None:
    """Rebuild a saved query model's new factors on ``model``, freshly built from its settings.

    Runs before its weights are loaded: freeze it as :func:`load_query_data` did, then add the factors.
    """
    freeze_reference(model.module, spec["n_reference_batch"], spec["n_new_batch"])
    _add_new_factors(model, spec)
