"""New factors for a query model: programs the reference lacks, under a shrinkage prior.

A query model built by :func:`~pyro_ldvae.models.query.freeze_reference` keeps every factor of
the reference fixed. :func:`add_new_factors` gives it ``K`` more factors: z grows from
``n_ref`` to ``n_ref + K`` entries, and the cell's logits become

    r_n = [reference decoder](z_ref_n ; c_n) + W_new z_new_n           (genes,)

with ``W_new`` ``(genes, K)`` a global latent variable under a per-factor shrinkage prior
(:class:`~pyro_ldvae.priors.ARD` or :class:`~pyro_ldvae.priors.Horseshoe`), whose per-factor
scale lets an unneeded factor shrink towards zero, projected off the reference's loadings (see
:meth:`NewFactorsMixin.global_latents`). ``W_new`` enters after the reference's (frozen, eval
mode) decoder batch norm, so its entries are in the units of the reference's folded loadings
(natural-log expression). The encoder keeps the reference's outputs bit for bit and gets ``K``
new output units (:class:`NewFactorEncoder`).

Two things the reference leaves unexplained in every query cell would otherwise switch new
factors on in a query with nothing new (measured in ``benchmarks/README.md``, "Reference
mapping"): the frozen library encoder's error, which varies from cell to cell (under the negative
binomial a misjudged library size is partly undone by shifting expression between genes, one
direction times a per-cell amount: a factor); and a per-gene offset of the query, which a new
factor with the same ``z`` in every cell can absorb. So the query model's copy of the library
encoder trains (the library is not part of the reference's outputs), and the new batches' decoder
columns learn at the rate of ``W_new`` (:meth:`NewFactorsMixin.global_rate_parameters`).

The class of the module changes (:func:`with_new_factors`), its state dict keeps plain keys, so
a saved query model is rebuilt by running the same steps before loading the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .ldvae import LDVAE, _local_params, _pyro_method
from .nn import VAR_EPS, Encoder
from .priors import ARD, GlobalNormalGuide, Horseshoe
from .query import HEADS, ExtendedLinear, eval_unlocked, mix_into

NewFactorPrior = Literal["ard", "horseshoe"]
NewFactorEncoderKind = Literal["heads", "separate"]


class NewFactorEncoder(nn.Module):
    """The reference's z encoder, unchanged, plus ``n_new`` output units for the new factors.

    ``kind='heads'``: the new units are linear heads (mean and log variance) on the reference's
    hidden features, which stay fixed; ``kind='separate'``: the new factors get an encoder of
    their own (same depth and width). The reference's outputs are computed by the same operations
    as in the reference model, so they are bit-identical.
    """

    def __init__(self, reference: Encoder, n_new: int, kind: NewFactorEncoderKind = "separate"):
        super().__init__()
        if kind not in ("heads", "separate"):
            raise ValueError(f"new_factor_encoder must be 'heads' or 'separate', got {kind!r}.")
        self.reference, self.kind = reference, kind
        n_hidden = reference.mean.in_features
        if kind == "heads":
            self.mean = nn.Linear(n_hidden, n_new)
            self.log_var = nn.Linear(n_hidden, n_new)
        else:
            first = reference.hidden[0]
            n_layers = sum(isinstance(m, nn.BatchNorm1d) for m in reference.hidden)
            dropout = next((m.p for m in reference.hidden if isinstance(m, nn.Dropout)), 0.0)
            self.own = Encoder(first.weight.shape[1], n_new, n_layers, n_hidden, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, var)``, each ``(cells, n_ref + n_new)``: the reference's units first."""
        ref = self.reference
        h = ref.hidden(x)  # the reference encoder's own forward, step by step
        loc, var = ref.mean(h), torch.exp(ref.log_var(h)) + VAR_EPS
        if self.kind == "heads":
            new_loc, new_var = self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS
        else:
            new_loc, new_var = self.own(x)
        return torch.cat([loc, new_loc], dim=-1), torch.cat([var, new_var], dim=-1)


class NewFactorsMixin:
    """Model pieces of a query LDVAE with new factors (see the module docstring).

    Attributes set by :func:`add_new_factors`: ``n_reference_latent``, ``n_new_factors``,
    ``reference_loadings`` (buffer, ``(genes, n_ref)``, the reference's ``get_loadings()``),
    ``reference_basis`` (buffer, ``(genes, n_ref + 1)``), ``reference_has_prior``,
    ``loadings_prior`` (the prior of ``W_new``) and ``global_guide``
    (its mean-field guide).
    """

    def global_latents(self):
        """Loadings ``(genes, n_ref + K)``: the reference's (fixed) and a draw of ``W_new``, projected; no z prior.

        ``W_new`` is projected off the span of the reference's loadings and the all-ones vector
        (``reference_basis``): a new factor can then neither re-estimate a reference factor (which
        would gain likelihood in every cell, as a correction of the fixed encoder) nor shift all
        genes at once (which the softmax ignores); only a direction the reference lacks remains.
        """
        with self.device:
            draw = self.loadings_prior(self.n_genes, self.n_new_factors)  # (genes, K)
        basis = self.reference_basis  # (genes, n_ref + 1), orthonormal columns
        new = draw - basis @ (basis.T @ draw)
        return torch.cat([self.reference_loadings, new], dim=-1), None

    @_pyro_method
    def factor_logits(self, decoder_input: torch.Tensor, loadings: torch.Tensor | None) -> torch.Tensor:
        """The reference decoder's logits of ``[z_ref ; c]`` plus ``z_new @ W_new.T``, ``(cells, genes)``.

        ``loadings`` ``(genes, n_ref + K)``: only its new columns are read; the reference part
        comes from the frozen decoder (batch norm in eval mode, or the reference's posterior
        mean loadings for a reference with a loadings prior).
        """
        n_ref, n_new = self.n_reference_latent, self.n_new_factors
        head = self.decoder.factor_regressor  # its columns of the new factors are fixed zeros
        if self.reference_has_prior:
            weight = torch.cat([self.reference_loadings, head.linear.weight[:, n_ref:]], dim=-1)
            logits = torch.nn.functional.linear(decoder_input, weight, head.linear.bias)
        else:
            logits = head(decoder_input)
        if loadings is None:  # no draw given: the posterior mean of W_new
            loadings = torch.as_tensor(self.get_loadings(), device=decoder_input.device)
        return logits + decoder_input[:, n_ref : n_ref + n_new] @ loadings[:, n_ref:].T

    def global_rate_parameters(self) -> list[nn.Parameter]:
        """Parameters that learn at the plan's ``global_lr``: the guide of ``W_new``, the new batches' columns and theta rows.

        The new batches' decoder columns hold the query's per-gene offset; learning more slowly
        than ``W_new``, they would leave that offset for a new factor to absorb (a factor whose
        ``z`` is the same in every cell, on in every query).
        """
        return list(self.global_guide.parameters()) + super().global_rate_parameters()

    @torch.no_grad()
    def get_loadings(self, return_std: bool = False, num_samples: int = 500):
        """``(genes, n_ref + K)``: the reference's loadings (fixed, std 0) and the posterior mean of ``W_new``."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)  # the same model gives the same loadings every time
            draws = self.sample_loadings(num_samples)[..., self.n_reference_latent :]  # (S, genes, K)
        ref = self.reference_loadings.cpu().numpy()
        mean = torch.cat([torch.from_numpy(ref), draws.mean(0).cpu()], dim=-1).numpy()
        if not return_std:
            return mean
        std = torch.cat([torch.zeros_like(torch.from_numpy(ref)), draws.std(0).cpu()], dim=-1).numpy()
        return mean, std


def with_new_factors(module: LDVAE) -> LDVAE:
    """``module`` with :class:`NewFactorsMixin` mixed into its class (changed in place)."""
    return mix_into(module, NewFactorsMixin)


def resolve_new_factor_prior(prior: NewFactorPrior, kwargs: dict | None = None):
    """The prior of ``W_new``: :class:`ARD` or :class:`Horseshoe` with ``kwargs``."""
    if prior not in ("ard", "horseshoe"):
        raise ValueError(f"new_factor_prior must be 'ard' or 'horseshoe', got {prior!r}.")
    return (ARD if prior == "ard" else Horseshoe)(**(kwargs or {}))


@_local_params
def add_new_factors(
    module: LDVAE,
    n_new: int,
    prior: NewFactorPrior = "ard",
    prior_kwargs: dict | None = None,
    encoder: NewFactorEncoderKind = "separate",
) -> LDVAE:
    """Give a frozen query ``module`` (from :func:`~pyro_ldvae.models.query.freeze_reference`) ``n_new`` new factors.

    Changed in place and returned: each decoder head gets ``n_new`` fixed zero columns after the
    reference's factors (new factors act on the mean only, through ``W_new``); z and the encoder
    grow by ``n_new``; ``W_new`` ``(genes, n_new)`` gets the shrinkage prior ``prior`` and a
    mean-field guide, which replaces the reference's (for a loadings-prior reference: the query
    model uses its posterior mean loadings). The reference's loadings are stored as they are reported, so
    ``get_loadings()[:, :n_ref]`` is the reference's, bit for bit.
    """
    if n_new < 1 or int(n_new) != n_new:
        raise ValueError(f"n_new_factors must be a positive integer, got {n_new!r}.")
    if module.latent_distribution == "ln":
        raise ValueError(
            "New factors need latent_distribution='normal': with 'ln' the decoder sees softmax(z), "
            "so new entries of z would change the reference's factors."
        )
    if not isinstance(module.decoder.factor_regressor.linear, ExtendedLinear):
        raise ValueError("add_new_factors needs a frozen query module (freeze_reference first).")
    n_ref = module.n_latent
    reference_loadings = torch.as_tensor(module.get_loadings()).to(module.device)  # as the reference reports them
    new_prior = resolve_new_factor_prior(prior, prior_kwargs)
    for name in HEADS:
        head = getattr(module.decoder, name, None)
        if head is not None:
            linear = head.linear  # ExtendedLinear: fixed columns [factors ; fixed covariates], new batch block
            zeros = linear.fixed.new_zeros(linear.fixed.shape[0], n_new)
            linear.fixed = torch.cat([linear.fixed[:, :n_ref], zeros, linear.fixed[:, n_ref:]], dim=1)
            linear.start, linear.stop = linear.start + n_new, linear.stop + n_new
    module.z_encoder = NewFactorEncoder(module.z_encoder, n_new, encoder)
    library_encoder = getattr(module, "l_encoder", None)
    if library_encoder is not None:  # the query's own copy adapts: see the module docstring
        eval_unlocked(library_encoder).requires_grad_(True)
    module.reference_has_prior = module.loadings_prior is not None
    module.register_buffer("reference_loadings", reference_loadings)
    ones = torch.ones_like(reference_loadings[:, :1])
    module.register_buffer("reference_basis", torch.linalg.qr(torch.cat([reference_loadings, ones], dim=-1))[0])
    module.n_reference_latent, module.n_new_factors, module.n_latent = n_ref, n_new, n_ref + n_new
    module.loadings_prior = new_prior
    with_new_factors(module)
    with torch.no_grad():
        guide = GlobalNormalGuide(module.global_latents)
        guide._setup_prototype()  # now, so that the optimizer sees its params
    module.global_guide = guide
    return module
