"""Scanpy-style tools: fit LDVAE and store the results in the AnnData, in one call."""

from __future__ import annotations

from collections.abc import Sequence

from anndata import AnnData

from ..infer.options import Accelerator, TrainOptions
from .linear_scvi import LinearSCVI


def ldvae(
    adata: AnnData,
    n_latent: int = 10,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    gene_likelihood: str = "nb",
    dispersion: str = "gene",
    max_epochs: int | None = None,
    batch_size: int = 128,
    accelerator: Accelerator = "auto",
    seed: int = 0,
    key_added: str = "ldvae",
    copy: bool = False,
    return_model: bool = False,
    progress_bar: bool = False,
    train_kwargs: dict | None = None,
    **model_kwargs,
) -> AnnData | LinearSCVI | None:
    """Fit LDVAE to the raw counts of ``adata`` and store the results, like ``sc.tl.pca``.

    Writes ``adata.obsm['X_<key_added>']`` (cells, n_latent), ``adata.varm['<key_added>_loadings']``
    (genes, n_latent) and ``adata.uns['<key_added>']`` (settings, history, variance explained),
    so that ``sc.pp.neighbors(adata, use_rep='X_ldvae')`` works directly.

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X`` or ``layer``.
    n_latent, gene_likelihood, dispersion, **model_kwargs
        Passed to :class:`~pyro_ldvae.LinearSCVI`.
    layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
        Passed to :meth:`~pyro_ldvae.LinearSCVI.setup_anndata`.
    max_epochs, batch_size, accelerator, seed, progress_bar, train_kwargs
        Passed to :meth:`~pyro_ldvae.LinearSCVI.train`; ``train_kwargs`` takes any of its options
        (``TrainOptions``: ``plan_kwargs``, ``datasplitter_kwargs``, ``callbacks``, scvi-tools'
        Lightning keywords as ``trainer_kwargs={...}``, ...), and an unknown name is a TypeError
        before any work is done.
    key_added
        Name under which results are stored.
    copy
        Work on (and return) a copy of ``adata``.
    return_model
        Return the fitted model (instead of None or the copy).

    Examples
    --------
    >>> import scanpy as sc, pyro_ldvae
    >>> adata = pyro_ldvae.datasets.pbmc68k_counts()
    >>> pyro_ldvae.tl.ldvae(adata, n_latent=10, max_epochs=50)
    >>> sc.pp.neighbors(adata, use_rep="X_ldvae"); sc.tl.umap(adata)
    """
    options = TrainOptions(
        max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, seed=seed, progress_bar=progress_bar
    ).replace(**(train_kwargs or {}))
    adata = adata.copy() if copy else adata
    LinearSCVI.setup_anndata(
        adata,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        categorical_covariate_keys=list(categorical_covariate_keys or []) or None,
        continuous_covariate_keys=list(continuous_covariate_keys or []) or None,
    )
    model = LinearSCVI(
        adata, n_latent=n_latent, gene_likelihood=gene_likelihood, dispersion=dispersion, seed=seed, **model_kwargs
    )
    model.train(**options.as_kwargs())
    model.to_adata(adata, key=key_added)
    if return_model:
        return model
    return adata if copy else None
