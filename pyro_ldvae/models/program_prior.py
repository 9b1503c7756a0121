"""The gene-program prior: a regularised horseshoe on the loadings whose local scales follow a gene-set mask.

The informed-sparsity idea is MuVI's (Qoku & Buettner 2023), here on the loadings of a count
model. It is a loadings prior in the sense of :mod:`pyro_ldvae.models.priors` (a callable
``(n_genes, n_latent) -> (genes, n_latent)`` whose sample sites get a mean-field guide), so it
trains with batches, covariates, every likelihood and the replayed or CUDA-graph steps.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .priors import TensorHalfCauchy


class ProgramPrior(nn.Module):
    """Regularised horseshoe with mask-informed local scales: one factor per gene program plus free factors.

    For gene g and factor k, with ``m_gk = 1`` when gene g is annotated to program k (and for
    every gene in the ``n_unannotated`` free factors) and ``c`` the ``confidence``::

        s_gk       = m_gk + (1 - m_gk) (1 - c)                      prior local scale
        tau_k      ~ HalfCauchy(global_scale r_k)                   'loadings_global_scale' (n_latent,)
        lambda_gk  ~ HalfCauchy(s_gk)                               'loadings_local_scale'  (genes, n_latent)
        c2_k       ~ InverseGamma(slab_df / 2, slab_df * slab_scale**2 / 2)   'loadings_slab'   (n_latent,)
        w_gk       ~ Normal(0, 1)                                   'loadings_raw'          (genes, n_latent)
        W_gk       = (1 / (tau_k lambda_gk)^2 + 1 / c2_k)^(-1/2) w_gk          'loadings' (deterministic)

    Annotated genes have wide local scales; genes outside a program are shrunk ``1 / (1 - c)``
    times harder, yet the Cauchy tails let a gene escape where the data insist. ``tau_k`` shrinks
    a whole factor, so a program the data do not support switches off; the slab ``c2_k`` caps
    the loadings that escape. ``confidence = 0`` makes every factor a plain horseshoe.

    ``r_k`` is 1 for a program and ``unannotated_scale`` for a free factor: a free factor reaches
    every gene at no extra cost, so with equal global scales it can take a program's signal
    (on Kang PBMC with four free factors the interferon program then lost the stimulation
    response in three of five cell types; see benchmarks/README.md). A smaller global scale gives
    the programs the first claim on what their genes carry, and leaves the free factors what no
    program explains.

    Parameters
    ----------
    mask
        Boolean ``(genes, programs)``: gene g is annotated to program k.
    n_unannotated
        Free factors after the programs, with the plain horseshoe (``s_gk = 1``).
    confidence
        ``c`` in ``[0, 1)``: how hard genes outside a program are shrunk.
    global_scale, slab_scale, slab_df
        As in :class:`pyro_ldvae.priors.Horseshoe`.
    unannotated_scale
        ``r_k`` of the free factors: their global scale relative to the programs'.
    """

    def __init__(
        self,
        mask: np.ndarray,
        n_unannotated: int = 0,
        confidence: float = 0.99,
        global_scale: float = 0.1,
        slab_scale: float = 1.0,
        slab_df: float = 4.0,
        unannotated_scale: float = 0.1,
    ):
        super().__init__()
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != bool:
            raise ValueError(
                f"ProgramPrior needs a boolean (genes, programs) mask, got {mask.dtype} of shape {mask.shape}."
            )
        if not (isinstance(n_unannotated, (int, np.integer)) and n_unannotated >= 0):
            raise ValueError(f"n_unannotated must be a non-negative integer, got {n_unannotated!r}.")
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"program_confidence must be in [0, 1), got {confidence!r} (1 would forbid any change).")
        scales = {"global_scale": global_scale, "slab_scale": slab_scale, "slab_df": slab_df}
        for name, value in {**scales, "unannotated_scale": unannotated_scale}.items():
            if not value > 0:
                raise ValueError(f"The program prior needs {name} > 0, got {value!r}.")
        self.n_programs, self.n_unannotated, self.confidence = mask.shape[1], int(n_unannotated), float(confidence)
        self.global_scale, self.slab_scale, self.slab_df = float(global_scale), float(slab_scale), float(slab_df)
        self.unannotated_scale = float(unannotated_scale)
        member = np.hstack([mask, np.ones((mask.shape[0], self.n_unannotated), dtype=bool)])
        # s_gk, (genes, n_latent): a buffer, so it moves with the module to its device.
        local_prior = np.where(member, 1.0, 1.0 - self.confidence).astype(np.float32)
        self.register_buffer("local_prior_scale", torch.from_numpy(local_prior), persistent=False)
        global_prior = np.r_[np.ones(self.n_programs), np.full(self.n_unannotated, self.unannotated_scale)]
        self.register_buffer(
            "global_prior_scale", torch.tensor(self.global_scale * global_prior, dtype=torch.float32), persistent=False
        )

    def forward(self, n_genes: int, n_latent: int) -> torch.Tensor:
        """Sample the loadings ``(genes, n_latent)`` and their scales (see the class docstring)."""
        if (n_genes, n_latent) != tuple(self.local_prior_scale.shape):
            raise ValueError(
                f"This program prior is for {tuple(self.local_prior_scale.shape)} (genes, programs + unannotated) "
                f"loadings, but the model has ({n_genes}, {n_latent})."
            )
        s = self.local_prior_scale
        ones = torch.ones_like(s[0])  # (n_latent,)
        tau = pyro.sample("loadings_global_scale", TensorHalfCauchy(self.global_prior_scale).to_event(1))
        lam = pyro.sample("loadings_local_scale", TensorHalfCauchy(s).to_event(2))  # (genes, n_latent)
        half_df = 0.5 * self.slab_df
        c2 = pyro.sample(
            "loadings_slab", dist.InverseGamma(half_df * ones, half_df * self.slab_scale**2 * ones).to_event(1)
        )  # (n_latent,)
        scale = torch.rsqrt((tau * lam).pow(-2) + c2.reciprocal())  # (genes, n_latent)
        raw = pyro.sample("loadings_raw", dist.Normal(torch.zeros_like(s), torch.ones_like(s)).to_event(2))
        return pyro.deterministic("loadings", scale * raw, event_dim=2)  # (genes, n_latent)

    @torch.no_grad()
    def initialise_guide(self, guide, init_loading: float = 1.0) -> None:
        """Start each program's annotated genes at ``w_gk = init_loading`` in the guide ``q(w)``.

        At ``w = 0`` every factor is alike, and the free factors, which reach all genes, take the
        strongest signals before the programs can; starting the annotated genes at a positive
        loading points each program factor at its genes from the first step (and orients it:
        a high activity means the annotated genes are up).
        """
        member = self.local_prior_scale[:, : self.n_programs] == 1.0
        loc = guide.locs.loadings_raw  # (genes, n_latent)
        loc[:, : self.n_programs] = torch.where(member, init_loading, loc[:, : self.n_programs])

    def extra_repr(self) -> str:
        """The settings, for ``repr``."""
        return (
            f"n_programs={self.n_programs}, n_unannotated={self.n_unannotated}, confidence={self.confidence}, "
            f"global_scale={self.global_scale}, slab_scale={self.slab_scale}, slab_df={self.slab_df}, "
            f"unannotated_scale={self.unannotated_scale}"
        )
