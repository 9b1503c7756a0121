"""Posterior draws from one encoder pass per cell: the fast path of the Monte Carlo tasks.

The guide's posteriors ``q(z | x)`` and ``q(l | x)`` depend on the cell only, so the encoders run
once per cell (on the sparse counts) and ``n`` draws are taken from their output; each draw is
mapped by the pieces ``LDVAE.model`` itself calls (``decoder_input``, ``factor_logits``,
``inverse_dispersion``, ``count_likelihood``). The draws are sample-major, ``(n * cells, ...)``,
and taken in the guide's order (z, then l), so one pass draws exactly what a trace of the guide on
``n`` stacked copies of the cells draws (``tests/test_task_draws.py`` checks it).

The path holds for models without global latent sites (no ``loadings_prior``, no ``z_prior``):
:func:`has_fast_path` says so; other models take the traced path of :mod:`.posterior`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.distributions import Normal

from ..data.minibatch import Minibatch
from ..kernels.sparse import total_counts
from ..models.ldvae import LDVAE
from ..models.likelihoods import CellCounts, count_kernel, count_likelihood


def has_fast_path(module: LDVAE) -> bool:
    """True when the model has no global latent site, so draws need only the per-cell guide."""
    return module.loadings_prior is None and module.z_prior is None


def repeat_cells(mb: Minibatch, n: int, batch_code: int | None = None) -> Minibatch:
    """The codes of ``mb`` stacked ``n`` times, ``(n * cells, ...)``, without the counts."""
    mb = replace(mb, x=None) if batch_code is None else replace(mb, x=None).with_batch(batch_code)
    rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
    return replace(
        mb, batch=rep(mb.batch), labels=rep(mb.labels), cat_covs=rep(mb.cat_covs), cont_covs=rep(mb.cont_covs)
    )


@dataclass
class Draws:
    """``n`` posterior draws of every cell of a minibatch, sample-major, and the decoder's input."""

    z: torch.Tensor  # (n * cells, n_latent)
    library: torch.Tensor  # (n * cells,) log library size
    decoder_input: torch.Tensor  # (n * cells, n_latent + n_covariates)
    cells: Minibatch  # codes (n * cells,), decoded batch; no counts


class EncodedCells:
    """A minibatch encoded once; :meth:`sample` draws from its posterior and decodes the draws.

    ``batch_code`` decodes every cell as if from that batch (None: its own), as ``posterior_traces``.
    """

    def __init__(self, module: LDVAE, mb: Minibatch, batch_code: int | None = None):
        self.module, self.mb, self.batch_code = module, mb, batch_code
        self.q = module.encode(mb)  # z_loc, z_var (cells, n_latent); l_loc, l_var (cells,); minified: the stored
        stored = mb.library  # minified data: the stored log library size (cells,), and no counts
        observed = stored if stored is not None else (torch.log(total_counts(mb.x)) if mb.x is not None else None)
        self.observed_library = observed if module.use_observed_lib_size else None
        self.weight_t, self.bias = folded_decoder(module)

    def z_posterior(self) -> Normal:
        """``q(z | x)``, batch shape ``(cells, n_latent)``."""
        return Normal(self.q["z_loc"], self.q["z_var"].sqrt())

    def library_posterior(self) -> Normal:
        """``q(l | x)``, batch shape ``(cells,)`` (latent library only)."""
        return Normal(self.q["l_loc"], self.q["l_var"].sqrt())

    def sample(self, n: int) -> Draws:
        """``n`` draws per cell, ``(n * cells, ...)``."""
        z = self.z_posterior().sample((n,)).reshape(n * self.mb.n_cells, -1)
        if self.observed_library is None:
            library = self.library_posterior().sample((n,)).reshape(-1)
        else:
            library = self.observed_library.repeat(n)
        cells = repeat_cells(self.mb, n, self.batch_code)
        return Draws(z, library, self.module.decoder_input(z, cells), cells)

    def rho(self, draws: Draws) -> torch.Tensor:
        """Normalized expression ``softmax(BN(W [f(z) ; c] + b))`` ``(n * cells, genes)``: the model's ``'rho'``."""
        if self.weight_t is None:
            return F.softmax(self.module.factor_logits(draws.decoder_input, None), dim=-1)
        return torch.addmm(self.bias, draws.decoder_input, self.weight_t).softmax(dim=-1)

    def likelihood(self, draws: Draws, rho: torch.Tensor | None = None):
        """The model's count law of the ``'x'`` site at the draws, ``(n * cells, genes)``."""
        module = self.module
        rho = self.rho(draws) if rho is None else rho
        mu = torch.exp(draws.library).unsqueeze(-1) * rho
        theta = module.inverse_dispersion(draws.decoder_input, draws.cells)
        return count_likelihood(module.gene_likelihood, mu, theta, module.gate_logits(draws.decoder_input))

    def log_weights(self, n: int, counts: torch.Tensor) -> torch.Tensor:
        """Importance log-weights ``log p(x, z, l) - log q(z, l | x)`` of ``n`` draws, ``(n, cells)``.

        ``counts`` are the cells' counts stacked ``n`` times (sparse CSR keeps the likelihood on the
        non-zeros); the terms are those of ``models.trace.log_weight`` on the model's sites.
        """
        module, cells = self.module, self.mb.n_cells
        draws = self.sample(n)
        px = self.likelihood(draws)
        total = CellCounts(px, kernel=count_kernel(counts, px)).log_prob(counts)  # (n * cells,)
        z = draws.z.reshape(n, cells, -1)
        total = total.reshape(n, cells) + (Normal(0.0, 1.0).log_prob(z) - self.z_posterior().log_prob(z)).sum(-1)
        if self.observed_library is None:
            library = draws.library.reshape(n, cells)
            batch = draws.cells.batch[:cells]  # the library prior is the batch the model decodes into
            prior = Normal(module.library_log_means[batch], module.library_log_vars[batch].sqrt())
            total = total + prior.log_prob(library) - self.library_posterior().log_prob(library)
        return total


def folded_decoder(module: LDVAE) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The eval-mode decoder ``BN(W v + b)`` as one affine map: ``(W.T scaled, bias)``, ``(in, genes)`` and ``(genes,)``.

    Batch norm with running statistics is ``(y - mean) * gamma / sqrt(var + eps) + beta``, so it folds
    into ``W`` and ``b`` and a decoder pass is one ``addmm`` instead of three passes over ``(rows, genes)``.
    ``(None, None)`` in training mode, where batch norm uses the minibatch's statistics.
    """
    head = module.decoder.factor_regressor
    bn = head.batch_norm
    if bn is not None and bn.training:
        return None, None
    weight = head.folded_weight()  # (genes, in)
    bias = head.linear.bias if head.linear.bias is not None else weight.new_zeros(weight.shape[0])
    if bn is not None:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = (bias - bn.running_mean) * scale + bn.bias
    return weight.t().contiguous().detach(), bias.detach()


def repeated_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A sparse CSR ``(cells, genes)`` matrix stacked ``n`` times, ``(n * cells, genes)``, still CSR."""
    if x.layout != torch.sparse_csr:
        return x.repeat(n, 1)
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    offsets = (torch.arange(n, dtype=crow.dtype) * crow[-1]).repeat_interleave(len(crow) - 1)
    new_crow = torch.cat([(crow[:-1].repeat(n) + offsets), crow[-1:] * n])
    return torch.sparse_csr_tensor(
        new_crow, col.repeat(n), val.repeat(n), size=(n * x.shape[0], x.shape[1]), check_invariants=False
    )
