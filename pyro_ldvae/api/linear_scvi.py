"""``LinearSCVI``: the AnnData-level model, a drop-in for ``scvi.model.LinearSCVI``.

A thin facade: it registers the AnnData, builds the module and hands the parts each job needs
(module, cells, registry) to ``tasks`` (posterior quantities, DE), ``io`` (save, load),
``scvi_import`` and ``results``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.cells import CellData
from ..data.minified import require_counts
from ..data.registry import SETUP_KEY, get_registry, register
from ..infer.options import TrainOptions
from ..models.options import Dispersion, GeneLikelihood, LatentDistribution
from ..tasks import de
from ..tasks import posterior as tasks
from ..tasks.expression import Weights, expression_samples, gene_mask
from ..tasks.latent import latent_representation
from . import dropin, factor_selection, io, multimodal, novelty, programs, query, results, scvi_import, setup
from .device import Accelerator, resolve_device
from .fit import fit

logger = logging.getLogger(__name__)


class LinearSCVI:
    """Linearly decoded VAE (Svensson et al. 2020) on AnnData, trained with Pyro SVI.

    Same constructor and methods as ``scvi.model.LinearSCVI``; ``n_batch`` and ``n_labels``
    come from the keys given to :meth:`setup_anndata`, so ``dispersion='gene-label'`` works
    with just ``labels_key``.

    Examples
    --------
    >>> import pyro_ldvae
    >>> adata = pyro_ldvae.datasets.pbmc68k_counts()
    >>> pyro_ldvae.LinearSCVI.setup_anndata(adata, labels_key="bulk_labels")
    >>> model = pyro_ldvae.LinearSCVI(adata, n_latent=10)
    >>> model.train(max_epochs=50)
    >>> adata.obsm["X_ldvae"] = model.get_latent_representation()
    >>> loadings = model.get_loadings()  # DataFrame genes x Z_0..Z_9

    Priors (``model_kwargs`` go to :class:`~pyro_ldvae.LDVAE`): Bayesian, sparse loadings and
    factor selection, with posterior uncertainty:

    >>> model = pyro_ldvae.LinearSCVI(adata, n_latent=10, loadings_prior="horseshoe")
    >>> model.train(max_epochs=50)
    >>> mean, std = model.get_loadings(return_std=True)
    """

    def __init__(
        self, adata: AnnData, n_hidden: int = 128, n_latent: int = 10, n_layers: int = 1, dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene", gene_likelihood: GeneLikelihood = "nb",
        latent_distribution: LatentDistribution = "normal", use_observed_lib_size: bool = False, seed: int = 0,
        **model_kwargs,
    ):  # fmt: skip
        adata = multimodal.split(adata)[1]  # a MuData: its RNA modality, named by setup_mudata
        n_latent, model_kwargs = programs.resolve_settings(adata, n_latent, model_kwargs)  # gene_programs=
        self._adata, self.seed, self.var_names = adata, seed, pd.Index(adata.var_names)
        self.registry = get_registry(adata)
        self.init_params_ = dict(
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate, dispersion=dispersion,
            gene_likelihood=gene_likelihood, latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size, **setup.module_kwargs(model_kwargs),
        )  # fmt: skip
        cells, self.module = setup.build(adata, self.registry, seed, self.init_params_)
        self.n_latent = n_latent
        self.history_: dict[str, pd.DataFrame] = {}
        self.is_trained_ = False
        self.train_indices = self.validation_indices = np.zeros(0, dtype=np.int64)
        self._cells_cache = setup.CellsCache(self.registry, self.var_names, adata, cells)

    # ------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls, adata: AnnData, batch_key: str | None = None, labels_key: str | None = None, layer: str | None = None,
        categorical_covariate_keys: list[str] | None = None, continuous_covariate_keys: list[str] | None = None,
        check_counts: bool = True, size_factor_key: str | None = None,
    ) -> None:  # fmt: skip
        """Register the counts' layer and the batch, labels and covariate columns of ``adata``.

        Arguments in scvi-tools' order; see :func:`pyro_ldvae.data.registry.register` for arguments and
        checks. ``size_factor_key`` raises ``ValueError`` with the reason (scvi-tools' LinearSCVI refuses
        it too).
        """
        dropin.refuse_size_factor(size_factor_key)
        keys = (categorical_covariate_keys, continuous_covariate_keys)
        register(adata, batch_key, labels_key, layer, *keys, check_counts=check_counts)

    setup_mudata = classmethod(multimodal.setup_mudata)

    def __repr__(self) -> str:
        p = self.init_params_
        return (
            f"LinearSCVI(n_cells={self.adata.n_obs}, n_genes={self.adata.n_vars}, n_latent={p['n_latent']}, "
            f"n_batch={self.registry.n_batch}, gene_likelihood={p['gene_likelihood']!r}, "
            f"dispersion={p['dispersion']!r}, trained={self.is_trained_})"
        )

    adata = property(lambda self: self._adata, dropin.set_adata, doc="The AnnData the model reads by default.")
    view_setup_args = staticmethod(dropin.view_setup_args)
    view_anndata_setup = dropin.view_anndata_setup
    minify_adata = dropin.minify_adata
    minified_data_type = property(dropin.minified_data_type, doc="The kind of minified data of ``adata``, or None.")

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch training history (scvi-tools' keys and signs: ``elbo_*`` is the negative ELBO)."""
        return self.history_

    @property
    def is_trained(self) -> bool:
        """Whether the model has been trained (or loaded trained)."""
        return self.is_trained_

    @property
    def device(self) -> torch.device:
        """The device the module lives on."""
        return self.module.device

    # ------------------------------------------------------------------------------------
    def get_cells(self, adata: AnnData | None = None) -> CellData:
        """The registered cells of ``adata`` (default: the training AnnData), checked against the model.

        Counts, batch, labels and covariates, with the genes in the model's order (reordered
        when all are present); ``cells.minibatch(indices, device)`` gives the model's input.
        """
        return self._cells_cache.get(self.adata if adata is None else multimodal.split(adata)[1])

    _cells = get_cells  # the name train() uses

    def _indices(self, cells: CellData, indices: Sequence[int] | None) -> np.ndarray:
        return np.arange(cells.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)

    # ------------------------------------------------------------------------------------
    test_indices = np.zeros(0, dtype=np.int64)  # cells of neither training nor validation

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: Accelerator = "auto",
        device: str | int = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_mode: Literal["min", "max"] = "min",
        early_stopping_warmup_epochs: int = 0,
        plan_kwargs: dict | None = None,
        check_val_every_n_epoch: int = 1,
        seed: int | None = None,
        progress_bar: bool = True,
        gradient_clip_val: float | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume_from: str | None = None,
        data_on_device: bool | None = None,
        cuda_graphs: bool | None = None,
        traced_step: bool | None = None,
        callbacks: list | None = None,
        **trainer_kwargs,
    ) -> LinearSCVI:
        """Train with SVI; arguments as ``scvi.model.LinearSCVI.train``.

        Parameters
        ----------
        max_epochs
            ``None`` uses scvi-tools' heuristic ``min(round(20000 / n_cells * 400), 400)``.
        accelerator, device
            'auto' trains on CUDA when available; data, module and optimizer live there.
        train_size, validation_size, shuffle_set_split
            Train/validation split (default 90/10), drawn as scvi-tools draws it for the same seed;
            the cells of neither are ``test_indices``.
        load_sparse_tensor
            Accepted for scvi-tools' sake; no effect (minibatches are always cut from sparse counts).
        batch_size
            Cells per minibatch. A last training minibatch of exactly one cell is a ValueError
            (batch norm cannot train on it) unless ``datasplitter_kwargs={'drop_last': True}``.
        early_stopping, early_stopping_patience, early_stopping_min_delta
            Stop when the monitored figure has not improved for ``patience`` validations; a
            ValueError without validation cells.
        datasplitter_kwargs
            As scvi-tools' ``DataSplitter``: ``drop_last`` drops each epoch's last partial
            minibatch; ``external_indexing=[train, validation, test]`` gives the cell indices.
        early_stopping_monitor, early_stopping_mode, early_stopping_warmup_epochs
            The figure watched ('elbo_validation', 'reconstruction_loss_validation' or
            'kl_local_validation', all recorded in the history), whether lower ('min') or higher ('max') is
            better, and how many first validations are not judged.
        plan_kwargs
            ``lr``, ``weight_decay``, ``eps``, ``optimizer`` ('Adam', 'AdamW', 'SGD', 'Custom' with
            ``optimizer_creator``), ``n_epochs_kl_warmup`` or (with it None) ``n_steps_kl_warmup``,
            ``max_kl_weight``, ``min_kl_weight``, ``reduce_lr_on_plateau`` with ``lr_factor``,
            ``lr_patience``, ``lr_threshold``, ``lr_min`` (the history then records ``lr``). Keys
            with no effect here (``compile``) or unknown warn.
        seed
            Seed of the split, minibatch order and sampling; default: the model's seed.
        gradient_clip_val
            Clip the gradient's total norm to this value (``None``: no clipping).
        checkpoint_dir, checkpoint_every
            Write ``checkpoint_dir/last.ckpt`` atomically every ``checkpoint_every`` epochs, at the
            end and on Ctrl-C: module, optimizer, RNG states, epoch and history, with its SHA-256
            (the one before is kept as ``previous.ckpt``). Under ``torchrun --max-restarts`` a
            restarted group resumes from it by itself (guide: Speed and scale).
        resume_from
            A ``checkpoint_dir`` (or its ``last.ckpt``) to continue from; use the same data,
            seed and split arguments. ``max_epochs`` counts the epochs already done, so the
            resumed run ends bit-identical to an uninterrupted one on CPU. On a GPU with CUDA
            graphs it ends equal to float rounding: the resumed run warms up and captures anew.
        data_on_device
            Keep the whole count matrix on the training device and cut minibatches there.
            Default: on CUDA when the counts fit in half the free GPU memory.
        cuda_graphs
            On a GPU, record one training step as a CUDA graph and replay it for every full
            minibatch. Default: whenever it can (in-memory counts that fit in half the free GPU
            memory, no prior of the user's own, Adam(W), one process); ``False`` never; ``True``
            raises if it cannot.
        traced_step
            On CPU, record one training step as a graph of torch ops and replay it for every
            later minibatch of its kind (a size, at KL weight 0 or not), bit for bit the eager
            step's results. Default: for runs of at least 1,000 full minibatches, no prior of the
            user's own, one process; ``False`` never; ``True`` always, or raises if it cannot.
        callbacks
            Objects with ``on_epoch_end(module, epoch, history)`` (see ``infer.callbacks``);
            True stops training. Lightning callbacks warn, naming what to use instead, and are not called.
        **trainer_kwargs
            Lightning ``Trainer`` keywords: ``enable_progress_bar`` and ``devices`` set
            ``progress_bar`` and ``device``; the others (``logger``, ``log_every_n_steps``,
            ``enable_checkpointing``, ...) warn and have no effect: the loop is not Lightning.

        Notes
        -----
        The history holds ``elbo_train``, ``elbo_validation``, ``reconstruction_loss_validation``,
        ``kl_local_validation``, ``validation_loss``, ``kl_weight``, ``train_loss_epoch``,
        ``train_time`` by epoch and ``train_loss_step`` by step. Ctrl-C stops after the current
        step; the model keeps the last completed epoch and ``stop_reason_`` is 'interrupted'. If
        the loss becomes NaN or infinite, a ``FloatingPointError`` names the epoch and the model
        keeps the last good epoch.
        """
        given = {name: value for name, value in locals().items() if name in TrainOptions.names()}
        given["trainer_kwargs"] = trainer_kwargs or None
        fit(self, TrainOptions(**given))
        return self

    # Posterior quantities, computed from the Pyro model (tasks/) -------------------------
    def get_latent_representation(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, give_mean: bool = True,
        mc_samples: int = 5000, batch_size: int | None = None, return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Posterior of the factors per cell, ``(cells, n_latent)``.

        ``give_mean`` returns the posterior mean (for 'ln', the Monte Carlo mean of softmax(z)
        over ``mc_samples`` draws); otherwise one sample. ``return_dist`` returns the Normal's
        ``(loc, variance)`` instead. Cells are encoded ``batch_size`` at a time (default 1,024; the
        encoders run in eval mode, so the result does not depend on it).
        """
        cells = self.get_cells(adata)
        idx = self._indices(cells, indices)
        return latent_representation(self.module, cells, idx, give_mean, mc_samples, batch_size or 1024, return_dist)

    def get_loadings(self, return_std: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
        """Per-gene loadings ``(genes, n_latent)`` with the decoder batch norm folded in (scvi-tools' definition).

        With a ``loadings_prior`` the posterior mean; ``return_std=True`` also returns the
        posterior standard deviation, as a second DataFrame (an error without a prior).
        """
        columns = novelty.factor_names(self.n_latent, self.init_params_)  # Z_k or programs, then a query's new_k
        if return_std:
            mean, std = self.module.get_loadings(return_std=True)
            frame = lambda a: pd.DataFrame(a, index=self.var_names, columns=columns)  # noqa: E731
            return frame(mean), frame(std)
        return pd.DataFrame(self.module.get_loadings(), index=self.var_names, columns=columns)

    def get_normalized_expression(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None,
        transform_batch: str | int | Sequence[str | int] | None = None, gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1, n_samples: int = 1, n_samples_overall: int | None = None,
        weights: Weights | None = None, batch_size: int | None = None, return_mean: bool = True,
        return_numpy: bool | None = None, silent: bool = True, **importance_weighting_kwargs,
    ) -> pd.DataFrame | np.ndarray:  # fmt: skip
        """Denoised expression: the model's ``rho`` (rows sum to one) times ``library_size``.

        ``transform_batch`` decodes every cell as if from that batch category (several are
        averaged: the batch-corrected expression; None: each cell's own batch); ``gene_list``
        keeps only these genes; ``library_size='latent'`` gives the expected counts ``exp(l) rho``.
        Returns a DataFrame (cells x genes), an array with ``return_numpy``, ``(n_samples, cells,
        genes)`` with ``return_mean=False`` and ``n_samples > 1``, or ``(n_samples_overall, genes)``
        draws from the group of cells, picked by ``weights`` ('uniform' or 'importance'; see
        :func:`pyro_ldvae.tasks.expression.expression_samples`, which takes the other arguments).
        ``silent`` is accepted for scvi-tools' sake: nothing is printed here.
        """
        cells = self.get_cells(adata)
        if weights == "importance":
            require_counts(cells, "weights='importance'")
        adata = self.adata if adata is None else adata
        idx = self._indices(cells, indices)
        codes, mask = self.registry.batch_codes(transform_batch), gene_mask(self.var_names, gene_list)
        # (n_samples, cells, genes), or (n_samples_overall, genes)
        exprs = expression_samples(
            self.module, cells, idx, codes, mask, library_size, n_samples, n_samples_overall, weights,
            batch_size or 128, importance_weighting_kwargs, return_mean,
        )  # fmt: skip
        if n_samples_overall is not None or (n_samples > 1 and not return_mean):
            return exprs
        exprs = exprs.mean(0)
        if return_numpy:
            return exprs
        return pd.DataFrame(exprs, index=adata.obs_names[idx], columns=self.var_names[mask])

    # scvi-tools' evaluation and sampling methods, with its return types (dropin.py)
    get_elbo = dropin.get_elbo
    get_marginal_ll = dropin.get_marginal_ll
    get_reconstruction_error = dropin.get_reconstruction_error
    posterior_predictive_sample = dropin.posterior_predictive_sample
    get_feature_correlation_matrix = dropin.get_feature_correlation_matrix

    def get_likelihood_parameters(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, n_samples: int = 1,
        give_mean: bool = False, batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Parameters of the count likelihood per cell and gene.

        Returns a dict with ``mean`` (the NB mean ``exp(l) rho``), ``dispersions`` (theta; not for
        Poisson) and ``dropout`` (zero-inflation probability; ZINB only), each ``(cells, genes)``,
        or ``(n_samples, cells, genes)`` when ``n_samples > 1`` and not ``give_mean``.
        """
        cells = self.get_cells(adata)
        idx = self._indices(cells, indices)
        params = tasks.likelihood_parameters(self.module, cells, idx, n_samples, batch_size or 128)
        if n_samples == 1 or give_mean:
            return {key: value.mean(0) for key, value in params.items()}
        return params

    def get_latent_library_size(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Library size ``exp(l)`` per cell, ``(cells, 1)``: posterior mean (log-normal), or one draw."""
        cells = self.get_cells(adata)
        idx = self._indices(cells, indices)
        return tasks.latent_library_size(self.module, cells, idx, give_mean, batch_size or 128)

    def differential_expression(
        self, adata: AnnData | None = None, groupby: str | None = None, group1: str | Sequence[str] | None = None,
        group2: str | None = None, idx1: Sequence[int] | Sequence[bool] | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | str | None = None, mode: de.Mode = "vanilla",
        delta: float | None = 0.25, batch_size: int | None = None, all_stats: bool = True,
        batch_correction: bool = False, batchid1: Sequence[str] | None = None, batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05, silent: bool = False, weights: Weights | None = "uniform",
        filter_outlier_cells: bool = False, importance_weighting_kwargs: dict | None = None, **kwargs,
    ) -> pd.DataFrame:  # fmt: skip
        """Bayesian differential expression of scVI, with scvi-tools' arguments and output columns.

        ``adata`` (default: the training data) holds the cells and their ``obs`` columns; the
        other arguments, and the ``**kwargs`` (``n_samples_overall``, ``use_permutation``,
        ``m_permutation``, ``pseudocounts``, ``threshold_counts``, ``test_mode``, ``seed``), are
        described in :func:`pyro_ldvae.tasks.de.differential_expression`.

        Returns
        -------
        DataFrame indexed by gene; one block per comparison sorted by ``bayes_factor`` (vanilla)
        or ``proba_de`` (change), with ``comparison``, ``group1`` and ``group2`` columns.
        """
        cells = self.get_cells(adata)
        if weights == "importance":
            require_counts(cells, "weights='importance'")
        obs = (self.adata if adata is None else adata).obs
        return de.differential_expression(
            self.module, cells, self.registry, obs, self.var_names, groupby, group1, group2, idx1, idx2,
            mode, delta, batch_size, all_stats, batch_correction, batchid1, batchid2, fdr_target, silent,
            weights, filter_outlier_cells, importance_weighting_kwargs, **kwargs,
        )  # fmt: skip

    def get_factor_variance_explained(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, sort: bool = False
    ) -> pd.DataFrame:
        """Per factor, the variance of the decoder logits it explains across cells.

        Returns a DataFrame indexed by factor (``Z_k``) with ``variance``, ``fraction`` (of the
        total logit variance, covariates included) and ``rank``; ``sort=True`` orders the rows by
        decreasing variance (LDVAE's factors are otherwise unordered), so
        ``model.get_loadings()[frame.index]`` gives loadings ordered by importance.
        """
        cells = self.get_cells(adata)
        frame = tasks.factor_variance_explained(self.module, cells, self._indices(cells, indices))
        frame.index = novelty.factor_names(self.n_latent, self.init_params_)
        return frame.sort_values("variance", ascending=False) if sort else frame

    get_active_factors = factor_selection.get_active_factors

    def get_top_genes(
        self, n_top: int = 10, factors: Sequence[str] | None = None, order_by_variance: bool = False
    ) -> pd.DataFrame:
        """Tidy table of the top positive and negative genes of each factor.

        Columns ``factor``, ``direction``, ``rank``, ``gene``, ``loading``; ``order_by_variance``
        lists factors by decreasing explained variance.
        """
        if factors is None and order_by_variance:
            factors = list(self.get_factor_variance_explained(sort=True).index)
        return tasks.top_genes(self.get_loadings(), n_top, factors)

    # Gene programs (programs.py): membership, activity and its differential test
    get_program_membership = programs.get_program_membership
    get_program_activity = programs.get_program_activity
    differential_program_activity = programs.differential_program_activity

    # Results into AnnData (results.py), persistence (io.py), import (scvi_import.py) ------
    def to_adata(self, adata: AnnData | None = None, key: str = "ldvae") -> AnnData:
        """Write the latent, loadings and settings into ``adata`` and return it.

        ``obsm['X_<key>']``, ``varm['<key>_loadings']`` and ``uns['<key>']`` (settings, history, variance
        explained) go into ``adata`` (default: the training data; a MuData: its RNA modality, and
        ``mdata.obsm['X_<key>']``); see :func:`pyro_ldvae.api.results.write_results`.
        """
        mdata, adata = multimodal.split(self.adata if adata is None else adata)
        results.check_genes(adata, self.var_names)
        latent, variance = self.get_latent_representation(adata), self.get_factor_variance_explained(adata)
        written = results.write_results(
            adata, key, latent, self.get_loadings(), variance, self.init_params_, self.registry, self.history_
        )
        if programs.program_names(self.init_params_):
            written.uns[key]["programs"] = np.asarray(programs.program_names(self.init_params_), dtype=str)
        return multimodal.write_back(mdata, written, key)

    def save(
        self, dir_path: str, overwrite: bool = False, save_anndata: bool = False, prefix: str | None = None
    ) -> None:
        """Save weights, setup and history to ``dir_path`` atomically; see :func:`pyro_ldvae.api.io.save`."""
        parts = io.ModelParts(
            settings=self.init_params_, registry=self.registry, var_names=list(self.var_names),
            state=self.module.state_dict(), history=self.history_, seed=self.seed, is_trained=self.is_trained_,
            train_indices=self.train_indices, validation_indices=self.validation_indices, adata=self.adata,
        )  # fmt: skip
        io.save(parts, dir_path, overwrite, save_anndata, prefix, model_class=type(self).__name__)

    @classmethod
    def load(
        cls, dir_path: str, adata: AnnData | None = None, accelerator: Accelerator = "auto",
        device: str | int = "auto", prefix: str | None = None, loadings_prior=None, z_prior=None,
    ) -> LinearSCVI:  # fmt: skip
        """Load a model saved by :meth:`save` (never unpickles code); see :func:`pyro_ldvae.api.io.load`.

        ``adata`` must hold the model's genes (in any order; other genes raise ``ValueError``).
        A model trained with a custom prior (a callable or object) needs it again: ``loadings_prior=``
        or ``z_prior=``.
        """
        target = resolve_device(accelerator, device)
        parts = io.load(dir_path, adata, target, prefix, loadings_prior, z_prior, model_class=cls.__name__)
        return cls._from_parts(parts, target)

    # Reference mapping (query.py): a query's new batches fitted with the reference fixed
    prepare_query_anndata = staticmethod(query.prepare_query_anndata)
    load_query_data = classmethod(query.load_query_data)
    get_novelty = novelty.get_novelty
    get_new_factor_activity = novelty.get_new_factor_activity

    @classmethod
    def from_scvi(cls, scvi_model, adata: AnnData | None = None) -> LinearSCVI:
        """Import a trained ``scvi.model.LinearSCVI`` (weights, setup, history).

        See :func:`pyro_ldvae.api.scvi_import.from_scvi`.
        """
        return cls._from_parts(scvi_import.from_scvi(scvi_model, adata))

    @classmethod
    def _from_parts(cls, parts: io.ModelParts, device: torch.device | None = None) -> LinearSCVI:
        """A model on ``parts.adata`` (which receives the setup) with the settings and weights of ``parts``."""
        parts.adata.uns[SETUP_KEY] = parts.registry.to_json()
        settings = dict(parts.settings)
        new_factors = settings.pop("new_factors", None)  # a query model with new factors (query.py)
        try:
            model = cls(parts.adata, seed=parts.seed, **settings)
        except TypeError as err:
            raise ValueError(f"The settings in {parts.source} do not fit this pyro_ldvae version: {err}") from err
        if new_factors:
            query.restore_new_factors(model, new_factors)
        try:
            model.module.load_state_dict(parts.state, strict=True)
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise ValueError(f"The weights in {parts.source} do not match its settings: {first_line}") from err
        model.module.to(device or model.module.device).eval()
        model.history_, model.is_trained_ = parts.history, parts.is_trained
        model.train_indices, model.validation_indices = parts.train_indices, parts.validation_indices
        return model
