"""``LinearSCVI``: the AnnData-level model, a drop-in for ``scvi.model.LinearSCVI``."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data import validate
from ..data.backed import cell_data
from ..data.cells import CellData
from ..data.registry import get_registry, register
from ..infer.evaluate import evaluate_elbo
from ..infer.options import Accelerator, TrainOptions
from ..infer.plan import split_indices
from ..infer.train import train_svi
from ..models.ldvae import LDVAE
from ..tasks import de
from ..tasks import posterior as tasks

logger = logging.getLogger(__name__)


def resolve_device(accelerator: str = "auto", device: str | int = "auto") -> torch.device:
    """'auto' picks CUDA when present; ``device`` may name an index ('cuda:1', 1) or 'auto'."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} asks for a GPU but torch sees no CUDA device; use 'cpu'.")
    if not use_cuda:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


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

    Priors (``model_kwargs`` go to :class:`~pyro_ldvae.module.LDVAE`): Bayesian, sparse loadings and
    factor selection, with posterior uncertainty:

    >>> model = pyro_ldvae.LinearSCVI(adata, n_latent=10, loadings_prior="horseshoe")
    >>> model.train(max_epochs=50)
    >>> mean, std = model.get_loadings(return_std=True)
    """

    def __init__(
        self,
        adata: AnnData,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "nb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = False,
        seed: int = 0,
        **model_kwargs,
    ):
        self.adata = adata
        self.registry = get_registry(adata)
        validate.check_model_args(
            n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, latent_distribution
        )
        validate.check_labels_for_dispersion(dispersion, self.registry.labels_key)
        validate.check_shape(adata)
        self.seed = seed
        self.var_names = pd.Index(adata.var_names)
        cells = cell_data(adata, self.registry)
        validate.check_totals(cells.X, adata.obs_names, warn_genes=False)
        library_log_means, library_log_vars = (None, None) if use_observed_lib_size else cells.library_prior()
        self.init_params_ = dict(
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            **model_kwargs,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights depend on the seed only
            self.module = LDVAE(
                n_input=adata.n_vars,
                n_batch=self.registry.n_batch,
                n_labels=self.registry.n_labels,
                n_hidden=n_hidden,
                n_latent=n_latent,
                n_layers_encoder=n_layers,
                dropout_rate=dropout_rate,
                dispersion=dispersion,
                gene_likelihood=gene_likelihood,
                latent_distribution=latent_distribution,
                use_observed_lib_size=use_observed_lib_size,
                library_log_means=library_log_means,
                library_log_vars=library_log_vars,
                n_cats_per_cov=self.registry.n_cats_per_cov,
                n_continuous_cov=len(self.registry.continuous_covariate_keys),
                **model_kwargs,
            )
        self.n_latent = n_latent
        self.history_: dict[str, pd.DataFrame] = {}
        self.is_trained_ = False
        self.train_indices = self.validation_indices = np.zeros(0, dtype=np.int64)
        # Keyed by a weak reference, not id(): a freed AnnData's id is reused by the next one,
        # which returned another dataset's cells (a silent wrong answer).
        self._data_cache: tuple[weakref.ref, CellData] | None = (weakref.ref(adata), cells)

    # ------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        check_counts: bool = True,
    ) -> None:
        """Register which layer holds raw counts and which ``obs`` columns are batch, labels, covariates.

        Parameters
        ----------
        adata
            Cells x genes AnnData with raw counts in ``X`` or in ``layer``.
        layer
            Layer holding the counts; ``None`` uses ``adata.X``.
        batch_key, labels_key
            ``obs`` columns of batches (enter the decoder, library prior, 'gene-batch') and labels.
        categorical_covariate_keys, continuous_covariate_keys
            Extra ``obs`` columns that enter the linear decoder beside the batch.
        check_counts
            Refuse non-integer values (the usual sign of normalized or log-transformed data);
            ``False`` accepts them. NaN, infinite and negative values are always refused, and so
            are cells with a total count of zero (remove them with
            ``scanpy.pp.filter_cells(adata, min_counts=1)``).

        Raises
        ------
        ValueError
            For a missing layer or key, missing values in a batch/label column, a non-numeric
            continuous covariate, an empty AnnData, or counts that are not raw counts.
        """
        register(
            adata,
            layer,
            batch_key,
            labels_key,
            categorical_covariate_keys,
            continuous_covariate_keys,
            check_counts=check_counts,
        )

    def __repr__(self) -> str:
        p = self.init_params_
        return (
            f"LinearSCVI(n_cells={self.adata.n_obs}, n_genes={self.adata.n_vars}, n_latent={p['n_latent']}, "
            f"n_batch={self.registry.n_batch}, gene_likelihood={p['gene_likelihood']!r}, "
            f"dispersion={p['dispersion']!r}, trained={self.is_trained_})"
        )

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch training history (scvi-tools' keys and signs: ``elbo_*`` is the negative ELBO)."""
        return self.history_

    @property
    def device(self) -> torch.device:
        return self.module.device

    # ------------------------------------------------------------------------------------
    def _cells(self, adata: AnnData | None) -> CellData:
        """The registered cells of ``adata`` (default: the training AnnData), checked against the model."""
        adata = self.adata if adata is None else adata
        if self._data_cache is not None and self._data_cache[0]() is adata:
            return self._data_cache[1]
        key = weakref.ref(adata)
        validate.check_shape(adata)
        adata = validate.align_genes(adata, self.var_names)  # reorders when all genes are present
        cells = cell_data(adata, self.registry)
        self._data_cache = (key, cells)
        return cells

    def _indices(self, cells: CellData, indices: Sequence[int] | None) -> np.ndarray:
        return np.arange(cells.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)

    # ------------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: Accelerator = "auto",
        device: str | int = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
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
    ) -> LinearSCVI:
        """Train with SVI; arguments as ``scvi.model.LinearSCVI.train``.

        Parameters
        ----------
        max_epochs
            ``None`` uses scvi-tools' heuristic ``min(round(20000 / n_cells * 400), 400)``.
        accelerator, device
            'auto' trains on CUDA when available; data, module and optimizer live there.
        train_size, validation_size, shuffle_set_split
            Train/validation split (default 90/10), drawn as scvi-tools draws it for the same seed.
        batch_size
            Cells per minibatch.
        early_stopping, early_stopping_patience, early_stopping_min_delta
            Stop when the validation ELBO has not improved for ``patience`` epochs.
        plan_kwargs
            ``lr``, ``weight_decay``, ``eps``, ``n_epochs_kl_warmup``, ``max_kl_weight``, ``min_kl_weight``.
        seed
            Seed of the split, minibatch order and sampling; default: the model's seed.
        gradient_clip_val
            Clip the gradient's total norm to this value (``None``: no clipping).
        checkpoint_dir, checkpoint_every
            Write ``checkpoint_dir/last.ckpt`` atomically every ``checkpoint_every`` epochs, at the
            end and on Ctrl-C: module, optimizer, RNG states, epoch and history.
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
            minibatch, instead of launching its few hundred kernels from Python each step.
            Default: whenever it can (in-memory counts that fit in half the free GPU memory,
            no prior of the user's own, one process); ``False`` never; ``True`` raises if it cannot.
        traced_step
            On CPU, record one training step (guide, model, ELBO and gradients) as a graph of
            torch ops and replay it (in TorchScript's interpreter) for every later minibatch of
            its kind, without Pyro's and autograd's Python overhead. The results are the eager
            step's, bit for bit. A kind (a minibatch size, at KL weight 0 or not) is recorded
            only if the run takes at least 200 steps of it, which repay the recording.
            Default: for runs of at least 1,000 full minibatches, no prior of the user's own, one
            process; ``False`` never; ``True`` always, or raises if it cannot.

        Ctrl-C stops after the current step; the model keeps the last completed epoch and
        ``stop_reason_`` is 'interrupted'. If the loss becomes NaN or infinite, a
        ``FloatingPointError`` names the epoch and the model keeps the last good epoch.
        """
        options = TrainOptions(**{name: value for name, value in locals().items() if name in TrainOptions.names()})
        cells = self._cells(None)
        n_obs = cells.n_obs
        options = options.replace(
            max_epochs=options.epochs(n_obs), seed=self.seed if options.seed is None else options.seed
        )
        validate.check_train_args(
            options.max_epochs,
            batch_size,
            train_size,
            validation_size,
            gradient_clip_val,
            checkpoint_every,
        )
        options.plan()  # unknown plan_kwargs fail here, before the split
        train_idx, val_idx = split_indices(
            n_obs, train_size, validation_size, batch_size, options.seed, shuffle_set_split
        )
        validate.check_split(n_obs, train_idx, batch_size)
        self.train_indices, self.validation_indices = train_idx, val_idx
        if resume_from is not None:
            self.history_ = {}  # the checkpoint carries the history of the epochs it holds
        history = _keeping_history_on_fault(self, train_svi)(
            self.module, cells, train_idx, val_idx, options, resolve_device(accelerator, device)
        )
        self.stop_reason_ = getattr(history, "stop_reason", "completed")
        self.history_ = _append_history(self.history_, dict(history))
        self.module.eval()
        self.is_trained_ = True
        return self

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior of the factors per cell, ``(cells, n_latent)``.

        ``give_mean`` returns the posterior mean (for 'ln', the Monte Carlo mean of softmax(z)
        over ``mc_samples`` draws); otherwise one sample. ``return_dist`` returns the Normal's
        ``(loc, variance)`` instead.
        """
        cells = self._cells(adata)
        module = self.module.eval()
        idx = self._indices(cells, indices)
        # Each minibatch is written into the (cells, n_latent) result as it comes: lists of
        # minibatches joined at the end would hold every cell's result twice.
        shape = (len(idx), module.n_latent)
        dtype = torch.empty(0, dtype=next(module.parameters()).dtype).numpy().dtype
        locs, variances = (np.empty(shape, dtype), np.empty(shape, dtype)) if return_dist else (None, None)
        outs = None if return_dist else np.empty(shape, dtype)
        start = 0
        for mb in cells.iter_minibatches(idx, batch_size or 128, module.device, sparse=True):
            q = module.encode(mb.x)
            stop = start + len(q["z_loc"])
            if return_dist:
                locs[start:stop], variances[start:stop] = q["z_loc"].cpu().numpy(), q["z_var"].cpu().numpy()
                start = stop
                continue
            normal = torch.distributions.Normal(q["z_loc"], q["z_var"].sqrt())
            if give_mean and module.latent_distribution == "ln":
                z = module.z_transform(normal.sample((mc_samples,))).mean(0)
            elif give_mean:
                z = q["z_loc"]
            else:
                z = module.z_transform(normal.sample())
            outs[start:stop] = z.cpu().numpy()
            start = stop
        if return_dist:
            return locs, variances
        return outs

    def get_loadings(self, return_std: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
        """Per-gene loadings ``(genes, n_latent)`` with the decoder batch norm folded in (scvi-tools' definition).

        With a ``loadings_prior`` the posterior mean; ``return_std=True`` also returns the
        posterior standard deviation, as a second DataFrame (an error without a prior).
        """
        columns = [f"Z_{i}" for i in range(self.n_latent)]
        if return_std:
            mean, std = self.module.get_loadings(return_std=True)
            frame = lambda a: pd.DataFrame(a, index=self.var_names, columns=columns)  # noqa: E731
            return frame(mean), frame(std)
        return pd.DataFrame(self.module.get_loadings(), index=self.var_names, columns=columns)

    @torch.no_grad()
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """ELBO per cell (mean over cells by default); higher is better, as scvi-tools' ``get_elbo``."""
        cells = self._cells(adata)
        per_cell = evaluate_elbo(self.module, cells, self._indices(cells, indices), batch_size or 1024)
        return per_cell.mean().item() if return_mean else per_cell.cpu().numpy()

    # ------------------------------------------------------------------------------------
    # scVI tasks, computed from the Pyro model (see tasks.py and de.py)
    # ------------------------------------------------------------------------------------
    def _batch_codes(self, transform_batch) -> list[int | None]:
        """Batch codes to decode into: None (each cell's own batch), one category, or several."""
        if transform_batch is None:
            return [None]
        values = [transform_batch] if isinstance(transform_batch, (str, int, np.integer)) else list(transform_batch)
        categories = self.registry.batch_categories
        codes = []
        for value in values:
            if str(value) in categories:
                codes.append(categories.index(str(value)))
            elif isinstance(value, (int, np.integer)) and 0 <= value < len(categories):
                codes.append(int(value))
            else:
                raise ValueError(f"transform_batch {value!r} is not a batch category; the model knows {categories}.")
        return codes

    def _gene_mask(self, gene_list: Sequence[str] | None) -> np.ndarray | slice:
        if gene_list is None:
            return slice(None)
        missing = sorted(set(gene_list) - set(self.var_names))
        if missing:
            raise ValueError(f"gene_list has genes the model does not know: {missing[:10]}.")
        return np.asarray(self.var_names.isin(gene_list))

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | int | Sequence[str | int] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        **importance_weighting_kwargs,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression: the model's ``rho`` (cells x genes, rows sum to one) times ``library_size``.

        Parameters
        ----------
        adata, indices
            Cells to use (default: all cells of the training AnnData).
        transform_batch
            Decode every cell as if from this batch category; several categories are averaged.
            This is the batch-corrected expression. None: each cell's observed batch.
        gene_list
            Return only these genes.
        library_size
            Scale to this library size; ``'latent'`` returns the expected counts ``exp(l) rho``.
        n_samples
            Posterior samples per cell; averaged when ``return_mean``.
        n_samples_overall
            Instead of per-cell output, draw this many samples ``(n_samples_overall, genes)`` from
            the group of cells (used by differential expression).
        weights
            How the ``n_samples_overall`` samples are picked from the cells' draws: 'uniform'
            (default; None means the same) or 'importance' (see ``differential_expression``; one
            ``transform_batch`` at most). ``importance_weighting_kwargs`` are its options.
        return_mean, return_numpy
            With ``return_mean=False`` and ``n_samples > 1`` the result is a numpy array
            ``(n_samples, cells, genes)``; otherwise a DataFrame (cells x genes) unless
            ``return_numpy``.
        batch_size
            Cells per forward pass.
        """
        if library_size != "latent" and not isinstance(library_size, (int, float, np.number)):
            raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}.")
        cells = self._cells(adata)
        adata = self.adata if adata is None else adata
        idx = self._indices(cells, indices)
        if n_samples_overall is not None:
            n_samples = n_samples_overall // len(idx) + 1
        mask = self._gene_mask(gene_list)
        weights = de.check_weights(weights, importance_weighting_kwargs)
        if weights == "importance":
            return self._importance_sampled_expression(
                cells, idx, transform_batch, mask, library_size, n_samples, n_samples_overall, batch_size,
                importance_weighting_kwargs,
            )  # fmt: skip
        exprs = tasks.normalized_expression(
            self.module,
            cells,
            idx,
            self._batch_codes(transform_batch),
            mask,
            library_size,
            n_samples,
            batch_size or 128,
        )  # (n_samples, cells, genes)
        if n_samples_overall is not None:
            flat = exprs.reshape(-1, exprs.shape[-1])
            return flat[np.random.choice(len(flat), n_samples_overall, replace=True)]
        if n_samples > 1 and not return_mean:
            return exprs
        exprs = exprs.mean(0)
        if return_numpy:
            return exprs
        return pd.DataFrame(exprs, index=adata.obs_names[idx], columns=self.var_names[mask])

    def _importance_sampled_expression(
        self, cells, idx, transform_batch, mask, library_size, n_samples, n_samples_overall, batch_size, options
    ) -> np.ndarray:
        if n_samples_overall is None:
            raise ValueError(
                "weights='importance' picks the n_samples_overall samples of a group of cells; pass n_samples_overall."
            )
        if library_size == "latent":
            raise ValueError("weights='importance' samples rho; use a numeric library_size, not 'latent'.")
        codes = self._batch_codes(transform_batch)
        if len(codes) != 1:
            raise ValueError(
                "Importance weights cannot be computed for expression averaged over several transform_batch "
                "categories; pass one category."
            )
        rng = np.random.default_rng(np.random.randint(2**31))
        rho = tasks.importance_resample(
            self.module, cells, idx, n_samples, n_samples_overall, rng, codes[0], batch_size or 128, **options
        )
        return rho[:, mask] * float(library_size)

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        transform_batch: str | int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the posterior predictive ``p(x_new | x)``: z and l from the guide, then
        the model's ``'x'`` site sampled instead of observed; ``transform_batch`` decodes every
        cell as if from that batch category.

        Returns a dense array ``(cells, genes)``, or ``(cells, genes, n_samples)`` when
        ``n_samples > 1`` (scvi-tools' layout; scvi-tools returns a sparse GCXS array).
        """
        cells = self._cells(adata)
        codes = self._batch_codes(transform_batch)
        if len(codes) != 1:
            raise ValueError("posterior_predictive_sample takes one transform_batch category, not several.")
        draws = tasks.posterior_predictive(
            self.module,
            cells,
            self._indices(cells, indices),
            n_samples,
            self._gene_mask(gene_list),
            batch_size or 128,
            codes[0],
        )  # (n_samples, cells, genes); fmt: skip
        return draws[0] if n_samples == 1 else np.moveaxis(draws, 0, -1)

    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of the count likelihood per cell and gene.

        Returns a dict with ``mean`` (the NB mean ``exp(l) rho``), ``dispersions`` (theta; not for
        Poisson) and ``dropout`` (zero-inflation probability; ZINB only), each ``(cells, genes)``,
        or ``(n_samples, cells, genes)`` when ``n_samples > 1`` and not ``give_mean``.
        """
        cells = self._cells(adata)
        params = tasks.likelihood_parameters(
            self.module, cells, self._indices(cells, indices), n_samples, batch_size or 128
        )
        if n_samples == 1 or give_mean:
            return {key: value.mean(0) for key, value in params.items()}
        return params

    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size ``exp(l)`` per cell, ``(cells, 1)``: posterior mean (log-normal), or one draw."""
        cells = self._cells(adata)
        return tasks.latent_library_size(
            self.module, cells, self._indices(cells, indices), give_mean, batch_size or 128
        )

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | Sequence[bool] | str | None = None,
        idx2: Sequence[int] | Sequence[bool] | str | None = None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: str | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """scVI's Bayesian differential expression, with scvi-tools' arguments and output columns.

        Parameters
        ----------
        adata
            AnnData (default: the training data).
        groupby, group1, group2
            ``obs`` column and its groups; ``group1=None`` compares every group with the rest,
            ``group2=None`` compares against all other cells ('Rest').
        idx1, idx2
            Instead of groups: masks, positions or ``obs.query`` strings of the two populations.
        mode
            'vanilla' (``P(rho1 > rho2)``) or 'change' (``P(|LFC| >= delta)``, LFC summaries, FDR calls).
        delta
            LFC threshold of 'change' mode; None estimates it from the data.
        batch_correction, batchid1, batchid2
            Decode both groups into the same batches (all, or those listed) and pair samples
            within a batch, so that batch effects cancel.
        fdr_target
            Posterior expected FDR for the ``is_de_fdr_<target>`` column ('change' mode).
        all_stats
            Add observed means, non-zero fractions and normalized means per group.
        weights
            How a group's posterior samples are drawn: 'uniform' (default; None means the same)
            or 'importance', in proportion to importance weights that favour draws which explain
            many cells of the group (Boyeau et al. 2023; :func:`pyro_ldvae.tasks.importance_weights`).
            'importance' costs minutes per comparison (about 2 min for 1,248 vs 7,369 cells x 2,000
            genes on 2 CPU cores: ``log p(x)`` and the likelihoods of 2 x 1,024 anchor cells), and
            its weights can sit on a few draws (a warning says so; ``truncation=True`` spreads them).
        filter_outlier_cells
            Drop latent-space outliers of each group first.
        importance_weighting_kwargs
            With ``weights='importance'``: ``max_cells`` (1024 anchor cells), ``truncation`` (False),
            ``n_mc_samples`` (500) and ``n_mc_samples_per_pass`` (250) of the marginal likelihood.
        **kwargs
            ``n_samples_overall`` (5000), ``use_permutation`` (False), ``m_permutation`` (10000),
            ``pseudocounts`` (None: estimated), ``threshold_counts``, ``test_mode`` ('three'), ``seed``.

        Returns
        -------
        DataFrame indexed by gene; one block per comparison sorted by ``bayes_factor`` (vanilla)
        or ``proba_de`` (change), with ``comparison``, ``group1`` and ``group2`` columns.
        """
        from ..tasks.de import differential_expression

        return differential_expression(
            self, adata, groupby, group1, group2, idx1, idx2, mode, delta, batch_size, all_stats,
            batch_correction, batchid1, batchid2, fdr_target, silent, weights, filter_outlier_cells,
            importance_weighting_kwargs, **kwargs,
        )  # fmt: skip

    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """``{'reconstruction_loss': -log p(x | z, l)}`` at a posterior draw: the mean per cell
        (scvi-tools' form) or, with ``return_mean=False``, per cell ``(cells,)``. Lower is better."""
        cells = self._cells(adata)
        nll = tasks.reconstruction_nll(self.module, cells, self._indices(cells, indices), batch_size or 128)
        return {"reconstruction_loss": float(nll.mean()) if return_mean else nll}

    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Importance-sampled ``log p(x)`` with the guide as proposal (higher is better): the mean
        over cells, or per cell ``(cells,)`` with ``return_mean=False``."""
        cells = self._cells(adata)
        ll = tasks.marginal_ll(self.module, cells, self._indices(cells, indices), n_mc_samples, batch_size or 128)
        return float(ll.mean()) if return_mean else ll

    def get_factor_variance_explained(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None, sort: bool = False
    ) -> pd.DataFrame:
        """Per factor, the variance of the decoder logits it explains across cells.

        Returns a DataFrame indexed by factor (``Z_k``) with ``variance``, ``fraction`` (of the
        total logit variance, covariates included) and ``rank``; ``sort=True`` orders the rows by
        decreasing variance (LDVAE's factors are otherwise unordered), so
        ``model.get_loadings()[frame.index]`` gives loadings ordered by importance.
        """
        cells = self._cells(adata)
        frame = tasks.factor_variance_explained(self.module, cells, self._indices(cells, indices))
        return frame.sort_values("variance", ascending=False) if sort else frame

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

    # ------------------------------------------------------------------------------------
    # Results into AnnData, persistence and import (see io.py)
    # ------------------------------------------------------------------------------------
    def to_adata(self, adata: AnnData | None = None, key: str = "ldvae") -> AnnData:
        """Write ``obsm['X_<key>']``, ``varm['<key>_loadings']`` and ``uns['<key>']`` (settings, history,
        variance explained) into ``adata`` (default: the training data) and return it."""
        from .io import write_results

        return write_results(self, self.adata if adata is None else adata, key)

    def save(
        self, dir_path: str, overwrite: bool = False, save_anndata: bool = False, prefix: str | None = None
    ) -> None:
        """Save weights, setup and history to ``dir_path`` atomically; see :func:`pyro_ldvae.io.save`."""
        from .io import save

        save(self, dir_path, overwrite=overwrite, save_anndata=save_anndata, prefix=prefix)

    @classmethod
    def load(
        cls, dir_path: str, adata: AnnData | None = None, accelerator: str = "auto", device: str | int = "auto",
        prefix: str | None = None, loadings_prior=None, z_prior=None,
    ) -> LinearSCVI:  # fmt: skip
        """Load a model saved by :meth:`save` (never unpickles code); see :func:`pyro_ldvae.io.load`.
        A model trained with a custom prior (a callable or object) needs it again: ``loadings_prior=``
        or ``z_prior=``."""
        from .io import load

        return load(
            dir_path, adata=adata, accelerator=accelerator, device=device, prefix=prefix,
            loadings_prior=loadings_prior, z_prior=z_prior,
        )  # fmt: skip

    @classmethod
    def from_scvi(cls, scvi_model, adata: AnnData | None = None) -> LinearSCVI:
        """Import a trained ``scvi.model.LinearSCVI`` (weights, setup, history); see
        :func:`pyro_ldvae.io.from_scvi`."""
        from .io import from_scvi

        return from_scvi(scvi_model, adata)


def _keeping_history_on_fault(model: LinearSCVI, train_fn):
    """``train_fn`` that, when the loss turns NaN (``FloatingPointError``), still records the
    history of the good epochs the module was rolled back to, then re-raises."""

    def run(*args, **kwargs):
        try:
            return train_fn(*args, **kwargs)
        except FloatingPointError as err:
            model.history_ = _append_history(model.history_, dict(getattr(err, "history", {})))
            model.module.eval()
            raise

    return run


def _append_history(old: dict[str, pd.DataFrame], new: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Continue epoch numbering when ``train`` is called again."""
    if not old:
        return new
    offset = max(len(v) for v in old.values())
    out = dict(old)
    for key, frame in new.items():
        frame = frame.set_axis(frame.index + offset)
        out[key] = pd.concat([old[key], frame]) if key in old else frame
    return out
