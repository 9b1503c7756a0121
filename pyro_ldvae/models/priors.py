"""Priors on the loadings W and on the factors z: the extension point of the model.

A **loadings prior** is any callable ``prior(n_genes, n_latent) -> Tensor`` that returns the
loadings ``(genes, n_latent)``. ``LDVAE.model`` calls it once per step, outside the ``cells``
plate, so it may contain its own ``pyro.sample`` sites (hyper-priors, local scales, ...); those
sites are global latent variables and the guide gives each a mean-field Normal posterior
(:class:`GlobalNormalGuide`). A user swaps the prior in a few lines::

    def student_t(n_genes, n_latent):
        return pyro.sample("loadings", dist.StudentT(3.0, 0.0, 0.3).expand([n_genes, n_latent]).to_event(2))

    model = LinearSCVI(adata, loadings_prior=student_t)

The prior runs with the module's device as torch's default device, so ``torch.zeros(...)`` or
python floats in a prior land on the GPU when the model does. Learnable hyper-parameters go into
a ``torch.nn.Module`` (``nn.Parameter``), which ``LDVAE`` registers as a submodule.

Built-ins, chosen by name in ``loadings_prior=``:

- ``'normal'``: ``W_gk ~ Normal(0, scale)`` (:class:`NormalLoadings`);
- ``'laplace'``: ``W_gk ~ Laplace(0, scale)`` (:class:`LaplaceLoadings`), a sparsity-promoting mode;
- ``'horseshoe'``: the regularised horseshoe of Piironen & Vehtari (2017) with one global scale
  per factor, non-centred (:class:`Horseshoe`);
- ``'ard'``: automatic relevance determination, one precision per factor (:class:`ARD`).

Batch norm: with a loadings prior the decoder has no batch norm and a per-gene intercept instead
(``LDVAE`` sets ``use_batch_norm=False``, ``bias=True`` and rejects ``use_batch_norm=True``). Batch
norm divides each gene's logits by their spread over the minibatch, so in training the likelihood
does not change when a gene's row of W is scaled: a prior on W could shrink it freely while batch
norm scales it back, and neither its scale nor sparsity or factor selection read off W would mean
anything. Without batch norm the prior is on exactly the loadings that ``get_loadings`` reports.

A **z prior** is a callable ``z_prior(n_latent) -> Distribution`` with event shape
``(n_latent,)``; ``LDVAE.model`` calls it outside the ``cells`` plate (so it too may sample global
sites) and draws every cell's z from it inside the plate, which broadcasts it over cells. The
default (``None``) is the standard Normal of LDVAE. Examples: :class:`LearnedScaleNormal`,
:class:`GaussianMixture`.

Shapes: loadings ``(genes, n_latent)``; per-factor scales ``(n_latent,)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn
from torch.distributions.transforms import AbsTransform
from torch.nn import functional as F

logger = logging.getLogger(__name__)

LoadingsPrior = Callable[[int, int], torch.Tensor]
ZPrior = Callable[[int], dist.Distribution]
LOADINGS_PRIORS = ("normal", "laplace", "horseshoe", "ard")


# --------------------------------------------------------------------------------------------
# Priors on the loadings
# --------------------------------------------------------------------------------------------
class NormalLoadings:
    """``W_gk ~ Normal(0, scale)`` i.i.d.: Bayesian loadings with a Gaussian prior (site ``'loadings'``)."""

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"The Normal loadings prior needs scale > 0, got {scale!r}.")
        self.scale = float(scale)

    def __call__(self, n_genes: int, n_latent: int) -> torch.Tensor:
        """Sample the loadings ``(genes, n_latent)``."""
        prior = dist.Normal(torch.zeros(n_genes, n_latent), torch.full((n_genes, n_latent), self.scale)).to_event(2)
        return pyro.sample("loadings", prior)  # (genes, n_latent)

    def __repr__(self) -> str:
        return f"NormalLoadings(scale={self.scale})"


class LaplaceLoadings:
    """``W_gk ~ Laplace(0, scale)`` i.i.d. (the Bayesian lasso; site ``'loadings'``)."""

    def __init__(self, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"The Laplace loadings prior needs scale > 0, got {scale!r}.")
        self.scale = float(scale)

    def __call__(self, n_genes: int, n_latent: int) -> torch.Tensor:
        """Sample the loadings ``(genes, n_latent)``."""
        prior = dist.Laplace(torch.zeros(n_genes, n_latent), torch.full((n_genes, n_latent), self.scale)).to_event(2)
        return pyro.sample("loadings", prior)  # (genes, n_latent)

    def __repr__(self) -> str:
        return f"LaplaceLoadings(scale={self.scale})"


class TensorHalfCauchy(dist.HalfCauchy):
    """``dist.HalfCauchy(scale)`` whose Cauchy base takes its zero location as a tensor.

    torch's HalfCauchy makes that location from the number 0, a tensor from a number, which the
    device rules forbid (see ``models.capture``). Density, draws and support are HalfCauchy's:
    only the construction differs.
    """

    def __init__(self, scale: torch.Tensor, validate_args: bool | None = None):
        base = dist.Cauchy(torch.zeros_like(scale), scale, validate_args=False)
        torch.distributions.TransformedDistribution.__init__(self, base, AbsTransform(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The distribution with its scale broadcast to ``batch_shape``."""
        new = self._get_checked_instance(TensorHalfCauchy, _instance)
        return super().expand(batch_shape, _instance=new)


class Horseshoe:
    """Regularised horseshoe (Piironen & Vehtari 2017), one global scale per factor, non-centred.

    For gene g and factor k::

        tau_k      ~ HalfCauchy(global_scale)                       'loadings_global_scale' (n_latent,)
        lambda_gk  ~ HalfCauchy(1)                                  'loadings_local_scale'  (genes, n_latent)
        c2_k       ~ InverseGamma(slab_df / 2, slab_df * slab_scale**2 / 2)   'loadings_slab'   (n_latent,)
        lambda~_gk = sqrt(c2_k lambda_gk**2 / (c2_k + tau_k**2 lambda_gk**2))
        w_gk       ~ Normal(0, 1)                                   'loadings_raw'          (genes, n_latent)
        W_gk       = tau_k lambda~_gk w_gk                          'loadings' (deterministic)

    The non-centred form (sample the standard Normal ``w`` and scale it) removes the funnel between
    scales and loadings that makes a centred horseshoe hard for a mean-field guide. ``tau_k`` lets
    a whole factor switch off (factor selection), ``lambda_gk`` lets single genes escape the
    shrinkage (sparsity), and the slab ``c2_k`` caps how far they escape (regularisation).

    Parameters
    ----------
    global_scale
        Scale ``tau_0`` of the per-factor global shrinkage. Piironen & Vehtari suggest
        ``p0 / (D - p0) * sigma / sqrt(n)`` for ``p0`` expected non-zeros out of ``D``.
    slab_scale, slab_df
        Scale and degrees of freedom of the slab: loadings far above ``slab_scale`` are
        shrunk like a Student-t with ``slab_df`` degrees of freedom.
    """

    def __init__(self, global_scale: float = 0.1, slab_scale: float = 1.0, slab_df: float = 4.0):
        for name, value in (("global_scale", global_scale), ("slab_scale", slab_scale), ("slab_df", slab_df)):
            if not value > 0:
                raise ValueError(f"The horseshoe prior needs {name} > 0, got {value!r}.")
        self.global_scale, self.slab_scale, self.slab_df = float(global_scale), float(slab_scale), float(slab_df)

    def __call__(self, n_genes: int, n_latent: int) -> torch.Tensor:
        """Sample the per-factor global scales, local scales and the loadings ``(genes, n_latent)``."""
        ones = torch.ones(n_latent)
        tau = pyro.sample(
            "loadings_global_scale", TensorHalfCauchy(self.global_scale * ones).to_event(1)
        )  # (n_latent,)
        lam = pyro.sample("loadings_local_scale", TensorHalfCauchy(torch.ones(n_genes, n_latent)).to_event(2))
        half_df = 0.5 * self.slab_df
        c2 = pyro.sample(
            "loadings_slab", dist.InverseGamma(half_df * ones, half_df * self.slab_scale**2 * ones).to_event(1)
        )  # (n_latent,)
        # tau * lambda~ = (1 / (tau lambda)^2 + 1 / c2)^(-1/2): the same, finite when lambda overflows
        scale = torch.rsqrt((tau * lam).pow(-2) + c2.reciprocal())  # (genes, n_latent)
        raw = pyro.sample(
            "loadings_raw", dist.Normal(torch.zeros(n_genes, n_latent), torch.ones(n_genes, n_latent)).to_event(2)
        )
        return pyro.deterministic("loadings", scale * raw, event_dim=2)  # (genes, n_latent)

    def __repr__(self) -> str:
        return f"Horseshoe(global_scale={self.global_scale}, slab_scale={self.slab_scale}, slab_df={self.slab_df})"


class ARD:
    """Automatic relevance determination: ``W_gk ~ Normal(0, alpha_k ** -1/2)``, ``alpha_k ~ Gamma(a, b)``.

    One precision ``alpha_k`` per factor (site ``'loadings_precision'``, ``(n_latent,)``): a factor
    the data do not need gets a large precision and its loadings (site ``'loadings'``) shrink to 0.

    Parameters
    ----------
    concentration, rate
        Shape ``a`` and rate ``b`` of the Gamma hyper-prior (prior mean precision ``a / b``).
    """

    def __init__(self, concentration: float = 1.0, rate: float = 0.1):
        if not (concentration > 0 and rate > 0):
            raise ValueError(f"The ARD prior needs concentration > 0 and rate > 0, got {concentration!r}, {rate!r}.")
        self.concentration, self.rate = float(concentration), float(rate)

    def __call__(self, n_genes: int, n_latent: int) -> torch.Tensor:
        """Sample the per-factor precisions and the loadings ``(genes, n_latent)``."""
        ones = torch.ones(n_latent)
        alpha = pyro.sample("loadings_precision", dist.Gamma(self.concentration * ones, self.rate * ones).to_event(1))
        prior = dist.Normal(torch.zeros(n_genes, n_latent), alpha.rsqrt()).to_event(2)
        return pyro.sample("loadings", prior)  # (genes, n_latent)

    def __repr__(self) -> str:
        return f"ARD(concentration={self.concentration}, rate={self.rate})"


def resolve_loadings_prior(
    prior: str | LoadingsPrior | None, scale: float | None = None, **kwargs
) -> LoadingsPrior | None:
    """Turn ``loadings_prior=`` into a callable ``prior(n_genes, n_latent) -> (genes, n_latent)``.

    Parameters
    ----------
    prior
        None (point-estimate loadings), 'normal', 'laplace', 'horseshoe', 'ard' or a callable.
    scale
        The scale of 'normal' and 'laplace' (defaults 1.0 and 0.5), the slab scale of 'horseshoe'.
    kwargs
        Further arguments of the built-in prior's class (e.g. ``global_scale`` of :class:`Horseshoe`).
    """
    if prior is None:
        if scale is not None or kwargs:
            raise ValueError("loadings_prior_scale / loadings_prior_kwargs were given without a loadings_prior.")
        return None
    if callable(prior):
        if scale is not None or kwargs:
            raise ValueError(
                "loadings_prior_scale / loadings_prior_kwargs only configure the named priors; "
                "a callable prior carries its own settings."
            )
        return prior
    if prior not in LOADINGS_PRIORS:
        raise ValueError(
            f"loadings_prior must be None, a callable prior(n_genes, n_latent) or one of "
            f"{', '.join(map(repr, LOADINGS_PRIORS))}; got {prior!r}."
        )
    if scale is not None:
        kwargs["slab_scale" if prior == "horseshoe" else "scale"] = scale
        if prior == "ard":
            raise ValueError(
                "The 'ard' prior learns its scale per factor; pass loadings_prior_kwargs=dict(concentration, rate)."
            )
    cls = {"normal": NormalLoadings, "laplace": LaplaceLoadings, "horseshoe": Horseshoe, "ard": ARD}[prior]
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Priors on z (examples of the z_prior extension point)
# --------------------------------------------------------------------------------------------
class LearnedScaleNormal(nn.Module):
    """``z_k ~ Normal(0, s_k)`` with a learned scale per factor (a point estimate, ``nn.Parameter``)."""

    def __init__(self, n_latent: int, init_scale: float = 1.0):
        super().__init__()
        self.unconstrained_scale = nn.Parameter(torch.full((n_latent,), float(init_scale)).expm1().log())

    @property
    def scale(self) -> torch.Tensor:
        """The per-factor standard deviation ``(n_latent,)``."""
        return F.softplus(self.unconstrained_scale)  # (n_latent,)

    def forward(self, n_latent: int) -> dist.Distribution:
        """``Normal(0, scale)`` over the ``n_latent`` factors."""
        return dist.Normal(torch.zeros_like(self.scale), self.scale).to_event(1)


class GaussianMixture(nn.Module):
    """``z ~ sum_c pi_c Normal(m_c, diag(s_c^2))``: a mixture prior over z with learned parameters.

    ``n_components`` means ``(n_components, n_latent)``, initialised spread out at random, scales
    and weights are point estimates (``nn.Parameter``). The KL to this prior has no closed form,
    so the ELBO uses ``log p(z) - log q(z)`` at the sampled z.
    """

    def __init__(self, n_latent: int, n_components: int = 5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.locs = nn.Parameter(torch.randn(n_components, n_latent, generator=generator))
        self.unconstrained_scales = nn.Parameter(torch.zeros(n_components, n_latent))
        self.logits = nn.Parameter(torch.zeros(n_components))

    def forward(self, n_latent: int) -> dist.Distribution:
        """The mixture over the ``n_latent`` factors."""
        components = dist.Normal(self.locs, F.softplus(self.unconstrained_scales) + 1e-3).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


def _is_real(support: dist.constraints.Constraint) -> bool:
    while isinstance(support, dist.constraints.independent):
        support = support.base_constraint
    return support is dist.constraints.real


# --------------------------------------------------------------------------------------------
# The guide for global latent variables
# --------------------------------------------------------------------------------------------
class GlobalNormalGuide(AutoNormal):
    """Mean-field Normal posterior (in unconstrained space) for every global sample site.

    An :class:`~pyro.infer.autoguide.AutoNormal` whose ``forward`` samples each site directly
    from ``TransformedDistribution(Normal(loc, scale), biject_to(support))`` (a plain Normal for
    real-valued sites) instead of through an auxiliary site and a ``Delta``. ``LDVAE.elbo`` then
    sees the guide's density of each site: the KL is analytic where one exists (a Normal prior on
    Normal-guided loadings) and ``log p - log q`` otherwise. Its ``locs`` and ``scales`` are
    ``nn.Parameter`` s of the ``LDVAE`` that holds it (build it under module-local params).
    """

    def __init__(self, model: Callable, init_scale: float = 0.01):
        super().__init__(model, init_loc_fn=init_to_median(num_samples=15), init_scale=init_scale)

    def site_distribution(self, name: str) -> dist.Distribution:
        """Q of site ``name`` in its own (constrained) space."""
        site = self.prototype_trace.nodes[name]
        loc, scale = self._get_loc_and_scale(name)
        q = dist.Normal(loc, scale).to_event(self._event_dims[name])
        if not _is_real(site["fn"].support):
            q = dist.TransformedDistribution(q, biject_to(site["fn"].support))
        return q

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every global latent site from its Normal posterior; returns the values by site name."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, self.site_distribution(name))
        return result
