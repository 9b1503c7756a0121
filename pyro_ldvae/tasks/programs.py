"""Gene-program quantities from a fitted program model: membership, activity and its differential test.

A program model (:class:`pyro_ldvae.models.program_prior.ProgramPrior`) has one factor per
program, first, then free factors. A factor's sign is not identified (``z W = (-z)(-W)``), so
activities are oriented: each program's activity is multiplied by the sign of the summed
posterior-mean loadings of its annotated genes, which makes a high activity mean "the annotated
genes are up".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.cells import CellData
from ..models.ldvae import LDVAE
from .de import fdr_de_prediction
from .latent import latent_representation


def program_signs(loadings: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(programs,)`` signs (+1 or -1) that orient each program so its annotated genes load positively.

    ``loadings`` is ``(genes, n_latent)`` with the programs first, ``mask`` ``(genes, programs)``.
    """
    summed = (loadings[:, : mask.shape[1]] * mask).sum(0)
    return np.where(summed < 0, -1.0, 1.0)


@torch.no_grad()
def program_membership(module: LDVAE, n_programs: int, threshold: float = 0.1, num_samples: int = 500) -> np.ndarray:
    """Posterior probability that each gene acts in each program, ``(genes, programs)``.

    ``P(|W_gk| > threshold | data)`` under the fitted posterior of the loadings, a Monte Carlo
    average over ``num_samples`` draws (seeded, so the same model gives the same answer; the
    caller's random state is left as it was). ``threshold`` is on the scale of the loadings: a
    change of ``threshold`` in a gene's log expression per unit of program activity (the prior
    standard deviation of an activity).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}.")
    with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
        torch.manual_seed(0)
        draws = module.sample_loadings(num_samples)[..., :n_programs]  # (num_samples, genes, programs)
    return (draws.abs() > threshold).double().mean(0).cpu().numpy()


def program_activity(
    module: LDVAE, cells: CellData, indices: np.ndarray, signs: np.ndarray, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Oriented posterior mean and variance of each program's activity, each ``(cells, programs)``."""
    loc, var = latent_representation(module, cells, indices, batch_size=batch_size, return_dist=True)
    n = len(signs)
    return loc[:, :n] * signs, var[:, :n]


def _bootstrap_means(loc: np.ndarray, var: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Draws of a group's population mean activity, ``(n_draws, programs)``.

    Bayesian bootstrap over cells (Dirichlet(1, ..., 1) weights ``w``) with each cell's activity
    drawn from its posterior: given ``w``, ``sum_i w_i z_i`` is Normal with mean ``w @ loc`` and
    variance ``w**2 @ var``, so it is drawn exactly without drawing every cell.
    """
    weights = rng.dirichlet(np.ones(len(loc)), size=n_draws)  # (n_draws, cells)
    mean = weights @ loc
    std = np.sqrt((weights**2) @ var)
    return mean + std * rng.standard_normal(mean.shape)


def differential_activity(
    loc1: np.ndarray,
    var1: np.ndarray,
    loc2: np.ndarray,
    var2: np.ndarray,
    names: list[str],
    delta: float = 0.2,
    fdr_target: float = 0.05,
    n_draws: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Bayesian test of a change in mean program activity between two groups of cells.

    The population mean activity of each group has a posterior by the Bayesian bootstrap over
    its cells, each cell's activity drawn from the encoder's posterior (:func:`_bootstrap_means`).
    The difference ``D = mean1 - mean2`` is put in units of the pooled standard deviation ``s``
    of the cells' activities; a program changes when ``|D| / s > delta``.

    Parameters
    ----------
    loc1, var1, loc2, var2
        Posterior means and variances of the oriented activities, ``(cells, programs)`` per group.
    names
        Program names.
    delta
        Smallest change that counts, in pooled standard deviations.
    fdr_target
        Posterior expected false discovery rate of the programs called (``is_de_fdr_<target>``).
    n_draws
        Monte Carlo draws of each group's mean.
    seed
        Seed of the draws (a private generator; no global state is touched).

    Returns
    -------
    pandas.DataFrame
        One row per program, sorted by ``proba_de``: ``effect_size`` (posterior mean of ``D / s``),
        ``effect_size_std``, ``proba_de`` (``P(|D / s| > delta)``), ``proba_not_de``,
        ``bayes_factor`` (log odds of a change), ``mean1``, ``mean2``, ``is_de_fdr_<fdr_target>``.
    """
    if len(loc1) < 2 or len(loc2) < 2:
        raise ValueError(f"Each group needs at least 2 cells; got {len(loc1)} and {len(loc2)}.")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta!r}.")
    rng = np.random.default_rng(seed)
    diff = _bootstrap_means(loc1, var1, n_draws, rng) - _bootstrap_means(loc2, var2, n_draws, rng)
    pooled = np.sqrt(0.5 * (loc1.var(0) + var1.mean(0) + loc2.var(0) + var2.mean(0)))  # (programs,)
    effect = diff / pooled
    proba = (np.abs(effect) > delta).mean(0)
    eps = 1e-8
    frame = pd.DataFrame(
        {
            "effect_size": effect.mean(0),
            "effect_size_std": effect.std(0),
            "proba_de": proba,
            "proba_not_de": 1.0 - proba,
            "bayes_factor": np.log(proba + eps) - np.log(1.0 - proba + eps),
            "mean1": loc1.mean(0),
            "mean2": loc2.mean(0),
        },
        index=pd.Index(names, name="program"),
    )
    frame = frame.sort_values(["proba_de", "effect_size"], ascending=False, key=lambda c: c.abs())
    frame[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(frame["proba_de"], fdr_target)
    return frame
