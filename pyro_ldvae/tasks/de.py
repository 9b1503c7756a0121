"""scVI's Bayesian differential expression (Lopez et al. 2018; Boyeau et al. 2019).

For two groups of cells, draw posterior samples of the normalized expression ``rho`` (the
model's ``'rho'`` site) from each group, pair them, and estimate per gene

* ``'vanilla'``: ``P(rho1 > rho2)`` and the Bayes factor ``log P / (1 - P)``;
* ``'change'``: the distribution of ``LFC = log2(rho1 + c) - log2(rho2 + c)``, the probability
  that ``|LFC| >= delta`` (``proba_de``), its mean/median/std/min/max, and the genes called DE
  at a posterior expected false discovery rate ``fdr_target``.

The output has scvi-tools' columns in each mode, one block per comparison, each block sorted by
``bayes_factor`` (vanilla) or ``proba_de`` (change), ties broken by effect size (the log fold
change of the mean scales, or ``|lfc_mean|``), with ``comparison``, ``group1`` and ``group2``
columns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.cells import CellData
from ..data.registry import Registry
from ..models.ldvae import LDVAE
from .expression import Weights, check_weights
from .importance import importance_resample
from .latent import latent_representation
from .posterior import normalized_expression

Mode = Literal["vanilla", "change"]
TestMode = Literal["two", "three"]

logger = logging.getLogger(__name__)

EPS = 1e-8


def _mask(selection, obs: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean cell mask from a mask, a list of positions, or an ``adata.obs.query`` string."""
    if isinstance(selection, str):
        mask = obs.index.isin(obs.query(selection).index)
    else:
        selection = np.asarray(selection).ravel()
        if selection.dtype == bool:
            if len(selection) != len(obs):
                raise ValueError(f"{name} is a boolean mask of length {len(selection)}; adata has {len(obs)} cells.")
            mask = selection
        else:
            mask = np.zeros(len(obs), dtype=bool)
            mask[selection.astype(np.int64)] = True
    if not mask.any():
        raise ValueError(f"{name} selects no cells.")
    return mask


def _comparisons(
    obs: pd.DataFrame, groupby: str | None, group1, group2, idx1, idx2
) -> list[tuple[np.ndarray, np.ndarray, str | None, str | None]]:
    """``(mask1, mask2, group1 name, group2 name)`` per comparison; names are None for idx1/idx2."""
    if idx1 is not None:
        mask1 = _mask(idx1, obs, "idx1")
        mask2 = ~mask1 if idx2 is None else _mask(idx2, obs, "idx2")
        if not mask2.any():
            raise ValueError("The second group is empty (idx1 selects every cell); pass idx2.")
        return [(mask1, mask2, None, None)]
    if groupby is None:
        raise ValueError("Pass groupby (an adata.obs column) with group1/group2, or idx1 (and optionally idx2).")
    if groupby not in obs.columns:
        raise ValueError(f"groupby {groupby!r} is not a column of adata.obs; available: {list(obs.columns)}.")
    column = obs[groupby].astype(str)
    categories = list(obs[groupby].astype("category").cat.categories.astype(str))
    if group1 is None:
        if len(categories) < 2:
            raise ValueError(f"obs[{groupby!r}] has a single group; differential expression needs two.")
        group1 = categories
    elif isinstance(group1, str) or not isinstance(group1, Sequence):
        group1 = [group1]
    out = []
    for g1 in map(str, group1):
        if g1 not in categories:
            raise ValueError(f"group1 {g1!r} is not a value of obs[{groupby!r}]; values: {categories[:20]}.")
        mask1 = (column == g1).to_numpy()
        if group2 is None:
            mask2, g2 = ~mask1, "Rest"
        else:
            g2 = str(group2)
            if g2 not in categories:
                raise ValueError(f"group2 {g2!r} is not a value of obs[{groupby!r}]; values: {categories[:20]}.")
            mask2 = (column == g2).to_numpy()
        if not mask2.any():
            raise ValueError(f"No cells to compare {g1!r} against.")
        out.append((mask1, mask2, g1, g2))
    return out


def _filter_outliers(module: LDVAE, cells: CellData, positions: np.ndarray, batch_size: int) -> np.ndarray:
    """Drop cells that are outliers of the group's latent representation (robust covariance)."""
    from sklearn.covariance import EllipticEnvelope

    latent = latent_representation(module, cells, positions, batch_size=batch_size)
    try:
        keep = EllipticEnvelope().fit_predict(latent) == 1
    except ValueError:
        warnings.warn("Could not estimate the covariance for outlier filtering; using all cells.", stacklevel=3)
        return positions
    return positions[keep]


def sample_scales(
    module: LDVAE,
    cells: CellData,
    positions: np.ndarray,
    batch_codes: Sequence[int | None],
    n_samples_overall: int,
    batch_size: int,
    rng: np.random.Generator,
    weights: Weights = "uniform",
    importance_weighting_kwargs: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior samples of ``rho`` for a group: ``(n_samples, genes)`` and their batch codes.

    ``n_samples_overall`` is split evenly over ``batch_codes`` (None: each cell's own batch); each
    cell gets enough draws and ``n`` rows are picked with replacement, uniformly or, with
    ``weights='importance'``, in proportion to the draws' importance weights
    (:func:`pyro_ldvae.tasks.importance.importance_resample`, which ``importance_weighting_kwargs`` go to).
    """
    per_code = max(2, int(n_samples_overall / len(batch_codes)))
    scales, codes = [], []
    for code in batch_codes:
        per_cell = per_code // len(positions) + 1
        if weights == "importance":
            options = importance_weighting_kwargs or {}
            scales.append(
                importance_resample(module, cells, positions, per_cell, per_code, rng, code, batch_size, **options)
            )
        else:
            # rows of (per_cell, cells) draws, picked first: only the cells picked are decoded
            draw, cell = np.divmod(rng.choice(per_cell * len(positions), size=per_code, replace=True), len(positions))
            picked, rank = np.unique(cell, return_inverse=True)
            draws = normalized_expression(
                module, cells, positions[picked], [code], n_samples=per_cell, batch_size=batch_size
            ).reshape(-1, cells.n_vars)
            scales.append(take_rows(draws, draw * len(picked) + rank))
        codes.append(np.full(per_code, -1 if code is None else code))
    return stack_rows(scales), np.concatenate(codes)


def _pairs(a: np.ndarray, b: np.ndarray, use_permutation: bool, m: int, rng: np.random.Generator):
    """Paired rows of two groups' samples, from the candidate rows ``a`` and ``b`` (indices)."""
    if not use_permutation:
        n = min(len(a), len(b))
        return a[:n], b[:n]
    return a[rng.choice(len(a), size=m)], b[rng.choice(len(b), size=m)]


# Large samples are allocated by torch: numpy asks for huge pages above 4 MiB, and their first touch
# can stall on compaction for longer than the arithmetic takes.
def take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``, in memory allocated by torch."""
    return torch.from_numpy(array).index_select(0, torch.from_numpy(rows)).numpy()


def stack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(arrays)``, in memory allocated by torch (one array: itself, not a copy)."""
    return arrays[0] if len(arrays) == 1 else torch.cat([torch.from_numpy(a) for a in arrays]).numpy()


def estimate_pseudocounts(
    scales1: np.ndarray,
    scales2: np.ndarray,
    zero1: np.ndarray,
    zero2: np.ndarray,
    quantile: float = 0.9,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """scvi-tools' pseudocount rule.

    A high quantile of the largest sampled scale among genes with (almost) no observed counts in a group, divided by the
    number of genes; at least 1e-10. ``pairs``: the rows of each group's samples that were paired (None: all).
    """
    offsets = []
    for scales, zero, rows in zip((scales1, scales2), (zero1, zero2), pairs or (None, None)):
        samples = torch.as_tensor(scales)
        if rows is None:
            largest = samples.amax(0)
        else:  # over the paired rows, a block of genes at a time (no (rows, genes) copy)
            used = torch.as_tensor(np.unique(rows))
            blocks = _gene_blocks((len(used), samples.shape[1]))
            largest = torch.cat([samples[:, block].index_select(0, used).amax(0) for block in blocks])
        offsets.append(np.quantile(largest.numpy()[zero], quantile) if zero.any() else 1e-10)
    return float(max(1e-10, max(offsets) / scales1.shape[1]))


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_threshold: float = 0.1) -> float:
    """LFC threshold from a 3-component Gaussian mixture of the per-gene mean LFCs (for ``delta=None``)."""
    from sklearn.mixture import GaussianMixture

    means = np.sort(GaussianMixture(n_components=3, random_state=0).fit(lfc_means[:, None]).means_.ravel())
    return float(max(min_threshold, coef * np.abs(means[[0, -1]]).mean()))


def bayes_factors(
    scales1: np.ndarray,
    scales2: np.ndarray,
    mode: Mode,
    delta: float | None,
    pseudocounts: float,
    test_mode: TestMode = "three",
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-gene DE statistics from paired posterior samples of both groups.

    ``scales1`` and ``scales2`` are ``(samples, genes)``; ``pairs`` the rows of each that are paired
    (equal lengths); None pairs row i with row i. The pairs are gathered a block of genes at a time,
    so no ``(pairs, genes)`` array is built.
    """
    rows1, rows2 = pairs if pairs is not None else (np.arange(len(scales1)), np.arange(len(scales2)))
    rows1, rows2 = torch.as_tensor(rows1, dtype=torch.long), torch.as_tensor(rows2, dtype=torch.long)
    samples1, samples2 = torch.as_tensor(scales1), torch.as_tensor(scales2)
    blocks = _gene_blocks((len(rows1), scales1.shape[1]))

    def paired(block: slice) -> tuple[np.ndarray, np.ndarray]:  # (n_pairs, genes in block) each
        return samples1[:, block].index_select(0, rows1).numpy(), samples2[:, block].index_select(0, rows2).numpy()

    if mode == "vanilla":
        proba_m1 = np.concatenate([np.mean(one > two, axis=0) for one, two in map(paired, blocks)])
        proba_m2 = 1.0 - proba_m1
        return {
            "proba_m1": proba_m1,
            "proba_m2": proba_m2,
            "bayes_factor": np.log(proba_m1 + EPS) - np.log(proba_m2 + EPS),
        }

    def lfc(one: np.ndarray, two: np.ndarray, pseudocount: float) -> np.ndarray:  # (n_pairs, genes in block)
        one, two = one + pseudocount, two + pseudocount
        return np.log2(one, out=one) - np.log2(two, out=two)

    if delta is None:
        delta = estimate_delta(np.concatenate([lfc(*paired(block), pseudocounts).mean(0) for block in blocks]))
    n_genes = scales1.shape[1]
    up, down = np.empty(n_genes), np.empty(n_genes)
    # LFC summaries with a thousand times smaller pseudocount, as scvi-tools reports them.
    summaries = {name: np.empty(n_genes, np.float32) for name in ("mean", "median", "std", "min", "max")}
    for block in blocks:  # half a million pairs at a time (2 MiB): nothing (pairs, genes) is built
        one, two = paired(block)
        change = lfc(one, two, pseudocounts)
        up[block], down[block] = np.mean(change >= delta, axis=0), np.mean(change < -delta, axis=0)
        small = lfc(one, two, 1e-3 * pseudocounts)
        for name, statistic in (
            ("mean", np.mean),
            ("median", np.median),
            ("std", np.std),
            ("min", np.min),
            ("max", np.max),
        ):
            summaries[name][block] = statistic(small, axis=0)
    proba_de = up + down if test_mode == "two" else np.maximum(up, down)
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "pseudocounts": np.full(n_genes, pseudocounts),
        "delta": np.full(n_genes, delta),
        **{f"lfc_{name}": values for name, values in summaries.items()},
    }


def _gene_blocks(shape: tuple[int, int], entries: int = 1 << 19) -> list[slice]:
    """Slices of genes of about ``entries`` paired samples each, ``shape`` ``(n_pairs, genes)``."""
    step = max(1, entries // max(1, shape[0]))
    return [slice(start, min(start + step, shape[1])) for start in range(0, shape[1], step)]


def raw_counts_properties(counts, mask1: np.ndarray, mask2: np.ndarray) -> dict[str, np.ndarray]:
    """Observed means, non-zero fractions and library-normalized (1e4) means per group."""
    size = np.asarray(counts.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        scaling = np.where(size > 0, 1e4 / size, 0.0)[:, None]
    blocks = {i: counts[mask] for i, mask in ((1, mask1), (2, mask2))}
    norms = {
        i: blocks[i].multiply(scaling[mask]) if sp.issparse(blocks[i]) else blocks[i] * scaling[mask]
        for i, mask in ((1, mask1), (2, mask2))
    }
    out = {}
    for i in (1, 2):
        out[f"raw_mean{i}"] = np.asarray(blocks[i].mean(axis=0)).ravel()
    for i in (1, 2):
        out[f"non_zeros_proportion{i}"] = np.asarray((blocks[i] != 0).mean(axis=0)).ravel()
    for i in (1, 2):
        out[f"raw_normalized_mean{i}"] = np.asarray(norms[i].mean(axis=0)).ravel()
    return out


def fdr_de_prediction(proba_de: pd.Series, fdr: float = 0.05) -> pd.Series:
    """Call the largest set of genes whose posterior expected FDR is at most ``fdr``."""
    ordered = proba_de.sort_values(ascending=False)
    expected_fdr = (1.0 - ordered).cumsum() / np.arange(1, len(ordered) + 1)
    called = pd.Series(False, index=ordered.index)
    called.iloc[: int((expected_fdr <= fdr).sum())] = True
    return called.loc[proba_de.index]


def differential_expression(
    module: LDVAE,
    cells: CellData,
    registry: Registry,
    obs: pd.DataFrame,
    var_names: pd.Index,
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1: Sequence[int] | Sequence[bool] | str | None = None,
    idx2: Sequence[int] | Sequence[bool] | str | None = None,
    mode: Mode = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1: Sequence[str] | None = None,
    batchid2: Sequence[str] | None = None,
    fdr_target: float = 0.05,
    silent: bool = True,
    weights: Weights | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    n_samples_overall: int = 5000,
    use_permutation: bool = False,
    m_permutation: int = 10000,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: TestMode = "three",
    seed: int | None = None,
) -> pd.DataFrame:
    """Bayesian differential expression of scVI between groups of ``cells``.

    Parameters
    ----------
    module
        The trained model.
    cells, registry
        The registered cells (genes in the model's order) and the setup they were registered with.
    obs, var_names
        The cells' ``adata.obs`` (groups, ``idx1``/``idx2`` queries) and the model's genes, which
        index the result.
    groupby, group1, group2
        ``obs`` column and its groups; ``group1=None`` compares every group with the rest,
        ``group2=None`` compares against all other cells ('Rest').
    idx1, idx2
        Instead of groups: masks, positions or ``obs.query`` strings of the two populations.
    mode
        'vanilla' (``P(rho1 > rho2)``) or 'change' (``P(|LFC| >= delta)``, LFC summaries, FDR calls).
    delta
        LFC threshold of 'change' mode; None estimates it from the data.
    batch_size
        Cells per forward pass.
    all_stats
        Add observed means, non-zero fractions and normalized means per group.
    batch_correction, batchid1, batchid2
        Decode both groups into the same batches (all, or those listed) and pair samples
        within a batch, so that batch effects cancel.
    fdr_target
        Posterior expected FDR for the ``is_de_fdr_<target>`` column ('change' mode).
    silent
        Do not log each comparison.
    weights
        How a group's posterior samples are drawn: 'uniform' (default; None means the same)
        or 'importance', in proportion to importance weights that favour draws which explain
        many cells of the group (Boyeau et al. 2023; :func:`pyro_ldvae.tasks.importance.importance_weights`).
        'importance' costs minutes per comparison (``log p(x)`` and the likelihoods of 2 x 1,024
        anchor cells), and its weights can sit on a few draws (a warning says so;
        ``truncation=True`` spreads them).
    filter_outlier_cells
        Drop latent-space outliers of each group first.
    importance_weighting_kwargs
        With ``weights='importance'``: ``max_cells`` (1024 anchor cells), ``truncation`` (False),
        ``n_mc_samples`` (500) and ``n_mc_samples_per_pass`` (250) of the marginal likelihood.
    n_samples_overall, use_permutation, m_permutation
        Posterior samples per group, and how they are paired (in order, or ``m_permutation``
        random pairs).
    pseudocounts, threshold_counts
        Pseudocount of the LFC ('change' mode); None estimates it from the genes whose mean
        count in a group is below ``threshold_counts``.
    test_mode
        'three' (``max(P(LFC >= delta), P(LFC < -delta))``) or 'two' (their sum).
    seed
        Seed of the sampling; None draws it from numpy's global state.

    Returns
    -------
    DataFrame indexed by gene; one block per comparison sorted by ``bayes_factor`` (vanilla)
    or ``proba_de`` (change), with ``comparison``, ``group1`` and ``group2`` columns.
    """
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}.")
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}.")
    weights = check_weights(weights, importance_weighting_kwargs)
    # seed=None draws from numpy's global state, so pyro.set_rng_seed / np.random.seed make it repeatable
    rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)

    def codes_for(batchid):
        if not batch_correction:
            if batchid is not None:
                raise ValueError("batchid1/batchid2 apply only with batch_correction=True.")
            return [None]
        names = registry.batch_categories if batchid is None else [str(b) for b in batchid]
        unknown = sorted(set(names) - set(registry.batch_categories))
        if unknown:
            raise ValueError(f"Unknown batch categories {unknown}; the model knows {registry.batch_categories}.")
        return [registry.batch_categories.index(b) for b in names]

    codes1, codes2 = codes_for(batchid1), codes_for(batchid2)
    batch_size = batch_size or 128
    results = []
    for mask1, mask2, g1, g2 in _comparisons(obs, groupby, group1, group2, idx1, idx2):
        if not silent:
            logger.info("DE: %s vs %s", g1, g2)
        pos1, pos2 = np.flatnonzero(mask1), np.flatnonzero(mask2)
        if filter_outlier_cells:
            pos1, pos2 = (_filter_outliers(module, cells, pos, batch_size) for pos in (pos1, pos2))
        sampling = dict(weights=weights, importance_weighting_kwargs=importance_weighting_kwargs)
        s1, b1 = sample_scales(module, cells, pos1, codes1, n_samples_overall, batch_size, rng, **sampling)
        s2, b2 = sample_scales(module, cells, pos2, codes2, n_samples_overall, batch_size, rng, **sampling)
        scale1, scale2 = s1.mean(0), s2.mean(0)
        if batch_correction and set(codes1) == set(codes2):
            # Pair samples decoded into the same batch, so the batch effect cancels.
            per_batch = m_permutation // len(codes1)
            per_code = [
                _pairs(np.flatnonzero(b1 == c), np.flatnonzero(b2 == c), use_permutation, per_batch, rng)
                for c in codes1
            ]
            pairs = (np.concatenate([p[0] for p in per_code]), np.concatenate([p[1] for p in per_code]))
        else:
            if batch_correction and set(codes1) & set(codes2):
                warnings.warn(
                    "batchid1 and batchid2 differ but overlap; batch correction is not trustworthy.", stacklevel=2
                )
            pairs = _pairs(np.arange(len(s1)), np.arange(len(s2)), use_permutation, m_permutation, rng)
        if mode == "change" and pseudocounts is None:
            pc = estimate_pseudocounts(
                s1,
                s2,
                np.asarray(cells.X[pos1].mean(0)).ravel() < threshold_counts,
                np.asarray(cells.X[pos2].mean(0)).ravel() < threshold_counts,
                pairs=pairs,
            )
        else:
            pc = pseudocounts or 0.0
        stats = bayes_factors(s1, s2, mode, delta, pc, test_mode, pairs)
        columns = dict(list(stats.items())[:3])
        columns.update(scale1=scale1, scale2=scale2)
        columns.update(dict(list(stats.items())[3:]))
        if all_stats:
            columns.update(raw_counts_properties(cells.X, mask1, mask2))
        frame = pd.DataFrame(columns, index=var_names)
        # scvi-tools' order (bayes_factor or proba_de, decreasing); ties, common when probabilities
        # saturate at 1, are broken by the effect size instead of arbitrarily.
        primary = frame["proba_de" if mode == "change" else "bayes_factor"].to_numpy()
        effect = np.abs(frame["lfc_mean"]) if mode == "change" else np.log2(scale1 + EPS) - np.log2(scale2 + EPS)
        frame = frame.iloc[np.lexsort((-np.asarray(effect), -primary))]
        if mode == "change":
            frame[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(frame["proba_de"], fdr_target)
        if g1 is not None:
            frame["comparison"] = f"{g1} vs {g2}"
            frame["group1"] = g1
            frame["group2"] = g2
        results.append(frame)
    return pd.concat(results, axis=0)
