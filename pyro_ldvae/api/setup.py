"""Building a ``LinearSCVI``'s parts from a registered AnnData: its cells and its module."""

from __future__ import annotations

import weakref

import pandas as pd
import torch
from anndata import AnnData

from ..data import validate
from ..data.backed import cell_data
from ..data.cells import CellData
from ..data.registry import Registry
from ..models.ldvae import LDVAE
from . import programs


def module_kwargs(model_kwargs: dict) -> dict:
    """``LinearSCVI``'s ``**model_kwargs`` in the form saved with a model.

    ``var_activation=torch.exp`` is the encoders' fixed variance activation, so it is stored as
    None (a function cannot be written to ``model.json``); the rest is checked by
    :class:`~pyro_ldvae.LDVAE`.
    """
    kwargs = dict(model_kwargs)
    if kwargs.get("var_activation") is torch.exp:
        kwargs["var_activation"] = None
    return kwargs


def build(adata: AnnData, registry: Registry, seed: int, settings: dict) -> tuple[CellData, LDVAE]:
    """The registered cells of ``adata`` and a new module for them, its initial weights set by ``seed``.

    ``settings`` are ``LinearSCVI``'s constructor arguments (``n_layers`` is the encoder's
    depth; the rest go to :class:`~pyro_ldvae.LDVAE` as they are). They are checked first, then
    the AnnData's shape and counts; ``n_batch``, ``n_labels`` and the covariates come from
    ``registry``, the library prior from the cells.
    """
    settings = programs.program_prior(settings, pd.Index(adata.var_names))  # gene_programs= -> its prior
    n_layers = settings.pop("n_layers")
    names = ("n_hidden", "n_latent", "dropout_rate", "dispersion", "gene_likelihood", "latent_distribution")
    n_hidden, n_latent, dropout_rate, dispersion, gene_likelihood, latent_distribution = map(settings.get, names)
    validate.check_model_args(
        n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, latent_distribution
    )
    validate.check_labels_for_dispersion(dispersion, registry.labels_key)
    validate.check_shape(adata)
    cells = cell_data(adata, registry)
    validate.check_totals(cells.X, adata.obs_names, warn_genes=False)
    observed = settings["use_observed_lib_size"]
    library_log_means, library_log_vars = (None, None) if observed else cells.library_prior()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights depend on the seed only
        module = LDVAE(
            n_input=adata.n_vars,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_layers_encoder=n_layers,
            library_log_means=library_log_means,
            library_log_vars=library_log_vars,
            n_cats_per_cov=registry.n_cats_per_cov,
            n_continuous_cov=len(registry.continuous_covariate_keys),
            **settings,
        )
        if hasattr(module.loadings_prior, "initialise_guide"):  # gene programs: see ProgramPrior
            module.loadings_prior.initialise_guide(module.global_guide)
    return cells, module


class CellsCache:
    """The registered cells of the AnnData last asked for, checked against the model's genes.

    Keyed by a weak reference, not ``id()``: a freed AnnData's id is reused by the next one,
    which returned another dataset's cells (a silent wrong answer).
    """

    def __init__(self, registry: Registry, var_names: pd.Index, adata: AnnData, cells: CellData):
        self.registry, self.var_names = registry, var_names
        self.key, self.cells = weakref.ref(adata), cells

    def get(self, adata: AnnData) -> CellData:
        """The cells of ``adata``, with the genes in the model's order (reordered when all are present)."""
        if self.key() is adata:
            return self.cells
        key = weakref.ref(adata)
        validate.check_shape(adata)
        cells = cell_data(validate.align_genes(adata, self.var_names), self.registry)
        self.key, self.cells = key, cells
        return cells
