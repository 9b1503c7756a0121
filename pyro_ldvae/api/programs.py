"""Gene programs on ``LinearSCVI``: settings, the prior they build, and the program-level methods.

``LinearSCVI(adata, gene_programs=..., n_unannotated=K, program_confidence=c, min_genes=m)``
resolves the programs against the data once (:func:`resolve_settings`), keeps them as a plain
dict of program to genes in the model's settings (so they are saved with it), and builds the
module with :class:`~pyro_ldvae.models.program_prior.ProgramPrior` as its loadings prior
(:func:`program_prior`). The methods below are bound to ``LinearSCVI`` by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data.programs import GenePrograms, program_mask
from ..models.program_prior import ProgramPrior
from ..tasks import programs as tasks

PROGRAM_SETTINGS = ("gene_programs", "n_unannotated", "program_confidence", "min_genes")
DEFAULT_N_LATENT = 10


def resolve_settings(adata: AnnData, n_latent: int, model_kwargs: dict) -> tuple[int, dict]:
    """``(n_latent, model_kwargs)`` with ``gene_programs`` resolved to ``{program: [genes in adata]}``.

    Without ``gene_programs`` the arguments are returned unchanged (the program options alone are
    an error). With it, ``n_latent`` becomes ``programs + n_unannotated``.
    """
    kwargs = dict(model_kwargs)
    spec: GenePrograms | None = kwargs.get("gene_programs")
    if spec is None:
        given = [key for key in PROGRAM_SETTINGS[1:] if key in kwargs]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with gene_programs=; pass the programs too.")
        return n_latent, kwargs
    if kwargs.get("loadings_prior") is not None:
        raise ValueError(
            "gene_programs sets the loadings prior (a program-informed horseshoe); do not pass loadings_prior too."
        )
    n_unannotated = kwargs.setdefault("n_unannotated", 0)
    kwargs.setdefault("program_confidence", 0.99)
    min_genes = kwargs.setdefault("min_genes", 5)
    mask = program_mask(spec, adata, min_genes)
    kwargs["gene_programs"] = {name: list(mask.index[mask[name].to_numpy()]) for name in mask.columns}
    total = mask.shape[1] + int(n_unannotated)
    if n_latent not in (DEFAULT_N_LATENT, total):
        raise ValueError(
            f"With gene_programs the factors are the {mask.shape[1]} programs plus n_unannotated={n_unannotated}, "
            f"{total} in all; n_latent={n_latent} differs. Leave n_latent out or set n_unannotated instead."
        )
    return total, kwargs


def program_prior(settings: dict, var_names: pd.Index) -> dict:
    """The module's keyword arguments: the program settings replaced by ``loadings_prior=ProgramPrior``."""
    settings = dict(settings)
    if settings.get("gene_programs") is None:
        return settings
    programs = settings.pop("gene_programs")
    n_unannotated, confidence = settings.pop("n_unannotated"), settings.pop("program_confidence")
    settings.pop("min_genes")
    mask = membership_mask(programs, var_names)
    settings["loadings_prior"] = ProgramPrior(mask.to_numpy(), n_unannotated, confidence)
    return settings


def membership_mask(programs: dict[str, list[str]], var_names: pd.Index) -> pd.DataFrame:
    """Boolean ``(genes, programs)`` annotation of resolved ``programs`` over ``var_names``."""
    return pd.DataFrame({name: var_names.isin(genes) for name, genes in programs.items()}, index=var_names)


def program_names(settings: dict) -> list[str]:
    """The programs of a model's settings, in factor order (empty without programs)."""
    return list(settings.get("gene_programs") or {})


def factor_names(settings: dict) -> list[str]:
    """Factor names: ``Z_0...`` without programs; program names then ``unannotated_0...`` with them."""
    if settings.get("gene_programs") is None:
        return [f"Z_{k}" for k in range(settings["n_latent"])]
    return program_names(settings) + [f"unannotated_{k}" for k in range(settings["n_unannotated"])]


def _check_programs(model) -> list[str]:
    names = program_names(model.init_params_)
    if not names:
        raise ValueError("This model has no gene programs; build it with LinearSCVI(adata, gene_programs=...).")
    return names


def _signs(model) -> np.ndarray:
    names = _check_programs(model)
    mask = membership_mask(model.init_params_["gene_programs"], model.var_names)[names].to_numpy()
    # The sign of a sum over a program's genes: 100 posterior draws settle it (and are seeded).
    return tasks.program_signs(model.module.get_loadings(num_samples=100), mask)


# --------------------------------------------------------------------------------------------
# Methods of LinearSCVI
# --------------------------------------------------------------------------------------------
def get_program_membership(self, threshold: float = 0.1, num_samples: int = 500) -> pd.DataFrame:
    """Posterior probability that each gene acts in each program, genes x programs.

    ``P(|W_gk| > threshold | data)``: the posterior probability that gene g's loading on
    program k exceeds ``threshold`` in size, a change of ``threshold`` in the gene's log expression
    per unit of program activity (activities have a standard Normal prior). Annotated genes the
    data reject fall towards 0; unannotated genes the data need rise towards 1.

    Parameters
    ----------
    threshold
        Smallest loading that counts as acting in the program.
    num_samples
        Posterior draws of the loadings (seeded: the same model gives the same table).

    Returns
    -------
    pandas.DataFrame
        ``(genes, programs)`` probabilities, indexed by gene, one column per program.
    """
    names = _check_programs(self)
    membership = tasks.program_membership(self.module, len(names), threshold, num_samples)
    return pd.DataFrame(membership, index=self.var_names, columns=names)


def get_program_activity(
    self, adata: AnnData | None = None, indices: Sequence[int] | None = None, batch_size: int | None = None
) -> pd.DataFrame:
    """Posterior mean activity of each program in each cell, cells x programs.

    The program factors' posterior means from the encoder (new cells are embedded at once),
    each oriented so that a higher activity means the program's annotated genes are up.

    Parameters
    ----------
    adata
        Cells to score (default: the training data); registered like the training data.
    indices
        Positions of the cells to score (default: all).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        ``(cells, programs)``, indexed by cell name.
    """
    signs = _signs(self)
    cells = self.get_cells(adata)
    idx = self._indices(cells, indices)
    loc, _ = tasks.program_activity(self.module, cells, idx, signs, batch_size or 1024)
    obs_names = (self.adata if adata is None else adata).obs_names[idx]
    return pd.DataFrame(loc, index=obs_names, columns=_check_programs(self))


def differential_program_activity(
    self, groupby: str, group1: str | Sequence[str], group2: str | Sequence[str] | None = None,
    adata: AnnData | None = None, delta: float = 0.2, fdr_target: float = 0.05, n_draws: int = 2000,
    seed: int = 0, batch_size: int | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Bayesian test of a change in mean program activity between two groups of cells.

    Each group's mean activity gets a posterior from the Bayesian bootstrap over its cells, each
    cell's activity drawn from its encoder posterior (see
    :func:`pyro_ldvae.tasks.programs.differential_activity`); a program changes when the
    difference exceeds ``delta`` pooled standard deviations. Programs are called at a posterior
    expected false discovery rate of ``fdr_target``, as in ``differential_expression``.

    Parameters
    ----------
    groupby
        ``obs`` column that defines the groups.
    group1
        Category (or categories) of the first group.
    group2
        Category (or categories) of the second group; None: all other cells.
    adata
        Cells and ``obs`` (default: the training data).
    delta
        Smallest change that counts, in pooled standard deviations of the activity.
    fdr_target
        Target posterior expected FDR of the ``is_de_fdr_<fdr_target>`` column.
    n_draws
        Monte Carlo draws of each group's mean.
    seed
        Seed of the draws; the global random state is left as it was.
    batch_size
        Cells per forward pass of the encoder.

    Returns
    -------
    pandas.DataFrame
        One row per program, most likely changed first: ``effect_size`` (posterior mean change in
        pooled standard deviations; positive: higher in group1), ``effect_size_std``, ``proba_de``,
        ``proba_not_de``, ``bayes_factor`` (log odds of a change), ``mean1``, ``mean2`` and
        ``is_de_fdr_<fdr_target>``.
    """
    adata = self.adata if adata is None else adata
    if groupby not in adata.obs:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs ({list(adata.obs.columns)}).")
    labels = adata.obs[groupby].astype(str).to_numpy()
    as_list = lambda g: [str(g)] if isinstance(g, str) or not isinstance(g, Sequence) else [str(v) for v in g]  # noqa: E731
    in1 = np.isin(labels, as_list(group1))
    in2 = ~in1 if group2 is None else np.isin(labels, as_list(group2))
    if (in1 & in2).any():
        raise ValueError("group1 and group2 share cells; give disjoint categories.")
    for name, mask in (("group1", in1), ("group2", in2)):
        if mask.sum() < 2:
            raise ValueError(f"{name} has {mask.sum()} cells in adata.obs[{groupby!r}]; it needs at least 2.")
    signs = _signs(self)
    cells = self.get_cells(adata)
    loc, var = tasks.program_activity(self.module, cells, np.arange(cells.n_obs), signs, batch_size or 1024)
    names = _check_programs(self)
    return tasks.differential_activity(loc[in1], var[in1], loc[in2], var[in2], names, delta, fdr_target, n_draws, seed)
