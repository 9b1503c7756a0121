"""``LinearSCVI``: the AnnData-level model, a drop-in for ``scvi.model.LinearSCVI``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import data as data_mod
from .module import LDVAE
from .train import TrainingPlan, evaluate_elbo, split_indices, train_svi

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
        self.registry = data_mod.get_registry(adata)
        self.seed = seed
        self.var_names = pd.Index(adata.var_names)
        cells = data_mod.cell_data(adata, self.registry)
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
        self._data_cache: tuple[int, data_mod.CellData] | None = (id(adata), cells)

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
        """
        data_mod.register(
            adata, layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
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
    def _cells(self, adata: AnnData | None) -> data_mod.CellData:
        """The registered cells of ``adata`` (default: the training AnnData), checked against the model."""
        adata = self.adata if adata is None else adata
        if self._data_cache is not None and self._data_cache[0] == id(adata):
            return self._data_cache[1]
        if list(adata.var_names) != list(self.var_names):
            raise ValueError(
                "adata.var_names differ from the genes the model was trained on; "
                "subset and order the genes as in model.var_names (adata[:, model.var_names])."
            )
        cells = data_mod.cell_data(adata, self.registry)
        self._data_cache = (id(adata), cells)
        return cells

    def _indices(self, cells: data_mod.CellData, indices: Sequence[int] | None) -> np.ndarray:
        return np.arange(cells.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)

    # ------------------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
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
        """
        cells = self._cells(None)
        n_obs = cells.n_obs
        if max_epochs is None:
            max_epochs = int(min(round(20000 / n_obs * 400), 400))
        seed = self.seed if seed is None else seed
        plan = TrainingPlan(**(plan_kwargs or {}))
        train_idx, val_idx = split_indices(n_obs, train_size, validation_size, batch_size, seed, shuffle_set_split)
        self.train_indices, self.validation_indices = train_idx, val_idx
        history = train_svi(
            self.module,
            cells,
            train_idx,
            val_idx,
            max_epochs=max_epochs,
            plan=plan,
            batch_size=batch_size,
            device=resolve_device(accelerator, device),
            seed=seed,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            early_stopping_min_delta=early_stopping_min_delta,
            progress_bar=progress_bar,
            check_val_every_n_epoch=check_val_every_n_epoch,
        )
        self.history_ = _append_history(self.history_, history)
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
        locs, variances, outs = [], [], []
        for mb in cells.iter_minibatches(self._indices(cells, indices), batch_size or 128, module.device, sparse=True):
            q = module.encode(mb.x)
            locs.append(q["z_loc"].cpu())
            variances.append(q["z_var"].cpu())
            if return_dist:
                continue
            normal = torch.distributions.Normal(q["z_loc"], q["z_var"].sqrt())
            if give_mean and module.latent_distribution == "ln":
                z = module.z_transform(normal.sample((mc_samples,))).mean(0)
            elif give_mean:
                z = q["z_loc"]
            else:
                z = module.z_transform(normal.sample())
            outs.append(z.cpu())
        if return_dist:
            return torch.cat(locs).numpy(), torch.cat(variances).numpy()
        return torch.cat(outs).numpy()

    def get_loadings(self) -> pd.DataFrame:
        """Per-gene loadings ``(genes, n_latent)`` with the decoder batch norm folded in (scvi-tools' definition)."""
        columns = [f"Z_{i}" for i in range(self.n_latent)]
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
