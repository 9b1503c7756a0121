"""Cells in memory and on the training device: counts and codes, cut into ``Minibatch`` objects by index.

The codes come from the setup registry (:mod:`pyro_ldvae.data.registry`), so a held-out split or a
query dataset is encoded exactly as the training data were.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from ..kernels.sparse import SparseCounts, scipy_to_torch_csr
from . import validate
from .minibatch import Minibatch
from .registry import Registry, category_codes, get_counts

logger = logging.getLogger(__name__)


def _as_float32_rows(matrix) -> sp.csr_matrix | np.ndarray:
    """CSR float32 for sparse input, C-contiguous float32 for dense; copies only when needed."""
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix) if not isinstance(matrix, (sp.csr_matrix, sp.csr_array)) else matrix
        if matrix.dtype != np.float32:
            matrix = matrix.astype(np.float32)
        return matrix
    return np.ascontiguousarray(np.asarray(matrix), dtype=np.float32)


class CellData:
    """Counts and codes of a set of cells; cuts ``Minibatch`` objects by index.

    Sparse counts stay sparse: each minibatch is cut from the CSR matrix in C (scipy's row
    fancy-indexing) and only that ``(cells, genes)`` block is densified.
    """

    def __init__(self, adata: AnnData, registry: Registry):
        self.registry = registry
        self.n_obs, self.n_vars = adata.n_obs, adata.n_vars
        self.X = self._read_counts(adata, registry)
        validate.check_count_values(self.X, validate.matrix_name(registry.layer), integers=registry.check_counts)
        self.batch = category_codes(adata, registry.batch_key, registry.batch_categories, "batch_key")
        self.labels = category_codes(adata, registry.labels_key, registry.label_categories, "labels_key")
        self.cat_covs = (
            np.stack(
                [
                    category_codes(adata, k, registry.covariate_categories[k], "categorical covariate")
                    for k in registry.categorical_covariate_keys
                ],
                axis=1,
            )
            if registry.categorical_covariate_keys
            else None
        )
        self.cont_covs = (
            validate.continuous_covariates(adata.obs, registry.continuous_covariate_keys)
            if registry.continuous_covariate_keys
            else None
        )

    def _read_counts(self, adata: AnnData, registry: Registry) -> sp.csr_matrix | np.ndarray:
        """The registered counts, in memory (``BackedCellData`` overrides this to keep them on disk)."""
        counts = _as_float32_rows(get_counts(adata, registry.layer))
        if sp.issparse(counts) and not counts.has_canonical_format:
            counts = counts.copy()
            counts.sum_duplicates()  # sparse likelihoods need one sorted entry per (cell, gene)
        return counts

    def library_sizes(self) -> np.ndarray:
        """Total counts per cell, ``(cells,)``."""
        return np.asarray(self.X.sum(axis=1)).ravel()

    def library_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log total counts, each ``(1, n_batch)`` (scvi-tools' rule)."""
        n_batch = self.registry.n_batch
        means, variances = np.zeros(n_batch), np.ones(n_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            log_sizes = self.library_sizes()
            np.log(log_sizes, out=log_sizes)  # in place: no second (cells,) array
        log_sizes[~np.isfinite(log_sizes)] = 0.0  # empty cells count as log 1, as scvi-tools does
        for b in np.unique(self.batch):
            in_batch = log_sizes[self.batch == b]
            means[b], variances[b] = np.mean(in_batch), np.var(in_batch)
        return means.reshape(1, -1).astype(np.float32), variances.reshape(1, -1).astype(np.float32)

    def dense_rows(self, idx: np.ndarray) -> np.ndarray:
        """Counts of cells ``idx`` as a dense ``(cells, genes)`` array."""
        rows = self.X[idx]
        return rows.toarray() if sp.issparse(rows) else rows

    def rows_tensor(self, idx: np.ndarray, device: torch.device | str = "cpu", sparse: bool = False) -> torch.Tensor:
        """Counts of cells ``idx`` on ``device``.

        ``(cells, genes)`` dense, or sparse CSR when ``sparse`` (cut in C by scipy, no Python loop). Dense input is made
        sparse per minibatch on that path, so every input format takes the same arithmetic and gives identical results.
        """
        if sparse:
            rows = self.X[idx] if sp.issparse(self.X) else sp.csr_matrix(self.dense_rows(idx))
            return scipy_to_torch_csr(rows, device)
        return torch.from_numpy(self.dense_rows(idx)).to(device)

    def minibatch(
        self,
        idx: np.ndarray,
        device: torch.device | str = "cpu",
        plate_idx: np.ndarray | None = None,
        sparse: bool = False,
        sparse_counts: bool = False,
    ) -> Minibatch:
        """The cells ``idx`` as tensors on ``device``; ``plate_idx`` (default ``idx``) indexes the plate.

        With ``sparse=True`` a sparse count matrix gives ``x`` as a torch sparse CSR tensor, which
        the likelihoods and encoders consume in O(non-zeros); the default is a dense ``x``. With
        ``sparse_counts=True`` a CSR matrix on CPU gives ``x`` as :class:`SparseCounts`, the traced
        training step's input, cut directly (``SparseCounts.from_scipy_rows``).
        """
        idx = np.asarray(idx)
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.int64)).to(device)  # noqa: E731
        if sparse_counts and torch.device(device).type == "cpu" and sp.issparse(self.X) and self.X.format == "csr":
            x = SparseCounts.from_scipy_rows(self.X, idx)
        else:
            x = self.rows_tensor(idx, device, sparse or sparse_counts)
        return Minibatch(
            x=x,
            batch=as_long(self.batch),
            labels=as_long(self.labels),
            cat_covs=None if self.cat_covs is None else as_long(self.cat_covs),
            cont_covs=None if self.cont_covs is None else torch.from_numpy(self.cont_covs[idx]).to(device),
            idx=torch.from_numpy(np.arange(len(idx)) if plate_idx is None else np.asarray(plate_idx)).to(device),
        )

    def iter_minibatches(
        self, indices: np.ndarray, batch_size: int, device: torch.device | str = "cpu", sparse: bool = False
    ):
        """Consecutive minibatches over ``indices`` in order (for inference)."""
        for start in range(0, len(indices), batch_size):
            yield self.minibatch(indices[start : start + batch_size], device, sparse=sparse)


class DeviceCells:
    """The counts and codes of a ``CellData``, resident on ``device``; minibatches are cut there.

    On a GPU the whole matrix is copied to GPU memory once and every minibatch is gathered on the
    device with a few vectorised index operations, so training does no host-to-device copy of
    counts per step. ``dense=True`` stores the counts as a dense ``(cells, genes)`` matrix
    (written from sparse data a block of rows at a time): a minibatch is then one row gather.
    Otherwise sparse counts stay a CSR triplet (a third of the memory at 10% non-zeros); a
    sparse minibatch then reads its number of non-zeros back to the host, and
    ``fixed_shape_rows`` cuts a dense one without doing so, for a CUDA graph (see
    ``cuda_graph``). It works on ``device='cpu'`` too (that is how it is tested) and yields the
    same minibatches as ``CellData.minibatch``.
    """

    # Rows densified per host-to-device copy: bounds the host memory the dense layout takes.
    DENSIFY_ELEMENTS = 1 << 25

    def __init__(self, cells: CellData, device: torch.device | str = "cpu", dense: bool = False):
        self.device = torch.device(device)
        self.n_obs, self.n_vars = cells.n_obs, cells.n_vars
        self.sparse = sp.issparse(cells.X) and not dense
        self._capacity: dict[int, int] = {}
        if self.sparse:
            self.crow = torch.from_numpy(cells.X.indptr.astype(np.int64)).to(self.device)  # (cells + 1,)
            self.col = torch.from_numpy(cells.X.indices.astype(np.int64)).to(self.device)  # (nnz,)
            self.val = torch.from_numpy(cells.X.data).to(self.device)  # (nnz,)
        elif sp.issparse(cells.X):
            self.X = torch.empty(
                (self.n_obs, self.n_vars), dtype=torch.from_numpy(cells.X.data[:0]).dtype, device=self.device
            )
            step = max(1, self.DENSIFY_ELEMENTS // max(self.n_vars, 1))
            for start in range(0, self.n_obs, step):
                self.X[start : start + step] = torch.from_numpy(cells.X[start : start + step].toarray())
        else:
            self.X = torch.from_numpy(cells.X).to(self.device)  # (cells, genes)
        as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        as_long = lambda a: None if a is None else as_tensor(a).long()  # noqa: E731
        self.batch, self.labels = as_long(cells.batch), as_long(cells.labels)
        self.cat_covs, self.cont_covs = as_long(cells.cat_covs), as_tensor(cells.cont_covs)

    @staticmethod
    def fits(cells: CellData, device: torch.device | str, fraction: float = 0.5, dense: bool = False) -> bool:
        """Whether the counts (as stored, or ``dense``) fit in ``fraction`` of the device's free memory.

        Always true on CPU.
        """
        device = torch.device(device)
        if device.type != "cuda":
            return True
        if dense or not sp.issparse(cells.X):
            n_bytes = cells.n_obs * cells.n_vars * cells.X.dtype.itemsize
        else:
            n_bytes = cells.X.data.nbytes + cells.X.indices.nbytes * 2
        return n_bytes <= fraction * torch.cuda.mem_get_info(device)[0]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Counts of cells ``idx`` ``(cells,)``: sparse CSR ``(cells, genes)`` (dense if stored dense)."""
        if not self.sparse:
            return self.X[idx]
        starts = self.crow[idx]
        lengths = self.crow[idx + 1] - starts
        crow = torch.zeros(len(idx) + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lengths, 0, out=crow[1:])
        nnz = int(crow[-1])
        # entry k of the new row r sits at starts[r] + (k - crow[r]) in the full matrix
        shift = torch.repeat_interleave(starts - crow[:-1], lengths, output_size=nnz)
        positions = torch.arange(nnz, device=self.device) + shift
        return torch.sparse_csr_tensor(
            crow, self.col[positions], self.val[positions], size=(len(idx), self.n_vars), check_invariants=False
        )

    def fixed_shape_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Counts of cells ``idx`` as a dense ``(cells, genes)`` matrix.

        Shapes depend only on ``len(idx)``: no host synchronisation, so a CUDA graph can capture it.

        From CSR, the minibatch's entries are gathered into ``capacity(len(idx))`` slots (the most
        non-zeros any ``len(idx)`` cells hold); the slots past the minibatch's own non-zeros add
        zeros to the result.
        """
        if not self.sparse:
            return self.X[idx]
        n_cells, n_slots = len(idx), self.capacity(len(idx))
        starts = self.crow[idx]
        lengths = self.crow[idx + 1] - starts
        ends = torch.cumsum(lengths, 0)  # end of each cell's entries among the minibatch's
        slot = torch.arange(n_slots, device=self.device)
        row = torch.searchsorted(ends, slot, right=True)  # the cell of each slot; n_cells past the end
        filled = row < n_cells
        row = row.clamp(max=n_cells - 1)
        source = (starts[row] + slot - (ends[row] - lengths[row])).clamp(max=len(self.col) - 1)
        dense = torch.zeros(n_cells * self.n_vars, dtype=self.val.dtype, device=self.device)
        # added, not written: an empty slot adds 0 at a real entry's position instead of
        # overwriting it (index_add_ is an atomic add on CUDA; index_put_ would sort the indices)
        dense.index_add_(0, row * self.n_vars + self.col[source], self.val[source] * filled)
        return dense.view(n_cells, self.n_vars)

    def capacity(self, n_cells: int) -> int:
        """The most non-zeros that any ``n_cells`` cells hold together (computed once per size)."""
        if not self.sparse:
            return n_cells * self.n_vars
        if n_cells not in self._capacity:
            per_cell = self.crow[1:] - self.crow[:-1]
            self._capacity[n_cells] = max(1, int(torch.topk(per_cell, min(n_cells, self.n_obs)).values.sum()))
        return self._capacity[n_cells]

    def minibatch(
        self, idx: torch.Tensor, plate_idx: torch.Tensor | None = None, fixed_shapes: bool = False
    ) -> Minibatch:
        """Minibatch of cells ``idx`` (an int64 tensor on the device).

        ``x`` sparse CSR when stored sparse, unless ``fixed_shapes`` asks for a dense ``x`` cut without host
        synchronisation.
        """
        idx = torch.as_tensor(idx, device=self.device)
        take = lambda a: None if a is None else a[idx]  # noqa: E731
        return Minibatch(
            x=self.fixed_shape_rows(idx) if fixed_shapes else self.rows(idx),
            batch=self.batch[idx],
            labels=self.labels[idx],
            cat_covs=take(self.cat_covs),
            cont_covs=take(self.cont_covs),
            idx=torch.arange(len(idx), device=self.device)
            if plate_idx is None
            else torch.as_tensor(plate_idx, device=self.device),
        )
