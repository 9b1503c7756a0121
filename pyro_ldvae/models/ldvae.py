"""LDVAE as a Pyro program: the generative ``model`` and the amortized ``guide``.

For cell n of batch s (Svensson et al. 2020, eq. 1-4; scVI's notation):

    z_n  ~ Normal(0, I)                                  (n_latent,)
    l_n  ~ Normal(mu_s, var_s)      or l_n = log sum_g x_ng with use_observed_lib_size
    r_n  = BN(W [f(z_n) ; c_n] + b)                      (genes,)   f = id, or softmax for 'ln'
    rho_n = softmax(r_n);  mu_ng = exp(l_n) rho_ng
    x_ng ~ NB(mu_ng, theta) | ZINB(mu_ng, theta, pi_ng) | Poisson(mu_ng)

c_n holds the one-hot batch (when n_batch > 1), one-hot categorical covariates and continuous
covariates; W's first n_latent columns are the loadings. The guide is
q(z_n | x_n) q(l_n | x_n), two MLPs on log1p(x_n).

With ``loadings_prior`` (see :mod:`pyro_ldvae.priors`) the loadings become a global latent
variable W ~ p(W), sampled once per step outside the cells plate, and the guide adds a mean-field
Normal q(W) (and q of every hyper-parameter of the prior); ``z_prior`` replaces Normal(0, I).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import to_pyro_module_
from torch.distributions import constraints

from ..data.minibatch import Minibatch
from ..data.validate import check_model_args
from ..kernels.linear import narrow_linear
from ..kernels.sparse import log1p_counts, total_counts
from .likelihoods import CellCounts, count_kernel, count_likelihood
from .module_options import SCVI_MODULE_KWARGS, check_scvi_module_kwargs, decoder_batch_norm
from .nn import Encoder, LinearHead
from .options import Dispersion, GeneLikelihood, LatentDistribution
from .priors import GlobalNormalGuide, LoadingsPrior, ZPrior, resolve_loadings_prior
from .trace import mean_field_elbo, replayed_traces


def _local_params(method: Callable) -> Callable:
    """Run with module-local Pyro params: two LDVAE objects in one session never share weights.

    Applied to ``__init__`` too, because a PyroModule fixes its param mode when it is built.

    With Pyro's default global param store, a re-created model silently picks up the old
    model's values of the same name; module-local params avoid that and keep every weight an
    ``nn.Parameter`` that torch optimizers and DistributedDataParallel see.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return method(*args, **kwargs)

    return wrapper


def _pyro_method(method: Callable) -> Callable:
    """Module-local params and an active PyroModule context around ``method``.

    Every param of the module (theta included, not only those of called submodules) is then a ``param`` site.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True), self._pyro_context:
            return method(self, *args, **kwargs)

    return wrapper


def kl_warmup(kl_weight: float | torch.Tensor):
    """Scale the z terms by the KL warm-up weight.

    A weight of 0 (scvi-tools' first epoch) masks them, since ``poutine.scale`` only takes positive scales.

    A 0-dim tensor weight (the CUDA-graph training step's, see ``cuda_graph``) scales as it is,
    0 included: comparing it with 0 would read it back to the host, which a graph cannot do.
    """
    if isinstance(kl_weight, torch.Tensor) or kl_weight > 0:
        return poutine.scale(scale=kl_weight)
    return poutine.mask(mask=False)


def one_hot(codes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(cells, n_classes)`` indicators of integer ``codes`` (checked when the data are set up).

    As a comparison rather than ``F.one_hot``, which on CPU reads the codes' range back to the
    host: the CUDA-graph scan of the training step runs on CPU (``tests/test_cuda_graph.py``).
    """
    return codes.unsqueeze(-1) == torch.arange(n_classes, device=codes.device)


class LDVAE(PyroModule):
    """Linearly decoded VAE (Svensson et al. 2020) as a Pyro model and guide.

    Arguments, names and defaults are those of ``scvi.module.LDVAE``; extras:
    ``n_cats_per_cov`` and ``n_continuous_cov`` add covariate columns to the linear decoder,
    ``loadings_prior`` and ``z_prior`` make the model Bayesian (see :mod:`pyro_ldvae.priors`).

    Parameters
    ----------
    n_input
        Number of genes (scvi-tools' name for it; the module calls it ``n_genes``, as every other layer does).
    n_batch
        Number of batches; a one-hot batch enters the decoder when ``n_batch > 1``.
    n_labels
        Number of labels (needed for ``dispersion='gene-label'``).
    n_hidden, n_layers_encoder, dropout_rate
        Encoder width, depth and dropout.
    n_latent
        Number of factors.
    dispersion
        'gene', 'gene-batch', 'gene-label' or 'gene-cell'.
    log_variational
        Encode ``log1p(x)`` instead of ``x``.
    gene_likelihood
        'nb', 'zinb', 'poisson', or 'normal' for non-integer data (a Normal with mean
        ``exp(l) rho`` and a learned standard deviation in place of theta).
    use_batch_norm, bias
        Batch norm and bias in the linear decoder (``use_batch_norm`` also takes scvi-tools'
        'both' = True and 'encoder' = False; the encoders always have batch norm). ``use_batch_norm=None`` (default) means True
        without a loadings prior (scvi-tools' LDVAE) and False with one. With a loadings prior the
        decoder has no batch norm and always a per-gene intercept (``bias``): batch norm divides
        each gene's logits by their spread over the minibatch, so the likelihood does not change
        when a gene's loadings are scaled and a prior on W would only shrink them towards 0 while
        batch norm rescales them back; the prior's scale would mean nothing and sparsity or factor
        selection would be read off a rescaled W. ``use_batch_norm=True`` with a prior is an error.
    latent_distribution
        'normal', or 'ln' (the decoder sees ``softmax(z)``).
    use_observed_lib_size
        Use ``log sum_g x_ng`` as the library instead of a latent variable.
    library_log_means, library_log_vars
        Per-batch mean and variance of log library size, shape ``(1, n_batch)`` or ``(n_batch,)``;
        required unless ``use_observed_lib_size``.
    loadings_prior
        None (default): the loadings are point estimates, a Pyro param, exactly scvi-tools' LDVAE.
        'normal', 'laplace', 'horseshoe', 'ard' or a callable ``prior(n_genes, n_latent) -> (genes,
        n_latent)`` that may contain ``pyro.sample`` sites: the factor columns of W become a global
        latent variable with a mean-field Normal guide; covariate columns stay point estimates.
        Global sites sit outside the cells plate, so in ``elbo`` their KL enters once, unscaled and
        not annealed by the KL warm-up, while local terms are scaled by ``n_obs / cells``: the
        minibatch ELBO stays an unbiased estimate of the full-data ELBO.
    loadings_prior_scale, loadings_prior_kwargs
        Scale of 'normal' / 'laplace' (slab scale of 'horseshoe'); other arguments of the named
        prior's class in :mod:`pyro_ldvae.priors`.
    z_prior
        None (default): ``z ~ Normal(0, I)``. A callable ``z_prior(n_latent) -> Distribution`` with
        event shape ``(n_latent,)``, e.g. :class:`pyro_ldvae.priors.GaussianMixture`.
    **scvi_module_kwargs
        scvi-tools' ``VAE`` options ``use_layer_norm``, ``var_activation``, ``encode_covariates``,
        ``deeply_inject_covariates``, ``extra_encoder_kwargs``, ``extra_decoder_kwargs``,
        ``use_size_factor_key``: the values that describe this model are accepted, the others
        raise ``ValueError`` with the reason (see :mod:`pyro_ldvae.models.module_options`).
    """

    @_local_params
    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers_encoder: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene",
        log_variational: bool = True,
        gene_likelihood: GeneLikelihood = "nb",
        use_batch_norm: bool | str | None = None,
        bias: bool = False,
        latent_distribution: LatentDistribution = "normal",
        use_observed_lib_size: bool = False,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
        n_cats_per_cov: list[int] | None = None,
        n_continuous_cov: int = 0,
        loadings_prior: str | LoadingsPrior | None = None,
        loadings_prior_scale: float | None = None,
        loadings_prior_kwargs: dict | None = None,
        z_prior: ZPrior | None = None,
        **scvi_module_kwargs,
    ):
        super().__init__()
        unknown = set(scvi_module_kwargs) - set(SCVI_MODULE_KWARGS)
        if unknown:
            raise ValueError(f"LDVAE got unknown keyword arguments {sorted(unknown)}.")
        check_scvi_module_kwargs(**scvi_module_kwargs)
        use_batch_norm = decoder_batch_norm(use_batch_norm)
        loadings_prior = resolve_loadings_prior(loadings_prior, loadings_prior_scale, **(loadings_prior_kwargs or {}))
        if loadings_prior is not None and use_batch_norm:
            raise ValueError(
                "use_batch_norm=True cannot be combined with a loadings prior: batch norm rescales each gene's "
                "logits, which makes the scale of W, and so the prior, meaningless. Leave use_batch_norm=None."
            )
        if use_batch_norm is None:
            use_batch_norm = loadings_prior is None
        bias = bias or loadings_prior is not None  # without batch norm, the intercept is the bias
        if int(n_input) != n_input or n_input < 1:
            raise ValueError(f"n_input must be a positive integer, got {n_input!r}.")
        check_model_args(
            n_hidden, n_latent, n_layers_encoder, dropout_rate, dispersion, gene_likelihood, latent_distribution
        )
        if dispersion == "gene-label" and n_labels < 1:
            raise ValueError(
                "dispersion='gene-label' needs labels: pass n_labels > 0 "
                "(LinearSCVI does this for you when setup_anndata is given labels_key)."
            )
        if dispersion == "gene-batch" and n_batch < 1:
            n_batch = 1  # one batch: 'gene-batch' is 'gene' with an extra axis of length one
        self.n_genes, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_latent, self.n_hidden, self.n_layers_encoder = n_latent, n_hidden, n_layers_encoder
        self.dropout_rate, self.dispersion, self.gene_likelihood = dropout_rate, dispersion, gene_likelihood
        self.log_variational, self.use_batch_norm, self.bias = log_variational, use_batch_norm, bias
        self.latent_distribution = latent_distribution
        self.use_observed_lib_size = use_observed_lib_size
        self.n_cats_per_cov = list(n_cats_per_cov or [])
        self.n_continuous_cov = n_continuous_cov
        # Categories with one level carry no information and get no column, as in scvi-tools.
        self.n_covariates = (
            (n_batch if n_batch > 1 else 0) + sum(n for n in self.n_cats_per_cov if n > 1) + n_continuous_cov
        )

        if not use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError(
                    "A latent library size needs library_log_means and library_log_vars "
                    "(per-batch mean and variance of log total counts), or use_observed_lib_size=True."
                )
            self.register_buffer(
                "library_log_means", torch.as_tensor(np.asarray(library_log_means)).float().reshape(-1)
            )
            self.register_buffer("library_log_vars", torch.as_tensor(np.asarray(library_log_vars)).float().reshape(-1))
        else:
            self.register_buffer("library_log_means", torch.zeros(1))
            self.register_buffer("library_log_vars", torch.ones(1))

        # Generative parameters: the decoder heads and theta are Pyro params (module-local).
        decoder_in = n_latent + self.n_covariates
        decoder = torch.nn.Module()
        decoder.factor_regressor = LinearHead(decoder_in, n_input, use_batch_norm, bias)  # the loadings W
        if gene_likelihood == "zinb":
            decoder.px_dropout_decoder = LinearHead(decoder_in, n_input, use_batch_norm, bias)
        if dispersion == "gene-cell":
            decoder.px_r_decoder = LinearHead(decoder_in, n_input, use_batch_norm, bias)
        to_pyro_module_(decoder)
        self.decoder = decoder
        n_theta = {"gene": None, "gene-batch": max(n_batch, 1), "gene-label": n_labels}.get(dispersion)
        if dispersion != "gene-cell":
            # log theta ~ N(0, 1) at init, as scvi-tools' px_r; stored as theta, (genes,) or (n_cat, genes).
            shape = (n_input,) if n_theta is None else (n_theta, n_input)
            self.theta = PyroParam(torch.randn(shape).exp(), constraint=constraints.positive)

        # Amortized inference networks (guide only).
        self.z_encoder = Encoder(n_input, n_latent, n_layers_encoder, n_hidden, dropout_rate)
        if not use_observed_lib_size:
            self.l_encoder = Encoder(n_input, 1, 1, n_hidden, dropout_rate)

        # Priors (pyro_ldvae.priors): nn.Modules among them are submodules, so their weights train.
        self.loadings_prior, self.z_prior, self.global_guide = loadings_prior, z_prior, None
        if loadings_prior is not None or z_prior is not None:
            with torch.no_grad():
                guide = GlobalNormalGuide(self.global_latents)
                guide._setup_prototype()  # now, so that the optimizer sees its params
            if any(True for _ in guide.prototype_trace.iter_stochastic_nodes()):
                self.global_guide = guide

    # ----------------------------------------------------------------------------------------
    # The generative model and the guide
    # ----------------------------------------------------------------------------------------
    @_pyro_method
    def model(self, mb: Minibatch, n_obs: int | None = None, kl_weight: float = 1.0) -> None:
        """p(x, z, l) for the cells of ``mb``; the plate scales local terms by ``n_obs / cells``."""
        loadings, z_prior = self.global_latents()  # None, None without priors: the default model
        with self._cells_plate(mb, n_obs):
            with kl_warmup(kl_weight):
                z_prior = dist.Normal(self._zeros(mb), self._ones(mb)).to_event(1) if z_prior is None else z_prior
                z = pyro.sample("z", z_prior)  # (cells, n_latent)
            if self.use_observed_lib_size:
                library = torch.log(total_counts(mb.x)) if mb.library is None else mb.library  # (cells,)
            else:
                library = pyro.sample(
                    "library",
                    dist.Normal(self.library_log_means[mb.batch], self.library_log_vars[mb.batch].sqrt()),
                )
            decoder_input = self.decoder_input(z, mb)  # [f(z) ; c], (cells, n_latent + n_covariates)
            rho = F.softmax(self.factor_logits(decoder_input, loadings), dim=-1)  # (cells, genes)
            pyro.deterministic("rho", rho, event_dim=1)
            mu = torch.exp(library).unsqueeze(-1) * rho
            theta = self.inverse_dispersion(decoder_input, mb)
            gate_logits = self.gate_logits(decoder_input)
            px = count_likelihood(self.gene_likelihood, mu, theta, gate_logits)  # per entry, (cells, genes)
            pyro.sample("x", CellCounts(px, kernel=count_kernel(mb.x, px)), obs=mb.x)

    @_pyro_method
    def guide(self, mb: Minibatch, n_obs: int | None = None, kl_weight: float = 1.0) -> None:
        """q(z | x) q(l | x): Normal posteriors from MLPs on log1p(x); batch is not an input.

        With priors, also q of the global sites (mean-field Normal, :class:`GlobalNormalGuide`).
        """
        if self.global_guide is not None:
            self.global_guide()
        encoder_input = log1p_counts(mb.x) if self.log_variational else mb.x
        with self._cells_plate(mb, n_obs):
            # minified data: the stored posterior stands in for the encoder's
            z_loc, z_var = self.z_encoder(encoder_input) if mb.qz_loc is None else (mb.qz_loc, mb.qz_var)
            with kl_warmup(kl_weight):
                pyro.sample("z", dist.Normal(z_loc, z_var.sqrt()).to_event(1))
            if not self.use_observed_lib_size:
                l_loc, l_var = self.l_encoder(encoder_input)
                pyro.sample("library", dist.Normal(l_loc.squeeze(-1), l_var.squeeze(-1).sqrt()))

    # ----------------------------------------------------------------------------------------
    # Pieces of the model, named for what they compute
    # ----------------------------------------------------------------------------------------
    def global_latents(self) -> tuple[torch.Tensor | None, dist.Distribution | None]:
        """Run the priors (outside the cells plate): loadings ``(genes, n_latent)`` and z's prior.

        Each is None when the model has no such prior. The priors run with the module's device as
        torch's default device, so a user's prior may create tensors without naming a device.
        """
        if self.loadings_prior is None and self.z_prior is None:
            return None, None
        with self.device:
            loadings = None if self.loadings_prior is None else self.loadings_prior(self.n_genes, self.n_latent)
            z_prior = None if self.z_prior is None else self.z_prior(self.n_latent)
        return loadings, z_prior

    @_pyro_method  # called by tasks too: the decoder's params stay module-local
    def gate_logits(self, decoder_input: torch.Tensor) -> torch.Tensor | None:
        """The ZINB gate's logits ``(cells, genes)``; None for other likelihoods."""
        return self.decoder.px_dropout_decoder(decoder_input) if self.gene_likelihood == "zinb" else None

    @_pyro_method  # called by tasks too: the decoder's params stay module-local
    def factor_logits(self, decoder_input: torch.Tensor, loadings: torch.Tensor | None) -> torch.Tensor:
        """``BN(W [z ; c] + b)`` ``(cells, genes)``; with a prior the factor columns of W are ``loadings``."""
        head = self.decoder.factor_regressor
        if loadings is None:
            return head(decoder_input)
        weight = torch.cat([loadings, head.linear.weight[:, self.n_latent :]], dim=-1)  # (genes, n_latent + n_cov)
        logits = narrow_linear(decoder_input, weight, head.linear.bias)
        return logits if head.batch_norm is None else head.batch_norm(logits)

    def _cells_plate(self, mb: Minibatch, n_obs: int | None) -> pyro.plate:
        idx = mb.idx if mb.idx is not None else torch.arange(mb.n_cells, device=mb.batch.device)
        return pyro.plate("cells", size=n_obs or mb.n_cells, subsample=idx, dim=-1)

    def _zeros(self, mb: Minibatch) -> torch.Tensor:
        return self.library_log_means.new_zeros(mb.n_cells, self.n_latent)

    def _ones(self, mb: Minibatch) -> torch.Tensor:
        # A tensor, not the number 1.0: a Normal makes a device tensor of a number by a host copy,
        # which a CUDA graph cannot capture.
        return self.library_log_means.new_ones(mb.n_cells, self.n_latent)

    def decoder_input(self, z: torch.Tensor, mb: Minibatch) -> torch.Tensor:
        """``[f(z) ; c]`` ``(cells, n_latent + n_covariates)``: what the linear decoder maps."""
        return torch.cat([self.z_transform(z), self.covariate_design(mb)], dim=-1)

    def z_transform(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder sees of z: z itself, or softmax(z) for the logistic normal."""
        return F.softmax(z, dim=-1) if self.latent_distribution == "ln" else z

    def covariate_design(self, mb: Minibatch) -> torch.Tensor:
        """Decoder columns after z: one-hot batch, one-hot categorical covariates, continuous ones."""
        columns = []
        if self.n_batch > 1:
            columns.append(one_hot(mb.batch, self.n_batch))
        for i, n_cat in enumerate(self.n_cats_per_cov):
            if n_cat > 1:
                columns.append(one_hot(mb.cat_covs[:, i], n_cat))
        if self.n_continuous_cov:
            columns.append(mb.cont_covs)
        dtype = self.library_log_means.dtype
        if not columns:
            return self.library_log_means.new_zeros(mb.n_cells, 0)
        return torch.cat([c.to(dtype) for c in columns], dim=-1)

    @_pyro_method
    def inverse_dispersion(self, decoder_input: torch.Tensor, mb: Minibatch) -> torch.Tensor | None:
        """theta: ``(genes,)`` for 'gene', ``(cells, genes)`` otherwise; None for Poisson."""
        if self.gene_likelihood == "poisson":
            return None
        if self.dispersion == "gene":
            return self.theta
        if self.dispersion == "gene-batch":
            return self.theta[mb.batch]
        if self.dispersion == "gene-label":
            return self.theta[mb.labels]
        return torch.exp(self.decoder.px_r_decoder(decoder_input))

    # ----------------------------------------------------------------------------------------
    # The ELBO, computed from traces of model and guide
    # ----------------------------------------------------------------------------------------
    def elbo(
        self, mb: Minibatch, n_obs: int | None = None, kl_weight: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-field ELBO with analytic KL where available, as ``TraceMeanField_ELBO``.

        Returns ``(elbo, per_cell)``: ``elbo`` is the differentiable full-data estimate (local
        terms scaled by ``n_obs / cells`` and the z term by ``kl_weight``); ``per_cell`` is the
        unweighted per-cell ELBO ``log p(x|z,l) - KL_z - KL_l``, shape ``(cells,)``.
        """
        guide_trace, model_trace = replayed_traces(self.model, self.guide, (mb, n_obs, kl_weight))
        return mean_field_elbo(model_trace, guide_trace, plate="cells")

    # ----------------------------------------------------------------------------------------
    # Inference helpers
    # ----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor | Minibatch) -> dict[str, torch.Tensor]:
        """Posterior parameters: ``z_loc``, ``z_var`` ``(cells, n_latent)``; ``l_loc``, ``l_var`` ``(cells,)``.

        ``x`` is the counts, or a minibatch: one of minified data gives its stored posterior of z.
        """
        if isinstance(x, Minibatch):
            if x.qz_loc is not None:
                return {"z_loc": x.qz_loc, "z_var": x.qz_var}
            x = x.x
        encoder_input = torch.log1p(x) if self.log_variational else x
        z_loc, z_var = self.z_encoder(encoder_input)
        out = {"z_loc": z_loc, "z_var": z_var}
        if not self.use_observed_lib_size:
            l_loc, l_var = self.l_encoder(encoder_input)
            out.update(l_loc=l_loc.squeeze(-1), l_var=l_var.squeeze(-1))
        return out

    @torch.no_grad()
    def get_loadings(
        self, return_std: bool = False, num_samples: int = 500
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Loadings ``(genes, n_latent)``: ``diag(gamma / sqrt(running_var + eps)) W``, covariate columns dropped.

        With a loadings prior (no batch norm, so nothing to fold): the posterior mean of W, a Monte
        Carlo average over ``num_samples`` draws of the guide; ``return_std=True`` returns
        ``(mean, std)``, the std being the posterior standard deviation of each entry.
        """
        if self.loadings_prior is None:
            if return_std:
                raise ValueError(
                    "The loadings are point estimates (loadings_prior=None) and have no posterior std; "
                    "build the model with a loadings_prior (e.g. 'normal') to get one."
                )
            return self.decoder.factor_regressor.folded_weight()[:, : self.n_latent].detach().cpu().numpy()
        # A fixed seed makes the Monte Carlo summary a function of the parameters alone: the same
        # model gives the same loadings every time (and after save/load), without touching the
        # caller's random state.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            draws = self.sample_loadings(num_samples)  # (num_samples, genes, n_latent)
        mean = draws.mean(0).cpu().numpy()
        return (mean, draws.std(0).cpu().numpy()) if return_std else mean

    @torch.no_grad()
    @_pyro_method
    def sample_loadings(self, num_samples: int = 500) -> torch.Tensor:
        """Draws of the loadings from the guide, ``(num_samples, genes, n_latent)`` (requires a loadings prior)."""
        if self.loadings_prior is None:
            raise ValueError("sample_loadings needs a model with a loadings_prior; use get_loadings() instead.")
        draws = []
        for _ in range(num_samples):
            guide_trace = poutine.trace(self.global_guide).get_trace()
            draws.append(poutine.replay(self.global_latents, trace=guide_trace)()[0])
        return torch.stack(draws)

    @property
    def n_input(self) -> int:
        """The number of genes under scvi-tools' module name (the constructor's argument)."""
        return self.n_genes

    @property
    def plan_defaults(self) -> dict:
        """Training-plan settings this model changes from scvi-tools' defaults (``plan_kwargs`` win).

        With a loadings prior the KL weight of z is 1 from the first epoch (no warm-up): z's prior
        then pins the scale of each factor, so a prior on W (and its per-factor shrinkage) acts on
        the factor's strength; a down-weighted KL lets z grow while W shrinks, and unneeded factors
        stay on. Without a loadings prior: none (scvi-tools' 400-epoch warm-up).
        """
        return {} if self.loadings_prior is None else {"n_epochs_kl_warmup": None}

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters."""
        return self.library_log_means.device
