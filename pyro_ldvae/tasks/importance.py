"""Importance weights of posterior draws for groups of cells (Boyeau et al. 2023), and resampling by them.

A cell's expression draws are weighted by how well each draw explains the other cells of its
group under the model, which corrects the encoder's amortization gap in differential expression.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Normal

from ..data.cells import CellData
from ..kernels.nb_table import nb_log_likelihood_table
from ..models.ldvae import LDVAE
from ..models.likelihoods import CellCounts, count_likelihood
from .draws import EncodedCells, has_fast_path
from .posterior import MAX_ELEMENTS, chunks, likelihood_of, marginal_ll, posterior_traces, samples_per_chunk


# ----------------------------------------------------------------------------------------
# Importance weights of a group's posterior draws (differential expression)
# ----------------------------------------------------------------------------------------
@dataclass
class GroupDraws:
    """Posterior draws for a group of cells.

    ``S`` rows, each one draw ``z_s ~ q(z | x_i)`` of one cell ``i``, with what the model makes of it (its ``'rho'``
    site and the ``'x'`` site's parameters).
    """

    rho: torch.Tensor  # (S, genes), rows sum to one
    z: torch.Tensor  # (S, n_latent)
    log_prior_z: torch.Tensor  # (S,) log p(z_s) under the model's prior of z
    theta: torch.Tensor | None  # (genes,) or (S, genes); None for Poisson
    gate_logits: torch.Tensor | None  # (S, genes) for ZINB, else None


@torch.no_grad()
def group_draws(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    n_samples: int,
    batch_code: int | None = None,
    batch_size: int = 128,
) -> GroupDraws:
    """``n_samples`` posterior draws per cell of ``indices`` (``batch_code``: decoded into that batch)."""
    module.eval()
    parts: dict[str, list[torch.Tensor]] = {"rho": [], "z": [], "log_prior_z": [], "theta": [], "gate_logits": []}
    shared_theta = None
    fast = has_fast_path(module)
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=fast):
        encoded = EncodedCells(module, mb, batch_code) if fast else None
        for n in chunks(n_samples, samples_per_chunk(module, mb.n_cells, n_samples)):
            if fast:  # the encoders run once per cell; the same draws as a trace of the guide
                draws = encoded.sample(n)
                z, rho = draws.z, encoded.rho(draws)
                fn = encoded.likelihood(draws, rho)
                log_prior_z = Normal(0.0, 1.0).log_prob(z).sum(-1)
            else:
                guide_trace, model_trace = posterior_traces(module, mb, n, batch_code)
                z, rho, fn = (
                    guide_trace.nodes["z"]["value"],
                    model_trace.nodes["rho"]["value"],
                    likelihood_of(model_trace),
                )
                log_prior_z = model_trace.nodes["z"]["fn"].log_prob(z)
            parts["rho"].append(rho.cpu())
            parts["z"].append(z.cpu())
            parts["log_prior_z"].append(log_prior_z.cpu())
            theta = getattr(fn, "theta", None)
            if theta is not None and theta.dim() == 1:
                shared_theta = theta.cpu()  # one theta per gene for every draw
            elif theta is not None:
                parts["theta"].append(theta.expand(len(z), -1).cpu())
            if module.gene_likelihood == "zinb":
                parts["gate_logits"].append(fn.gate_logits.cpu())
    cat = lambda key: torch.cat(parts[key]) if parts[key] else None  # noqa: E731
    return GroupDraws(
        rho=cat("rho"),
        z=cat("z"),
        log_prior_z=cat("log_prior_z"),
        theta=shared_theta if shared_theta is not None else cat("theta"),
        gate_logits=cat("gate_logits"),
    )


def _normal_log_density(z: torch.Tensor, loc: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log N(z_s; loc_a, diag(var_a))`` for every draw ``s`` and cell ``a``: ``(S, A)``, in float64.

    The quadratic form expands into matrix products, so no ``(S, A, n_latent)`` array is formed.
    """
    z, loc, precision = z.double(), loc.double(), 1.0 / var.double()
    quadratic = (z * z) @ precision.T - 2.0 * z @ (loc * precision).T + (loc * loc * precision).sum(-1)
    return -0.5 * (quadratic + torch.log(2 * math.pi * var.double()).sum(-1))


def _table_applies(module: LDVAE, draws: GroupDraws) -> bool:
    """True for an NB with one theta per gene: :func:`nb_log_likelihood_table` then scores all anchors at once."""
    return module.gene_likelihood == "nb" and draws.theta is not None and draws.theta.dim() == 1


def _rows_of(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return t[rows] if t is not None and t.dim() == 2 else t


def _repeated_csr(counts: torch.Tensor, n: int) -> torch.Tensor:
    """One cell's counts ``(genes,)`` as ``n`` identical rows of a sparse CSR ``(n, genes)`` matrix."""
    cols = counts.nonzero().squeeze(-1)
    return torch.sparse_csr_tensor(
        torch.arange(n + 1) * len(cols),
        cols.repeat(n),
        counts[cols].repeat(n),
        size=(n, len(counts)),
        check_invariants=False,
    )


@torch.no_grad()
def count_log_likelihoods(module: LDVAE, draws: GroupDraws, x: torch.Tensor) -> torch.Tensor:
    """``log p(x_a | z_s)`` ``(S, cells)`` for the cells ``x`` ``(cells, genes)``.

    The model's count likelihood with draw ``s``'s parameters and mean ``L_a rho_s``, ``L_a`` the cell's observed total
    count (as scvi-tools' ``get_importance_weights``).
    """
    x = x.to_dense().cpu().float() if x.layout != torch.strided else x.cpu().float()  # (cells, genes)
    rows_per_pass = max(1, MAX_ELEMENTS // max(1, module.n_genes))
    out = torch.empty(len(draws.rho), x.shape[0])
    for a, counts in enumerate(x):
        library = counts.sum()
        for start in range(0, len(draws.rho), rows_per_pass):
            rows = slice(start, start + rows_per_pass)
            rho = draws.rho[rows]
            # The model's likelihood of draw s, with mean L_a rho_s; the counts are sparse.
            px = count_likelihood(
                module.gene_likelihood, library * rho, _rows_of(draws.theta, rows), _rows_of(draws.gate_logits, rows)
            )
            out[rows, a] = CellCounts(px, kernel="sparse").log_prob(_repeated_csr(counts, len(rho)))
    return out


@torch.no_grad()
def importance_weights(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    draws: GroupDraws,
    rng: np.random.Generator,
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    batch_size: int = 128,
) -> np.ndarray:
    """Normalized importance weights ``(S,)`` of a group's posterior draws (Boyeau et al.

    2023, as scvi-tools' ``get_importance_weights``).

    The draws come from the mixture of the cells' posteriors, ``(1/A) sum_a q(z | x_a)``; the
    target is the group's posterior ``(1/A) sum_a p(z | x_a)``. With ``A`` anchor cells (at most
    ``max_cells``, drawn from the group) the log-weight of draw ``z_s`` is

        log p(z_s) + logsumexp_a [log p(x_a | z_s) - log p(x_a)] - logsumexp_a log q(z_s | x_a)

    with ``log p(x_a)`` importance-sampled (``n_mc_samples``). Draws that explain many cells of
    the group get more weight than the uniform ``1/S``. ``truncation`` raises every log-weight to
    at least the log of the mean weight, scvi-tools' rule.
    """
    module.eval()
    indices = np.asarray(indices)
    if len(indices) > max_cells:
        indices = np.sort(rng.choice(indices, size=max_cells, replace=False))
    log_px = torch.from_numpy(
        marginal_ll(module, cells, indices, n_mc_samples, batch_size, n_mc_samples_per_pass)
    ).double()  # (A,)
    log_qz, log_px_z = [], []
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=True):
        posterior = module.encode(mb.x)
        log_qz.append(_normal_log_density(draws.z, posterior["z_loc"].cpu(), posterior["z_var"].cpu()))
        if not _table_applies(module, draws):
            log_px_z.append(count_log_likelihoods(module, draws, mb.x).double())
    if _table_applies(module, draws):  # every anchor at once: the dense part is shared by all
        x = cells.rows_tensor(indices, "cpu", sparse=True)
        log_px_z = [nb_log_likelihood_table(draws.rho, draws.theta, x.crow_indices(), x.col_indices(), x.values())]
    log_w = (
        draws.log_prior_z.double()
        + torch.logsumexp(torch.cat(log_px_z, dim=1) - log_px, dim=1)
        - torch.logsumexp(torch.cat(log_qz, dim=1), dim=1)
    )
    return normalized_weights(log_w, truncation)


@torch.no_grad()
def importance_resample(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    n_samples: int,
    n_out: int,
    rng: np.random.Generator,
    batch_code: int | None = None,
    batch_size: int = 128,
    **options,
) -> np.ndarray:
    """``n_out`` rows of ``rho`` ``(n_out, genes)`` resampled by importance weight.

    Rows are drawn with replacement from ``n_samples`` posterior draws per cell of ``indices``, in proportion
    to their importance weights (``options`` go to :func:`importance_weights`).
    """
    draws = group_draws(module, cells, indices, n_samples, batch_code, batch_size)
    p = importance_weights(module, cells, indices, draws, rng, batch_size=batch_size, **options)
    return draws.rho.numpy()[rng.choice(len(p), size=n_out, replace=True, p=p)]


def normalized_weights(log_w: torch.Tensor, truncation: bool = False) -> np.ndarray:
    """Weights ``(S,)`` summing to one from log-weights; warns when they concentrate on few draws.

    ``truncation`` raises every log-weight to at least the log of the mean weight (scvi-tools' rule).
    With thousands of genes the log-weights of a group's draws often spread over tens of nats, and
    a handful of draws take nearly all the weight; the effective sample size ``1 / sum(w^2)`` says
    how many.
    """
    log_w = log_w.double()
    if truncation:
        log_w = log_w.clamp(min=float(torch.logsumexp(log_w, 0) - math.log(len(log_w))))
    weights = torch.softmax(log_w, dim=0).numpy()
    weights = weights / weights.sum()
    effective = 1.0 / float(np.sum(weights**2))
    if effective < max(10.0, 0.01 * len(weights)):
        warnings.warn(
            f"The importance weights concentrate on {effective:.1f} effective draws out of {len(weights)}: the "
            "group's samples are nearly copies of those draws. importance_weighting_kwargs={'truncation': True} "
            "spreads the weights; weights='uniform' does not weight.",
            UserWarning,
            stacklevel=2,
        )
    return weights
