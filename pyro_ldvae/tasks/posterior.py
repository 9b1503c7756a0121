"""The scVI tasks (expression, predictive counts, likelihood parameters, marginal LL) from the Pyro model itself.

Posterior traces, denoised expression, posterior predictive counts, likelihood parameters, marginal likelihood and
factor interpretation.

Every quantity here comes from running the guide and then the model *replayed* on the guide's
draws (``poutine.replay``), so the generative process is written once, in ``LDVAE.model``:
the deterministic site ``'rho'`` is the normalized expression, the ``'x'`` site's distribution
holds the likelihood parameters, and ``poutine.uncondition`` turns the observed ``'x'`` into a
draw from the posterior predictive.

Monte Carlo samples are taken by stacking ``n_samples`` copies of a minibatch along the cell
axis (the module is in eval mode, so batch norm uses running statistics and copies do not
interact); results are reshaped to ``(n_samples, cells, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from pyro.poutine import Trace

from ..data.cells import CellData
from ..data.minibatch import Minibatch
from ..models.ldvae import LDVAE
from ..models.likelihoods import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from ..models.trace import log_weight, replayed_traces
from .draws import EncodedCells, has_fast_path, repeated_rows

# At most this many (cell x sample) rows times genes are materialized at once: small enough for the
# (rows, genes) temporaries of one pass to stay in cache (figures in benchmarks/README.md).
MAX_ELEMENTS = 2_000_000


def repeat_minibatch(mb: Minibatch, n: int) -> Minibatch:
    """``n`` stacked copies of ``mb``: ``(n * cells, ...)``, sample-major."""
    if n == 1:
        return mb
    rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
    return Minibatch(
        x=rep(mb.x),
        batch=rep(mb.batch),
        labels=rep(mb.labels),
        cat_covs=rep(mb.cat_covs),
        cont_covs=rep(mb.cont_covs),
        idx=torch.arange(n * mb.n_cells, device=mb.batch.device),
        qz_loc=rep(mb.qz_loc),
        qz_var=rep(mb.qz_var),
        library=rep(mb.library),
    )


@torch.no_grad()
def posterior_traces(
    module: LDVAE,
    mb: Minibatch,
    n_samples: int = 1,
    batch_code: int | None = None,
    sample_x: bool = False,
):
    """Traces of the guide and of the model replayed on the guide's draws.

    Cells are stacked ``n_samples`` times (site values are ``(n_samples * cells, ...)``).
    ``batch_code`` decodes every cell as if from that batch (the guide does not see the batch);
    ``sample_x`` un-conditions ``'x'`` so that its value is a posterior predictive draw.
    """
    rep = repeat_minibatch(mb, n_samples)
    model_mb = rep if batch_code is None else rep.with_batch(batch_code)
    return replayed_traces(module.model, module.guide, (rep,), (model_mb,), uncondition=sample_x)


def likelihood_of(model_trace: Trace) -> NegativeBinomial | ZeroInflatedNegativeBinomial | Poisson:
    """The per-entry count distribution ``(cells, genes)`` of the ``'x'`` site (its :class:`CellCounts`' base)."""
    return model_trace.nodes["x"]["fn"].base_dist


def samples_per_chunk(module: LDVAE, n_cells: int, n_samples: int) -> int:
    """Samples stacked per forward pass so that ``samples * cells * genes`` stays below MAX_ELEMENTS."""
    return max(1, min(n_samples, MAX_ELEMENTS // max(1, n_cells * module.n_genes)))


def chunks(total: int, size: int):
    """Sizes of the consecutive chunks of ``size`` that cover ``total``."""
    for start in range(0, total, size):
        yield min(size, total - start)


@torch.no_grad()
def normalized_expression(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    batch_codes: Sequence[int | None] = (None,),
    gene_mask: np.ndarray | slice = slice(None),
    library_size: float | str = 1.0,
    n_samples: int = 1,
    batch_size: int = 128,
    return_mean: bool = False,
) -> np.ndarray:
    """Denoised expression ``(n_samples, cells, genes_selected)``, averaged over ``batch_codes``.

    ``library_size='latent'`` returns the expected counts ``exp(library) * rho`` (the NB mean);
    a number scales ``rho`` (which sums to one per cell) to that library size. ``return_mean``
    returns the mean over the samples, ``(1, cells, genes_selected)``, summed pass by pass.
    """
    module.eval()
    fast = has_fast_path(module)
    n_out = 1 if return_mean else n_samples
    scale = 1.0 if library_size == "latent" else float(library_size)
    # torch's allocation, not numpy's: numpy asks for huge pages above 4 MiB, whose first touch can stall
    out = torch.empty((n_out, len(indices), _n_selected(module, gene_mask)), dtype=torch.float32)
    start = 0
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=fast):
        mean, done = 0.0, 0
        encoded = [EncodedCells(module, mb, code) for code in batch_codes] if fast else None
        for n in chunks(n_samples, samples_per_chunk(module, mb.n_cells, n_samples)):
            total = 0.0
            for i, code in enumerate(batch_codes):
                if fast:
                    draws = encoded[i].sample(n)
                    value = encoded[i].likelihood(draws).mu if library_size == "latent" else encoded[i].rho(draws)
                else:
                    _, trace = posterior_traces(module, mb, n, code)
                    value = likelihood_of(trace).mu if library_size == "latent" else trace.nodes["rho"]["value"]
                value = value.reshape(n, mb.n_cells, -1)[..., gene_mask]
                total = value if i == 0 else total + value
            if return_mean:  # summed here, scaled once at the end
                mean = total.sum(0) if done == 0 else mean.add_(total.sum(0) if n > 1 else total[0])
            else:
                out[done : done + n, start : start + mb.n_cells] = (total * (scale / len(batch_codes))).cpu()
            done += n
        if return_mean:
            out[0, start : start + mb.n_cells] = (mean * (scale / (len(batch_codes) * n_samples))).cpu()
        start += mb.n_cells
    return out.numpy()


def _n_selected(module: LDVAE, gene_mask: np.ndarray | slice) -> int:
    return len(np.arange(module.n_genes)[gene_mask])


@torch.no_grad()
def posterior_predictive_blocks(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    n_samples: int = 1,
    gene_mask: np.ndarray | slice = slice(None),
    batch_size: int = 128,
    batch_codes: Sequence[int | None] = (None,),
) -> Iterator[torch.Tensor]:
    """Counts drawn from the posterior predictive, a minibatch of cells at a time: ``(cells, genes_selected, n_samples)``.

    Every cell is decoded into each of ``batch_codes`` (None: its own batch); with several codes
    the draws are averaged over them, as scvi-tools does, and are then no longer integers.
    """
    module.eval()
    fast = has_fast_path(module)
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=fast):
        per_code = []
        for code in batch_codes:
            parts = []
            encoded = EncodedCells(module, mb, code) if fast else None
            for n in chunks(n_samples, samples_per_chunk(module, mb.n_cells, n_samples)):
                if fast:
                    draw = encoded.likelihood(encoded.sample(n)).sample()
                else:
                    draw = posterior_traces(module, mb, n, code, sample_x=True)[1].nodes["x"]["value"]
                parts.append(draw.reshape(n, mb.n_cells, -1)[..., gene_mask].cpu())
            per_code.append(torch.cat(parts, dim=0))
        draws = per_code[0] if len(per_code) == 1 else torch.stack(per_code).mean(0)
        yield draws.permute(1, 2, 0)


@torch.no_grad()
def likelihood_parameters(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    n_samples: int = 1,
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """The NB ``mean``, ``dispersions`` and ZINB ``dropout``, each ``(n_samples, cells, genes)``.

    ``mean`` is the NB mean ``mu``, ``dispersions`` theta, ``dropout`` the ZINB gate probability;
    ``dispersions`` is absent for Poisson.
    """
    module.eval()
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "dispersions": [], "dropout": []}
    for mb in cells.iter_minibatches(indices, batch_size, module.device):
        chunk: dict[str, list[torch.Tensor]] = {k: [] for k in parts}
        for n in chunks(n_samples, samples_per_chunk(module, mb.n_cells, n_samples)):
            _, trace = posterior_traces(module, mb, n)
            fn = likelihood_of(trace)
            shape = (n, mb.n_cells, module.n_genes)
            chunk["mean"].append(fn.mu.expand(-1, module.n_genes).reshape(shape).cpu())
            if module.gene_likelihood != "poisson":
                chunk["dispersions"].append(fn.theta.expand(n * mb.n_cells, -1).reshape(shape).cpu())
            if module.gene_likelihood == "zinb":
                chunk["dropout"].append(torch.sigmoid(fn.gate_logits).reshape(shape).cpu())
        for key, values in chunk.items():
            if values:
                parts[key].append(torch.cat(values, dim=0))
    return {key: torch.cat(values, dim=1).numpy() for key, values in parts.items() if values}


@torch.no_grad()
def log_weights(module: LDVAE, mb: Minibatch, n_samples: int) -> torch.Tensor:
    """Importance log-weights ``log p(x, z, l) - log q(z, l | x)``, ``(n_samples, cells)``."""
    guide_trace, model_trace = posterior_traces(module, mb, n_samples)
    return log_weight(model_trace, guide_trace).reshape(n_samples, mb.n_cells)


@torch.no_grad()
def marginal_ll(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    n_mc_samples: int = 1000,
    batch_size: int = 128,
    n_mc_samples_per_pass: int | None = None,
) -> np.ndarray:
    """Importance-sampled ``log p(x)`` per cell ``(cells,)``, the guide as proposal.

    Samples are taken in passes of at most ``n_mc_samples_per_pass`` (default: as many as fit
    in ``MAX_ELEMENTS``).
    """
    module.eval()
    fast = has_fast_path(module)
    out = []
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=fast):
        per_pass = samples_per_chunk(module, mb.n_cells, n_mc_samples)
        if n_mc_samples_per_pass is not None:
            per_pass = max(1, min(per_pass, n_mc_samples_per_pass))
        if fast:  # the encoders run once; the likelihood works on the non-zeros
            encoded, stacked = EncodedCells(module, mb), {}
            for n in set(chunks(n_mc_samples, per_pass)):
                stacked[n] = repeated_rows(mb.x, n)
            weights = [encoded.log_weights(n, stacked[n]) for n in chunks(n_mc_samples, per_pass)]
        else:
            weights = [log_weights(module, mb, n) for n in chunks(n_mc_samples, per_pass)]
        out.append((torch.logsumexp(torch.cat(weights), dim=0) - math.log(n_mc_samples)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def reconstruction_nll(module: LDVAE, cells: CellData, indices: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """``-log p(x | z, l)`` per cell ``(cells,)`` at one draw of ``z, l`` from the guide."""
    module.eval()
    out = []
    for mb in cells.iter_minibatches(indices, batch_size, module.device):
        _, trace = posterior_traces(module, mb)
        site = trace.nodes["x"]
        out.append(-site["fn"].log_prob(site["value"]).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def latent_library_size(
    module: LDVAE, cells: CellData, indices: np.ndarray, give_mean: bool = True, batch_size: int = 128
) -> np.ndarray:
    """Library size ``exp(l)`` per cell, ``(cells, 1)``: the log-normal posterior mean, or one draw.

    The observed total count with ``use_observed_lib_size``.
    """
    module.eval()
    out = []
    for mb in cells.iter_minibatches(indices, batch_size, module.device):
        if module.use_observed_lib_size:
            out.append((mb.x.sum(-1) if mb.library is None else mb.library.exp()).cpu())
            continue
        q = module.encode(mb.x)
        if give_mean:
            out.append(torch.exp(q["l_loc"] + 0.5 * q["l_var"]).cpu())
        else:
            out.append(torch.exp(torch.distributions.Normal(q["l_loc"], q["l_var"].sqrt()).sample()).cpu())
    return torch.cat(out).numpy()[:, None]


# ----------------------------------------------------------------------------------------
# Factor interpretation
# ----------------------------------------------------------------------------------------
class RunningMoments:
    """Per-column mean and population variance of rows that arrive in blocks.

    Blocks are merged with Chan et al.'s pairwise update (count, mean, sum of squared deviations),
    in the blocks' dtype (float64 here), which is as accurate as a two-pass variance over all rows
    held at once, without holding them.
    """

    def __init__(self):
        self.count = 0
        self.mean: torch.Tensor | None = None  # (columns,)
        self.sum_sq: torch.Tensor | None = None  # (columns,) sum of squared deviations from the mean

    def update(self, rows: torch.Tensor) -> None:
        """Add ``rows`` ``(n, columns)``."""
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        sum_sq = ((rows - mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.sum_sq = n, mean, sum_sq
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.sum_sq = self.sum_sq + sum_sq + delta**2 * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """Population variance per column ``(columns,)`` (NaN before any row, as ``torch.var``)."""
        if self.mean is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.sum_sq / self.count


@torch.no_grad()
def factor_variance_explained(
    module: LDVAE, cells: CellData, indices: np.ndarray, batch_size: int = 1024
) -> pd.DataFrame:
    """Share of the across-cell variance of the decoder logits explained by each factor.

    In eval mode the decoder logits are affine in the decoder input ``[f(z) ; covariates]``:
    ``r_ng = sum_k L_gk f(z)_nk + (covariate and bias terms)`` with ``L`` the loadings of
    ``get_loadings`` (batch norm folded in; the posterior mean under a loadings prior). For factor
    ``k``, ``variance = sum_g Var_n(L_gk f(z)_nk)`` at the posterior mean of ``z`` and
    ``fraction = variance / sum_g Var_n(r_ng)``, ``r`` the model's own logits (the total includes
    the covariate columns). Factors can be correlated, so fractions need not sum to the explained total.

    Returns a DataFrame indexed by factor name with columns ``variance``, ``fraction``, ``rank``
    (1 = most variance).
    """
    module.eval()
    weights = torch.from_numpy(module.get_loadings()).double()  # (genes, n_latent)
    # The model's logits take the loadings it samples; a prior model's are set to their posterior mean.
    prior_loadings = None if module.loadings_prior is None else weights.to(module.device, torch.float32)
    # Variances are accumulated minibatch by minibatch: the logits of all cells, (cells, genes),
    # would take 12 bytes per cell and gene (float32, then float64), 24 GB for 1M cells.
    z_moments, r_moments = RunningMoments(), RunningMoments()
    for mb in cells.iter_minibatches(indices, batch_size, module.device):
        z = module.encode(mb)["z_loc"]  # (cells, n_latent)
        r = module.factor_logits(module.decoder_input(z, mb), prior_loadings)  # (cells, genes)
        z_moments.update(module.z_transform(z).cpu().double())
        r_moments.update(r.cpu().double())
    variance = z_moments.variance() * (weights**2).sum(0)  # (n_latent,)
    total = r_moments.variance().sum()
    frame = pd.DataFrame(
        {"variance": variance.numpy(), "fraction": (variance / total).numpy()},
        index=[f"Z_{k}" for k in range(module.n_latent)],
    )
    frame["rank"] = frame["variance"].rank(ascending=False, method="first").astype(int)
    return frame


def top_genes(loadings: pd.DataFrame, n_top: int = 10, factors: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy table of the genes with the largest positive and negative loadings per factor.

    Columns: ``factor``, ``direction`` ('positive' or 'negative'), ``rank`` (1 = strongest),
    ``gene``, ``loading``.
    """
    rows = []
    for factor in factors if factors is not None else loadings.columns:
        if factor not in loadings.columns:
            raise ValueError(f"Unknown factor {factor!r}; factors are {list(loadings.columns)}.")
        ordered = loadings[factor].sort_values()
        for direction, genes in (("positive", ordered[::-1][:n_top]), ("negative", ordered[:n_top])):
            for rank, (gene, value) in enumerate(genes.items(), start=1):
                rows.append(
                    {"factor": factor, "direction": direction, "rank": rank, "gene": gene, "loading": float(value)}
                )
    return pd.DataFrame(rows, columns=["factor", "direction", "rank", "gene", "loading"])
