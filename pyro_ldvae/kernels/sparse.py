"""Sparse count matrices as plain tensors, and CSR helpers (pure torch and scipy, no Pyro)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch

try:  # scipy's C kernels behind csr_matrix.tocsc() and row indexing; private, so the public routes are kept
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
    from scipy.sparse._sparsetools import csr_tocsc as _csr_tocsc
except ImportError:
    _csr_row_index = _csr_tocsc = None

# Minibatch counts travel as torch sparse CSR tensors, whose API torch still labels beta.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


# ---------------------------------------------------------------------------------------------
# Sparse observations. Single-cell counts are 90-95% zeros, and at x = 0 every count term of the
# densities vanishes (lgamma(0 + theta) - lgamma(theta) = 0, 0 * log(.) = 0, lgamma(1) = 0). The
# log-density of a sparse count matrix is therefore computed as the cheap x = 0 case over all
# (cells, genes) entries, with the full formula (lgamma, digamma in the gradient) evaluated only
# at the stored non-zeros and written over those entries. The elementwise result is the dense
# formula's, to float precision; the full formula at the non-zeros is the very same function
# (log_nb, log_zinb, log_poisson), applied to gathered values.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseCounts:
    """A minibatch's sparse counts as plain tensors: CSR ``(cells, genes)`` and its transpose.

    The traced CPU training step (:mod:`pyro_ldvae.traced_step`) takes its counts in this form,
    because graph tracing accepts only strided tensors, not torch's sparse CSR layout. Each
    field is a dense 1-D tensor: ``crow`` ``(cells + 1,)``, and per non-zero in row-major order
    ``row``, ``col`` and ``val``; the transpose (CSR of ``(genes, cells)``) is ``crow_t``
    ``(genes + 1,)`` with ``col_t`` (the cell of each entry) and ``val_t``. The data path builds
    the transpose with scipy, outside the step: the encoders' weight gradient ``x.T @ grad`` reads
    it (``nn._sparse_t_matmul``), and computing it inside the step would need a sort.
    """

    crow: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    val_t: torch.Tensor
    shape: torch.Size

    @classmethod
    def from_csr_arrays(
        cls, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, shape: tuple[int, int]
    ) -> SparseCounts:
        """From the arrays of a CSR matrix; the indices become int64, the values float32."""
        n_rows, n_cols = shape
        indptr = np.asarray(indptr).astype(np.int64, copy=False)
        indices = np.asarray(indices).astype(np.int64, copy=False)
        values = np.asarray(values, dtype=np.float32)
        t_indptr, t_indices, t_values = csr_transpose_arrays(n_rows, n_cols, indptr, indices, values)
        as_tensor = torch.from_numpy
        return cls(
            crow=as_tensor(indptr),
            row=as_tensor(np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))),
            col=as_tensor(indices),
            val=as_tensor(values),
            crow_t=as_tensor(t_indptr),
            col_t=as_tensor(t_indices),
            val_t=as_tensor(t_values),
            shape=torch.Size(shape),
        )

    @classmethod
    def from_scipy(cls, matrix: sp.csr_matrix) -> SparseCounts:
        """Sparse counts from a scipy CSR matrix (copied into torch tensors)."""
        return cls.from_csr_arrays(matrix.indptr, matrix.indices, matrix.data, matrix.shape)

    @classmethod
    def from_scipy_rows(cls, matrix: sp.csr_matrix, rows: np.ndarray) -> SparseCounts:
        """The rows ``rows`` of a CSR matrix, the same as ``from_scipy(matrix[rows])``.

        scipy's C row gather writes the minibatch's arrays directly, skipping scipy's indexing and a
        torch CSR tensor, since this runs on every training step of the traced path.
        """
        indptr = matrix.indptr
        if _csr_row_index is None or indptr.dtype != matrix.indices.dtype:
            return cls.from_scipy(matrix[rows])
        rows = np.asarray(rows, dtype=indptr.dtype)
        starts = indptr[rows]
        row_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(indptr[rows + 1] - starts, out=row_indptr[1:])
        indices = np.empty(row_indptr[-1], dtype=matrix.indices.dtype)
        values = np.empty(row_indptr[-1], dtype=matrix.data.dtype)
        _csr_row_index(len(rows), rows, indptr, matrix.indices, matrix.data, indices, values)
        return cls.from_csr_arrays(row_indptr, indices, values, (len(rows), matrix.shape[1]))

    @classmethod
    def from_torch_csr(cls, x: torch.Tensor) -> SparseCounts:
        """From a torch sparse CSR tensor on CPU (the arrays are read without a copy)."""
        return cls.from_csr_arrays(
            x.crow_indices().numpy(), x.col_indices().numpy(), x.values().detach().numpy(), tuple(x.shape)
        )

    def map_values(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseCounts:
        """The same non-zeros with ``fn`` applied to their values (``fn(0)`` must be 0, as log1p's)."""
        return replace(self, val=fn(self.val), val_t=fn(self.val_t))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The CSR arrays and those of the transpose, in the order the replayed step takes them."""
        return (self.crow, self.row, self.col, self.val, self.crow_t, self.col_t, self.val_t)

    @property
    def device(self) -> torch.device:
        """The device the counts are on."""
        return self.val.device

    def to_dense(self) -> torch.Tensor:
        """The counts as a dense ``(cells, genes)`` tensor."""
        return self.val.new_zeros(self.shape).index_put_((self.row, self.col), self.val)


def csr_transpose_arrays(
    n_rows: int, n_cols: int, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays of the transpose ``(n_cols, n_rows)`` of a CSR matrix, by scipy's C routine."""
    if _csr_tocsc is not None and indptr.dtype == indices.dtype:
        # scipy's C routine on the arrays as they are, skipping csr_matrix's constructor checks
        # and conversions.
        t_indptr = np.empty(n_cols + 1, dtype=indptr.dtype)
        t_indices = np.empty(len(indices), dtype=indices.dtype)
        t_values = np.empty(len(values), dtype=values.dtype)
        _csr_tocsc(n_rows, n_cols, indptr, indices, values, t_indptr, t_indices, t_values)
        return t_indptr, t_indices, t_values
    transposed = sp.csr_matrix((values, indices, indptr), shape=(n_rows, n_cols)).tocsc()  # CSC of x = CSR of x.T
    return transposed.indptr, transposed.indices, transposed.data


def is_sparse_counts(value: object) -> bool:
    """True for sparse counts.

    A torch sparse CSR tensor (a minibatch cut from a sparse matrix) or :class:`SparseCounts` (the traced step's).
    """
    return isinstance(value, SparseCounts) or (isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr)


def log1p_counts(x: torch.Tensor | SparseCounts) -> torch.Tensor | SparseCounts:
    """``log1p(x)`` for dense, sparse CSR or :class:`SparseCounts` counts (zeros stay zeros)."""
    return x.map_values(torch.log1p) if isinstance(x, SparseCounts) else torch.log1p(x)


def csr_entries(value: torch.Tensor | SparseCounts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices, column indices and values ``(nnz,)`` of a sparse CSR matrix, without a host sync.

    The indices are cached on ``value``: the encoders, the library and the likelihood all read one
    minibatch. ``values()`` is not: stored in ``value``'s ``__dict__`` it forms a reference cycle
    through C++ that Python's garbage collector cannot see, and every minibatch stayed in memory.
    """
    if isinstance(value, SparseCounts):
        return value.row, value.col, value.val
    cached = getattr(value, "_coo_indices", None)
    if cached is None:
        rows = value.to_sparse_coo().indices()[0]  # CSR order is row-major: the same order as values()
        value._coo_indices = cached = (rows, value.col_indices())
    return cached[0], cached[1], value.values()


def total_counts(x: torch.Tensor) -> torch.Tensor:
    """Counts per cell ``(cells,)`` of a dense or sparse CSR ``(cells, genes)`` matrix."""
    if is_sparse_counts(x):
        rows, _, vals = csr_entries(x)
        return vals.new_zeros(x.shape[0]).index_add_(0, rows, vals)
    return x.sum(-1)


def scipy_to_torch_csr(matrix: sp.csr_matrix | sp.csr_array, device: torch.device | str = "cpu") -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor (int64 indices); shares memory on CPU."""
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64, copy=False)),
        torch.from_numpy(matrix.indices.astype(np.int64, copy=False)),
        torch.from_numpy(np.asarray(matrix.data, dtype=np.float32)),
        size=matrix.shape,
        check_invariants=False,
    ).to(device)
